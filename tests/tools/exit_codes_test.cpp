// How a failure becomes an exit code (tools/shoal/exit_codes.hpp): the part of the contract no
// input can reach through the binary, since exit 70 means Shoal itself is broken.

#include "exit_codes.hpp"

#include <catch2/catch.hpp>

#include <cstdio>
#include <stdexcept>
#include <string>

namespace {

// The exit code and what report_failure printed for `failure`.
std::pair<int, std::string> report(std::exception_ptr failure) {
  std::FILE* err = std::tmpfile();
  REQUIRE(err != nullptr);
  const int code = shoal::tools::report_failure(failure, err);
  std::rewind(err);
  std::string text;
  char buffer[512];
  while (std::fgets(buffer, sizeof buffer, err)) text += buffer;
  std::fclose(err);
  return {code, text};
}

}  // namespace

TEST_CASE("classified input errors exit 2, internal and unclassified failures exit 70", "[cli][exit]") {
  using shoal::errc;
  for (const auto code : {errc::invalid_argument, errc::not_found, errc::failed_precondition, errc::unavailable,
                          errc::aborted, errc::resource_exhausted, errc::deadline_exceeded, errc::cancelled}) {
    CAPTURE(shoal::errc_name(code));
    const auto [exit_code, text] = report(std::make_exception_ptr(shoal::error(code, "the input is wrong")));
    CHECK(exit_code == 2);
    CHECK(text == "shoal: error: the input is wrong\n");
  }
  const auto internal = report(std::make_exception_ptr(shoal::error(errc::internal, "invariant broken")));
  CHECK(internal.first == 70);
  CHECK(internal.second == "shoal: internal error: invariant broken\n");
  const auto unclassified = report(std::make_exception_ptr(std::out_of_range("vector::at")));
  CHECK(unclassified.first == 70);
  CHECK(unclassified.second == "shoal: internal error: vector::at\n");
  const auto not_std = report(std::make_exception_ptr(42));
  CHECK(not_std.first == 70);
  CHECK_THAT(not_std.second, Catch::StartsWith("shoal: internal error: "));
}
