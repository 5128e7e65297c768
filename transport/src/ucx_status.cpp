#include "ucx_status.hpp"

namespace shoal::transport::detail {

errc to_errc(ucs_status_t status) noexcept {
  switch (status) {
    case UCS_OK:
    case UCS_INPROGRESS:
      return errc::internal;  // Not an error; a caller asking is a bug.
    case UCS_ERR_CANCELED:
      return errc::cancelled;
    case UCS_ERR_TIMED_OUT:
    case UCS_ERR_ENDPOINT_TIMEOUT:
      return errc::deadline_exceeded;
    case UCS_ERR_NO_MEMORY:
    case UCS_ERR_EXCEEDS_LIMIT:
    case UCS_ERR_NO_RESOURCE:
      return errc::resource_exhausted;
    case UCS_ERR_INVALID_PARAM:
    case UCS_ERR_INVALID_ADDR:
    case UCS_ERR_MESSAGE_TRUNCATED:
      return errc::invalid_argument;
    case UCS_ERR_UNSUPPORTED:
    case UCS_ERR_NO_DEVICE:
      return errc::failed_precondition;
    case UCS_ERR_NO_ELEM:
      return errc::not_found;
    // Peer and link failures: the same call may succeed later or against another peer.
    case UCS_ERR_UNREACHABLE:
    case UCS_ERR_CONNECTION_RESET:
    case UCS_ERR_NOT_CONNECTED:
    case UCS_ERR_REJECTED:
    case UCS_ERR_BUSY:
    case UCS_ERR_IO_ERROR:
    case UCS_ERR_ALREADY_EXISTS:
    case UCS_ERR_SOME_CONNECTS_FAILED:
    case UCS_ERR_NO_PROGRESS:
      return errc::unavailable;
    default:
      return errc::unavailable;
  }
}

void throw_ucs(ucs_status_t status, std::string_view what) {
  throw error(to_errc(status), fmt::format("{}: {}", what, ucs_status_string(status)));
}

}  // namespace shoal::transport::detail
