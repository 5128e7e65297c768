#pragma once
// Rope kernel: blockIdx.x = token, threads over (head, pair).

#include "device_common.cuh"

namespace shoal::kernels::cuda::detail {

struct rope_args {
  float* x;
  std::int64_t heads, token_stride, head_stride, offset, pairs;
  const std::int64_t* positions;
  const float* frequencies;
};

__global__ void rope_kernel(rope_args a) {
  const std::int64_t token = blockIdx.x;
  const float position = static_cast<float>(a.positions[token]);
  for (std::int64_t i = threadIdx.x; i < a.heads * a.pairs; i += blockDim.x) {
    const std::int64_t head = i / a.pairs, pair = i % a.pairs;
    rotate_pair(a.x + token * a.token_stride + head * a.head_stride + a.offset + 2 * pair,
                position, a.frequencies[pair]);
  }
}

}  // namespace shoal::kernels::cuda::detail
