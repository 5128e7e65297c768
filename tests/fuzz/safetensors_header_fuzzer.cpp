// The safetensors header parser on any bytes (the first bytes of a file): it accepts a header
// whose every tensor lies inside the data area with a size that matches its dtype and shape,
// or throws shoal::error(invalid_argument); never anything else.

#include "fuzz_check.hpp"

#include "shoal/base/error.hpp"
#include "shoal/runtime/safetensors.hpp"

#include <cstddef>
#include <cstdint>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    const auto entries = shoal::runtime::parse_safetensors_header(
        reinterpret_cast<const std::byte*>(data), size, "fuzz.safetensors");
    std::uint64_t header_len = 0;
    for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | data[i];
    const std::uint64_t data_size = size - 8 - header_len;
    for (const auto& e : entries) {
      SHOAL_FUZZ_CHECK(e.begin <= e.end && e.end <= data_size);
      for (const auto d : e.shape) SHOAL_FUZZ_CHECK(d >= 0);
    }
  } catch (const shoal::error& e) {
    SHOAL_FUZZ_CHECK(e.code() == shoal::errc::invalid_argument);
  }
  return 0;
}
