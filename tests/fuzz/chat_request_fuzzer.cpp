// The HTTP API's request parser on any body: the first byte picks the endpoint (chat or
// completion), the rest is the body. It returns a checked request or throws api_error with a
// 400 or 404 status, never anything else; an accepted request respects the documented bounds.

#include "fuzz_check.hpp"

#include "shoal/gateway/api.hpp"

#include <cstddef>
#include <cstdint>
#include <string_view>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  const auto kind = data[0] % 2 == 0 ? shoal::gateway::endpoint::chat : shoal::gateway::endpoint::completion;
  const std::string_view body(reinterpret_cast<const char*>(data) + 1, size - 1);
  try {
    const auto request = shoal::gateway::parse_request(body, kind, "shoal-tiny");
    SHOAL_FUZZ_CHECK(request.kind == kind);
    SHOAL_FUZZ_CHECK(request.n >= 1 && request.n <= shoal::gateway::kMaxChoices);
    SHOAL_FUZZ_CHECK(request.stop.size() <= 4);
    for (const auto& s : request.stop) SHOAL_FUZZ_CHECK(!s.empty());
    if (kind == shoal::gateway::endpoint::chat) SHOAL_FUZZ_CHECK(!request.messages.empty());
  } catch (const shoal::gateway::api_error& e) {
    SHOAL_FUZZ_CHECK(e.status() == 400 || e.status() == 404);
  }
  return 0;
}
