#pragma once
// Private to the CPU kernels: the one place that configures OpenBLAS.

#include <cblas.h>

namespace shoal::kernels::detail {

/// Our thread pool owns the cores; OpenBLAS threads on top of it would oversubscribe them, so
/// every BLAS call is made from inside a pool thread with OpenBLAS itself single-threaded.
inline void ensure_blas_single_threaded() {
  static const bool configured = [] {
    openblas_set_num_threads(1);
    return true;
  }();
  (void)configured;
}

}  // namespace shoal::kernels::detail
