#pragma once
/// \file
/// DeepSeek-V3 mixture of experts on the GPU: the router, and the fused routed experts
/// (permute by expert, grouped gate/up GEMM with SwiGLU, grouped down GEMM with the routing
/// weight and the combine fused). Weights are bf16, or FP8 E4M3 with 128x128 block scales
/// dequantized inside the GEMM; accumulation is fp32.

#include "shoal/kernels/dtype.hpp"

#include <cstddef>
#include <cstdint>

namespace shoal::kernels::cuda {

class context;

/// The V3 router (`noaux_tc`, sigmoid scoring); the contract of `kernels::moe_route`, with
/// every pointer in device memory.
struct moe_route_params {
  const float* logits = nullptr;    ///< Gate logits `[tokens][experts]`.
  const float* bias = nullptr;      ///< `e_score_correction_bias` `[experts]` (selection only); may be null.
  std::int64_t tokens = 0;          ///< Tokens routed.
  std::int64_t experts = 0;         ///< Routed experts (at most 1024).
  std::int64_t groups = 1;          ///< `n_group` (at most 64, dividing `experts`).
  std::int64_t top_groups = 1;      ///< `topk_group`.
  std::int64_t top_k = 1;           ///< `num_experts_per_tok` (at most 32).
  bool normalize = true;            ///< `norm_topk_prob`.
  float scaling_factor = 1.0f;      ///< `routed_scaling_factor`.
  std::int32_t* indices = nullptr;  ///< Out `[tokens][top_k]`, by descending biased score.
  float* weights = nullptr;         ///< Out `[tokens][top_k]`.
};

/// One block per token: sigmoid + bias, group scores (sum of the top two), best groups, top-k.
/// Ties break like the reference (lower group, then lower expert index first).
void moe_route(context& ctx, const moe_route_params& params);

/// Device pointers of one routed expert's weights, Linear layout. A null `gate` marks an
/// expert this process does not hold; its (token, choice) pairs are skipped.
struct moe_expert_pointers {
  const void* gate = nullptr;         ///< `[inter][hidden]` of the params' `weight_type`.
  const void* up = nullptr;           ///< `[inter][hidden]`.
  const void* down = nullptr;         ///< `[hidden][inter]`.
  const float* gate_scale = nullptr;  ///< FP8: `[ceil(inter/128)][ceil(hidden/128)]` multipliers.
  const float* up_scale = nullptr;    ///< FP8: same shape as `gate_scale`.
  const float* down_scale = nullptr;  ///< FP8: `[ceil(hidden/128)][ceil(inter/128)]`.
};

/// How the weighted expert outputs are added into `y`.
enum class moe_combine : std::uint8_t {
  /// The down GEMM's epilogue adds weight * output straight into y with fp32 atomics: one pass,
  /// but the order of the top-k additions (and so the last bits of y) varies run to run.
  atomic,
  /// The down GEMM writes each (token, choice) row; a second pass adds them into y in
  /// ascending expert order, like the reference: bit-reproducible, costs one extra round trip
  /// of `tokens * top_k * hidden` floats. Failover replay relies on reproducible tokens.
  ordered,
};

/// Routed experts over a batch of tokens. All pointers are device memory.
struct moe_experts_params {
  const float* x = nullptr;               ///< Activations `[tokens][hidden]` (rounded to bf16 inside).
  std::int64_t tokens = 0;                ///< Tokens (0 is allowed: nothing happens).
  std::int64_t hidden = 0;                ///< Model width (multiple of 16).
  std::int64_t inter = 0;                 ///< Expert width, `moe_intermediate_size` (multiple of 16).
  std::int64_t experts = 0;               ///< Routed experts (entries of `expert_table`, at most 1024).
  std::int64_t top_k = 0;                 ///< Choices per token.
  const std::int32_t* indices = nullptr;  ///< `[tokens][top_k]` expert ids.
  const float* weights = nullptr;         ///< `[tokens][top_k]` routing weights.
  const moe_expert_pointers* expert_table = nullptr;  ///< `[experts]`, in device memory.
  dtype weight_type = dtype::bf16;        ///< `bf16` or `f8_e4m3` for every expert.
  float* y = nullptr;                     ///< `[tokens][hidden]`; weighted outputs are added in.
  moe_combine combine = moe_combine::ordered;  ///< Combine strategy.
  void* workspace = nullptr;              ///< Scratch of `moe_experts_workspace_bytes` bytes.
  std::size_t workspace_bytes = 0;        ///< Size of `workspace`.
};

/// Scratch bytes `moe_experts` needs for these sizes (permutation tables, the permuted bf16
/// activations, the SwiGLU outputs and, for `ordered`, the per-choice output rows).
std::size_t moe_experts_workspace_bytes(std::int64_t tokens, std::int64_t top_k,
                                        std::int64_t experts, std::int64_t hidden,
                                        std::int64_t inter, moe_combine combine);

/// Counts tokens per expert, permutes token rows by expert, then runs the two grouped GEMMs
/// over tiles of one expert's rows each (tiles are listed on the device, so nothing waits for
/// the host; empty experts cost nothing). Asynchronous on the context's stream.
void moe_experts(context& ctx, const moe_experts_params& params);

}  // namespace shoal::kernels::cuda
