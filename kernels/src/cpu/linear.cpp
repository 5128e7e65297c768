#include "shoal/kernels/linear.hpp"

#include "shoal/kernels/thread_pool.hpp"

#include "blas.hpp"
#include "gemm_bf16.hpp"
#include "simd.hpp"

#include <algorithm>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace shoal::kernels {
namespace {

// Below this many tokens each weight row is streamed once through SIMD dot products (decode);
// at or above it, dequantized tiles feed a BLAS GEMM (prefill).
constexpr std::int64_t kGemmMinTokens = 16;
// Tokens handled per pass over a weight row in the streaming path (accumulators in registers).
constexpr int kMaxTokensPerPass = 8;
// Below this many multiply-adds a parallel region costs more than it saves.
constexpr std::int64_t kMinParallelWork = 1 << 16;
// Rows dequantized per GEMM tile.
constexpr std::int64_t kGemmTileRows = 64;

#if defined(__x86_64__)
// GCC 12 flags its own AVX-512 intrinsic headers (an undefined-vector idiom) as uninitialized use.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define SHOAL_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,f16c,fma")))
// For the loops over the tokens of a pass: fully unrolled, the accumulators stay in registers
// (GCC at -O2 keeps such arrays in memory, and every multiply-add then loads and stores).
#define SHOAL_UNROLL _Pragma("GCC unroll 8")

// 16 E4M3 bytes to fp32 times 2^-8, exactly: sign-extending each byte to 16 bits and shifting
// left by 7 lands exponent and mantissa where an f16 keeps them and the sign in bit 15; the
// AND clears the copy of the sign that lands in the f16 exponent's top bit.
SHOAL_AVX512 inline __m512 fp8_to_scaled_f32(__m128i bytes) {
  const __m256i wide = _mm256_cvtepi8_epi16(bytes);
  return _mm512_cvtph_ps(_mm256_and_si256(_mm256_slli_epi16(wide, 7), _mm256_set1_epi16(static_cast<short>(0xBFFF))));
}

// Loads 16 weights as fp32. FP8 comes back as its value times 2^-8: e4m3 bits are moved into
// an f16 layout, which converts exactly; the 2^8 is folded into the block scale.
template <dtype T>
SHOAL_AVX512 inline __m512 load16(const void* base, std::int64_t index) {
  if constexpr (T == dtype::f32) {
    return _mm512_loadu_ps(static_cast<const float*>(base) + index);
  } else if constexpr (T == dtype::bf16) {
    const __m256i raw = _mm256_loadu_si256(
        reinterpret_cast<const __m256i*>(static_cast<const std::uint16_t*>(base) + index));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
  } else if constexpr (T == dtype::f16) {
    const __m256i raw = _mm256_loadu_si256(
        reinterpret_cast<const __m256i*>(static_cast<const std::uint16_t*>(base) + index));
    return _mm512_cvtph_ps(raw);
  } else {
    const __m128i raw = _mm_loadu_si128(
        reinterpret_cast<const __m128i*>(static_cast<const std::uint8_t*>(base) + index));
    return fp8_to_scaled_f32(raw);
  }
}

template <dtype T>
SHOAL_AVX512 inline __m512 load16_masked(const void* base, std::int64_t index, __mmask16 mask) {
  if constexpr (T == dtype::f32) {
    return _mm512_maskz_loadu_ps(mask, static_cast<const float*>(base) + index);
  } else if constexpr (T == dtype::bf16) {
    const __m256i raw =
        _mm256_maskz_loadu_epi16(mask, static_cast<const std::uint16_t*>(base) + index);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
  } else if constexpr (T == dtype::f16) {
    const __m256i raw =
        _mm256_maskz_loadu_epi16(mask, static_cast<const std::uint16_t*>(base) + index);
    return _mm512_cvtph_ps(raw);
  } else {
    const __m128i raw = _mm_maskz_loadu_epi8(mask, static_cast<const std::uint8_t*>(base) + index);
    return fp8_to_scaled_f32(raw);
  }
}

// Dot products of one weight row with N token vectors; the row is read once.
template <int N, dtype T>
SHOAL_AVX512 void dot_row_avx512(const linear_params& p, std::int64_t row, std::int64_t token0,
                                 std::int64_t x_stride, std::int64_t y_stride) {
  const matrix_view& w = p.weight;
  const std::int64_t cols = w.cols;
  const void* row_data =
      static_cast<const std::uint8_t*>(w.data) + row * cols * static_cast<std::int64_t>(dtype_size(T));
  const float* x = p.x + token0 * x_stride;
  const float* scales = nullptr;
  std::int64_t block = cols;
  if constexpr (T == dtype::f8_e4m3) {
    scales = w.scale_inv + (row / matrix_view::kBlock) * w.scale_cols();
    block = matrix_view::kBlock;
  }
  __m512 total[N];
  SHOAL_UNROLL for (int t = 0; t < N; ++t) total[t] = _mm512_setzero_ps();
  for (std::int64_t c0 = 0; c0 < cols; c0 += block) {
    const std::int64_t c1 = std::min(cols, c0 + block);
    __m512 acc0[N], acc1[N];
    SHOAL_UNROLL for (int t = 0; t < N; ++t) acc0[t] = acc1[t] = _mm512_setzero_ps();
    std::int64_t c = c0;
    for (; c + 32 <= c1; c += 32) {
      const __m512 w0 = load16<T>(row_data, c);
      const __m512 w1 = load16<T>(row_data, c + 16);
      SHOAL_UNROLL for (int t = 0; t < N; ++t) {
        acc0[t] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + t * x_stride + c), acc0[t]);
        acc1[t] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + t * x_stride + c + 16), acc1[t]);
      }
    }
    for (; c < c1; c += 16) {
      const std::int64_t left = std::min<std::int64_t>(16, c1 - c);
      const __mmask16 mask = static_cast<__mmask16>((1u << left) - 1u);
      const __m512 w0 = load16_masked<T>(row_data, c, mask);
      SHOAL_UNROLL for (int t = 0; t < N; ++t)
        acc0[t] = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(mask, x + t * x_stride + c), acc0[t]);
    }
    if constexpr (T == dtype::f8_e4m3) {
      const __m512 scale = _mm512_set1_ps(scales[c0 / matrix_view::kBlock] * 256.0f);
      SHOAL_UNROLL for (int t = 0; t < N; ++t)
        total[t] = _mm512_fmadd_ps(_mm512_add_ps(acc0[t], acc1[t]), scale, total[t]);
    } else {
      SHOAL_UNROLL for (int t = 0; t < N; ++t) total[t] = _mm512_add_ps(acc0[t], acc1[t]);
    }
  }
  SHOAL_UNROLL for (int t = 0; t < N; ++t) {
    const float value = _mm512_reduce_add_ps(total[t]);
    float& out = p.y[(token0 + t) * y_stride + row];
    out = p.accumulate ? out + value : value;
  }
}

template <dtype T>
SHOAL_AVX512 void stream_rows_avx512(const linear_params& p, std::int64_t row_begin,
                                     std::int64_t row_end, std::int64_t xs, std::int64_t ys) {
  for (std::int64_t t0 = 0; t0 < p.tokens; t0 += kMaxTokensPerPass) {
    const int n = static_cast<int>(std::min<std::int64_t>(kMaxTokensPerPass, p.tokens - t0));
    for (std::int64_t r = row_begin; r < row_end; ++r) {
      switch (n) {
        case 1: dot_row_avx512<1, T>(p, r, t0, xs, ys); break;
        case 2: dot_row_avx512<2, T>(p, r, t0, xs, ys); break;
        case 3: dot_row_avx512<3, T>(p, r, t0, xs, ys); break;
        case 4: dot_row_avx512<4, T>(p, r, t0, xs, ys); break;
        case 5: dot_row_avx512<5, T>(p, r, t0, xs, ys); break;
        case 6: dot_row_avx512<6, T>(p, r, t0, xs, ys); break;
        case 7: dot_row_avx512<7, T>(p, r, t0, xs, ys); break;
        default: dot_row_avx512<8, T>(p, r, t0, xs, ys); break;
      }
    }
  }
}
#endif  // __x86_64__

// Portable streaming path: dequantize a row once, then dot it with each token.
void stream_rows_portable(const linear_params& p, std::int64_t row_begin, std::int64_t row_end,
                          std::int64_t xs, std::int64_t ys) {
  std::vector<float> row(p.weight.cols);
  for (std::int64_t r = row_begin; r < row_end; ++r) {
    dequantize_row(p.weight, r, 0, p.weight.cols, row.data());
    for (std::int64_t t = 0; t < p.tokens; ++t) {
      const float* x = p.x + t * xs;
      float partial[8] = {};
      std::int64_t c = 0;
      for (; c + 8 <= p.weight.cols; c += 8)
        for (int j = 0; j < 8; ++j) partial[j] += row[c + j] * x[c + j];
      float sum = 0.0f;
      for (float value : partial) sum += value;
      for (; c < p.weight.cols; ++c) sum += row[c] * x[c];
      float& out = p.y[t * ys + r];
      out = p.accumulate ? out + sum : sum;
    }
  }
}

void stream_rows(const linear_params& p, std::int64_t row_begin, std::int64_t row_end,
                 std::int64_t xs, std::int64_t ys) {
#if defined(__x86_64__)
  if (detail::cpu_has_avx512()) {
    switch (p.weight.type) {
      case dtype::f32: return stream_rows_avx512<dtype::f32>(p, row_begin, row_end, xs, ys);
      case dtype::bf16: return stream_rows_avx512<dtype::bf16>(p, row_begin, row_end, xs, ys);
      case dtype::f16: return stream_rows_avx512<dtype::f16>(p, row_begin, row_end, xs, ys);
      case dtype::f8_e4m3:
        return stream_rows_avx512<dtype::f8_e4m3>(p, row_begin, row_end, xs, ys);
    }
  }
#endif
  stream_rows_portable(p, row_begin, row_end, xs, ys);
}

void gemm_rows(const linear_params& p, std::int64_t row_begin, std::int64_t row_end,
               std::int64_t xs, std::int64_t ys) {
  const std::int64_t cols = p.weight.cols;
  thread_local std::vector<float> tile;
  for (std::int64_t r0 = row_begin; r0 < row_end; r0 += kGemmTileRows) {
    const std::int64_t rows = std::min(kGemmTileRows, row_end - r0);
    const float* b = nullptr;
    if (p.weight.type == dtype::f32) {
      b = static_cast<const float*>(p.weight.data) + r0 * cols;
    } else {
      tile.resize(static_cast<std::size_t>(rows * cols));
      for (std::int64_t r = 0; r < rows; ++r)
        dequantize_row(p.weight, r0 + r, 0, cols, tile.data() + r * cols);
      b = tile.data();
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(p.tokens),
                static_cast<int>(rows), static_cast<int>(cols), 1.0f, p.x, static_cast<int>(xs), b,
                static_cast<int>(cols), p.accumulate ? 1.0f : 0.0f, p.y + r0,
                static_cast<int>(ys));
  }
}

void linear_rows(const linear_params& p, std::int64_t row_begin, std::int64_t row_end) {
  const std::int64_t xs = p.x_stride ? p.x_stride : p.weight.cols;
  const std::int64_t ys = p.y_stride ? p.y_stride : p.weight.rows;
  if (p.tokens >= kGemmMinTokens) {
    detail::ensure_blas_single_threaded();
    gemm_rows(p, row_begin, row_end, xs, ys);
  } else {
    stream_rows(p, row_begin, row_end, xs, ys);
  }
}

bool use_bf16_gemm(const linear_params& p) { return detail::bf16_gemm_applies(p.weight); }

detail::gemm_bf16_params bf16_params(const linear_params& p, const detail::bf16_activations& x) {
  return {.x = x.data.data(),
          .x_stride = x.stride,
          .weight = p.weight,
          .y = p.y,
          .tokens = p.tokens,
          .y_stride = p.y_stride ? p.y_stride : p.weight.rows,
          .accumulate = p.accumulate};
}

}  // namespace

void linear(thread_pool& pool, const linear_params& params) {
  if (params.tokens <= 0 || params.weight.rows <= 0) return;
  if (use_bf16_gemm(params)) {
    thread_local detail::bf16_activations x;
    detail::bf16_split(params.x, params.tokens, params.weight.cols,
                       params.x_stride ? params.x_stride : params.weight.cols, x, &pool);
    const auto g = bf16_params(params, x);
    if (params.tokens * params.weight.rows * params.weight.cols < kMinParallelWork) {
      detail::gemm_bf16_rows(g, 0, params.weight.rows);
      return;
    }
    const std::int64_t granules = (params.weight.rows + 15) / 16;
    pool.parallel_for(granules, [&](std::int64_t begin, std::int64_t end) {
      detail::gemm_bf16_rows(g, begin * 16, std::min(end * 16, params.weight.rows));
    });
    return;
  }
  if (params.tokens * params.weight.rows * params.weight.cols < kMinParallelWork) {
    linear_rows(params, 0, params.weight.rows);
    return;
  }
  // Split rows in multiples of 16 so FP8 blocks and cache lines are not shared across threads.
  const std::int64_t granules = (params.weight.rows + 15) / 16;
  pool.parallel_for(granules, [&](std::int64_t begin, std::int64_t end) {
    linear_rows(params, begin * 16, std::min(end * 16, params.weight.rows));
  });
}

void linear_serial(const linear_params& params) {
  if (params.tokens <= 0 || params.weight.rows <= 0) return;
  if (use_bf16_gemm(params)) {
    thread_local detail::bf16_activations x;
    detail::bf16_split(params.x, params.tokens, params.weight.cols,
                       params.x_stride ? params.x_stride : params.weight.cols, x);
    detail::gemm_bf16_rows(bf16_params(params, x), 0, params.weight.rows);
    return;
  }
  linear_rows(params, 0, params.weight.rows);
}

namespace reference {
void linear(const linear_params& p) {
  const std::int64_t xs = p.x_stride ? p.x_stride : p.weight.cols;
  const std::int64_t ys = p.y_stride ? p.y_stride : p.weight.rows;
  for (std::int64_t t = 0; t < p.tokens; ++t)
    for (std::int64_t r = 0; r < p.weight.rows; ++r) {
      float sum = 0.0f;
      for (std::int64_t c = 0; c < p.weight.cols; ++c) sum += p.x[t * xs + c] * p.weight.at(r, c);
      float& out = p.y[t * ys + r];
      out = p.accumulate ? out + sum : sum;
    }
}
}  // namespace reference

}  // namespace shoal::kernels
