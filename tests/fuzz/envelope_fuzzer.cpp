// libFuzzer entry point for the envelope decoder: any input must either decode or throw
// shoal::error, never crash, hang or read out of bounds (run under ASan/UBSan).

#include "shoal/transport/codec.hpp"

#include <cstddef>
#include <cstdint>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    auto message = shoal::transport::decode_envelope(
        std::span<const std::byte>(reinterpret_cast<const std::byte*>(data), size));
    (void)message.kind();
  } catch (const shoal::error&) {
  }
  return 0;
}
