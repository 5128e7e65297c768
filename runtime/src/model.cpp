#include "shoal/runtime/model.hpp"

#include "shoal/base/error.hpp"
#include "shoal/kernels/linear.hpp"
#include "shoal/kernels/mla_attention.hpp"
#include "shoal/kernels/moe.hpp"
#include "shoal/kernels/rmsnorm.hpp"
#include "shoal/kernels/rope.hpp"
#include "shoal/kernels/thread_pool.hpp"

#include <algorithm>
#include <cstring>

namespace shoal::runtime {

using kernels::linear_params;

block_allocator::block_allocator(std::int64_t blocks) : references_(static_cast<std::size_t>(blocks), 0) {
  SHOAL_REQUIRE(blocks > 0, "a block allocator needs blocks > 0, not {}", blocks);
  free_.reserve(static_cast<std::size_t>(blocks));
  for (std::int64_t b = blocks - 1; b >= 0; --b) free_.push_back(static_cast<std::int32_t>(b));
}

std::int32_t block_allocator::allocate() {
  if (free_.empty()) return -1;
  const std::int32_t block = free_.back();
  free_.pop_back();
  references_[static_cast<std::size_t>(block)] = 1;
  return block;
}

void block_allocator::retain(std::int32_t block) {
  SHOAL_REQUIRE(block >= 0 && block < total_blocks() && references(block) > 0, "retaining free block {}", block);
  ++references_[static_cast<std::size_t>(block)];
}

void block_allocator::release(std::int32_t block) {
  SHOAL_REQUIRE(block >= 0 && block < total_blocks() && references(block) > 0, "releasing free block {}", block);
  if (--references_[static_cast<std::size_t>(block)] == 0) free_.push_back(block);
}

kv_block_pool::kv_block_pool(const config::model_config& config, std::int64_t blocks, std::int64_t block_tokens,
                             std::int64_t first_layer, std::int64_t end_layer)
    : blocks_(blocks), block_tokens_(block_tokens), latent_dim_(config.latent_dim()), first_layer_(first_layer),
      end_layer_(end_layer < 0 ? config.num_hidden_layers : end_layer), blocks_in_use_(std::max<std::int64_t>(blocks, 1)) {
  SHOAL_REQUIRE(blocks > 0 && block_tokens > 0, "a cache pool needs blocks ({}) and block_tokens ({}) > 0", blocks,
                block_tokens);
  SHOAL_REQUIRE(first_layer_ >= 0 && first_layer_ < end_layer_ && end_layer_ <= config.num_hidden_layers,
                "cache pool layers [{}, {}) are not within the model's {}", first_layer_, end_layer_,
                config.num_hidden_layers);
  data_.resize(static_cast<std::size_t>((end_layer_ - first_layer_) * blocks * block_tokens * latent_dim_));
}

std::int64_t kv_block_pool::block_bytes(const config::model_config& config, std::int64_t block_tokens,
                                        std::int64_t layers) {
  if (layers < 0) layers = config.num_hidden_layers;
  return layers * block_tokens * config.latent_dim() * static_cast<std::int64_t>(sizeof(float));
}

latent_cache::latent_cache(const config::model_config& config, std::int64_t capacity)
    : own_pool_(std::make_unique<kv_block_pool>(config, 1, std::max<std::int64_t>(capacity, 1))), pool_(own_pool_.get()) {
  blocks_.push_back(pool_->allocate());
}

latent_cache::latent_cache(kv_block_pool& pool) : pool_(&pool) {}

latent_cache::latent_cache(kv_block_pool& pool, std::span<const std::int32_t> blocks, std::int64_t length)
    : pool_(&pool), borrowed_(true), blocks_(blocks.begin(), blocks.end()), length_(length) {
  for (auto b : blocks_)
    SHOAL_REQUIRE(b >= 0 && b < pool.total_blocks(), "block {} is outside the pool's {} blocks", b, pool.total_blocks());
}

latent_cache::~latent_cache() { clear(); }

bool latent_cache::reserve(std::int64_t positions) {
  if (borrowed_) return positions <= capacity();
  const std::int64_t needed = (positions + pool_->block_tokens() - 1) / pool_->block_tokens() -
                              static_cast<std::int64_t>(blocks_.size());
  if (needed <= 0) return true;
  if (needed > pool_->free_blocks()) return false;
  for (std::int64_t i = 0; i < needed; ++i) blocks_.push_back(pool_->allocate());
  return true;
}

void latent_cache::adopt_prefix(const std::vector<std::int32_t>& blocks, std::int64_t length) {
  SHOAL_REQUIRE(blocks_.empty(), "adopting a prefix into a cache that holds {} blocks", blocks_.size());
  blocks_ = blocks;
  length_ = length;
}

void latent_cache::clear() {
  if (!borrowed_)
    for (auto block : blocks_) pool_->release(block);
  blocks_.clear();
  length_ = 0;
}

model::model(const model_weights& weights, kernels::thread_pool& pool, kernel_mode mode)
    : weights_(weights), pool_(pool), mode_(mode) {
  const auto& c = weights.config();
  kernels::yarn_params yarn;
  if (c.rope_scaling) {
    yarn.factor = c.rope_scaling->factor;
    yarn.original_max_position = static_cast<double>(c.rope_scaling->original_max_position);
    yarn.beta_fast = c.rope_scaling->beta_fast;
    yarn.beta_slow = c.rope_scaling->beta_slow;
  }
  rope_frequencies_ = kernels::rope_frequencies(c.qk_rope_head_dim, c.rope_theta, yarn);
  softmax_scale_ = static_cast<float>(c.softmax_scale());
}

void model::embed(std::span<const std::int32_t> tokens, float* hidden) const {
  const auto& table = weights_.embedding();
  SHOAL_REQUIRE(table.data, "this process does not hold the embedding");
  for (std::size_t t = 0; t < tokens.size(); ++t) {
    if (tokens[t] < 0 || tokens[t] >= table.rows)
      shoal::fail(errc::invalid_argument, "token id {} at position {} is outside the vocabulary [0, {})",
                  tokens[t], t, table.rows);
    kernels::dequantize_row(table, tokens[t], 0, table.cols, hidden + t * table.cols);
  }
}

namespace {

void do_linear(kernel_mode mode, kernels::thread_pool& pool, const linear_params& p) {
  if (mode == kernel_mode::reference)
    kernels::reference::linear(p);
  else
    kernels::linear(pool, p);
}

void do_rmsnorm(kernel_mode mode, kernels::thread_pool& pool, const kernels::rmsnorm_params& p) {
  if (mode == kernel_mode::reference)
    kernels::reference::rmsnorm(p);
  else
    kernels::rmsnorm(pool, p);
}

}  // namespace

void model::run_mlp(const kernels::expert_weights& mlp, const float* x, std::int64_t tokens, float* y) {
  // A dense MLP or the shared experts: one expert that every token uses with weight 1.
  std::vector<std::int32_t> indices(tokens, 0);
  std::vector<float> ones(tokens, 1.0f);
  kernels::moe_experts_params p;
  p.x = x;
  p.tokens = tokens;
  p.hidden = config().hidden_size;
  p.top_k = 1;
  p.indices = indices.data();
  p.weights = ones.data();
  p.experts = std::span<const kernels::expert_weights>(&mlp, 1);
  p.y = y;
  if (mode_ == kernel_mode::reference)
    kernels::reference::moe_experts(p);
  else
    kernels::moe_experts(pool_, p);
}

void model::attention(std::int64_t layer_index, std::span<const sequence_step> steps, const float* x,
                      std::int64_t tokens, float* hidden) {
  const auto& c = config();
  const layer_weights& w = weights_.layers()[layer_index];
  const std::int64_t heads = c.num_attention_heads;
  const std::int64_t qk = c.qk_head_dim();
  const std::int64_t latent_dim = c.latent_dim();

  std::vector<std::int64_t> positions;
  positions.reserve(tokens);
  for (const auto& step : steps)
    for (std::size_t i = 0; i < step.tokens.size(); ++i)
      positions.push_back(step.cache->length() + static_cast<std::int64_t>(i));

  std::vector<float> q(static_cast<std::size_t>(tokens * heads * qk));
  if (c.q_lora_rank > 0) {
    std::vector<float> q_latent(static_cast<std::size_t>(tokens * c.q_lora_rank));
    do_linear(mode_, pool_, {.x = x, .weight = w.q_a, .y = q_latent.data(), .tokens = tokens});
    do_rmsnorm(mode_, pool_, {.x = q_latent.data(), .weight = w.q_a_norm.data(), .y = q_latent.data(),
                              .rows = tokens, .dim = c.q_lora_rank, .eps = static_cast<float>(c.rms_norm_eps)});
    do_linear(mode_, pool_, {.x = q_latent.data(), .weight = w.q_b, .y = q.data(), .tokens = tokens});
  } else {
    do_linear(mode_, pool_, {.x = x, .weight = w.q_b, .y = q.data(), .tokens = tokens});
  }
  std::vector<float> kv(static_cast<std::size_t>(tokens * latent_dim));
  do_linear(mode_, pool_, {.x = x, .weight = w.kv_a, .y = kv.data(), .tokens = tokens});
  do_rmsnorm(mode_, pool_, {.x = kv.data(), .weight = w.kv_a_norm.data(), .y = kv.data(), .rows = tokens,
                            .dim = c.kv_lora_rank, .x_stride = latent_dim, .y_stride = latent_dim,
                            .eps = static_cast<float>(c.rms_norm_eps)});
  kernels::rope_params q_rope{.x = q.data(), .tokens = tokens, .heads = heads, .token_stride = heads * qk,
                              .head_stride = qk, .offset = c.qk_nope_head_dim,
                              .rope_dim = c.qk_rope_head_dim, .positions = positions.data(),
                              .frequencies = rope_frequencies_.data()};
  kernels::rope_params k_rope{.x = kv.data(), .tokens = tokens, .heads = 1, .token_stride = latent_dim,
                              .head_stride = latent_dim, .offset = c.kv_lora_rank,
                              .rope_dim = c.qk_rope_head_dim, .positions = positions.data(),
                              .frequencies = rope_frequencies_.data()};
  if (mode_ == kernel_mode::reference) {
    kernels::reference::rope(q_rope);
    kernels::reference::rope(k_rope);
  } else {
    kernels::rope(q_rope);
    kernels::rope(k_rope);
  }

  std::vector<float> attn(static_cast<std::size_t>(tokens * heads * c.v_head_dim));
  std::int64_t row = 0;
  for (const auto& step : steps) {
    const auto n = static_cast<std::int64_t>(step.tokens.size());
    const std::int64_t start = step.cache->length();
    SHOAL_REQUIRE(start + n <= step.cache->capacity(), "cache of {} positions cannot take {} more after {}",
                  step.cache->capacity(), n, start);
    for (std::int64_t i = 0; i < n; ++i)
      std::memcpy(step.cache->row(layer_index, start + i), kv.data() + (row + i) * latent_dim,
                  static_cast<std::size_t>(latent_dim) * sizeof(float));
    kernels::mla_params p{.heads = heads, .qk_nope_dim = c.qk_nope_head_dim, .qk_rope_dim = c.qk_rope_head_dim,
                          .v_head_dim = c.v_head_dim, .kv_lora_rank = c.kv_lora_rank,
                          .softmax_scale = softmax_scale_, .q = q.data() + row * heads * qk, .queries = n,
                          .first_position = start, .latent = step.cache->pool().layer_base(layer_index),
                          .block_table = step.cache->blocks().data(),
                          .block_tokens = step.cache->pool().block_tokens(), .kv_b = w.kv_b,
                          .out = attn.data() + row * heads * c.v_head_dim};
    if (mode_ == kernel_mode::reference)
      kernels::reference::mla_attention(p);
    else
      kernels::mla_attention(pool_, p);
    row += n;
  }
  do_linear(mode_, pool_, {.x = attn.data(), .weight = w.o, .y = hidden, .tokens = tokens, .accumulate = true});
}

void model::feed_forward(std::int64_t layer_index, const float* x, std::int64_t tokens, float* hidden,
                         expert_backend* experts) {
  const auto& c = config();
  const layer_weights& w = weights_.layers()[layer_index];
  if (!w.moe) {
    run_mlp(w.dense, x, tokens, hidden);
    return;
  }
  std::vector<float> router_logits(static_cast<std::size_t>(tokens * c.n_routed_experts));
  do_linear(mode_, pool_, {.x = x, .weight = w.router, .y = router_logits.data(), .tokens = tokens});
  std::vector<std::int32_t> indices(static_cast<std::size_t>(tokens * c.num_experts_per_tok));
  std::vector<float> weights(indices.size());
  kernels::moe_route_params route{.logits = router_logits.data(), .bias = w.router_bias.data(),
                                  .tokens = tokens, .experts = c.n_routed_experts, .groups = c.n_group,
                                  .top_groups = c.topk_group, .top_k = c.num_experts_per_tok,
                                  .normalize = c.norm_topk_prob,
                                  .scaling_factor = static_cast<float>(c.routed_scaling_factor),
                                  .indices = indices.data(), .weights = weights.data()};
  if (mode_ == kernel_mode::reference)
    kernels::reference::moe_route(route);
  else
    kernels::moe_route(route);

  if (route_observer_) route_observer_(layer_index, tokens, c.num_experts_per_tok, indices.data(), weights.data());
  std::vector<float> y(static_cast<std::size_t>(tokens * c.hidden_size), 0.0f);
  if (experts) {
    // The shared expert runs while the expert actors compute. Summed into zeros and then
    // added, its output rounds exactly as when accumulated into y after the routed experts.
    std::vector<float> shared;
    auto meanwhile = [&] {
      if (c.n_shared_experts == 0) return;
      shared.assign(y.size(), 0.0f);
      run_mlp(w.shared, x, tokens, shared.data());
    };
    experts->run(layer_index, x, tokens, c.num_experts_per_tok, indices.data(), weights.data(), y.data(), meanwhile);
    for (std::size_t i = 0; i < shared.size(); ++i) y[i] += shared[i];
    for (std::size_t i = 0; i < y.size(); ++i) hidden[i] += y[i];
    return;
  }
  kernels::moe_experts_params p{.x = x, .tokens = tokens, .hidden = c.hidden_size,
                                .top_k = c.num_experts_per_tok, .indices = indices.data(),
                                .weights = weights.data(), .experts = w.experts, .y = y.data()};
  if (mode_ == kernel_mode::reference)
    kernels::reference::moe_experts(p);
  else
    kernels::moe_experts(pool_, p);
  if (c.n_shared_experts > 0) run_mlp(w.shared, x, tokens, y.data());
  for (std::size_t i = 0; i < y.size(); ++i) hidden[i] += y[i];
}

void model::run_layers(std::int64_t first, std::int64_t last, std::span<const sequence_step> steps,
                       float* hidden, expert_backend* experts) {
  const auto& c = config();
  std::int64_t tokens = 0;
  for (const auto& step : steps) tokens += static_cast<std::int64_t>(step.tokens.size());
  if (tokens == 0) return;
  std::vector<float> x(static_cast<std::size_t>(tokens * c.hidden_size));
  const float eps = static_cast<float>(c.rms_norm_eps);
  for (std::int64_t i = first; i < last; ++i) {
    const layer_weights& w = weights_.layers()[i];
    SHOAL_REQUIRE(!w.input_norm.empty(), "layer {} is not held by this process", i);
    do_rmsnorm(mode_, pool_, {.x = hidden, .weight = w.input_norm.data(), .y = x.data(), .rows = tokens,
                              .dim = c.hidden_size, .eps = eps});
    attention(i, steps, x.data(), tokens, hidden);
    do_rmsnorm(mode_, pool_, {.x = hidden, .weight = w.post_attention_norm.data(), .y = x.data(),
                              .rows = tokens, .dim = c.hidden_size, .eps = eps});
    feed_forward(i, x.data(), tokens, hidden, experts);
  }
}

void model::logits(const float* hidden, std::int64_t rows, float* out) {
  const auto& c = config();
  SHOAL_REQUIRE(weights_.lm_head().data, "this process does not hold the lm_head");
  std::vector<float> normed(static_cast<std::size_t>(rows * c.hidden_size));
  do_rmsnorm(mode_, pool_, {.x = hidden, .weight = weights_.final_norm().data(), .y = normed.data(),
                            .rows = rows, .dim = c.hidden_size, .eps = static_cast<float>(c.rms_norm_eps)});
  do_linear(mode_, pool_, {.x = normed.data(), .weight = weights_.lm_head(), .y = out, .tokens = rows});
}

void model::advance(std::span<const sequence_step> steps) {
  for (const auto& step : steps)
    step.cache->set_length(step.cache->length() + static_cast<std::int64_t>(step.tokens.size()));
}

std::vector<float> model::forward(std::span<const sequence_step> steps, bool all_positions) {
  const auto& c = config();
  std::vector<std::int32_t> tokens;
  for (const auto& step : steps) tokens.insert(tokens.end(), step.tokens.begin(), step.tokens.end());
  const auto n = static_cast<std::int64_t>(tokens.size());
  std::vector<float> hidden(static_cast<std::size_t>(n * c.hidden_size));
  embed(tokens, hidden.data());
  run_layers(0, c.num_hidden_layers, steps, hidden.data());
  advance(steps);
  std::vector<float> selected;
  if (all_positions) {
    selected = std::move(hidden);
  } else {
    std::int64_t row = 0;
    for (const auto& step : steps) {
      row += static_cast<std::int64_t>(step.tokens.size());
      if (step.tokens.empty()) continue;
      selected.insert(selected.end(), hidden.begin() + (row - 1) * c.hidden_size,
                      hidden.begin() + row * c.hidden_size);
    }
  }
  const std::int64_t rows = static_cast<std::int64_t>(selected.size()) / c.hidden_size;
  std::vector<float> out(static_cast<std::size_t>(rows * c.vocab_size));
  logits(selected.data(), rows, out.data());
  return out;
}

std::int32_t argmax(std::span<const float> logits) {
  return static_cast<std::int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
}

}  // namespace shoal::runtime
