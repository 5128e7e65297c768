#include "gemm_bf16.hpp"

#include "shoal/kernels/thread_pool.hpp"

#include <algorithm>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__)
#include <immintrin.h>
// GCC 12 flags its own AVX-512 intrinsic headers (an undefined-vector idiom) as uninitialized use.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace shoal::kernels::detail {
namespace {

// Weight rows per tile. Four rows of a 2048-wide matrix (16 KiB) stay in L1 while the tile
// sweeps over a block of tokens.
constexpr int kTileRows = 4;
// Accumulators per tile (of the 32 vector registers; the rest hold the weights and one
// activation vector).
constexpr int kTileAccumulators = 24;
// Split activations of one token block kept in L2 while every weight row passes over them.
constexpr std::int64_t kTokenBlockBytes = 256 << 10;

#if defined(__x86_64__)
#define SHOAL_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#define SHOAL_UNROLL _Pragma("GCC unroll 32")

template <int P>
constexpr int max_tile_tokens() {
  return kTileAccumulators / (kTileRows * P);
}

template <int P, int R, int T>
SHOAL_AVX512_BF16 __attribute__((always_inline)) inline void tile_step(__m512 (&acc)[P][R][T], const __m512i (&wv)[R],
                                                                     const std::uint16_t* x, std::int64_t xs,
                                                                     std::int64_t c) {
  SHOAL_UNROLL for (int t = 0; t < T; ++t) SHOAL_UNROLL for (int q = 0; q < P; ++q) {
      const __m512bh xv = reinterpret_cast<__m512bh>(_mm512_loadu_si512(x + (t * P + q) * xs + c));
      SHOAL_UNROLL for (int r = 0; r < R; ++r)
        acc[q][r][t] = _mm512_dpbf16_ps(acc[q][r][t], reinterpret_cast<__m512bh>(wv[r]), xv);
    }
}

// The R x T outputs of rows r0.. and tokens t0..: each weight vector is loaded once per
// 32 columns and meets every part of every token of the tile. Each output owns P
// accumulators (one per part) that see the same sequence of operations for any R and T.
template <int P, int R, int T>
SHOAL_AVX512_BF16 void tile(const gemm_bf16_params& p, std::int64_t r0, std::int64_t t0) {
  const std::int64_t cols = p.weight.cols;
  const std::uint16_t* w = static_cast<const std::uint16_t*>(p.weight.data) + r0 * cols;
  const std::int64_t xs = p.x_stride;
  const std::uint16_t* x = p.x + t0 * P * xs;
  __m512 acc[P][R][T];
  SHOAL_UNROLL for (int q = 0; q < P; ++q) SHOAL_UNROLL for (int r = 0; r < R; ++r) SHOAL_UNROLL for (int t = 0; t < T; ++t)
      acc[q][r][t] = _mm512_setzero_ps();
  std::int64_t c = 0;
  for (; c + 32 <= cols; c += 32) {
    __m512i wv[R];
    SHOAL_UNROLL for (int r = 0; r < R; ++r) wv[r] = _mm512_loadu_si512(w + r * cols + c);
    tile_step<P, R, T>(acc, wv, x, xs, c);
  }
  if (c < cols) {
    // Masked-off weights read as zero; the activations there are zero padding.
    const __mmask32 mask = static_cast<__mmask32>((std::uint64_t{1} << (cols - c)) - 1u);
    __m512i wv[R];
    SHOAL_UNROLL for (int r = 0; r < R; ++r) wv[r] = _mm512_maskz_loadu_epi16(mask, w + r * cols + c);
    tile_step<P, R, T>(acc, wv, x, xs, c);
  }
  SHOAL_UNROLL for (int r = 0; r < R; ++r) SHOAL_UNROLL for (int t = 0; t < T; ++t) {
      // Smallest parts first.
      __m512 sum = acc[P - 1][r][t];
      SHOAL_UNROLL for (int q = P - 2; q >= 0; --q) sum = _mm512_add_ps(sum, acc[q][r][t]);
      const float value = _mm512_reduce_add_ps(sum);
      float& out = p.y[(t0 + t) * p.y_stride + r0 + r];
      out = p.accumulate ? out + value : value;
    }
}

template <int P, int R, int T = 1>
void tile_tokens(const gemm_bf16_params& p, std::int64_t r0, std::int64_t t0, int tokens) {
  if constexpr (T < max_tile_tokens<P>()) {
    if (tokens != T) return tile_tokens<P, R, T + 1>(p, r0, t0, tokens);
  }
  tile<P, R, T>(p, r0, t0);
}

template <int P, int R = 1>
void tile_rows(const gemm_bf16_params& p, std::int64_t r0, std::int64_t t0, int rows, int tokens) {
  if constexpr (R < kTileRows) {
    if (rows != R) return tile_rows<P, R + 1>(p, r0, t0, rows, tokens);
  }
  tile_tokens<P, R>(p, r0, t0, tokens);
}

template <int P>
void gemm_rows(const gemm_bf16_params& p, std::int64_t row_begin, std::int64_t row_end) {
  constexpr int kT = max_tile_tokens<P>();
  const std::int64_t token_bytes = P * p.x_stride * 2;
  const std::int64_t block = std::max<std::int64_t>(kT, kTokenBlockBytes / token_bytes / kT * kT);
  for (std::int64_t b0 = 0; b0 < p.tokens; b0 += block) {
    const std::int64_t b1 = std::min(p.tokens, b0 + block);
    // One token (decode) streams one weight row at a time: faster than four interleaved rows
    // (21-24 against 18-19 GB/s), and a tile's row count changes no output.
    const int tile_rows_here = p.tokens == 1 ? 1 : kTileRows;
    for (std::int64_t r0 = row_begin; r0 < row_end; r0 += tile_rows_here) {
      const int rows = static_cast<int>(std::min<std::int64_t>(tile_rows_here, row_end - r0));
      for (std::int64_t t0 = b0; t0 < b1; t0 += kT)
        tile_rows<P>(p, r0, t0, rows, static_cast<int>(std::min<std::int64_t>(kT, b1 - t0)));
    }
  }
}

// Writes the parts of `cols` floats; zero from `cols` to `stride` in every part.
template <int P>
SHOAL_AVX512_BF16 void split_row(const float* x, std::int64_t cols, std::int64_t stride, std::uint16_t* out) {
  for (std::int64_t c = 0; c < stride; c += 16) {
    const std::int64_t left = std::clamp<std::int64_t>(cols - c, 0, 16);
    const __mmask16 mask = static_cast<__mmask16>((1u << left) - 1u);
    __m512 rest = _mm512_maskz_loadu_ps(mask, x + c);
    SHOAL_UNROLL for (int q = 0; q < P; ++q) {
      // Round to nearest even; the remainder rest - part is exact in fp32.
      const __m256bh part = _mm512_cvtneps_pbh(rest);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + q * stride + c), reinterpret_cast<__m256i>(part));
      if (q + 1 < P)
        rest = _mm512_sub_ps(rest, _mm512_castsi512_ps(_mm512_slli_epi32(
                                       _mm512_cvtepu16_epi32(reinterpret_cast<__m256i>(part)), 16)));
    }
  }
}
#endif  // __x86_64__

}  // namespace

int bf16_parts() {
  static const int parts = [] {
    const char* setting = std::getenv("SHOAL_BF16_PARTS");
    return setting ? std::clamp(std::atoi(setting), 1, 3) : kBf16Parts;
  }();
  return parts;
}

bool bf16_gemm_applies(const matrix_view& weight) {
  return weight.type == dtype::bf16 && bf16_gemm_enabled();
}

bool bf16_gemm_enabled() {
#if defined(__x86_64__)
  static const bool enabled = [] {
    const char* setting = std::getenv("SHOAL_BF16_GEMM");
    if (setting && std::strcmp(setting, "0") == 0) return false;
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
  }();
  return enabled;
#else
  return false;
#endif
}

void bf16_split(const float* x, std::int64_t tokens, std::int64_t cols, std::int64_t x_stride,
                bf16_activations& out, thread_pool* pool) {
#if defined(__x86_64__)
  out.tokens = tokens;
  out.stride = (cols + 31) / 32 * 32;
  out.data.resize(static_cast<std::size_t>(tokens * out.token_stride()));
  const auto split = [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t t = begin; t < end; ++t) {
      std::uint16_t* dst = out.data.data() + t * out.token_stride();
      switch (bf16_parts()) {
        case 1: split_row<1>(x + t * x_stride, cols, out.stride, dst); break;
        case 2: split_row<2>(x + t * x_stride, cols, out.stride, dst); break;
        default: split_row<3>(x + t * x_stride, cols, out.stride, dst); break;
      }
    }
  };
  if (pool && tokens * cols >= (1 << 16))
    pool->parallel_for(tokens, split);
  else
    split(0, tokens);
#else
  (void)x, (void)tokens, (void)cols, (void)x_stride, (void)out, (void)pool;
#endif
}

void gemm_bf16_rows(const gemm_bf16_params& params, std::int64_t row_begin, std::int64_t row_end) {
#if defined(__x86_64__)
  switch (bf16_parts()) {
    case 1: return gemm_rows<1>(params, row_begin, row_end);
    case 2: return gemm_rows<2>(params, row_begin, row_end);
    default: return gemm_rows<3>(params, row_begin, row_end);
  }
#else
  (void)params, (void)row_begin, (void)row_end;
#endif
}

}  // namespace shoal::kernels::detail
