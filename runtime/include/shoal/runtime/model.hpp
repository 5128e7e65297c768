#pragma once
/// \file
/// The DeepSeek-V3 forward pass on the CPU, over batches of sequences with latent KV caches.

#include "shoal/runtime/weights.hpp"

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <vector>

namespace shoal::kernels {
class thread_pool;
}

namespace shoal::runtime {

/// Reference counts and a free list over block ids `[0, blocks)`: the accounting half of a
/// paged cache. The scheduler decides blocks with one of these; pools that only store
/// (a pipeline stage's) never allocate themselves.
class block_allocator {
 public:
  explicit block_allocator(std::int64_t blocks);
  /// Takes a free block (reference count 1), or returns -1 when none is free.
  std::int32_t allocate();
  /// Adds a reference to a block in use.
  void retain(std::int32_t block);
  /// Drops a reference; the block is free again at zero.
  void release(std::int32_t block);
  /// References held on a block.
  std::int32_t references(std::int32_t block) const { return references_[static_cast<std::size_t>(block)]; }
  std::int64_t free_blocks() const noexcept { return static_cast<std::int64_t>(free_.size()); }
  std::int64_t total_blocks() const noexcept { return static_cast<std::int64_t>(references_.size()); }

 private:
  std::vector<std::int32_t> references_;
  std::vector<std::int32_t> free_;
};

/// Fixed-size blocks of latent-cache memory shared by many sequences. Layout
/// `[layer][block][block_tokens][latent_dim]` over the layers the pool stores, so one layer's
/// blocks form one array the attention kernel addresses through a block table. Blocks are
/// reference-counted so that sequences with a common prompt prefix can share them.
class kv_block_pool {
 public:
  /// `blocks` blocks of `block_tokens` positions for layers `[first_layer, end_layer)` of
  /// `config` (`end_layer` -1: through the last layer). A pipeline stage stores only its own.
  kv_block_pool(const config::model_config& config, std::int64_t blocks, std::int64_t block_tokens,
                std::int64_t first_layer = 0, std::int64_t end_layer = -1);

  /// Bytes one block takes across `layers` layers (every layer of the model when -1).
  static std::int64_t block_bytes(const config::model_config& config, std::int64_t block_tokens,
                                  std::int64_t layers = -1);
  /// Takes a free block (reference count 1), or returns -1 when none is free.
  std::int32_t allocate() { return blocks_in_use_.allocate(); }
  /// Adds a reference to a block in use.
  void retain(std::int32_t block) { blocks_in_use_.retain(block); }
  /// Drops a reference; the block is free again at zero.
  void release(std::int32_t block) { blocks_in_use_.release(block); }
  /// References held on a block.
  std::int32_t references(std::int32_t block) const { return blocks_in_use_.references(block); }
  std::int64_t free_blocks() const noexcept { return blocks_in_use_.free_blocks(); }
  std::int64_t total_blocks() const noexcept { return blocks_; }
  std::int64_t block_tokens() const noexcept { return block_tokens_; }
  std::int64_t latent_dim() const noexcept { return latent_dim_; }
  /// Layers stored: `[first_layer(), end_layer())`.
  std::int64_t first_layer() const noexcept { return first_layer_; }
  std::int64_t end_layer() const noexcept { return end_layer_; }
  /// First row of `layer`'s block array (a layer the pool stores).
  float* layer_base(std::int64_t layer) noexcept {
    return data_.data() + (layer - first_layer_) * blocks_ * block_tokens_ * latent_dim_;
  }

 private:
  std::int64_t blocks_;
  std::int64_t block_tokens_;
  std::int64_t latent_dim_;
  std::int64_t first_layer_;
  std::int64_t end_layer_;
  std::vector<float> data_;
  block_allocator blocks_in_use_;
};

/// A sequence's cache of compressed attention latents: per layer and position,
/// `kv_lora_rank` normalized latent values followed by `qk_rope_head_dim` roped key values,
/// held in blocks of a `kv_block_pool`.
class latent_cache {
 public:
  /// A standalone cache of `capacity` positions in one block of its own (contiguous rows).
  latent_cache(const config::model_config& config, std::int64_t capacity);
  /// An empty cache drawing blocks from `pool` as it grows (see `reserve`).
  explicit latent_cache(kv_block_pool& pool);
  /// A view of `blocks` of `pool` that someone else accounts for (a scheduler), with
  /// `length` positions filled; it neither retains nor releases them and cannot grow.
  latent_cache(kv_block_pool& pool, std::span<const std::int32_t> blocks, std::int64_t length);
  ~latent_cache();
  latent_cache(const latent_cache&) = delete;
  latent_cache& operator=(const latent_cache&) = delete;

  /// Positions filled so far (the next token goes at this position).
  std::int64_t length() const noexcept { return length_; }
  /// Positions the blocks held can take.
  std::int64_t capacity() const noexcept {
    return static_cast<std::int64_t>(blocks_.size()) * pool_->block_tokens();
  }
  /// Makes room for `positions` positions in total; false (nothing changed) when the pool has
  /// too few free blocks.
  bool reserve(std::int64_t positions);
  /// Starts the cache with `blocks` (already retained for this cache) holding `length`
  /// positions of a shared prefix.
  void adopt_prefix(const std::vector<std::int32_t>& blocks, std::int64_t length);
  /// Returns every block to the pool and empties the cache.
  void clear();
  /// Marks positions [0, length) as filled; positions past it are overwritten later.
  void set_length(std::int64_t length) noexcept { length_ = length; }
  /// Row of `position` in `layer`.
  float* row(std::int64_t layer, std::int64_t position) noexcept {
    const auto bt = pool_->block_tokens();
    return pool_->layer_base(layer) +
           (static_cast<std::int64_t>(blocks_[position / bt]) * bt + position % bt) * pool_->latent_dim();
  }
  /// Rows of one layer of a standalone cache, `[capacity][latent_dim]` (contiguous only there).
  float* layer(std::int64_t index) noexcept { return pool_->layer_base(index) + blocks_.front() * capacity() * pool_->latent_dim(); }
  /// Block ids in position order.
  const std::vector<std::int32_t>& blocks() const noexcept { return blocks_; }
  /// The pool the blocks come from.
  kv_block_pool& pool() noexcept { return *pool_; }
  /// Bytes of the blocks held.
  std::size_t bytes() const noexcept {
    return static_cast<std::size_t>(capacity()) * static_cast<std::size_t>(pool_->latent_dim()) * sizeof(float);
  }

 private:
  std::unique_ptr<kv_block_pool> own_pool_;  // standalone caches only
  kv_block_pool* pool_;
  bool borrowed_ = false;                    // a view: blocks are not ours to release
  std::vector<std::int32_t> blocks_;
  std::int64_t length_ = 0;
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
  /// Calls `meanwhile` once, while other processes compute their experts (the model runs the
  /// shared expert there instead of after the routed ones).
  virtual void run(std::int64_t layer, const float* x, std::int64_t tokens, std::int64_t top_k,
                   const std::int32_t* indices, const float* weights, float* y,
                   const std::function<void()>& meanwhile) = 0;
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
