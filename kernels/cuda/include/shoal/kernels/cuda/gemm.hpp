#pragma once
/// \file
/// Dense GEMMs through cuBLASLt: y = alpha * x W^T + beta * y with bf16 inputs and fp32
/// accumulation, W in a Linear's `[out][in]` layout.

#include <cstdint>

namespace shoal::kernels::cuda {

class context;

/// Element type of the GEMM output.
enum class gemm_output : std::uint8_t {
  f32,   ///< fp32 (residual stream, router logits).
  bf16,  ///< bf16 (input of the next GEMM).
};

/// All pointers are device memory; matrices are row-major.
struct gemm_params {
  const std::uint16_t* x = nullptr;  ///< bf16 activations `[m][x_stride]`, first k used.
  const std::uint16_t* w = nullptr;  ///< bf16 weight `[n][k]`.
  void* y = nullptr;                 ///< Output `[m][y_stride]` of `output` type.
  gemm_output output = gemm_output::f32;  ///< Output element type.
  std::int64_t m = 0;                ///< Rows of x and y (tokens).
  std::int64_t n = 0;                ///< Output features (rows of W).
  std::int64_t k = 0;                ///< Input features.
  std::int64_t x_stride = 0;         ///< Elements between rows of x (0: k).
  std::int64_t y_stride = 0;         ///< Elements between rows of y (0: n).
  float alpha = 1.0f;                ///< Scales x W^T.
  float beta = 0.0f;                 ///< Scales the previous y (1: accumulate).
};

/// Runs one GEMM on the context's stream with the cuBLASLt heuristic's first algorithm.
void gemm(context& ctx, const gemm_params& params);

}  // namespace shoal::kernels::cuda
