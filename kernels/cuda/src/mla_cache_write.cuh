#pragma once
// Fused latent RMSNorm + key rope + bf16 store into the paged cache: one block per token.

#include "reduce.cuh"

namespace shoal::kernels::cuda::detail {

struct mla_cache_write_args {
  const float* kv;
  std::int64_t kv_stride;
  const float* norm_weight;
  float eps;
  const std::int64_t* positions;
  const float* frequencies;
  const std::int32_t* slots;
  __nv_bfloat16* cache;
  std::int64_t rank, rope_dim;
};

__global__ void mla_cache_write_kernel(mla_cache_write_args a) {
  __shared__ float scratch[32];
  const std::int64_t token = blockIdx.x;
  const float* kv = a.kv + token * a.kv_stride;
  __nv_bfloat16* row = a.cache + static_cast<std::int64_t>(a.slots[token]) * (a.rank + a.rope_dim);
  float sum = 0.0f;
  for (std::int64_t i = threadIdx.x; i < a.rank; i += blockDim.x) sum += kv[i] * kv[i];
  sum = block_sum(sum, scratch);
  const float inv = rsqrtf(sum / static_cast<float>(a.rank) + a.eps);
  for (std::int64_t i = threadIdx.x; i < a.rank; i += blockDim.x)
    row[i] = __float2bfloat16_rn(a.norm_weight[i] * (kv[i] * inv));
  const float position = static_cast<float>(a.positions[token]);
  for (std::int64_t pair = threadIdx.x; pair < a.rope_dim / 2; pair += blockDim.x) {
    float v[2] = {kv[a.rank + 2 * pair], kv[a.rank + 2 * pair + 1]};
    rotate_pair(v, position, a.frequencies[pair]);
    row[a.rank + 2 * pair] = __float2bfloat16_rn(v[0]);
    row[a.rank + 2 * pair + 1] = __float2bfloat16_rn(v[1]);
  }
}

}  // namespace shoal::kernels::cuda::detail
