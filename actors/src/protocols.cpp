#include "shoal/actors/protocols.hpp"

#include <caf/message.hpp>
#include <caf/sec.hpp>

namespace shoal::actors {

caf::error to_caf_error(errc code, std::string message) {
  // Code 0 means "no error" to CAF, so Shoal codes are shifted by one.
  return caf::error(static_cast<std::uint8_t>(static_cast<int>(code) + 1), shoal_error_category,
                    caf::make_message(std::move(message)));
}

caf::error to_caf_error(const shoal::error& e) { return to_caf_error(e.code(), e.what()); }

shoal::error from_caf_error(const caf::error& e) {
  if (e.category() == shoal_error_category) {
    std::string message = "unknown error";
    if (e.context().match_elements<std::string>()) message = e.context().get_as<std::string>(0);
    return shoal::error(static_cast<errc>(e.code() - 1), message);
  }
  if (e.category() == caf::atom("system")) {
    const auto code = static_cast<caf::sec>(e.code());
    if (code == caf::sec::request_timeout)
      return shoal::error(errc::deadline_exceeded, "no answer before the deadline (" + caf::to_string(e) + ")");
    return shoal::error(errc::unavailable, caf::to_string(e));
  }
  return shoal::error(errc::internal, caf::to_string(e));
}

}  // namespace shoal::actors
