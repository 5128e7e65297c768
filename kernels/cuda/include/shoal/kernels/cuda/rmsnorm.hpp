#pragma once
/// \file
/// RMSNorm on the GPU, optionally fused with the residual add that precedes it:
/// h = x + residual; residual = h; y = h / sqrt(mean(h^2) + eps) * weight.

#include <cstdint>

namespace shoal::kernels::cuda {

class context;

/// All pointers are device memory.
struct rmsnorm_params {
  const float* x = nullptr;          ///< Input rows `[rows][x_stride]`, first `dim` used.
  /// Optional residual stream `[rows][dim]`: when set, x is added to it, the sum is written
  /// back here and normalized (the pre-norm transformer's add + norm in one pass).
  float* residual = nullptr;
  const float* weight = nullptr;     ///< Per-feature gain `[dim]`.
  float* y = nullptr;                ///< fp32 output `[rows][y_stride]`; may alias x; may be null.
  std::uint16_t* y_bf16 = nullptr;   ///< Optional bf16 output `[rows][dim]` (GEMM input).
  std::int64_t rows = 0;             ///< Number of vectors.
  std::int64_t dim = 0;              ///< Features per vector.
  std::int64_t x_stride = 0;         ///< Floats between input rows (0: dim).
  std::int64_t y_stride = 0;         ///< Floats between fp32 output rows (0: dim).
  float eps = 1e-6f;                 ///< Added to the mean square.
};

/// One block per row; fp32 throughout. Matches `kernels::reference::rmsnorm` to ~1e-6.
void rmsnorm(context& ctx, const rmsnorm_params& params);

}  // namespace shoal::kernels::cuda
