#pragma once
/// \file
/// The DeepSeek-V3 forward pass on the CPU, over batches of sequences with latent KV caches.

#include "shoal/runtime/weights.hpp"

#include <cstdint>
#include <functional>
#include <span>
#include <vector>

namespace shoal::kernels {
class thread_pool;
}

namespace shoal::runtime {

/// A sequence's cache of compressed attention latents: per layer and position,
/// `kv_lora_rank` normalized latent values followed by `qk_rope_head_dim` roped key values.
class latent_cache {
 public:
  /// A cache for up to `capacity` positions of every layer.
  latent_cache(const config::model_config& config, std::int64_t capacity);

  /// Positions filled so far (the next token goes at this position).
  std::int64_t length() const noexcept { return length_; }
  /// Positions it can hold.
  std::int64_t capacity() const noexcept { return capacity_; }
  /// Rows of one layer, `[capacity][latent_dim]`.
  float* layer(std::int64_t index) noexcept { return data_.data() + index * capacity_ * latent_dim_; }
  /// Marks positions [0, length) as filled; positions past it are overwritten later.
  void set_length(std::int64_t length) noexcept { length_ = length; }
  /// Bytes held.
  std::size_t bytes() const noexcept { return data_.size() * sizeof(float); }

 private:
  std::int64_t capacity_;
  std::int64_t latent_dim_;
  std::int64_t length_ = 0;
  std::vector<float> data_;
};

/// One sequence's share of a batched step: its new tokens, appended after what it has cached.
struct sequence_step {
  latent_cache* cache = nullptr;             ///< Its cache; new latents go at `cache->length()`.
  std::span<const std::int32_t> tokens;      ///< New tokens (a prompt chunk, or one decode token).
};

/// Which kernels run the model.
enum class kernel_mode {
  optimized,  ///< SIMD, threads, BLAS.
  reference,  ///< The plain reference kernels, for checking the optimized ones.
};

/// Computes routed experts for a stage. The default runs them locally; a distributed stage
/// sends each expert actor the tokens routed to its experts instead.
class expert_backend {
 public:
  virtual ~expert_backend() = default;
  /// Adds sum_k weights[t][k] * expert_{indices[t][k]}(x[t]) into y[t] for every token.
  virtual void run(std::int64_t layer, const float* x, std::int64_t tokens, std::int64_t top_k,
                   const std::int32_t* indices, const float* weights, float* y) = 0;
};

/// The model over the weights a process holds.
class model {
 public:
  /// `pool` provides the threads for optimized kernels; both must outlive the model.
  model(const model_weights& weights, kernels::thread_pool& pool,
        kernel_mode mode = kernel_mode::optimized);

  const config::model_config& config() const noexcept { return weights_.config(); }

  /// Writes the embeddings of `tokens` to `hidden` `[tokens][hidden_size]`. An id outside the
  /// vocabulary is an `invalid_argument` error naming it.
  void embed(std::span<const std::int32_t> tokens, float* hidden) const;

  /// Runs decoder layers [first, last) over the concatenated tokens of `steps` (in order),
  /// reading and extending each sequence's cache. `hidden` holds one row per token. Caches'
  /// lengths are advanced by the caller (`advance`) once all layers have run.
  void run_layers(std::int64_t first, std::int64_t last, std::span<const sequence_step> steps,
                  float* hidden, expert_backend* experts = nullptr);

  /// Final norm and lm_head for `rows` hidden rows, into `logits` `[rows][vocab]`.
  void logits(const float* hidden, std::int64_t rows, float* logits);

  /// Called after routing in every MoE layer with the chosen experts `[tokens][top_k]` and
  /// their weights: per-expert load metrics and routing checks hang off it.
  using route_observer = std::function<void(std::int64_t layer, std::int64_t tokens, std::int64_t top_k,
                                            const std::int32_t* indices, const float* weights)>;
  void set_route_observer(route_observer observer) { route_observer_ = std::move(observer); }

  /// Marks the steps' tokens as cached.
  static void advance(std::span<const sequence_step> steps);

  /// Embedding, every layer, head: logits of each step's last token (`all_positions`: of
  /// every token), rows in step order.
  std::vector<float> forward(std::span<const sequence_step> steps, bool all_positions = false);

 private:
  struct layer_scratch;
  void attention(std::int64_t layer, std::span<const sequence_step> steps, const float* x,
                 std::int64_t tokens, float* hidden);
  void feed_forward(std::int64_t layer, const float* x, std::int64_t tokens, float* hidden,
                    expert_backend* experts);
  void run_mlp(const kernels::expert_weights& mlp, const float* x, std::int64_t tokens, float* y);

  const model_weights& weights_;
  kernels::thread_pool& pool_;
  kernel_mode mode_;
  route_observer route_observer_;
  std::vector<float> rope_frequencies_;
  float softmax_scale_;
};

/// Index of the largest logit (the lowest index among equal maxima).
std::int32_t argmax(std::span<const float> logits);

}  // namespace shoal::runtime
