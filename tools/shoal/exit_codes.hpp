#pragma once
// The exit codes of every shoal command, and how a failure becomes one.

#include "shoal/base/error.hpp"

#include <fmt/core.h>

#include <cstdio>
#include <exception>

namespace shoal::tools {

/// The command did what was asked.
inline constexpr int kExitSuccess = 0;
/// The input was wrong (command line, files, requests, an unreachable peer): fix it and retry.
inline constexpr int kExitBadInput = 2;
/// Shoal itself failed (a broken invariant, or an exception no code classified); EX_SOFTWARE.
inline constexpr int kExitInternal = 70;

/// Prints `failure` on `err` as "shoal: error: ..." (or "shoal: internal error: ...") and
/// returns its exit code: kExitInternal for `errc::internal` and for anything that is not a
/// `shoal::error`, kExitBadInput for every other `shoal::error`.
inline int report_failure(std::exception_ptr failure, std::FILE* err = stderr) {
  try {
    std::rethrow_exception(failure);
  } catch (const shoal::error& e) {
    if (e.code() == errc::internal) {
      fmt::print(err, "shoal: internal error: {}\n", e.what());
      return kExitInternal;
    }
    fmt::print(err, "shoal: error: {}\n", e.what());
    return kExitBadInput;
  } catch (const std::exception& e) {
    // Not classified where it happened: a failure of Shoal, not of the input.
    fmt::print(err, "shoal: internal error: {}\n", e.what());
    return kExitInternal;
  } catch (...) {
    fmt::print(err, "shoal: internal error: an exception that is not a std::exception\n");
    return kExitInternal;
  }
}

}  // namespace shoal::tools
