#pragma once
// Honest skips. A test case that cannot run here (no GPU, no CAP_NET_ADMIN, no registry) calls
// skip(reason) and returns; the test binary then exits with kSkipReturnCode, which CTest reports
// as Skipped instead of Passed. Because the whole binary is then reported as skipped, a case
// that may skip runs as a CTest entry of its own (shoal_add_test_run in tests/CMakeLists.txt
// filters the binary's cases by tag).

#include <catch2/catch.hpp>

#include <mutex>
#include <string>
#include <vector>

namespace shoal::testing {

/// The exit code CTest's SKIP_RETURN_CODE is set to for every test.
inline constexpr int kSkipReturnCode = 77;

/// Reasons given by the cases that skipped in this process.
inline std::vector<std::string>& skip_reasons() {
  static std::vector<std::string> reasons;
  return reasons;
}

/// Records that the current test case cannot run here and why; the caller returns next.
inline void skip(const std::string& reason) {
  static std::mutex mutex;
  std::lock_guard lock(mutex);
  WARN("SKIPPED: " << reason);
  skip_reasons().push_back(reason);
}

}  // namespace shoal::testing
