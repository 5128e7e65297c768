#pragma once
/// \file
/// What stage and expert actors compute, without CAF: each engine owns the weights its actor
/// holds and calls the runtime. Actors wrap them; a stage calls an expert engine of its own
/// process directly, without a message.

#include "shoal/actors/messages.hpp"
#include "shoal/runtime/model.hpp"
#include "shoal/runtime/sampling.hpp"
#include "shoal/runtime/weights.hpp"

#include <atomic>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <mutex>
#include <string>
#include <map>
#include <memory>
#include <span>
#include <vector>

namespace shoal::kernels {
class thread_pool;
}

namespace shoal::actors {

/// The runtime's sampling parameters for a wire `sampling_spec`.
runtime::sampling_params to_sampling_params(const sampling_spec& spec);

/// A set of routed experts of every MoE layer.
class expert_engine {
 public:
  /// Loads `experts` of every MoE layer from `model`; `threads` compute threads (0: cores).
  expert_engine(const std::filesystem::path& model, std::vector<std::uint32_t> experts, int threads,
                std::shared_ptr<const runtime::weights_key> key = nullptr);
  /// Builds from the parts another expert actor sent (`weights_parts`, all of them, in any
  /// order), checked tensor by tensor against their config.json as a checkpoint would be;
  /// `source` names where they came from in errors. The parts are consumed.
  expert_engine(std::vector<weights_part> parts, std::vector<std::uint32_t> experts, int threads,
                const std::string& source);
  ~expert_engine();

  /// Part `part` of the weights of `experts` (each must be held): whole (layer, expert)
  /// pairs, in layer then expert order, packed into parts of at most `part_bytes` (a pair
  /// larger than that travels alone). Thread-safe: weights do not change.
  weights_part weights_part_of(const std::vector<std::uint32_t>& experts, std::uint32_t part,
                               std::size_t part_bytes = kWeightsPartBytes) const;
  /// Bytes per weights part: large enough that a part's round trip is a small cost next to
  /// its transfer, small enough to sit in memory twice while it is checked.
  static constexpr std::size_t kWeightsPartBytes = 64u << 20;
  /// The config.json text the weights were checked against.
  const std::string& config_json() const noexcept { return config_json_; }
  /// Bytes of weights held.
  std::size_t resident_bytes() const noexcept;

  /// The model's architecture.
  const config::model_config& config() const noexcept { return weights_->config(); }
  /// Expert ids held, ascending.
  const std::vector<std::uint32_t>& experts() const noexcept { return experts_; }
  /// Whether routed expert `id` is held.
  bool holds(std::int64_t id) const noexcept;

  /// Writes each row's expert output, unweighted: `out[r] = expert_{ids[r]}(x[r])` for `rows`
  /// rows of `[hidden_size]`. Rows of one expert keep their order, so the fused kernel sees the
  /// same token groups as in a single process and the results are bit-identical.
  /// An id not held or a dense layer is an `invalid_argument` error.
  void compute(std::int64_t layer, const float* x, const std::int32_t* ids, std::int64_t rows, float* out);
  /// Rows computed so far (the measured load of this copy).
  std::uint64_t rows_computed() const noexcept { return rows_computed_.load(std::memory_order_relaxed); }

 private:
  std::atomic<std::uint64_t> rows_computed_{0};
  void check_held();

  std::vector<std::uint32_t> experts_;
  std::string config_json_;
  std::vector<bool> held_;
  std::unique_ptr<runtime::model_weights> weights_;
  std::unique_ptr<kernels::thread_pool> pool_;
};

/// A pipeline stage: a layer range, the embedding (first stage), the head (last stage), and
/// the latent-cache blocks of its layers, which steps address through block tables that the
/// router's scheduler decides.
class stage_engine {
 public:
  /// What a stage holds.
  struct options {
    std::filesystem::path model;      ///< Checkpoint directory.
    std::int64_t first_layer = 0;     ///< First layer.
    std::int64_t end_layer = 0;       ///< One past the last.
    bool first = true;                ///< Embeds tokens.
    bool last = true;                 ///< Final norm, lm_head, sampling.
    bool hold_experts = true;         ///< Holds its layers' routed experts (no expert actors).
    int threads = 0;                  ///< Compute threads (0: cores).
    std::int64_t cache_blocks = 0;    ///< Latent-cache blocks of its layers (as many as the router hands out).
    std::int64_t block_tokens = 32;   ///< Positions per block.
    /// Receives loading progress lines (layers loaded); may be empty.
    std::function<void(const std::string&)> progress = {};
    /// Key of a checkpoint encrypted at rest; null for plain files.
    std::shared_ptr<const runtime::weights_key> key = nullptr;
  };

  /// Loads the weights.
  explicit stage_engine(const options& o);
  ~stage_engine();

  /// The model's architecture.
  const config::model_config& config() const noexcept { return weights_->config(); }
  /// What it holds.
  const options& settings() const noexcept { return options_; }

  /// Runs the stage's layers over `batch` in place: the first stage fills `batch.hidden`
  /// from the tokens; every stage writes the latents of each entry's new positions into the
  /// blocks its table names. `experts` computes routed experts unless the stage holds them. A
  /// block table that does not cover the entry or names a block outside the pool is an
  /// `invalid_argument` error.
  void run(step_batch& batch, runtime::expert_backend* experts);

  /// The last stage: the tokens (and logits when the batch wants them) of the entries that
  /// sample, from `batch.hidden`, each chosen as its entry's `sampling` says. Greedy entries
  /// take the argmax; the others keep a sampler per request (penalties, random stream), rebuilt
  /// from the whole token history when an entry is `fresh`, so a recomputed request draws the
  /// tokens the original run would have.
  sampled_batch sample(const step_batch& batch);

  /// Forgets the samplers of `requests` (finished or cancelled).
  void release(std::span<const request_id> requests);
  /// Requests with sampler state.
  std::size_t sampling_requests() const noexcept { return samplers_.size() + contexts_.size(); }
  /// Latent-cache blocks held.
  std::int64_t cache_blocks() const noexcept;
  /// Tokens routed to each expert so far, `[layer * n_routed_experts + expert]` over every
  /// layer of the model (zero outside this stage's layers). Thread-safe.
  std::vector<std::uint64_t> routed_tokens() const;

 private:
  options options_;
  std::unique_ptr<runtime::model_weights> weights_;
  std::unique_ptr<kernels::thread_pool> pool_;
  std::unique_ptr<runtime::model> model_;
  std::unique_ptr<runtime::kv_block_pool> cache_;
  std::map<request_id, runtime::sampler> samplers_;
  /// Tokens of fresh non-greedy requests whose prompt is still being prefilled, for the
  /// sampler built when they first sample.
  std::map<request_id, std::vector<std::int32_t>> contexts_;
  mutable std::mutex routed_mutex_;
  std::vector<std::uint64_t> routed_;
};

}  // namespace shoal::actors
