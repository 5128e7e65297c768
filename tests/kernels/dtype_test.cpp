#include "shoal/kernels/dtype.hpp"

#include <catch2/catch.hpp>

#include <bit>
#include <cmath>
#include <set>

using namespace shoal::kernels;

TEST_CASE("fp8 e4m3 decodes the format's landmarks exactly", "[dtype]") {
  CHECK(fp8_e4m3_to_f32(0x00) == 0.0f);
  CHECK(std::signbit(fp8_e4m3_to_f32(0x80)));
  CHECK(fp8_e4m3_to_f32(0x38) == 1.0f);          // exponent 7 = bias
  CHECK(fp8_e4m3_to_f32(0x7e) == 448.0f);        // largest finite
  CHECK(fp8_e4m3_to_f32(0xfe) == -448.0f);
  CHECK(fp8_e4m3_to_f32(0x01) == 0x1p-9f);       // smallest subnormal
  CHECK(fp8_e4m3_to_f32(0x08) == 0x1p-6f);       // smallest normal
  CHECK(std::isnan(fp8_e4m3_to_f32(0x7f)));
  CHECK(std::isnan(fp8_e4m3_to_f32(0xff)));
}

TEST_CASE("fp8 e4m3 encoding round-trips every finite value and rounds to nearest even", "[dtype]") {
  for (int bits = 0; bits < 256; ++bits) {
    if ((bits & 0x7f) == 0x7f) continue;
    const float value = fp8_e4m3_to_f32(static_cast<std::uint8_t>(bits));
    const std::uint8_t encoded = f32_to_fp8_e4m3(value);
    if (value == 0.0f)
      CHECK(fp8_e4m3_to_f32(encoded) == 0.0f);
    else
      CHECK(encoded == bits);
  }
  CHECK(f32_to_fp8_e4m3(1000.0f) == 0x7e);  // saturates
  CHECK(f32_to_fp8_e4m3(-1000.0f) == 0xfe);
  // 1.0625 lies halfway between 1.0 (0x38, even mantissa) and 1.125 (0x39): ties to even.
  CHECK(f32_to_fp8_e4m3(1.0625f) == 0x38);
  CHECK(f32_to_fp8_e4m3(1.1875f) == 0x3a);  // halfway between 0x39 and 0x3a: to even 0x3a
  // Halfway between two subnormals 1*2^-9 and 2*2^-9 goes to the even one.
  CHECK(f32_to_fp8_e4m3(1.5f * 0x1p-9f) == 0x02);
}

TEST_CASE("bf16 conversion rounds to nearest even and widens exactly", "[dtype]") {
  CHECK(f32_to_bf16(1.0f) == 0x3f80);
  CHECK(bf16_to_f32(0x3f80) == 1.0f);
  // 1 + 2^-8 is halfway between bf16 1.0 and 1 + 2^-7: ties to even (1.0).
  CHECK(f32_to_bf16(1.0f + 0x1p-8f) == 0x3f80);
  CHECK(f32_to_bf16(1.0f + 3 * 0x1p-8f) == 0x3f82);
  CHECK(std::isnan(bf16_to_f32(f32_to_bf16(NAN))));
}

TEST_CASE("f16 conversion round-trips every finite half value", "[dtype]") {
  for (std::uint32_t bits = 0; bits < 0x10000; ++bits) {
    const auto h = static_cast<std::uint16_t>(bits);
    if ((h & 0x7c00) == 0x7c00) continue;  // inf / nan
    const float value = f16_to_f32(h);
    if (value == 0.0f) continue;
    REQUIRE(f32_to_f16(value) == h);
  }
  CHECK(f16_to_f32(0x0001) == 0x1p-24f);
  CHECK(f32_to_f16(70000.0f) == 0x7c00);
}
