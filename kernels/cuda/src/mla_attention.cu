#include "shoal/kernels/cuda/mla_attention.hpp"

#include "check.cuh"
#include "mla_attention.cuh"
#include "shoal/kernels/cuda/context.hpp"

#include <algorithm>
#include <string>

namespace shoal::kernels::cuda {

namespace {
constexpr std::size_t kAlign = 256;
std::size_t aligned(std::size_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }
}  // namespace

std::size_t mla_attention_workspace_bytes(std::int64_t batch, std::int64_t queries,
                                          std::int64_t heads, std::int64_t kv_lora_rank,
                                          std::int64_t splits) {
  const auto rows = static_cast<std::size_t>(batch * std::max<std::int64_t>(splits, 1) * queries * heads);
  return aligned(rows * static_cast<std::size_t>(kv_lora_rank) * 4) + 2 * aligned(rows * 4);
}

std::int64_t mla_attention_splits(int multiprocessors, std::int64_t batch, std::int64_t queries,
                                  std::int64_t heads, std::int64_t max_seq_len) {
  const std::int64_t row_blocks = batch * ((queries * heads + detail::kMlaRows - 1) / detail::kMlaRows);
  // One block per SM at this size: aim for two waves' worth of blocks, and keep every split at
  // least four 32-token tiles long so the merge stays cheap.
  const std::int64_t wanted = (2 * static_cast<std::int64_t>(multiprocessors) + row_blocks - 1) / row_blocks;
  const std::int64_t longest = std::max<std::int64_t>(1, max_seq_len / (4 * detail::kMlaTokens));
  return std::clamp<std::int64_t>(wanted, 1, std::min<std::int64_t>(longest, 64));
}

void mla_attention(context& ctx, const mla_attention_params& p) {
  if (p.batch <= 0 || p.queries <= 0) return;
  const std::int64_t dim = p.kv_lora_rank + p.rope_dim;
  SHOAL_CUDA_REQUIRE(p.q && p.cache && p.block_table && p.seq_lens && p.out && p.workspace,
                     "mla_attention needs q, cache, block_table, seq_lens, out and a workspace");
  SHOAL_CUDA_REQUIRE(p.kv_lora_rank > 0 && p.kv_lora_rank % 16 == 0 && p.rope_dim >= 0 &&
                         dim % 16 == 0 && dim <= detail::kMlaMaxDim && p.heads > 0 &&
                         p.page_size > 0 && p.max_pages > 0 && p.splits >= 1,
                     "mla_attention: unsupported shape rank " + std::to_string(p.kv_lora_rank) +
                         " rope " + std::to_string(p.rope_dim) + " heads " +
                         std::to_string(p.heads) + " splits " + std::to_string(p.splits));
  const std::int64_t rows = p.queries * p.heads;
  const std::size_t need =
      mla_attention_workspace_bytes(p.batch, p.queries, p.heads, p.kv_lora_rank, p.splits);
  SHOAL_CUDA_REQUIRE(p.workspace_bytes >= need, "mla_attention workspace holds " +
                                                    std::to_string(p.workspace_bytes) +
                                                    " bytes, needs " + std::to_string(need));
  const std::size_t part_rows = static_cast<std::size_t>(p.batch * p.splits * rows);
  char* ws = static_cast<char*>(p.workspace);
  const std::size_t out_bytes = aligned(part_rows * static_cast<std::size_t>(p.kv_lora_rank) * 4);
  detail::mla_args a{static_cast<int>(p.queries),
                     static_cast<int>(p.heads),
                     static_cast<int>(p.kv_lora_rank),
                     static_cast<int>(dim),
                     static_cast<int>(p.splits),
                     p.softmax_scale,
                     p.q,
                     reinterpret_cast<const __nv_bfloat16*>(p.cache),
                     static_cast<int>(p.page_size),
                     static_cast<int>(p.max_pages),
                     p.block_table,
                     p.seq_lens,
                     reinterpret_cast<float*>(ws),
                     reinterpret_cast<float*>(ws + out_bytes),
                     reinterpret_cast<float*>(ws + out_bytes + aligned(part_rows * 4)),
                     p.out};
  const detail::mla_smem layout(static_cast<int>(dim));
  SHOAL_CUDA_CHECK(cudaFuncSetAttribute(detail::mla_attention_kernel,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(layout.total)));
  const cudaStream_t stream = detail::as_stream(ctx.stream());
  const dim3 grid(static_cast<unsigned>((rows + detail::kMlaRows - 1) / detail::kMlaRows),
                  static_cast<unsigned>(p.splits), static_cast<unsigned>(p.batch));
  // Row blocks of one sequence and split are adjacent in launch order, so when heads exceed 64
  // the second block finds the cache tile in L2.
  // TODO(perf): one block for all 128 heads (two warpgroups, wgmma) reads each tile once.
  detail::mla_attention_kernel<<<grid, detail::kMlaThreads, layout.total, stream>>>(a);
  SHOAL_CUDA_CHECK_LAUNCH();
  detail::mla_combine_kernel<<<dim3(static_cast<unsigned>(rows), static_cast<unsigned>(p.batch)),
                               128, 0, stream>>>(a);
  SHOAL_CUDA_CHECK_LAUNCH();
}

}  // namespace shoal::kernels::cuda
