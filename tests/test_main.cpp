#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include "skip.hpp"

#include <cstdio>

int main(int argc, char* argv[]) {
  const int failures = Catch::Session().run(argc, argv);
  if (failures != 0 || shoal::testing::skip_reasons().empty()) return failures;
  for (const auto& reason : shoal::testing::skip_reasons()) std::fprintf(stderr, "SKIPPED: %s\n", reason.c_str());
  return shoal::testing::kSkipReturnCode;
}
