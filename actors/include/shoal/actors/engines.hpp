#pragma once
/// \file
/// What stage and expert actors compute, without CAF: each engine owns the weights its actor
/// holds and calls the runtime. Actors wrap them; a stage calls an expert engine of its own
/// process directly, without a message.

#include "shoal/actors/messages.hpp"
#include "shoal/runtime/model.hpp"
#include "shoal/runtime/sampling.hpp"
#include "shoal/runtime/weights.hpp"

#include <cstdint>
#include <filesystem>
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
  expert_engine(const std::filesystem::path& model, std::vector<std::uint32_t> experts, int threads);
  ~expert_engine();

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

 private:
  std::vector<std::uint32_t> experts_;
  std::vector<bool> held_;
  std::unique_ptr<runtime::model_weights> weights_;
  std::unique_ptr<kernels::thread_pool> pool_;
};

/// A pipeline stage: a layer range, the embedding (first stage), the head (last stage), and
/// the latent caches of the sequences passing through it.
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
  };

  /// Loads the weights.
  explicit stage_engine(const options& o);
  ~stage_engine();

  /// The model's architecture.
  const config::model_config& config() const noexcept { return weights_->config(); }
  /// What it holds.
  const options& settings() const noexcept { return options_; }

  /// Runs the stage's layers over `batch` in place: the first stage fills `batch.hidden`
  /// from the tokens; every stage advances the caches of the batch's requests. `experts`
  /// computes routed experts unless the stage holds them. Caches are created, grown, or
  /// rewound to `position` as entries require; a position past the cache is a
  /// `failed_precondition` error.
  void run(step_batch& batch, runtime::expert_backend* experts);

  /// The last stage: the tokens (and logits when the batch wants them) of the entries that
  /// sample, from `batch.hidden`, each chosen as its entry's `sampling` says. Greedy entries
  /// take the argmax; the others keep a sampler per request (penalties, random stream), rebuilt
  /// at position 0 so a replayed request draws the tokens the original run would have.
  sampled_batch sample(const step_batch& batch);

  /// Forgets the caches and samplers of `requests` (finished or cancelled).
  void release(std::span<const request_id> requests);
  /// Sequences cached.
  std::size_t cached_sequences() const noexcept { return caches_.size(); }

 private:
  runtime::latent_cache& cache_for(const batch_entry& entry);

  options options_;
  std::unique_ptr<runtime::model_weights> weights_;
  std::unique_ptr<kernels::thread_pool> pool_;
  std::unique_ptr<runtime::model> model_;
  std::map<request_id, std::unique_ptr<runtime::latent_cache>> caches_;
  std::map<request_id, runtime::sampler> samplers_;
};

}  // namespace shoal::actors
