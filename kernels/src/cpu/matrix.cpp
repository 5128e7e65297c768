#include "shoal/kernels/matrix.hpp"

#include "simd.hpp"

#include <algorithm>
#include <array>
#include <cstring>

namespace shoal::kernels {
namespace {

// All 256 E4M3 values, so dequantizing a byte is one load.
const std::array<float, 256>& fp8_table() {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> values{};
    for (int i = 0; i < 256; ++i) values[i] = fp8_e4m3_to_f32(static_cast<std::uint8_t>(i));
    return values;
  }();
  return table;
}

#if defined(__x86_64__)
__attribute__((target("avx512f,avx512bw,avx512vl"))) void bf16_row_avx512(const std::uint16_t* in, std::int64_t count,
                                                                          float* out) {
  std::int64_t i = 0;
  for (; i + 16 <= count; i += 16) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(in + i));
    _mm512_storeu_ps(out + i, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16)));
  }
  for (; i < count; ++i) out[i] = bf16_to_f32(in[i]);
}

// E4M3 through f16 as in the linear kernel: sign-extended to 16 bits and shifted left by 7,
// a byte's exponent and mantissa sit where an f16 keeps them (the AND clears the sign's copy in
// the f16 exponent), which converts exactly to the value times 2^-8. Multiplying by the block
// scale times 2^8 rounds the same exact product as the table's value times the scale.
__attribute__((target("avx512f,avx512bw,avx512vl"))) void fp8_row_avx512(const std::uint8_t* in, const float* scales,
                                                                         std::int64_t col0, std::int64_t count,
                                                                         float* out) {
  const __m256i sign_copy = _mm256_set1_epi16(static_cast<short>(0xBFFF));
  std::int64_t i = 0;
  while (i < count) {
    const std::int64_t col = col0 + i;
    const std::int64_t end = std::min(count, i + matrix_view::kBlock - col % matrix_view::kBlock);
    const __m512 scale = _mm512_set1_ps(scales[col / matrix_view::kBlock] * 256.0f);
    for (; i < end; i += 16) {
      const std::int64_t left = std::min<std::int64_t>(16, end - i);
      const __mmask16 mask = static_cast<__mmask16>((1u << left) - 1u);
      const __m128i raw = _mm_maskz_loadu_epi8(mask, in + i);
      const __m256i half = _mm256_and_si256(_mm256_slli_epi16(_mm256_cvtepi8_epi16(raw), 7), sign_copy);
      _mm512_mask_storeu_ps(out + i, mask, _mm512_mul_ps(_mm512_cvtph_ps(half), scale));
    }
    i = end;
  }
}
#endif

}  // namespace

matrix_view matrix_view::row_slice(std::int64_t first, std::int64_t count) const noexcept {
  matrix_view slice = *this;
  slice.rows = count;
  slice.data = static_cast<const std::uint8_t*>(data) +
               first * cols * static_cast<std::int64_t>(dtype_size(type));
  if (scale_inv) slice.scale_inv = scale_inv + (first / kBlock) * scale_cols();
  return slice;
}

void dequantize_row(const matrix_view& matrix, std::int64_t row, std::int64_t col0,
                    std::int64_t count, float* out) noexcept {
  const std::int64_t base = row * matrix.cols + col0;
  switch (matrix.type) {
    case dtype::f32:
      std::memcpy(out, static_cast<const float*>(matrix.data) + base, count * sizeof(float));
      return;
    case dtype::bf16: {
      const auto* in = static_cast<const std::uint16_t*>(matrix.data) + base;
#if defined(__x86_64__)
      if (detail::cpu_has_avx512()) return bf16_row_avx512(in, count, out);
#endif
      for (std::int64_t i = 0; i < count; ++i) out[i] = bf16_to_f32(in[i]);
      return;
    }
    case dtype::f16: {
      const auto* in = static_cast<const std::uint16_t*>(matrix.data) + base;
      for (std::int64_t i = 0; i < count; ++i) out[i] = f16_to_f32(in[i]);
      return;
    }
    case dtype::f8_e4m3: {
      const auto& table = fp8_table();
      const auto* in = static_cast<const std::uint8_t*>(matrix.data) + base;
      const float* scales = matrix.scale_inv + (row / matrix_view::kBlock) * matrix.scale_cols();
#if defined(__x86_64__)
      // Attention dequantizes every kv_b row of a layer at each decode step: scalar, this was
      // a fifth of an FP8 decode step.
      if (detail::cpu_has_avx512()) return fp8_row_avx512(in, scales, col0, count, out);
#endif
      for (std::int64_t i = 0; i < count; ++i)
        out[i] = table[in[i]] * scales[(col0 + i) / matrix_view::kBlock];
      return;
    }
  }
}

}  // namespace shoal::kernels
