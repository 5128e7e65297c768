#pragma once
// Sampling kernel: one 1024-thread block per row (see sampling.hpp for the contract).

#include "reduce.cuh"
#include "shoal/kernels/cuda/sampling.hpp"

namespace shoal::kernels::cuda::detail {

constexpr int kSampleThreads = 1024;
constexpr int kCandidates = static_cast<int>(kSamplingMaxCandidates);
static_assert(kCandidates == kSampleThreads, "one candidate per thread");

// Order-preserving map of a float to an unsigned key (larger float, larger key).
__device__ __forceinline__ std::uint32_t float_key(float v) {
  const std::uint32_t u = __float_as_uint(v);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Inclusive prefix sum over the block (1024 threads). `scratch` holds 32 values.
template <typename T>
__device__ __forceinline__ T block_inclusive_scan(T v, T* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const T n = __shfl_up_sync(0xffffffffu, v, o);
    if (lane >= o) v += n;
  }
  __syncthreads();
  if (lane == 31) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    T w = scratch[lane];
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const T n = __shfl_up_sync(0xffffffffu, w, o);
      if (lane >= o) w += n;
    }
    scratch[lane] = w;
  }
  __syncthreads();
  return warp > 0 ? v + scratch[warp - 1] : v;
}

struct sample_args {
  const float* logits;
  std::int64_t vocab;
  const float* temperature;
  const std::int32_t* top_k;
  const float* top_p;
  const float* uniform;
  std::int32_t* tokens;
};

__global__ void __launch_bounds__(kSampleThreads) sample_kernel(sample_args a) {
  __shared__ float fscratch[32];
  __shared__ int iscratch[32];
  __shared__ int histogram[256];
  __shared__ unsigned long long sort_keys[kCandidates];
  __shared__ int count_gt, taken, pick, last_kept;
  __shared__ std::uint32_t prefix_s;
  __shared__ int remaining_s;
  __shared__ float cumulative[kCandidates];

  const int tid = threadIdx.x;
  const std::int64_t row = blockIdx.x;
  const float* x = a.logits + row * a.vocab;
  const float temperature = a.temperature[row];

  // Max, and the argmax with the lowest index among equal maxima.
  float max = -INFINITY;
  for (std::int64_t i = tid; i < a.vocab; i += kSampleThreads) max = fmaxf(max, x[i]);
  max = block_max(max, fscratch);
  if (temperature <= 0.0f) {
    if (tid == 0) pick = 0x7fffffff;
    __syncthreads();
    for (std::int64_t i = tid; i < a.vocab; i += kSampleThreads)
      if (x[i] == max) {
        atomicMin(&pick, static_cast<int>(i));
        break;
      }
    __syncthreads();
    if (tid == 0) a.tokens[row] = pick;
    return;
  }
  float z = 0.0f;
  for (std::int64_t i = tid; i < a.vocab; i += kSampleThreads) z += expf((x[i] - max) / temperature);
  z = block_sum(z, fscratch);

  int k = a.top_k[row] <= 0 ? kCandidates : a.top_k[row];
  k = static_cast<int>(k < kCandidates ? (k < a.vocab ? k : a.vocab) : (kCandidates < a.vocab ? kCandidates : a.vocab));

  // Radix select of the k-th largest key, 8 bits at a time from the top.
  if (tid == 0) {
    prefix_s = 0;
    remaining_s = k;
  }
  for (int shift = 24; shift >= 0; shift -= 8) {
    if (tid < 256) histogram[tid] = 0;
    __syncthreads();
    const std::uint32_t prefix = prefix_s;
    const std::uint32_t high_mask = shift == 24 ? 0u : (0xffffffffu << (shift + 8));
    for (std::int64_t i = tid; i < a.vocab; i += kSampleThreads) {
      const std::uint32_t key = float_key(x[i]);
      if ((key & high_mask) == (prefix & high_mask)) atomicAdd(&histogram[(key >> shift) & 0xff], 1);
    }
    __syncthreads();
    if (tid == 0) {
      int remaining = remaining_s, digit = 255;
      for (; digit > 0; --digit) {
        if (histogram[digit] >= remaining) break;
        remaining -= histogram[digit];
      }
      prefix_s = prefix | (static_cast<std::uint32_t>(digit) << shift);
      remaining_s = remaining;  // how many keys equal to the final threshold still to take
    }
    __syncthreads();
  }
  const std::uint32_t threshold = prefix_s;
  const int equal_needed = remaining_s;

  // Candidates: every key above the threshold, then the first `equal_needed` equal keys in index
  // order. A sort key packs (logit key, inverted index) so a descending sort breaks ties by index.
  if (tid == 0) {
    count_gt = 0;
    taken = 0;
  }
  sort_keys[tid] = 0ull;
  __syncthreads();
  for (std::int64_t i = tid; i < a.vocab; i += kSampleThreads) {
    const std::uint32_t key = float_key(x[i]);
    if (key > threshold) {
      const int at = atomicAdd(&count_gt, 1);
      sort_keys[at] = (static_cast<unsigned long long>(key) << 32) | (0xffffffffu - static_cast<std::uint32_t>(i));
    }
  }
  __syncthreads();
  const int above = count_gt;
  for (std::int64_t base = 0; base < a.vocab; base += kSampleThreads) {
    if (taken >= equal_needed) break;  // uniform: read after a barrier
    const std::int64_t i = base + tid;
    const bool equal = i < a.vocab && float_key(x[i]) == threshold;
    const int position = block_inclusive_scan(equal ? 1 : 0, iscratch) - 1 + taken;
    if (equal && position < equal_needed)
      sort_keys[above + position] = (static_cast<unsigned long long>(threshold) << 32) |
                                    (0xffffffffu - static_cast<std::uint32_t>(i));
    __syncthreads();
    if (tid == kSampleThreads - 1) taken = position + 1;
    __syncthreads();
  }

  // Bitonic sort, descending.
  for (int size = 2; size <= kCandidates; size <<= 1)
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      __syncthreads();
      const int partner = tid ^ stride;
      if (partner > tid) {
        const bool descending = (tid & size) == 0;
        const unsigned long long mine = sort_keys[tid], other = sort_keys[partner];
        if ((mine < other) == descending) {
          sort_keys[tid] = other;
          sort_keys[partner] = mine;
        }
      }
    }
  __syncthreads();

  const int index = static_cast<int>(0xffffffffu - static_cast<std::uint32_t>(sort_keys[tid]));
  const float prob = tid < k ? expf((x[tid < k ? index : 0] - max) / temperature) / z : 0.0f;
  const float running = block_inclusive_scan(prob, fscratch);
  cumulative[tid] = running;
  const float top_p = a.top_p[row];
  const bool kept = tid < k && running - prob < top_p;
  if (tid == 0) {
    pick = 0x7fffffff;
    last_kept = 0;
  }
  __syncthreads();
  if (kept) atomicMax(&last_kept, tid);
  __syncthreads();
  const float target = a.uniform[row] * cumulative[last_kept];
  if (kept && running > target) atomicMin(&pick, tid);
  __syncthreads();
  if (tid == 0) {
    const int chosen = pick == 0x7fffffff ? last_kept : pick;
    a.tokens[row] = static_cast<std::int32_t>(0xffffffffu - static_cast<std::uint32_t>(sort_keys[chosen]));
  }
}

}  // namespace shoal::kernels::cuda::detail
