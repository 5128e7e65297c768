#pragma once
/// \file
/// The error vocabulary of Shoal. The codes tell a caller how to react, not which subsystem
/// failed; the message says what exactly went wrong (file, tensor, key, line).

#include <fmt/format.h>

#include <stdexcept>
#include <string>
#include <string_view>

namespace shoal {

/// What the caller should do about a failure.
enum class errc {
  invalid_argument,     ///< The input is wrong; fix the input (bad config key, corrupt file).
  not_found,            ///< A named thing does not exist; fix the name or create it.
  failed_precondition,  ///< The system is not in a state to do this; fix state first.
  unavailable,          ///< Transient; retry the same call later.
  aborted,              ///< Conflict (e.g. placement epoch changed); retry at a higher level.
  resource_exhausted,   ///< Out of a budget (KV blocks, queue); back off or shed load.
  deadline_exceeded,    ///< The request's deadline passed.
  cancelled,            ///< The caller cancelled.
  internal,             ///< A bug: an invariant did not hold.
};

/// Human-readable name of an error code ("invalid_argument", ...).
constexpr std::string_view errc_name(errc code) noexcept {
  switch (code) {
    case errc::invalid_argument: return "invalid_argument";
    case errc::not_found: return "not_found";
    case errc::failed_precondition: return "failed_precondition";
    case errc::unavailable: return "unavailable";
    case errc::aborted: return "aborted";
    case errc::resource_exhausted: return "resource_exhausted";
    case errc::deadline_exceeded: return "deadline_exceeded";
    case errc::cancelled: return "cancelled";
    case errc::internal: return "internal";
  }
  return "unknown";
}

/// An error with a code. Inside a process, the runtime throws it where a failure is first
/// classified; actors and the CLI catch it at their boundary and turn it into a value (a
/// reply, an HTTP status, an exit code).
class error : public std::runtime_error {
 public:
  error(errc code, std::string message) : std::runtime_error(std::move(message)), code_(code) {}
  /// How the caller should react.
  errc code() const noexcept { return code_; }

 private:
  errc code_;
};

/// Throws `shoal::error` with a formatted message.
template <typename... Args>
[[noreturn]] void fail(errc code, fmt::format_string<Args...> format, Args&&... args) {
  throw error(code, fmt::format(format, std::forward<Args>(args)...));
}

namespace detail {
[[noreturn]] inline void require_failed(const char* condition, const char* file, int line,
                                        const std::string& message) {
  throw error(errc::internal,
              fmt::format("{}:{}: requirement `{}` failed: {}", file, line, condition, message));
}
}  // namespace detail

}  // namespace shoal

/// Checks an invariant; a failure is a bug and throws `shoal::error(errc::internal)` naming the
/// file, line, condition and a formatted message.
#define SHOAL_REQUIRE(cond, ...)                                                     \
  do {                                                                               \
    if (!(cond)) [[unlikely]]                                                        \
      ::shoal::detail::require_failed(#cond, __FILE__, __LINE__,                     \
                                      ::fmt::format(__VA_ARGS__));                   \
  } while (false)
