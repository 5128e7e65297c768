#pragma once
// Device helpers shared by the kernels: conversions, warp reductions, the bf16 tensor-core MMA.

#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace shoal::kernels::cuda::detail {

inline cudaStream_t as_stream(void* stream) { return static_cast<cudaStream_t>(stream); }

template <typename T>
constexpr T ceil_div(T a, T b) {
  return (a + b - 1) / b;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Packs two floats into a bf16x2 register, low half first (round to nearest even).
__device__ __forceinline__ std::uint32_t pack_bf16x2(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const std::uint32_t*>(&v);
}

// Two bf16 values (as raw 16-bit) into one register, `lo` in the low half.
__device__ __forceinline__ std::uint32_t pack_raw16(std::uint16_t lo, std::uint16_t hi) {
  return static_cast<std::uint32_t>(lo) | (static_cast<std::uint32_t>(hi) << 16);
}

// Two FP8 E4M3 bytes (low byte first) to a bf16x2 register. Exact: every e4m3 value, subnormals
// included, is a half, and every half in e4m3's range is a bfloat16.
__device__ __forceinline__ std::uint32_t fp8x2_to_bf16x2(std::uint16_t two) {
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(two), __NV_E4M3);
  const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&h));
  return pack_bf16x2(f.x, f.y);
}

// D = A * B + D for one m16n8k16 tile: bf16 inputs, fp32 accumulation. Fragment layouts
// (lane = 4 * group + tig): a0..a3 hold A[group][2tig..], A[group+8][2tig..],
// A[group][2tig+8..], A[group+8][2tig+8..]; b0, b1 hold B[k=2tig..][n=group],
// B[k=2tig+8..][n=group]; d0..d3 hold D[group][2tig], D[group][2tig+1], D[group+8][2tig],
// D[group+8][2tig+1].
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const std::uint32_t (&a)[4],
                                               std::uint32_t b0, std::uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Rotates one interleaved pair like the reference: fp32 angle, then full-precision sincosf.
__device__ __forceinline__ void rotate_pair(float* v, float position, float frequency) {
  const float angle = position * frequency;
  float s, c;
  sincosf(angle, &s, &c);
  const float a = v[0], b = v[1];
  v[0] = a * c - b * s;
  v[1] = a * s + b * c;
}

}  // namespace shoal::kernels::cuda::detail
