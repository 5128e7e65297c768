#pragma once
/// \file
/// DeepSeek-V3 mixture of experts: the router and the fused routed-expert kernel.

#include "shoal/kernels/matrix.hpp"

#include <cstdint>
#include <span>

namespace shoal::kernels {

class thread_pool;

/// The V3 router (`topk_method: noaux_tc`, sigmoid scoring).
struct moe_route_params {
  const float* logits = nullptr;   ///< Gate logits `[tokens][experts]` (h . W_gate^T).
  const float* bias = nullptr;     ///< `e_score_correction_bias` `[experts]`; selection only.
  std::int64_t tokens = 0;         ///< Tokens routed.
  std::int64_t experts = 0;        ///< Routed experts.
  std::int64_t groups = 1;         ///< `n_group`.
  std::int64_t top_groups = 1;     ///< `topk_group`: groups kept per token.
  std::int64_t top_k = 1;          ///< `num_experts_per_tok`.
  bool normalize = true;           ///< `norm_topk_prob`: weights divided by their sum.
  float scaling_factor = 1.0f;     ///< `routed_scaling_factor`, applied after normalizing.
  std::int32_t* indices = nullptr; ///< Out `[tokens][top_k]`, by descending biased score.
  float* weights = nullptr;        ///< Out `[tokens][top_k]`, from the unbiased scores.
};

/// Group-limited top-k routing: s = sigmoid(logits), b = s + bias; a group scores the sum of
/// its top two b; the best `top_groups` groups stay; the `top_k` best b among their experts
/// are chosen and weighted by their s. Ties go to the lower group and expert index.
void moe_route(const moe_route_params& params);

/// Weights of one SwiGLU expert: down(silu(gate(x)) * up(x)).
struct expert_weights {
  matrix_view gate;  ///< `[inter][hidden]`.
  matrix_view up;    ///< `[inter][hidden]`.
  matrix_view down;  ///< `[hidden][inter]`.
};

/// Routed experts over a batch of tokens with their routing decisions.
struct moe_experts_params {
  const float* x = nullptr;            ///< Token activations `[tokens][hidden]`.
  std::int64_t tokens = 0;             ///< Tokens.
  std::int64_t hidden = 0;             ///< Model width.
  std::int64_t top_k = 0;              ///< Choices per token.
  const std::int32_t* indices = nullptr; ///< `[tokens][top_k]` expert ids.
  const float* weights = nullptr;      ///< `[tokens][top_k]` routing weights.
  /// All experts by id; an entry with null `gate.data` is not held here and is skipped
  /// (another expert actor computes it).
  std::span<const expert_weights> experts;
  float* y = nullptr;                  ///< `[tokens][hidden]`, weighted outputs added in.
};

/// Fused routed experts: tokens are grouped by expert, each expert's gate/up/down run once on
/// its group with SwiGLU fused, and weighted results are scattered back. Work is split across
/// the pool by (expert, row block), so one token's eight experts keep every core busy.
void moe_experts(thread_pool& pool, const moe_experts_params& params);

namespace reference {
/// Plain per-token, per-choice loop: the specification.
void moe_experts(const moe_experts_params& params);
/// Plain router, same contract: each token's scores sorted whole, ties to the lower group
/// and expert index. Written apart from `moe_route`, which tests compare with it.
void moe_route(const moe_route_params& params);
}  // namespace reference

}  // namespace shoal::kernels
