// The envelope decoder on any bytes: it decodes or throws shoal::error (invalid_argument, or
// failed_precondition for another schema version), never crashes, hangs or reads out of
// bounds (run under ASan/UBSan).

#include "fuzz_check.hpp"

#include "shoal/transport/codec.hpp"

#include <cstddef>
#include <cstdint>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    auto message = shoal::transport::decode_envelope(
        std::span<const std::byte>(reinterpret_cast<const std::byte*>(data), size));
    (void)message.kind();
    SHOAL_FUZZ_CHECK(message.bulk_count() == 0);
  } catch (const shoal::error& e) {
    SHOAL_FUZZ_CHECK(e.code() == shoal::errc::invalid_argument ||
                     e.code() == shoal::errc::failed_precondition);
  }
  return 0;
}
