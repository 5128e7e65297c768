#pragma once
// SIGINT and SIGTERM, taken synchronously by the thread that waits for them, so that shutdown
// runs as ordinary code rather than in a signal handler.

#include <csignal>
#include <chrono>

namespace shoal::tools {

/// Blocks SIGINT and SIGTERM in the calling thread (threads started later inherit the mask)
/// and installs a handler that only records them: libraries start threads before `main`
/// (OpenBLAS its pool) that keep both unblocked, and a signal delivered there would otherwise
/// end the process with the default action. Call before starting threads; returns the set.
sigset_t block_stop_signals();

/// Waits up to `timeout` (0: only looks) for SIGINT or SIGTERM, pending in this thread's set or
/// caught by the handler on another thread; returns the signal, or 0. Each signal is returned
/// once, to one caller.
int wait_stop_signal(const sigset_t& set, std::chrono::milliseconds timeout);

}  // namespace shoal::tools
