#include "shoal/kernels/dtype.hpp"

#include <cmath>

namespace shoal::kernels {

std::uint16_t f32_to_f16(float value) noexcept {
  const std::uint32_t bits = std::bit_cast<std::uint32_t>(value);
  const std::uint16_t sign = static_cast<std::uint16_t>((bits >> 16) & 0x8000u);
  const float magnitude = std::fabs(value);
  if (std::isnan(value)) return sign | 0x7e00u;
  if (magnitude >= 65520.0f) return sign | 0x7c00u;  // rounds to infinity
  if (magnitude < 0x1p-14f) {
    // Subnormal range: quantize to multiples of 2^-24 with ties to even.
    const float scaled = magnitude * 0x1p24f;
    return sign | static_cast<std::uint16_t>(std::nearbyint(scaled));
  }
  std::uint32_t mag_bits = bits & 0x7fffffffu;
  // Round the 23-bit mantissa to 10 bits, ties to even, then rebias the exponent.
  mag_bits += 0xfffu + ((mag_bits >> 13) & 1u);
  const std::uint32_t exponent = (mag_bits >> 23) - 112u;
  return sign | static_cast<std::uint16_t>((exponent << 10) | ((mag_bits >> 13) & 0x3ffu));
}

std::uint8_t f32_to_fp8_e4m3(float value) noexcept {
  const std::uint8_t sign = std::signbit(value) ? 0x80 : 0x00;
  if (std::isnan(value)) return sign | 0x7f;
  float magnitude = std::fabs(value);
  if (magnitude >= 448.0f) return sign | 0x7e;  // saturate to the largest finite value
  if (magnitude < 0x1p-6f) {
    // Subnormals are multiples of 2^-9.
    const int steps = static_cast<int>(std::nearbyint(magnitude * 0x1p9f));
    if (steps >= 8) return sign | 0x08;  // rounded up into the smallest normal
    return sign | static_cast<std::uint8_t>(steps);
  }
  std::uint32_t bits = std::bit_cast<std::uint32_t>(magnitude);
  bits += 0x7ffffu + ((bits >> 20) & 1u);  // round 23 -> 3 mantissa bits, ties to even
  const std::uint32_t exponent = (bits >> 23) - 120u;
  const std::uint32_t mantissa = (bits >> 20) & 0x7u;
  if (exponent > 15 || (exponent == 15 && mantissa == 7)) return sign | 0x7e;
  return sign | static_cast<std::uint8_t>((exponent << 3) | mantissa);
}

}  // namespace shoal::kernels
