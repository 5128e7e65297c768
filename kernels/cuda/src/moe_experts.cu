#include "check.cuh"
#include "moe_experts.cuh"
#include "shoal/kernels/cuda/context.hpp"
#include "shoal/kernels/cuda/moe.hpp"

#include <string>

namespace shoal::kernels::cuda {

namespace {

constexpr std::size_t kAlign = 256;

std::size_t aligned(std::size_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

// Rows per tile: a decode batch gives each expert a handful of rows, and a 64-row tile would
// spend most of its tensor-core work on padding while the weights stream by.
// TODO(perf): at batch 1 only 8 experts x 32 column tiles stream weights, with one slice in
// flight per block; split-K or a deeper cp.async pipeline is the likely next step for decode.
int tile_rows(std::int64_t tokens, std::int64_t top_k, std::int64_t experts) {
  const std::int64_t pairs = tokens * top_k;
  return pairs <= 16 * experts ? 16 : 64;
}

// Upper bound of the row tiles: every non-empty expert may end in a partial tile.
std::int64_t max_tiles(std::int64_t pairs, std::int64_t experts, int bm) {
  return (pairs + bm - 1) / bm + std::min(experts, pairs);
}

struct layout {
  std::size_t counts, offsets, cursor, tile_expert, tile_row, num_tiles, perm_slot, xp, act, rows,
      total;
};

layout plan_layout(std::int64_t tokens, std::int64_t top_k, std::int64_t experts,
                   std::int64_t hidden, std::int64_t inter, moe_combine combine) {
  const std::size_t pairs = static_cast<std::size_t>(tokens * top_k);
  const std::size_t tiles = static_cast<std::size_t>(
      max_tiles(tokens * top_k, experts, tile_rows(tokens, top_k, experts)));
  const std::size_t e = static_cast<std::size_t>(experts);
  layout l{};
  std::size_t at = 0;
  auto take = [&](std::size_t bytes) {
    const std::size_t here = at;
    at += aligned(bytes);
    return here;
  };
  l.counts = take(e * 4);
  l.offsets = take((e + 1) * 4);
  l.cursor = take(e * 4);
  l.tile_expert = take(tiles * 4);
  l.tile_row = take(tiles * 4);
  l.num_tiles = take(4);
  l.perm_slot = take(pairs * 4);
  l.xp = take(pairs * static_cast<std::size_t>(hidden) * 2);
  l.act = take(pairs * static_cast<std::size_t>(inter) * 2);
  l.rows = combine == moe_combine::ordered ? take(pairs * static_cast<std::size_t>(hidden) * 4) : at;
  l.total = at;
  return l;
}

template <int kBM, bool kFp8>
void launch_gemms(const detail::moe_gemm_args& gate_up, const detail::moe_gemm_args& down,
                  unsigned tiles, cudaStream_t stream) {
  const dim3 grid_gate_up(static_cast<unsigned>((gate_up.n + detail::kMoeBN - 1) / detail::kMoeBN), tiles);
  detail::moe_gemm_kernel<kBM, kFp8, true><<<grid_gate_up, detail::kMoeThreads, 0, stream>>>(gate_up);
  SHOAL_CUDA_CHECK_LAUNCH();
  const dim3 grid_down(static_cast<unsigned>((down.n + detail::kMoeBN - 1) / detail::kMoeBN), tiles);
  detail::moe_gemm_kernel<kBM, kFp8, false><<<grid_down, detail::kMoeThreads, 0, stream>>>(down);
  SHOAL_CUDA_CHECK_LAUNCH();
}

}  // namespace

std::size_t moe_experts_workspace_bytes(std::int64_t tokens, std::int64_t top_k,
                                        std::int64_t experts, std::int64_t hidden,
                                        std::int64_t inter, moe_combine combine) {
  return plan_layout(tokens, top_k, experts, hidden, inter, combine).total;
}

void moe_experts(context& ctx, const moe_experts_params& p) {
  if (p.tokens <= 0) return;
  SHOAL_CUDA_REQUIRE(p.x && p.indices && p.weights && p.expert_table && p.y && p.workspace,
                     "moe_experts needs x, indices, weights, expert_table, y and a workspace");
  SHOAL_CUDA_REQUIRE(p.hidden > 0 && p.hidden % 16 == 0 && p.inter > 0 && p.inter % 16 == 0,
                     "moe_experts needs hidden and inter multiples of 16, got hidden " +
                         std::to_string(p.hidden) + " inter " + std::to_string(p.inter));
  SHOAL_CUDA_REQUIRE(p.experts > 0 && p.experts <= 1024 && p.top_k > 0 && p.top_k <= 64,
                     "moe_experts supports up to 1024 experts and top_k 64, got " +
                         std::to_string(p.experts) + " and " + std::to_string(p.top_k));
  SHOAL_CUDA_REQUIRE(p.weight_type == dtype::bf16 || p.weight_type == dtype::f8_e4m3,
                     "moe_experts takes bf16 or FP8 E4M3 weights");
  const layout l = plan_layout(p.tokens, p.top_k, p.experts, p.hidden, p.inter, p.combine);
  SHOAL_CUDA_REQUIRE(p.workspace_bytes >= l.total,
                     "moe_experts workspace holds " + std::to_string(p.workspace_bytes) +
                         " bytes, needs " + std::to_string(l.total));
  char* ws = static_cast<char*>(p.workspace);
  detail::moe_plan plan{reinterpret_cast<std::int32_t*>(ws + l.counts),
                        reinterpret_cast<std::int32_t*>(ws + l.offsets),
                        reinterpret_cast<std::int32_t*>(ws + l.cursor),
                        reinterpret_cast<std::int32_t*>(ws + l.tile_expert),
                        reinterpret_cast<std::int32_t*>(ws + l.tile_row),
                        reinterpret_cast<std::int32_t*>(ws + l.num_tiles),
                        reinterpret_cast<std::int32_t*>(ws + l.perm_slot),
                        reinterpret_cast<__nv_bfloat16*>(ws + l.xp),
                        reinterpret_cast<__nv_bfloat16*>(ws + l.act),
                        p.combine == moe_combine::ordered ? reinterpret_cast<float*>(ws + l.rows)
                                                          : nullptr};
  const cudaStream_t stream = detail::as_stream(ctx.stream());
  const std::int64_t pairs = p.tokens * p.top_k;
  const int bm = tile_rows(p.tokens, p.top_k, p.experts);
  const auto tiles = static_cast<unsigned>(max_tiles(pairs, p.experts, bm));
  const int experts = static_cast<int>(p.experts);

  SHOAL_CUDA_CHECK(cudaMemsetAsync(plan.counts, 0, static_cast<std::size_t>(p.experts) * 4, stream));
  detail::moe_count_kernel<<<static_cast<unsigned>((pairs + 255) / 256), 256, 0, stream>>>(
      p.indices, pairs, p.expert_table, plan.counts);
  SHOAL_CUDA_CHECK_LAUNCH();
  detail::moe_scan_kernel<<<1, (experts + 31) / 32 * 32, 0, stream>>>(plan, experts, bm);
  SHOAL_CUDA_CHECK_LAUNCH();
  detail::moe_scatter_kernel<<<static_cast<unsigned>(pairs), 128, 0, stream>>>(
      p.x, p.indices, static_cast<int>(p.top_k), p.hidden, p.expert_table, plan);
  SHOAL_CUDA_CHECK_LAUNCH();

  const detail::moe_gemm_args gate_up{plan, p.expert_table, p.inter, p.hidden,
                                      static_cast<int>(p.top_k), p.weights, p.y, false};
  const detail::moe_gemm_args down{plan, p.expert_table, p.hidden, p.inter,
                                   static_cast<int>(p.top_k), p.weights, p.y,
                                   p.combine == moe_combine::ordered};
  const bool fp8 = p.weight_type == dtype::f8_e4m3;
  // Runtime choices become template parameters here, and only here.
  if (bm == 16) {
    if (fp8) launch_gemms<16, true>(gate_up, down, tiles, stream);
    else launch_gemms<16, false>(gate_up, down, tiles, stream);
  } else {
    if (fp8) launch_gemms<64, true>(gate_up, down, tiles, stream);
    else launch_gemms<64, false>(gate_up, down, tiles, stream);
  }
  if (p.combine == moe_combine::ordered) {
    detail::moe_combine_kernel<<<static_cast<unsigned>(p.tokens), 256, 0, stream>>>(
        p.indices, static_cast<int>(p.top_k), p.hidden, p.expert_table, plan.rows, p.y);
    SHOAL_CUDA_CHECK_LAUNCH();
  }
}

}  // namespace shoal::kernels::cuda
