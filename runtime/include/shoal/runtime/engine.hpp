#pragma once
/// \file
/// The scheduler and a whole model in one thread: continuous batching over a paged latent KV
/// cache with prefix reuse. Requests arrive as token ids with sampling options and leave as
/// streamed text deltas. `shoal serve` does not use it (it runs the router and stage actors,
/// which share `runtime::scheduler`); it checks the scheduler against the reference without
/// actors, and its request and event types are the gateway's.

#include "shoal/base/error.hpp"
#include "shoal/runtime/completion.hpp"
#include "shoal/runtime/sampling.hpp"
#include "shoal/runtime/tokenizer.hpp"

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace shoal::runtime {

class model;

/// Sizing and scheduling of an engine.
struct engine_options {
  std::int64_t cache_blocks = 0;           ///< Latent-cache blocks; 0: derive from `cache_bytes`.
  std::int64_t cache_bytes = 512ll << 20;  ///< Memory for the latent cache when `cache_blocks` is 0.
  std::int64_t block_tokens = 32;          ///< Positions per cache block.
  std::int64_t max_batch_tokens = 256;     ///< Token budget of one iteration (decode + prefill chunks).
  std::int64_t max_running = 64;           ///< Sequences decoding at once.
  std::int64_t max_waiting = 1024;         ///< Queued requests; more are refused (resource_exhausted).
  bool prefix_cache = true;                ///< Reuse cached blocks of shared prompt prefixes.
};

/// What a request produced since its last event. Events of one request arrive in order, on
/// the engine thread: handlers must be quick and must not call back into the engine
/// synchronously except `cancel`.
struct generation_event {
  std::uint64_t request_id = 0;
  std::string text;                      ///< New text to show (complete UTF-8, stop strings withheld).
  std::vector<token_id> tokens;          ///< Ids generated since the last event.
  bool finished = false;                 ///< Last event of the request.
  finish_reason reason = finish_reason::none;  ///< When finished: stop or length (none on error).
  std::string matched_stop;              ///< When a stop string ended it: that string.
  std::optional<errc> error;             ///< When finished by an error: cancelled, deadline_exceeded, ...
  std::string error_message;             ///< Human-readable reason for `error`.
  std::int64_t prompt_tokens = 0;        ///< Prompt length.
  std::int64_t cached_prompt_tokens = 0; ///< Prompt tokens served from the prefix cache.
  std::int64_t completion_tokens = 0;    ///< Tokens generated so far.
};

/// One generation.
struct generation_request {
  std::vector<token_id> prompt;          ///< Prompt ids (chat template already applied).
  sampling_params sampling;              ///< Token choice.
  completion_limits limits;              ///< max_tokens, stop strings; EOS is added by the engine.
  /// Give up (error deadline_exceeded) if not finished by then.
  std::optional<std::chrono::steady_clock::time_point> deadline;
  /// Receives the request's events (see `generation_event`).
  std::function<void(const generation_event&)> on_event;
};

/// A snapshot of the engine for metrics and readiness.
struct engine_stats {
  std::int64_t waiting = 0;              ///< Requests queued, not yet admitted.
  std::int64_t running = 0;              ///< Sequences admitted (prefilling or decoding).
  std::int64_t cache_blocks_total = 0;
  std::int64_t cache_blocks_used = 0;    ///< Held by running sequences or the prefix cache.
  std::int64_t prefix_cache_blocks = 0;  ///< Blocks kept for prefix reuse.
  std::uint64_t steps = 0;               ///< Iterations completed.
  std::uint64_t prompt_tokens = 0;       ///< Prompt tokens of finished and running requests.
  std::uint64_t prefilled_tokens = 0;    ///< Prompt tokens actually computed (not from the cache).
  std::uint64_t cached_prompt_tokens = 0;///< Prompt tokens served from the prefix cache.
  std::uint64_t generated_tokens = 0;    ///< Tokens sampled.
  std::uint64_t preemptions = 0;         ///< Sequences evicted for recompute when blocks ran out.
  std::int64_t last_batch_tokens = 0;    ///< Tokens in the latest iteration.
  /// When the latest iteration finished (epoch if none yet): readiness checks compare it with
  /// `waiting + running` to spot an engine that holds work but makes no progress.
  std::chrono::steady_clock::time_point last_step_end{};
  std::vector<std::uint64_t> expert_tokens;  ///< Routed tokens per (layer * experts + expert).
  /// Why requests cannot be computed right now (a node of the cluster is dead and not yet
  /// replaced); empty when they can. Requests still queue: they run once it heals.
  std::string unavailable;
  /// Health of the cluster behind a gateway (all 0 for an engine without one).
  struct cluster_health {
    std::int64_t nodes = 0;                ///< Nodes in the config.
    std::int64_t nodes_down = 0;           ///< Declared dead and not back.
    std::uint64_t node_restarts = 0;       ///< Nodes that joined again after being declared dead.
    std::uint64_t recoveries = 0;          ///< Times the cluster served again after a failure.
    std::uint64_t replayed_requests = 0;   ///< Requests recomputed after a failed step.
    std::uint64_t failed_steps = 0;        ///< Steps abandoned because a node failed.
    std::uint64_t epoch = 0;               ///< Placement epoch.
    /// Rows computed by the heaviest expert node over the mean of the expert nodes, over the
    /// load window (1 is balanced; 0 when unmeasured or without expert nodes).
    double expert_imbalance = 0;
    std::uint64_t refused_peers = 0;       ///< Connections the head refused: no or another join secret.
    std::uint64_t head_failovers = 0;      ///< Times the gateway moved its streams to another head.
    std::uint64_t resumed_requests = 0;    ///< Requests the head in charge took over with tokens a client had.
    /// Model versions served side by side (the head's `split`): empty without other versions.
    struct version {
      std::string name;                    ///< As in the cluster config.
      std::uint32_t weight = 0;            ///< Share of new requests (relative).
      std::uint64_t requests = 0;          ///< Requests it served.
      std::uint64_t fallbacks = 0;         ///< Requests it was picked for but could not take.
      bool up = true;                      ///< This cluster, or connected to the other deployment's head.
    };
    std::vector<version> versions;
  } cluster;
};

/// Continuous batching: every iteration runs one decode token for each running sequence and
/// fills the rest of `max_batch_tokens` with prompt chunks of admitted sequences. A request is
/// admitted only when the cache has blocks for its prompt; when decoding runs out of blocks the
/// youngest sequence is preempted and later recomputed from its prompt and generated tokens,
/// so the cache never overflows. Finished prompts leave their full blocks in a prefix tree
/// (evicted least recently used when blocks are needed).
class engine {
 public:
  /// `net` and `tok` must outlive the engine. Starts the engine thread.
  engine(model& net, const tokenizer& tok, engine_options options = {});
  /// Stops the thread; unfinished requests get a `cancelled` event.
  ~engine();
  engine(const engine&) = delete;
  engine& operator=(const engine&) = delete;

  /// Queues a request; returns its id. Throws `invalid_argument` (empty prompt, prompt plus
  /// max_tokens beyond the model's context or the whole cache, bad sampling values) or
  /// `resource_exhausted` (queue full) or `unavailable` (shutting down).
  std::uint64_t submit(generation_request request);
  /// Cancels a request if it is still known; its last event carries `errc::cancelled`.
  void cancel(std::uint64_t request_id);
  /// Stops admitting; `drain`: lets queued and running requests finish first, else cancels
  /// them. Returns when the engine thread has stopped. Idempotent.
  void shutdown(bool drain);
  /// Current statistics (thread-safe).
  engine_stats stats() const;
  /// Longest prompt plus completion a request may have.
  std::int64_t max_sequence_tokens() const;

 private:
  struct impl;
  std::unique_ptr<impl> impl_;
};

}  // namespace shoal::runtime
