#pragma once
/// \file
/// Linear layers y = x W^T with weights in any storage type and fp32 accumulation.

#include "shoal/kernels/matrix.hpp"

#include <cstdint>

namespace shoal::kernels {

class thread_pool;

struct linear_params {
  const float* x = nullptr;    ///< Inputs `[tokens][x_stride]`, first `weight.cols` used.
  matrix_view weight;          ///< `[out][in]`.
  float* y = nullptr;          ///< Outputs `[tokens][y_stride]`, first `weight.rows` written.
  std::int64_t tokens = 0;     ///< Rows of x.
  std::int64_t x_stride = 0;   ///< Floats between rows of x (0: weight.cols).
  std::int64_t y_stride = 0;   ///< Floats between rows of y (0: weight.rows).
  bool accumulate = false;     ///< Add into y instead of overwriting it.
};

/// Optimized linear: weight rows split over the pool. BF16 weights on CPUs with AVX512-BF16 go
/// through a BF16 GEMM at every batch size (activations carried as two BF16 parts, within
/// 2^-16 of their fp32 values; a token's outputs do not depend on the other tokens). Other
/// weights: few tokens stream each weight row once through SIMD dequantization, many tokens go
/// through dequantized tiles and a BLAS GEMM.
void linear(thread_pool& pool, const linear_params& params);

/// The same on the calling thread only, for callers that already split work across threads.
void linear_serial(const linear_params& params);

namespace reference {
/// Plain linear: exact dequantization, one fp32 dot product per output.
void linear(const linear_params& params);
}  // namespace reference

}  // namespace shoal::kernels
