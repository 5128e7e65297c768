#pragma once
/// \file
/// Element types of weights and activations, and exact scalar conversions between them.

#include <bit>
#include <cstdint>
#include <cstring>
#include <string_view>

namespace shoal::kernels {

/// Storage type of a tensor. Activations are always f32; weights may be any of these.
enum class dtype : std::uint8_t { f32, bf16, f16, f8_e4m3 };

/// Bytes per element.
constexpr std::size_t dtype_size(dtype type) noexcept {
  switch (type) {
    case dtype::f32: return 4;
    case dtype::bf16: return 2;
    case dtype::f16: return 2;
    case dtype::f8_e4m3: return 1;
  }
  return 0;
}

/// The safetensors spelling of a dtype ("F32", "BF16", "F16", "F8_E4M3").
constexpr std::string_view dtype_name(dtype type) noexcept {
  switch (type) {
    case dtype::f32: return "F32";
    case dtype::bf16: return "BF16";
    case dtype::f16: return "F16";
    case dtype::f8_e4m3: return "F8_E4M3";
  }
  return "?";
}

/// Widens a bfloat16 bit pattern to float (exact).
inline float bf16_to_f32(std::uint16_t bits) noexcept {
  return std::bit_cast<float>(static_cast<std::uint32_t>(bits) << 16);
}

/// Rounds a float to bfloat16, round-to-nearest-even (NaN stays NaN).
inline std::uint16_t f32_to_bf16(float value) noexcept {
  std::uint32_t bits = std::bit_cast<std::uint32_t>(value);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((bits >> 16) | 0x40);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<std::uint16_t>(bits >> 16);
}

/// Widens an IEEE half bit pattern to float (exact, subnormals included).
inline float f16_to_f32(std::uint16_t bits) noexcept {
  const std::uint32_t sign = static_cast<std::uint32_t>(bits & 0x8000u) << 16;
  const std::uint32_t exponent = (bits >> 10) & 0x1fu;
  std::uint32_t mantissa = bits & 0x3ffu;
  if (exponent == 0) {
    if (mantissa == 0) return std::bit_cast<float>(sign);
    // Subnormal: value = mantissa * 2^-24, exactly representable in float.
    const float magnitude = static_cast<float>(mantissa) * 0x1p-24f;
    return sign ? -magnitude : magnitude;
  }
  if (exponent == 31) return std::bit_cast<float>(sign | 0x7f800000u | (mantissa << 13));
  return std::bit_cast<float>(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

/// Rounds a float to IEEE half, round-to-nearest-even.
std::uint16_t f32_to_f16(float value) noexcept;

/// Widens an OCP FP8 E4M3 (e4m3fn: bias 7, no infinities, S.1111.111 = NaN, max 448) byte to
/// float (exact).
inline float fp8_e4m3_to_f32(std::uint8_t bits) noexcept {
  const std::uint32_t sign = static_cast<std::uint32_t>(bits & 0x80u) << 24;
  const std::uint32_t exponent = (bits >> 3) & 0xfu;
  const std::uint32_t mantissa = bits & 0x7u;
  if (exponent == 0xf && mantissa == 0x7) return std::bit_cast<float>(0x7fc00000u | sign);
  if (exponent == 0) {
    const float magnitude = static_cast<float>(mantissa) * 0x1p-9f;
    return sign ? -magnitude : magnitude;
  }
  return std::bit_cast<float>(sign | ((exponent + 120u) << 23) | (mantissa << 20));
}

/// Rounds a float to FP8 E4M3 (e4m3fn), round-to-nearest-even, saturating at +-448.
std::uint8_t f32_to_fp8_e4m3(float value) noexcept;

}  // namespace shoal::kernels
