#include "shoal/kernels/matrix.hpp"

#include "simd.hpp"

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
      for (std::int64_t i = 0; i < count; ++i)
        out[i] = table[in[i]] * scales[(col0 + i) / matrix_view::kBlock];
      return;
    }
  }
}

}  // namespace shoal::kernels
