#pragma once
// RMSNorm (+ residual add) kernel: one block per row.

#include "reduce.cuh"

namespace shoal::kernels::cuda::detail {

struct rmsnorm_args {
  const float* x;
  float* residual;
  const float* weight;
  float* y;
  __nv_bfloat16* y_bf16;
  std::int64_t dim, x_stride, y_stride;
  float eps;
};

__global__ void rmsnorm_kernel(rmsnorm_args a) {
  __shared__ float scratch[32];
  const std::int64_t row = blockIdx.x;
  const float* x = a.x + row * a.x_stride;
  float* residual = a.residual ? a.residual + row * a.dim : nullptr;
  float sum = 0.0f;
  // First pass: form h (and store it into the residual stream), accumulate its square.
  for (std::int64_t i = threadIdx.x; i < a.dim; i += blockDim.x) {
    float h = x[i];
    if (residual) {
      h += residual[i];
      residual[i] = h;
    }
    sum += h * h;
  }
  sum = block_sum(sum, scratch);
  const float inv = rsqrtf(sum / static_cast<float>(a.dim) + a.eps);
  // Second pass re-reads h from where this thread wrote it (same index), so no barrier needed;
  // y may alias x.
  const float* h = residual ? residual : x;
  for (std::int64_t i = threadIdx.x; i < a.dim; i += blockDim.x) {
    const float v = a.weight[i] * (h[i] * inv);
    if (a.y) a.y[row * a.y_stride + i] = v;
    if (a.y_bf16) a.y_bf16[row * a.dim + i] = __float2bfloat16_rn(v);
  }
}

}  // namespace shoal::kernels::cuda::detail
