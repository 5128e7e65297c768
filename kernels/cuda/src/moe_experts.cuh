#pragma once
// Routed-expert kernels: count, scan + tile list, permute, the grouped GEMMs, ordered combine.
//
// The grouped GEMM computes, for one tile of kBM rows of one expert and kBN output columns,
// C = A W^T with A bf16 rows of that expert (permuted activations, or SwiGLU outputs) and W the
// expert's bf16 or FP8 weight. Four warps, mma.sync m16n8k16 (bf16 in, fp32 accumulate). The
// K loop stages one kBK-wide slice of A and W in shared memory while the next slice is being
// fetched into registers. FP8 weights are widened to bf16 exactly on their way into shared
// memory; each slice's partial sums are multiplied by its block scale before joining the fp32
// accumulator (kBN and kBK divide 128, so a slice has a single scale).

#include "device_common.cuh"
#include "shoal/kernels/cuda/moe.hpp"

namespace shoal::kernels::cuda::detail {

constexpr int kMoeThreads = 128;
constexpr int kMoeBN = 64;
constexpr int kMoeBK = 64;
constexpr int kMoePitch = kMoeBK + 8;  // bf16 per shared row: 8 of padding spread the banks.
constexpr int kScaleBlock = 128;

// Where the routed-expert pipeline keeps its tables; all device pointers into the workspace.
struct moe_plan {
  std::int32_t* counts;       // [experts] held (token, choice) pairs per expert
  std::int32_t* offsets;      // [experts + 1] first permuted row of each expert
  std::int32_t* cursor;       // [experts] next free permuted row while scattering
  std::int32_t* tile_expert;  // [max_tiles] expert of each row tile
  std::int32_t* tile_row;     // [max_tiles] first row of the tile inside its expert
  std::int32_t* num_tiles;    // [1]
  std::int32_t* perm_slot;    // [tokens * top_k] (token * top_k + choice) of each permuted row
  __nv_bfloat16* xp;          // [tokens * top_k][hidden] permuted activations
  __nv_bfloat16* act;         // [tokens * top_k][inter] SwiGLU outputs
  float* rows;                // [tokens * top_k][hidden] weighted outputs (ordered combine)
};

__global__ void moe_count_kernel(const std::int32_t* indices, std::int64_t pairs,
                                 const moe_expert_pointers* table, std::int32_t* counts) {
  const std::int64_t i = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x;
  if (i >= pairs) return;
  const int e = indices[i];
  if (table[e].gate) atomicAdd(&counts[e], 1);
}

// One block of >= experts threads: exclusive scans of rows and of row tiles per expert.
__global__ void moe_scan_kernel(moe_plan plan, int experts, int bm) {
  __shared__ std::int32_t rows[1024];
  __shared__ std::int32_t tiles[1024];
  const int e = threadIdx.x;
  const std::int32_t count = e < experts ? plan.counts[e] : 0;
  const std::int32_t my_tiles = (count + bm - 1) / bm;
  rows[e] = count;
  tiles[e] = my_tiles;
  __syncthreads();
  for (int step = 1; step < static_cast<int>(blockDim.x); step <<= 1) {
    const std::int32_t r = e >= step ? rows[e - step] : 0;
    const std::int32_t t = e >= step ? tiles[e - step] : 0;
    __syncthreads();
    rows[e] += r;
    tiles[e] += t;
    __syncthreads();
  }
  if (e < experts) {
    const std::int32_t row0 = rows[e] - count, tile0 = tiles[e] - my_tiles;
    plan.offsets[e] = row0;
    plan.cursor[e] = row0;
    for (std::int32_t t = 0; t < my_tiles; ++t) {
      plan.tile_expert[tile0 + t] = e;
      plan.tile_row[tile0 + t] = t * bm;
    }
    if (e == experts - 1) {
      plan.offsets[experts] = rows[e];
      *plan.num_tiles = tiles[e];
    }
  }
}

// One block per (token, choice): claims a row of its expert, copies the activation as bf16.
__global__ void moe_scatter_kernel(const float* x, const std::int32_t* indices, int top_k,
                                   std::int64_t hidden, const moe_expert_pointers* table,
                                   moe_plan plan) {
  __shared__ std::int32_t row;
  const std::int64_t slot = blockIdx.x;
  const int e = indices[slot];
  if (!table[e].gate) return;
  if (threadIdx.x == 0) {
    row = atomicAdd(&plan.cursor[e], 1);
    plan.perm_slot[row] = static_cast<std::int32_t>(slot);
  }
  __syncthreads();
  const float4* src = reinterpret_cast<const float4*>(x + (slot / top_k) * hidden);
  uint2* dst = reinterpret_cast<uint2*>(plan.xp + row * hidden);
  for (std::int64_t i = threadIdx.x; i < hidden / 4; i += blockDim.x) {
    const float4 v = src[i];
    dst[i] = make_uint2(pack_bf16x2(v.x, v.y), pack_bf16x2(v.z, v.w));
  }
}

// Adds each token's weighted rows into y in ascending expert order (the reference's order).
__global__ void moe_combine_kernel(const std::int32_t* indices, int top_k, std::int64_t hidden,
                                   const moe_expert_pointers* table, const float* rows, float* y) {
  __shared__ int order[64];
  __shared__ int count;
  const std::int64_t token = blockIdx.x;
  if (threadIdx.x == 0) {
    int n = 0;
    for (int k = 0; k < top_k; ++k) {
      const int e = indices[token * top_k + k];
      if (!table[e].gate) continue;
      int at = n++;  // insertion sort by expert id; top_k is small
      while (at > 0 && indices[token * top_k + order[at - 1]] > e) {
        order[at] = order[at - 1];
        --at;
      }
      order[at] = k;
    }
    count = n;
  }
  __syncthreads();
  for (std::int64_t d = threadIdx.x; d < hidden; d += blockDim.x) {
    float acc = y[token * hidden + d];
    for (int i = 0; i < count; ++i) acc += rows[(token * top_k + order[i]) * hidden + d];
    y[token * hidden + d] = acc;
  }
}

struct moe_gemm_args {
  moe_plan plan;
  const moe_expert_pointers* table;
  std::int64_t n;       // output columns (inter for gate/up, hidden for down)
  std::int64_t k;       // reduction length (hidden for gate/up, inter for down)
  int top_k;
  const float* weights; // routing weights [tokens * top_k] (down)
  float* y;             // [tokens][hidden] (down, atomic combine)
  bool ordered;         // down: write plan.rows instead of adding into y
};

template <int kBM>
struct moe_tile_shape {
  static constexpr int kWarpsM = kBM >= 32 ? 2 : 1;
  static constexpr int kWarpsN = 4 / kWarpsM;
  static constexpr int kMI = kBM / (kWarpsM * 16);    // m16 tiles per warp
  static constexpr int kNI = kMoeBN / (kWarpsN * 8);  // n8 tiles per warp
  static constexpr int kAChunks = kBM * kMoeBK / 8 / kMoeThreads;  // 16-byte loads per thread
};

// One kBK slice of one weight matrix on its way to shared memory.
template <bool kFp8>
struct weight_slice {
  static constexpr int kChunks = kFp8 ? kMoeBN * kMoeBK / 16 / kMoeThreads
                                      : kMoeBN * kMoeBK / 8 / kMoeThreads;
  uint4 raw[kChunks];

  __device__ __forceinline__ void load(const void* w, std::int64_t n0, std::int64_t k0,
                                       std::int64_t n, std::int64_t k) {
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
      const int c = threadIdx.x + i * kMoeThreads;
      const int per_row = kFp8 ? kMoeBK / 16 : kMoeBK / 8;
      const int width = kFp8 ? 16 : 8;
      const std::int64_t row = n0 + c / per_row, col = k0 + (c % per_row) * width;
      raw[i] = make_uint4(0, 0, 0, 0);
      if (row < n && col < k) {
        const std::int64_t byte = (row * k + col) * (kFp8 ? 1 : 2);
        raw[i] = __ldg(reinterpret_cast<const uint4*>(static_cast<const char*>(w) + byte));
      }
    }
  }

  __device__ __forceinline__ void store(__nv_bfloat16* smem) const {
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
      const int c = threadIdx.x + i * kMoeThreads;
      if constexpr (kFp8) {
        const int row = c / (kMoeBK / 16), col = (c % (kMoeBK / 16)) * 16;
        const std::uint32_t words[4] = {raw[i].x, raw[i].y, raw[i].z, raw[i].w};
        uint4 lo, hi;
        std::uint32_t* out_lo = &lo.x;
        std::uint32_t* out_hi = &hi.x;
#pragma unroll
        for (int w = 0; w < 2; ++w) {
          out_lo[2 * w] = fp8x2_to_bf16x2(static_cast<std::uint16_t>(words[w] & 0xffffu));
          out_lo[2 * w + 1] = fp8x2_to_bf16x2(static_cast<std::uint16_t>(words[w] >> 16));
          out_hi[2 * w] = fp8x2_to_bf16x2(static_cast<std::uint16_t>(words[w + 2] & 0xffffu));
          out_hi[2 * w + 1] = fp8x2_to_bf16x2(static_cast<std::uint16_t>(words[w + 2] >> 16));
        }
        *reinterpret_cast<uint4*>(smem + row * kMoePitch + col) = lo;
        *reinterpret_cast<uint4*>(smem + row * kMoePitch + col + 8) = hi;
      } else {
        const int row = c / (kMoeBK / 8), col = (c % (kMoeBK / 8)) * 8;
        *reinterpret_cast<uint4*>(smem + row * kMoePitch + col) = raw[i];
      }
    }
  }
};

// Accumulates one kBK slice: acc[mi][ni] += A[warp rows] W[warp cols]^T.
template <int kBM>
__device__ __forceinline__ void mma_slice(const __nv_bfloat16* a_smem, const __nv_bfloat16* b_smem,
                                          float (&acc)[moe_tile_shape<kBM>::kMI][moe_tile_shape<kBM>::kNI][4]) {
  using shape = moe_tile_shape<kBM>;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int group = lane >> 2, tig = lane & 3;
  const int warp_m = warp % shape::kWarpsM, warp_n = warp / shape::kWarpsM;
#pragma unroll
  for (int kk = 0; kk < kMoeBK; kk += 16) {
    std::uint32_t a[shape::kMI][4];
#pragma unroll
    for (int mi = 0; mi < shape::kMI; ++mi) {
      const __nv_bfloat16* base = a_smem + (warp_m * shape::kMI * 16 + mi * 16 + group) * kMoePitch + kk + 2 * tig;
      a[mi][0] = *reinterpret_cast<const std::uint32_t*>(base);
      a[mi][1] = *reinterpret_cast<const std::uint32_t*>(base + 8 * kMoePitch);
      a[mi][2] = *reinterpret_cast<const std::uint32_t*>(base + 8);
      a[mi][3] = *reinterpret_cast<const std::uint32_t*>(base + 8 * kMoePitch + 8);
    }
#pragma unroll
    for (int ni = 0; ni < shape::kNI; ++ni) {
      const __nv_bfloat16* base = b_smem + (warp_n * shape::kNI * 8 + ni * 8 + group) * kMoePitch + kk + 2 * tig;
      const std::uint32_t b0 = *reinterpret_cast<const std::uint32_t*>(base);
      const std::uint32_t b1 = *reinterpret_cast<const std::uint32_t*>(base + 8);
#pragma unroll
      for (int mi = 0; mi < shape::kMI; ++mi) mma_bf16_16816(acc[mi][ni], a[mi], b0, b1);
    }
  }
}

// kGateUp: A = permuted activations, W = gate and up, epilogue SwiGLU into plan.act.
// Otherwise: A = plan.act, W = down, epilogue weight * row into y (atomics) or plan.rows.
template <int kBM, bool kFp8, bool kGateUp>
__global__ void __launch_bounds__(kMoeThreads) moe_gemm_kernel(moe_gemm_args a) {
  using shape = moe_tile_shape<kBM>;
  constexpr int kMats = kGateUp ? 2 : 1;
  __shared__ __align__(16) __nv_bfloat16 a_smem[kBM * kMoePitch];
  __shared__ __align__(16) __nv_bfloat16 b_smem[kMats][kMoeBN * kMoePitch];

  const int tile = blockIdx.y;
  if (tile >= *a.plan.num_tiles) return;
  const int expert = a.plan.tile_expert[tile];
  const std::int64_t m0 = a.plan.tile_row[tile];
  const std::int64_t rows = a.plan.counts[expert];
  const std::int64_t base = a.plan.offsets[expert];
  const std::int64_t n0 = static_cast<std::int64_t>(blockIdx.x) * kMoeBN;
  const moe_expert_pointers ptr = a.table[expert];
  const void* w[kMats];
  const float* scale[kMats];
  if constexpr (kGateUp) {
    w[0] = ptr.gate;
    w[1] = ptr.up;
    scale[0] = ptr.gate_scale;
    scale[1] = ptr.up_scale;
  } else {
    w[0] = ptr.down;
    scale[0] = ptr.down_scale;
  }
  const __nv_bfloat16* a_src = kGateUp ? a.plan.xp : a.plan.act;
  const std::int64_t scale_cols = (a.k + kScaleBlock - 1) / kScaleBlock;
  const std::int64_t scale_row = n0 / kScaleBlock;

  float acc[kMats][shape::kMI][shape::kNI][4] = {};
  uint4 a_raw[shape::kAChunks];
  weight_slice<kFp8> b_raw[kMats];

  auto load = [&](std::int64_t k0) {
#pragma unroll
    for (int i = 0; i < shape::kAChunks; ++i) {
      const int c = threadIdx.x + i * kMoeThreads;
      const std::int64_t row = m0 + c / (kMoeBK / 8), col = k0 + (c % (kMoeBK / 8)) * 8;
      a_raw[i] = make_uint4(0, 0, 0, 0);
      if (row < rows && col < a.k)
        a_raw[i] = *reinterpret_cast<const uint4*>(a_src + (base + row) * a.k + col);
    }
#pragma unroll
    for (int m = 0; m < kMats; ++m) b_raw[m].load(w[m], n0, k0, a.n, a.k);
  };

  load(0);
  for (std::int64_t k0 = 0; k0 < a.k; k0 += kMoeBK) {
#pragma unroll
    for (int i = 0; i < shape::kAChunks; ++i) {
      const int c = threadIdx.x + i * kMoeThreads;
      *reinterpret_cast<uint4*>(a_smem + (c / (kMoeBK / 8)) * kMoePitch + (c % (kMoeBK / 8)) * 8) = a_raw[i];
    }
#pragma unroll
    for (int m = 0; m < kMats; ++m) b_raw[m].store(b_smem[m]);
    __syncthreads();
    if (k0 + kMoeBK < a.k) load(k0 + kMoeBK);  // in flight while this slice multiplies
#pragma unroll
    for (int m = 0; m < kMats; ++m) {
      if constexpr (kFp8) {
        float part[shape::kMI][shape::kNI][4] = {};
        mma_slice<kBM>(a_smem, b_smem[m], part);
        const float s = __ldg(scale[m] + scale_row * scale_cols + k0 / kScaleBlock);
#pragma unroll
        for (int mi = 0; mi < shape::kMI; ++mi)
#pragma unroll
          for (int ni = 0; ni < shape::kNI; ++ni)
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[m][mi][ni][j] += part[mi][ni][j] * s;
      } else {
        mma_slice<kBM>(a_smem, b_smem[m], acc[m]);
      }
    }
    __syncthreads();
  }

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int group = lane >> 2, tig = lane & 3;
  const int warp_m = warp % shape::kWarpsM, warp_n = warp / shape::kWarpsM;
#pragma unroll
  for (int mi = 0; mi < shape::kMI; ++mi)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const std::int64_t row = m0 + warp_m * shape::kMI * 16 + mi * 16 + group + half * 8;
      if (row >= rows) continue;
      const std::int64_t prow = base + row;  // permuted row
      std::int32_t slot = 0;
      float weight = 0.0f;
      if constexpr (!kGateUp) {
        slot = a.plan.perm_slot[prow];
        weight = a.weights[slot];
      }
#pragma unroll
      for (int ni = 0; ni < shape::kNI; ++ni) {
        const std::int64_t col = n0 + warp_n * shape::kNI * 8 + ni * 8 + 2 * tig;
        if (col >= a.n) continue;  // n is even, so col + 1 < n too
        const float v0 = acc[0][mi][ni][2 * half], v1 = acc[0][mi][ni][2 * half + 1];
        if constexpr (kGateUp) {
          const float u0 = acc[kMats - 1][mi][ni][2 * half], u1 = acc[kMats - 1][mi][ni][2 * half + 1];
          const float h0 = v0 / (1.0f + expf(-v0)) * u0;
          const float h1 = v1 / (1.0f + expf(-v1)) * u1;
          *reinterpret_cast<std::uint32_t*>(a.plan.act + prow * a.n + col) = pack_bf16x2(h0, h1);
        } else if (a.ordered) {
          *reinterpret_cast<float2*>(a.plan.rows + static_cast<std::int64_t>(slot) * a.n + col) =
              make_float2(weight * v0, weight * v1);
        } else {
          float* y = a.y + static_cast<std::int64_t>(slot / a.top_k) * a.n + col;
          atomicAdd(y, weight * v0);
          atomicAdd(y + 1, weight * v1);
        }
      }
    }
}

}  // namespace shoal::kernels::cuda::detail
