#pragma once
// Absorbed-MLA kernels. A block owns 64 (query, head) rows of one sequence and one context
// split. Eight warps: warp (wm = warp % 4, wn = warp / 4) scores rows 16 wm.. against tokens
// 16 wn.. of each 32-token tile, and accumulates output columns [wn * rank / 2, (wn + 1) * rank / 2)
// of its 16 rows. Cache tiles arrive by cp.async, double-buffered; the softmax is the online
// (flash) one in fp32 with P rounded to bf16 for the second MMA.

#include "device_common.cuh"

namespace shoal::kernels::cuda::detail {

constexpr int kMlaThreads = 256;
constexpr int kMlaRows = 64;
constexpr int kMlaTokens = 32;
constexpr int kMlaMaxDim = 576;
constexpr int kMlaMaxOutTiles = kMlaMaxDim / 16;  // n8 tiles per warp for rank <= 512 (+ slack)
constexpr int kMlaPPitch = kMlaTokens + 8;
constexpr int kMlaSPitch = kMlaTokens + 1;

struct mla_args {
  int queries, heads, rank, dim, splits;
  float scale;
  const float* q;
  const __nv_bfloat16* cache;
  int page_size, max_pages;
  const std::int32_t* block_table;
  const std::int32_t* seq_lens;
  float* part_out;   // [batch][splits][rows][rank]
  float* part_max;   // [batch][splits][rows]
  float* part_sum;   // [batch][splits][rows]
  float* out;        // [batch][rows][rank]
};

// Shared-memory layout for a given latent width (bytes).
struct mla_smem {
  int pitch;  // bf16 per row of Q and KV
  std::size_t q, kv0, kv1, s, p, alpha, total;
  __host__ __device__ explicit mla_smem(int dim) : pitch(dim + 8) {
    q = 0;
    kv0 = q + std::size_t{kMlaRows} * pitch * 2;
    kv1 = kv0 + std::size_t{kMlaTokens} * pitch * 2;
    s = kv1 + std::size_t{kMlaTokens} * pitch * 2;
    p = s + std::size_t{kMlaRows} * kMlaSPitch * 4;
    alpha = p + std::size_t{kMlaRows} * kMlaPPitch * 2;
    total = alpha + kMlaRows * 4;
  }
};

__device__ __forceinline__ void cp_async_16(void* smem, const void* global, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int bytes = valid ? 16 : 0;  // 0: fill with zeros, read nothing
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(global), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

__global__ void __launch_bounds__(kMlaThreads) mla_attention_kernel(mla_args a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const mla_smem layout(a.dim);
  __nv_bfloat16* q_s = reinterpret_cast<__nv_bfloat16*>(smem_raw + layout.q);
  __nv_bfloat16* kv_s[2] = {reinterpret_cast<__nv_bfloat16*>(smem_raw + layout.kv0),
                            reinterpret_cast<__nv_bfloat16*>(smem_raw + layout.kv1)};
  float* s_s = reinterpret_cast<float*>(smem_raw + layout.s);
  __nv_bfloat16* p_s = reinterpret_cast<__nv_bfloat16*>(smem_raw + layout.p);
  float* alpha_s = reinterpret_cast<float*>(smem_raw + layout.alpha);

  const int b = blockIdx.z, split = blockIdx.y;
  const int rows_total = a.queries * a.heads;
  const int row0 = blockIdx.x * kMlaRows;
  const int seq_len = a.seq_lens[b];
  const int first_position = seq_len - a.queries;
  // The last row of the block sees the most context.
  const int last_row = min(row0 + kMlaRows, rows_total) - 1;
  const int kv_end_block = first_position + last_row / a.heads + 1;
  const int chunk = (((seq_len + a.splits - 1) / a.splits) + kMlaTokens - 1) / kMlaTokens * kMlaTokens;
  const int kv_begin = split * chunk;
  const int kv_end = min(kv_end_block, kv_begin + chunk);
  const std::int64_t part_row0 = (static_cast<std::int64_t>(b) * a.splits + split) * rows_total;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int group = lane >> 2, tig = lane & 3;
  const int wm = warp & 3, wn = warp >> 2;
  const int chunks_per_token = a.dim / 8;

  auto issue_tile = [&](int t0, __nv_bfloat16* dst) {
    for (int c = tid; c < kMlaTokens * chunks_per_token; c += kMlaThreads) {
      const int tok = c / chunks_per_token, part = c % chunks_per_token;
      const int t = t0 + tok;
      const bool valid = t < kv_end;
      const __nv_bfloat16* src = a.cache;
      if (valid) {
        const std::int64_t page = a.block_table[static_cast<std::int64_t>(b) * a.max_pages + t / a.page_size];
        src = a.cache + (page * a.page_size + t % a.page_size) * a.dim + part * 8;
      }
      cp_async_16(dst + tok * layout.pitch + part * 8, src, valid);
    }
    cp_async_commit();
  };

  if (kv_begin < kv_end) issue_tile(kv_begin, kv_s[0]);

  // Queries of the block's rows, as bf16; rows past the end are zero.
  for (int i = tid; i < kMlaRows * a.dim; i += kMlaThreads) {
    const int r = i / a.dim, d = i % a.dim;
    const int row = row0 + r;
    const float v = row < rows_total
                        ? a.q[(static_cast<std::int64_t>(b) * rows_total + row) * a.dim + d]
                        : 0.0f;
    q_s[r * layout.pitch + d] = __float2bfloat16_rn(v);
  }

  // Online-softmax state of the row this thread helps reduce (4 threads per row).
  const int soft_row = tid >> 2, soft_part = tid & 3;
  const int soft_visible = first_position + (row0 + soft_row) / a.heads + 1;
  float row_max = -INFINITY, row_sum = 0.0f;

  const int out_tiles = a.rank / 16;  // n8 tiles per warp (each warp has half the columns)
  const int col_base = wn * (a.rank / 2);
  float o[kMlaMaxOutTiles][4];
#pragma unroll
  for (int j = 0; j < kMlaMaxOutTiles; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;

  const int tiles = kv_begin < kv_end ? (kv_end - kv_begin + kMlaTokens - 1) / kMlaTokens : 0;
  for (int it = 0; it < tiles; ++it) {
    const int t0 = kv_begin + it * kMlaTokens;
    const __nv_bfloat16* kv = kv_s[it & 1];
    if (it + 1 < tiles) {
      issue_tile(t0 + kMlaTokens, kv_s[(it + 1) & 1]);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();

    // S = Q KV^T for rows 16 wm.., tokens 16 wn.. (two n8 tiles).
    float s[2][4] = {};
    for (int k0 = 0; k0 < a.dim; k0 += 16) {
      const __nv_bfloat16* qa = q_s + (wm * 16 + group) * layout.pitch + k0 + 2 * tig;
      const std::uint32_t af[4] = {*reinterpret_cast<const std::uint32_t*>(qa),
                                   *reinterpret_cast<const std::uint32_t*>(qa + 8 * layout.pitch),
                                   *reinterpret_cast<const std::uint32_t*>(qa + 8),
                                   *reinterpret_cast<const std::uint32_t*>(qa + 8 * layout.pitch + 8)};
#pragma unroll
      for (int ni = 0; ni < 2; ++ni) {
        const __nv_bfloat16* kb = kv + (wn * 16 + ni * 8 + group) * layout.pitch + k0 + 2 * tig;
        mma_bf16_16816(s[ni], af, *reinterpret_cast<const std::uint32_t*>(kb),
                       *reinterpret_cast<const std::uint32_t*>(kb + 8));
      }
    }
#pragma unroll
    for (int ni = 0; ni < 2; ++ni)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int r = wm * 16 + group + (j >= 2 ? 8 : 0);
        const int col = wn * 16 + ni * 8 + 2 * tig + (j & 1);
        const int visible = first_position + (row0 + r) / a.heads + 1;
        const int t = t0 + col;
        s_s[r * kMlaSPitch + col] = (t < visible && t < kv_end) ? s[ni][j] * a.scale : -INFINITY;
      }
    __syncthreads();

    // Online softmax: 4 threads per row, 8 tokens each.
    {
      float v[8];
      float tile_max = -INFINITY;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        v[i] = s_s[soft_row * kMlaSPitch + soft_part * 8 + i];
        tile_max = fmaxf(tile_max, v[i]);
      }
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
      const float new_max = fmaxf(row_max, tile_max);
      float alpha = 1.0f, sum = 0.0f;
      if (new_max != -INFINITY) {
        alpha = expf(row_max - new_max);  // row_max == -inf gives 0
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          v[i] = expf(v[i] - new_max);
          sum += v[i];
        }
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = 0.0f;
      }
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      row_sum = row_sum * alpha + sum;
      row_max = new_max;
#pragma unroll
      for (int i = 0; i < 8; i += 2)
        *reinterpret_cast<std::uint32_t*>(p_s + soft_row * kMlaPPitch + soft_part * 8 + i) =
            pack_bf16x2(v[i], v[i + 1]);
      if (soft_part == 0) alpha_s[soft_row] = alpha;
    }
    __syncthreads();

    // O = alpha O + P V over this warp's 16 rows and half of the latent columns.
    {
      const float alpha0 = alpha_s[wm * 16 + group], alpha1 = alpha_s[wm * 16 + group + 8];
#pragma unroll
      for (int j = 0; j < kMlaMaxOutTiles; ++j) {
        if (j >= out_tiles) break;
        o[j][0] *= alpha0;
        o[j][1] *= alpha0;
        o[j][2] *= alpha1;
        o[j][3] *= alpha1;
      }
#pragma unroll
      for (int k0 = 0; k0 < kMlaTokens; k0 += 16) {
        const __nv_bfloat16* pa = p_s + (wm * 16 + group) * kMlaPPitch + k0 + 2 * tig;
        const std::uint32_t af[4] = {*reinterpret_cast<const std::uint32_t*>(pa),
                                     *reinterpret_cast<const std::uint32_t*>(pa + 8 * kMlaPPitch),
                                     *reinterpret_cast<const std::uint32_t*>(pa + 8),
                                     *reinterpret_cast<const std::uint32_t*>(pa + 8 * kMlaPPitch + 8)};
        const std::uint16_t* vb = reinterpret_cast<const std::uint16_t*>(kv) + (k0 + 2 * tig) * layout.pitch;
#pragma unroll
        for (int j = 0; j < kMlaMaxOutTiles; ++j) {
          if (j >= out_tiles) break;
          const int n = col_base + j * 8 + group;
          const std::uint32_t b0 = pack_raw16(vb[n], vb[layout.pitch + n]);
          const std::uint32_t b1 = pack_raw16(vb[8 * layout.pitch + n], vb[9 * layout.pitch + n]);
          mma_bf16_16816(o[j], af, b0, b1);
        }
      }
    }
    __syncthreads();
  }

  // Unnormalized partial output plus this split's softmax statistics, merged later.
  if (soft_part == 0 && row0 + soft_row < rows_total) {
    const bool any = kv_begin < min(kv_end, soft_visible);
    a.part_max[part_row0 + row0 + soft_row] = any ? row_max : -INFINITY;
    a.part_sum[part_row0 + row0 + soft_row] = any ? row_sum : 0.0f;
  }
#pragma unroll
  for (int j = 0; j < kMlaMaxOutTiles; ++j) {
    if (j >= out_tiles) break;
    const int col = col_base + j * 8 + 2 * tig;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = row0 + wm * 16 + group + half * 8;
      if (r >= rows_total) continue;
      *reinterpret_cast<float2*>(a.part_out + (part_row0 + r) * a.rank + col) =
          make_float2(o[j][2 * half], o[j][2 * half + 1]);
    }
  }
}

// Merges the splits of one (sequence, row): out = sum_s e^(m_s - M) O_s / sum_s e^(m_s - M) l_s.
__global__ void mla_combine_kernel(mla_args a) {
  const int b = blockIdx.y, row = blockIdx.x;
  const int rows_total = a.queries * a.heads;
  float global_max = -INFINITY;
  for (int s = 0; s < a.splits; ++s)
    global_max = fmaxf(global_max, a.part_max[(static_cast<std::int64_t>(b) * a.splits + s) * rows_total + row]);
  float denom = 0.0f;
  for (int s = 0; s < a.splits; ++s) {
    const std::int64_t i = (static_cast<std::int64_t>(b) * a.splits + s) * rows_total + row;
    if (a.part_max[i] != -INFINITY) denom += expf(a.part_max[i] - global_max) * a.part_sum[i];
  }
  const float inv = denom > 0.0f ? 1.0f / denom : 0.0f;
  for (int c = threadIdx.x; c < a.rank; c += blockDim.x) {
    float acc = 0.0f;
    for (int s = 0; s < a.splits; ++s) {
      const std::int64_t i = (static_cast<std::int64_t>(b) * a.splits + s) * rows_total + row;
      if (a.part_max[i] != -INFINITY) acc += expf(a.part_max[i] - global_max) * a.part_out[i * a.rank + c];
    }
    a.out[(static_cast<std::int64_t>(b) * rows_total + row) * a.rank + c] = acc * inv;
  }
}

}  // namespace shoal::kernels::cuda::detail
