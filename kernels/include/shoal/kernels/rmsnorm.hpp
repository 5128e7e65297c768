#pragma once
/// \file
/// RMSNorm: y = x / sqrt(mean(x^2) + eps) * weight, in fp32.

#include <cstdint>

namespace shoal::kernels {

class thread_pool;

struct rmsnorm_params {
  const float* x = nullptr;       ///< Input rows `[rows][x_stride]`, first `dim` values used.
  const float* weight = nullptr;  ///< Per-feature gain `[dim]`.
  float* y = nullptr;             ///< Output rows `[rows][y_stride]`; may alias `x`.
  std::int64_t rows = 0;          ///< Number of vectors.
  std::int64_t dim = 0;           ///< Features normalized per row.
  std::int64_t x_stride = 0;      ///< Floats between consecutive input rows (0: dim).
  std::int64_t y_stride = 0;      ///< Floats between consecutive output rows (0: dim).
  float eps = 1e-6f;              ///< Added to the mean square.
};

/// Optimized RMSNorm (vectorized, rows split over the pool).
void rmsnorm(thread_pool& pool, const rmsnorm_params& params);

namespace reference {
/// Plain RMSNorm: the specification.
void rmsnorm(const rmsnorm_params& params);
}  // namespace reference

}  // namespace shoal::kernels
