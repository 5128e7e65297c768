#include "shoal/kernels/moe.hpp"

#include "shoal/kernels/linear.hpp"
#include "shoal/kernels/thread_pool.hpp"

#include "gemm_bf16.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <functional>
#include <limits>
#include <numeric>
#include <vector>

namespace shoal::kernels {
namespace {

inline float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }
inline float silu(float x) { return x / (1.0f + std::exp(-x)); }

void route_tokens(const moe_route_params& p) {
  const std::int64_t per_group = p.experts / p.groups;
  std::vector<float> scores(p.experts), biased(p.experts), group_score(p.groups);
  std::vector<std::int32_t> order(std::max(p.experts, p.groups));
  std::vector<char> allowed(p.groups);
  for (std::int64_t t = 0; t < p.tokens; ++t) {
    const float* logits = p.logits + t * p.experts;
    for (std::int64_t e = 0; e < p.experts; ++e) {
      scores[e] = sigmoid(logits[e]);
      biased[e] = scores[e] + (p.bias ? p.bias[e] : 0.0f);
    }
    std::fill(allowed.begin(), allowed.end(), 1);
    if (p.groups > 1) {
      for (std::int64_t g = 0; g < p.groups; ++g) {
        // A group scores the sum of its two best biased scores.
        float first = -std::numeric_limits<float>::infinity(), second = first;
        for (std::int64_t e = g * per_group; e < (g + 1) * per_group; ++e) {
          if (biased[e] > first) {
            second = first;
            first = biased[e];
          } else if (biased[e] > second) {
            second = biased[e];
          }
        }
        group_score[g] = per_group > 1 ? first + second : first;
      }
      std::iota(order.begin(), order.begin() + p.groups, 0);
      std::stable_sort(order.begin(), order.begin() + p.groups,
                       [&](std::int32_t a, std::int32_t b) { return group_score[a] > group_score[b]; });
      std::fill(allowed.begin(), allowed.end(), 0);
      for (std::int64_t i = 0; i < p.top_groups; ++i) allowed[order[i]] = 1;
    }
    std::int64_t candidates = 0;
    for (std::int64_t e = 0; e < p.experts; ++e)
      if (allowed[e / per_group]) order[candidates++] = static_cast<std::int32_t>(e);
    std::partial_sort(order.begin(), order.begin() + p.top_k, order.begin() + candidates,
                      [&](std::int32_t a, std::int32_t b) {
                        return biased[a] > biased[b] || (biased[a] == biased[b] && a < b);
                      });
    float sum = 0.0f;
    for (std::int64_t k = 0; k < p.top_k; ++k) sum += scores[order[k]];
    for (std::int64_t k = 0; k < p.top_k; ++k) {
      const std::int32_t e = order[k];
      float weight = scores[e];
      if (p.normalize) weight /= sum;
      p.indices[t * p.top_k + k] = e;
      p.weights[t * p.top_k + k] = weight * p.scaling_factor;
    }
  }
}

// Rows of one expert's projections handled by one work item; FP8 slices must start on a
// 128-row block edge.
std::int64_t row_granule(const matrix_view& w) {
  return w.type == dtype::f8_e4m3 ? matrix_view::kBlock : 64;
}

struct work_item {
  std::int32_t expert;
  std::int64_t row_begin;
  std::int64_t row_end;
};

// Below this many multiply-adds per phase, one thread is faster than a parallel region.
constexpr std::int64_t kMinParallelWork = 1 << 16;

// Runs items on the pool with a shared counter, so uneven experts balance across threads.
template <typename Body>
void run_items(thread_pool& pool, const std::vector<work_item>& items, std::int64_t work, const Body& body) {
  if (work < kMinParallelWork) {
    for (const auto& item : items) body(item);
    return;
  }
  std::atomic<std::size_t> next{0};
  pool.run([&](int) {
    for (std::size_t i = next.fetch_add(1); i < items.size(); i = next.fetch_add(1)) body(items[i]);
  });
}

}  // namespace

void moe_route(const moe_route_params& params) { route_tokens(params); }

void moe_experts(thread_pool& pool, const moe_experts_params& p) {
  const std::int64_t num_experts = static_cast<std::int64_t>(p.experts.size());
  // Group (token, choice) pairs by expert, in token order.
  std::vector<std::int64_t> counts(num_experts + 1, 0);
  for (std::int64_t i = 0; i < p.tokens * p.top_k; ++i) {
    const std::int32_t e = p.indices[i];
    if (p.experts[e].gate.data) ++counts[e + 1];
  }
  std::vector<std::int64_t> offsets(num_experts + 1, 0);
  std::partial_sum(counts.begin(), counts.end(), offsets.begin());
  const std::int64_t assignments = offsets[num_experts];
  if (assignments == 0) return;
  std::vector<std::int64_t> slot_of(p.tokens * p.top_k, -1);  // where each choice's output lands
  std::vector<std::int64_t> fill(offsets.begin(), offsets.end() - 1);
  std::vector<float> gathered(static_cast<std::size_t>(assignments * p.hidden));
  for (std::int64_t i = 0; i < p.tokens * p.top_k; ++i) {
    const std::int32_t e = p.indices[i];
    if (!p.experts[e].gate.data) continue;
    const std::int64_t slot = fill[e]++;
    slot_of[i] = slot;
    std::copy_n(p.x + (i / p.top_k) * p.hidden, p.hidden, gathered.data() + slot * p.hidden);
  }
  std::int64_t max_inter = 0;
  std::vector<work_item> up_items, down_items;
  for (std::int32_t e = 0; e < num_experts; ++e) {
    if (offsets[e + 1] == offsets[e]) continue;
    const expert_weights& w = p.experts[e];
    max_inter = std::max(max_inter, w.gate.rows);
    for (std::int64_t r = 0; r < w.gate.rows; r += row_granule(w.gate))
      up_items.push_back({e, r, std::min(w.gate.rows, r + row_granule(w.gate))});
    for (std::int64_t r = 0; r < w.down.rows; r += row_granule(w.down))
      down_items.push_back({e, r, std::min(w.down.rows, r + row_granule(w.down))});
  }
  std::vector<float> gate_out(static_cast<std::size_t>(assignments * max_inter));
  std::vector<float> up_out(static_cast<std::size_t>(assignments * max_inter));
  std::vector<float> expert_out(static_cast<std::size_t>(assignments * p.hidden));
  // SwiGLU of rows [first, first + n), columns [col, col + count) of the gate and up outputs.
  const auto silu_mul = [&](std::int64_t first, std::int64_t n, std::int64_t col, std::int64_t count) {
    for (std::int64_t t = 0; t < n; ++t) {
      float* g = gate_out.data() + (first + t) * max_inter + col;
      const float* u = up_out.data() + (first + t) * max_inter + col;
      for (std::int64_t r = 0; r < count; ++r) g[r] = silu(g[r]) * u[r];
    }
  };

  // An expert's rows are split into BF16 parts once, here, not once per row block.
  bool any_bf16 = false;
  for (std::int32_t e = 0; e < num_experts; ++e)
    any_bf16 = any_bf16 || (offsets[e + 1] > offsets[e] && detail::bf16_gemm_applies(p.experts[e].gate));
  detail::bf16_activations split_x, split_act;
  if (any_bf16) detail::bf16_split(gathered.data(), assignments, p.hidden, p.hidden, split_x, &pool);
  // The tile of rows [begin, end) of `w` for an expert's n rows of split activations x.
  const auto gemm_bf16 = [](const detail::bf16_activations& x, std::int64_t first, std::int64_t n,
                            const matrix_view& w, std::int64_t begin, std::int64_t end, float* y,
                            std::int64_t y_stride) {
    detail::gemm_bf16_rows({.x = x.data.data() + first * x.token_stride(),
                            .x_stride = x.stride,
                            .weight = w,
                            .y = y,
                            .tokens = n,
                            .y_stride = y_stride},
                           begin, end);
  };

  // Phase 1: gate and up projections of each expert's tokens, SwiGLU fused per row block.
  const std::int64_t phase_work = assignments * max_inter * p.hidden;
  run_items(pool, up_items, phase_work, [&](const work_item& item) {
    const expert_weights& w = p.experts[item.expert];
    const std::int64_t first = offsets[item.expert];
    const std::int64_t n = offsets[item.expert + 1] - first;
    const std::int64_t rows = item.row_end - item.row_begin;
    if (detail::bf16_gemm_applies(w.gate) && detail::bf16_gemm_applies(w.up)) {
      gemm_bf16(split_x, first, n, w.gate, item.row_begin, item.row_end, gate_out.data() + first * max_inter,
                max_inter);
      gemm_bf16(split_x, first, n, w.up, item.row_begin, item.row_end, up_out.data() + first * max_inter,
                max_inter);
      silu_mul(first, n, item.row_begin, rows);
      return;
    }
    linear_params lp;
    lp.x = gathered.data() + first * p.hidden;
    lp.tokens = n;
    lp.x_stride = p.hidden;
    lp.y_stride = max_inter;
    lp.weight = w.gate.row_slice(item.row_begin, rows);
    lp.y = gate_out.data() + first * max_inter + item.row_begin;
    linear_serial(lp);
    lp.weight = w.up.row_slice(item.row_begin, rows);
    lp.y = up_out.data() + first * max_inter + item.row_begin;
    linear_serial(lp);
    silu_mul(first, n, item.row_begin, rows);
  });
  if (any_bf16) detail::bf16_split(gate_out.data(), assignments, max_inter, max_inter, split_act, &pool);
  // Phase 2: down projections.
  run_items(pool, down_items, phase_work, [&](const work_item& item) {
    const expert_weights& w = p.experts[item.expert];
    const std::int64_t first = offsets[item.expert];
    const std::int64_t n = offsets[item.expert + 1] - first;
    if (detail::bf16_gemm_applies(w.down)) {
      gemm_bf16(split_act, first, n, w.down, item.row_begin, item.row_end, expert_out.data() + first * p.hidden,
                p.hidden);
      return;
    }
    linear_params lp;
    lp.x = gate_out.data() + first * max_inter;
    lp.tokens = offsets[item.expert + 1] - first;
    lp.x_stride = max_inter;
    lp.weight = w.down.row_slice(item.row_begin, item.row_end - item.row_begin);
    lp.y = expert_out.data() + first * p.hidden + item.row_begin;
    lp.y_stride = p.hidden;
    linear_serial(lp);
  });
  // Phase 3: weighted combine, each token summing its choices in expert-id order (as the
  // reference does), so the result does not depend on thread timing.
  const auto combine = [&](std::int64_t begin, std::int64_t end) {
    std::vector<std::int64_t> choice(p.top_k);
    for (std::int64_t t = begin; t < end; ++t) {
      std::iota(choice.begin(), choice.end(), 0);
      std::sort(choice.begin(), choice.end(), [&](std::int64_t a, std::int64_t b) {
        return p.indices[t * p.top_k + a] < p.indices[t * p.top_k + b];
      });
      float* y = p.y + t * p.hidden;
      for (std::int64_t k : choice) {
        const std::int64_t slot = slot_of[t * p.top_k + k];
        if (slot < 0) continue;
        const float weight = p.weights[t * p.top_k + k];
        const float* out = expert_out.data() + slot * p.hidden;
        for (std::int64_t d = 0; d < p.hidden; ++d) y[d] += weight * out[d];
      }
    }
  };
  if (p.tokens * p.top_k * p.hidden < kMinParallelWork)
    combine(0, p.tokens);
  else
    pool.parallel_for(p.tokens, combine);
}

namespace reference {

// DeepSeek's Gate.forward (noaux_tc) token by token with whole sorts, written apart from
// route_tokens so that comparing the two checks the optimized selection.
void moe_route(const moe_route_params& p) {
  const std::int64_t per_group = p.experts / p.groups;
  for (std::int64_t t = 0; t < p.tokens; ++t) {
    const float* logits = p.logits + t * p.experts;
    std::vector<float> score(p.experts), choice(p.experts);
    for (std::int64_t e = 0; e < p.experts; ++e) {
      score[e] = 1.0f / (1.0f + std::exp(-logits[e]));
      choice[e] = score[e] + (p.bias ? p.bias[e] : 0.0f);
    }
    std::vector<float> group_score(p.groups);
    for (std::int64_t g = 0; g < p.groups; ++g) {
      std::vector<float> members(choice.begin() + g * per_group, choice.begin() + (g + 1) * per_group);
      std::sort(members.begin(), members.end(), std::greater<>());
      group_score[g] = per_group > 1 ? members[0] + members[1] : members[0];
    }
    // Ties go to the lower index, for groups and experts alike.
    std::vector<std::int64_t> groups(p.groups);
    std::iota(groups.begin(), groups.end(), 0);
    std::sort(groups.begin(), groups.end(), [&](std::int64_t a, std::int64_t b) {
      return group_score[a] != group_score[b] ? group_score[a] > group_score[b] : a < b;
    });
    std::vector<std::int32_t> candidates;
    for (std::int64_t i = 0; i < p.top_groups; ++i)
      for (std::int64_t e = groups[i] * per_group; e < (groups[i] + 1) * per_group; ++e)
        candidates.push_back(static_cast<std::int32_t>(e));
    std::sort(candidates.begin(), candidates.end(), [&](std::int32_t a, std::int32_t b) {
      return choice[a] != choice[b] ? choice[a] > choice[b] : a < b;
    });
    double sum = 0.0;
    for (std::int64_t k = 0; k < p.top_k; ++k) sum += score[candidates[k]];
    for (std::int64_t k = 0; k < p.top_k; ++k) {
      const std::int32_t e = candidates[k];
      const double weight = p.normalize ? score[e] / sum : score[e];
      p.indices[t * p.top_k + k] = e;
      p.weights[t * p.top_k + k] = static_cast<float>(weight * p.scaling_factor);
    }
  }
}

void moe_experts(const moe_experts_params& p) {
  std::vector<std::int32_t> order(p.top_k);
  for (std::int64_t t = 0; t < p.tokens; ++t) {
    const float* x = p.x + t * p.hidden;
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](std::int32_t a, std::int32_t b) {
      return p.indices[t * p.top_k + a] < p.indices[t * p.top_k + b];
    });
    for (std::int32_t k : order) {
      const expert_weights& w = p.experts[p.indices[t * p.top_k + k]];
      if (!w.gate.data) continue;
      const std::int64_t inter = w.gate.rows;
      std::vector<float> act(inter);
      for (std::int64_t r = 0; r < inter; ++r) {
        float g = 0.0f, u = 0.0f;
        for (std::int64_t c = 0; c < p.hidden; ++c) {
          g += w.gate.at(r, c) * x[c];
          u += w.up.at(r, c) * x[c];
        }
        act[r] = silu(g) * u;
      }
      const float weight = p.weights[t * p.top_k + k];
      for (std::int64_t d = 0; d < p.hidden; ++d) {
        float sum = 0.0f;
        for (std::int64_t r = 0; r < inter; ++r) sum += w.down.at(d, r) * act[r];
        p.y[t * p.hidden + d] += weight * sum;
      }
    }
  }
}

}  // namespace reference

}  // namespace shoal::kernels
