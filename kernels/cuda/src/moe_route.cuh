#pragma once
// Router kernel: one block per token, one thread per expert (blockDim >= experts).

#include "device_common.cuh"

namespace shoal::kernels::cuda::detail {

constexpr int kRouteMaxExperts = 1024;
constexpr int kRouteMaxGroups = 64;
constexpr int kRouteMaxTopK = 32;

struct moe_route_args {
  const float* logits;
  const float* bias;
  int experts, groups, top_groups, top_k;
  bool normalize;
  float scaling_factor;
  std::int32_t* indices;
  float* weights;
};

// (value, index) with the reference's order: larger value first, then lower index.
__device__ __forceinline__ bool route_better(float v, int i, float w, int j) {
  return v > w || (v == w && i < j);
}

__global__ void moe_route_kernel(moe_route_args a) {
  __shared__ float scores[kRouteMaxExperts];
  __shared__ float biased[kRouteMaxExperts];
  __shared__ float group_score[kRouteMaxGroups];
  __shared__ bool allowed[kRouteMaxGroups];
  __shared__ float warp_value[32];
  __shared__ int warp_index[32];
  __shared__ int chosen[kRouteMaxTopK];
  const int e = threadIdx.x;
  const int lane = e & 31, warp = e >> 5, warps = blockDim.x >> 5;
  const std::int64_t token = blockIdx.x;
  const int per_group = a.experts / a.groups;
  if (e < a.experts) {
    const float s = 1.0f / (1.0f + expf(-a.logits[token * a.experts + e]));
    scores[e] = s;
    biased[e] = s + (a.bias ? a.bias[e] : 0.0f);
  }
  __syncthreads();
  if (e < a.groups) {
    // The reference's running top two, in expert order, so equal values count twice.
    float first = -INFINITY, second = -INFINITY;
    for (int i = e * per_group; i < (e + 1) * per_group; ++i) {
      const float b = biased[i];
      if (b > first) {
        second = first;
        first = b;
      } else if (b > second) {
        second = b;
      }
    }
    group_score[e] = per_group > 1 ? first + second : first;
    allowed[e] = a.groups == 1;
  }
  __syncthreads();
  if (e == 0 && a.groups > 1) {
    // A stable descending sort keeps the lower group first among equals; a handful of groups
    // makes a serial selection cheapest.
    for (int round = 0; round < a.top_groups; ++round) {
      int best = -1;
      for (int g = 0; g < a.groups; ++g)
        if (!allowed[g] && (best < 0 || group_score[g] > group_score[best])) best = g;
      allowed[best] = true;
    }
  }
  __syncthreads();
  bool candidate = e < a.experts && allowed[e / per_group];
  for (int k = 0; k < a.top_k; ++k) {
    float v = candidate ? biased[e] : -INFINITY;
    int i = candidate ? e : 0x7fffffff;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float w = __shfl_xor_sync(0xffffffffu, v, o);
      const int j = __shfl_xor_sync(0xffffffffu, i, o);
      if (route_better(w, j, v, i)) {
        v = w;
        i = j;
      }
    }
    if (lane == 0) {
      warp_value[warp] = v;
      warp_index[warp] = i;
    }
    __syncthreads();
    if (e == 0) {
      float best_v = warp_value[0];
      int best_i = warp_index[0];
      for (int w = 1; w < warps; ++w)
        if (route_better(warp_value[w], warp_index[w], best_v, best_i)) {
          best_v = warp_value[w];
          best_i = warp_index[w];
        }
      chosen[k] = best_i;
    }
    __syncthreads();
    if (e == chosen[k]) candidate = false;
  }
  if (e == 0) {
    float sum = 0.0f;
    for (int k = 0; k < a.top_k; ++k) sum += scores[chosen[k]];
    for (int k = 0; k < a.top_k; ++k) {
      float weight = scores[chosen[k]];
      if (a.normalize) weight /= sum;
      a.indices[token * a.top_k + k] = chosen[k];
      a.weights[token * a.top_k + k] = weight * a.scaling_factor;
    }
  }
}

}  // namespace shoal::kernels::cuda::detail
