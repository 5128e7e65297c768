#pragma once
// What the fuzz bodies share: a property that fails stops the process (libFuzzer records the
// input as a crash; the replay test fails), whatever NDEBUG says.

#include <cstdio>
#include <cstdlib>

#define SHOAL_FUZZ_CHECK(cond)                                                          \
  do {                                                                                  \
    if (!(cond)) {                                                                      \
      std::fprintf(stderr, "%s:%d: fuzz property `%s` does not hold\n", __FILE__, __LINE__, \
                   #cond);                                                              \
      std::abort();                                                                     \
    }                                                                                   \
  } while (false)
