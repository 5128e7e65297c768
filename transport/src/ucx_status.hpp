#pragma once
// The one place where UCX status codes become shoal errors, plus RAII holders for UCX handles.

#include "shoal/base/error.hpp"

#include <ucp/api/ucp.h>

#include <memory>
#include <string_view>

namespace shoal::transport::detail {

/// How a caller should react to a UCX status.
errc to_errc(ucs_status_t status) noexcept;

/// Throws `error(to_errc(status))` saying what failed; `status` must be an error.
[[noreturn]] void throw_ucs(ucs_status_t status, std::string_view what);

struct ucp_config_deleter {
  void operator()(ucp_config_t* config) const noexcept { ucp_config_release(config); }
};
struct ucp_context_deleter {
  void operator()(ucp_context_h context) const noexcept { ucp_cleanup(context); }
};
struct ucp_worker_deleter {
  void operator()(ucp_worker_h worker) const noexcept { ucp_worker_destroy(worker); }
};
struct ucp_listener_deleter {
  void operator()(ucp_listener_h listener) const noexcept { ucp_listener_destroy(listener); }
};

using ucp_config_ptr = std::unique_ptr<ucp_config_t, ucp_config_deleter>;
using ucp_context_ptr = std::unique_ptr<std::remove_pointer_t<ucp_context_h>, ucp_context_deleter>;
using ucp_worker_ptr = std::unique_ptr<std::remove_pointer_t<ucp_worker_h>, ucp_worker_deleter>;
using ucp_listener_ptr =
    std::unique_ptr<std::remove_pointer_t<ucp_listener_h>, ucp_listener_deleter>;

}  // namespace shoal::transport::detail

/// Evaluates a UCX call returning ucs_status_t and throws a shoal error unless it is UCS_OK.
#define SHOAL_UCS_CHECK(expr, what)                                        \
  do {                                                                     \
    ucs_status_t shoal_ucs_status_ = (expr);                               \
    if (shoal_ucs_status_ != UCS_OK) [[unlikely]]                          \
      ::shoal::transport::detail::throw_ucs(shoal_ucs_status_, (what));    \
  } while (false)
