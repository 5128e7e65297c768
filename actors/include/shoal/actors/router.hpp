#pragma once
/// \file
/// The router: admits requests, batches them into pipeline steps, streams tokens back, and
/// keeps each request's prompt and generated tokens so it can be replayed from them.

#include "shoal/actors/protocols.hpp"
#include "shoal/config/cluster_config.hpp"
#include "shoal/runtime/scheduler.hpp"

#include <caf/stateful_actor.hpp>
#include <caf/typed_event_based_actor.hpp>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <map>
#include <random>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace shoal::actors {

class fabric;
struct version_link;

/// Router settings.
struct router_options {
  /// Admission, batching and block accounting; `cache_blocks` must equal the blocks every
  /// stage stores (both come from `config::cache_blocks_for`).
  runtime::scheduler_options scheduling;
  std::chrono::milliseconds step_timeout{60000};     ///< Deadline of one pipeline step.
  std::int64_t vocab_size = 0;                       ///< Token ids must be below it (0: unchecked).
  std::int64_t max_positions = 0;                    ///< Prompt + max_tokens limit (0: unchecked).
  /// Failed steps a request lives through (each time it is recomputed on the next
  /// placement); one more ends it with the step's error. Bounds a request that itself brings
  /// nodes down.
  int replay_limit = 5;
  /// Steps in the pipeline at once (micro-batches); 0: one per stage of the placement.
  int micro_batches = 0;
  /// Pause after a step failed without a fence from the supervisor (a node that may be
  /// dying), before the requests are stepped again.
  std::chrono::milliseconds retry_pause{1000};
  /// The model version this cluster serves, other deployments serving other versions, and
  /// the initial shares of the requests (see `config::cluster_config::split`).
  std::string version = "default";
  std::vector<config::model_version> versions{};
  std::vector<std::pair<std::string, std::uint32_t>> split{};
  /// The join secret the other versions' heads are connected with (this cluster's own).
  std::string join_secret{};
};

/// State of the router.
struct router_state {
  static inline const char* name = "shoal.router";  ///< Actor name in CAF logs.

  /// A request from admission to its last token; its tokens live in the scheduler.
  struct request {
    request_id client_id = 0;              ///< The client's id for it.
    token_sink_actor sink;                 ///< Where its tokens go.
    generate_request spec;                 ///< As submitted.
    std::uint32_t generated = 0;           ///< Tokens streamed so far.
    bool cancelled = false;                ///< Cancel arrived while it was in the step being computed.
    int replays = 0;                       ///< Failed steps it was part of.
  };

  router_options options;                  ///< Settings.
  std::shared_ptr<fabric> book;            ///< Resolves the stages.
  stage_actor first_stage;                 ///< Where steps start; null until wired.
  std::uint64_t epoch = 0;                 ///< Placement epoch.
  std::uint64_t fence = 0;                 ///< Its fence (see `placement_table::fence`).
  std::vector<actor_address> stages;       ///< The stages of the placement, in order.
  std::unique_ptr<runtime::scheduler> plan; ///< Which tokens of which requests run next, in which blocks.
  std::map<std::uint64_t, request> requests; ///< By router-internal id, in admission order.
  /// Steps in the pipeline, by step number: at most one per stage, each with sequences of its
  /// own, so that stages do not wait for each other.
  std::map<std::uint64_t, std::vector<runtime::scheduled_chunk>> in_flight;
  std::uint64_t next_id = 1;               ///< Next internal id.
  std::uint64_t step = 0;                  ///< Steps started.
  std::size_t most_in_flight = 0;          ///< The most steps that were in the pipeline at once.
  bool wired = false;                      ///< Wired at least once (a later wire means new stores).
  bool paused = false;                     ///< A step failed; waiting for `retry_pause` or a new placement.
  std::uint64_t failed_steps = 0;          ///< Steps abandoned because of a failure.
  std::uint64_t replays = 0;               ///< Requests recomputed after a failure.
  std::uint64_t resumed = 0;               ///< Requests a client resubmitted with tokens it had (head failover).
  std::mt19937_64 seeds{std::random_device{}()}; ///< Seeds for sampled requests that bring none.
  /// A model version's share of the requests (smooth weighted round robin: every version gets
  /// its weight's share of each run of sum-of-weights requests, spread evenly).
  struct version_share {
    std::string name;                      ///< As in the config.
    std::uint32_t weight = 0;              ///< Share (relative).
    std::int64_t credit = 0;               ///< Round-robin state.
    std::uint64_t requests = 0;            ///< Requests it served (this cluster: admitted here).
    std::uint64_t fallbacks = 0;           ///< Requests it was picked for but could not take.
    std::shared_ptr<version_link> link;    ///< Another deployment; null for this cluster.
  };
  std::vector<version_share> versions;     ///< This cluster's version first; empty without `versions`.
  /// Threads connecting to other versions' heads, each with its "finished" flag.
  std::vector<std::pair<std::thread, std::shared_ptr<std::atomic<bool>>>> connectors;
  router_state();
  ~router_state();
};

/// The scheduler settings of a cluster config: its cache budget (`config::cache_blocks_for`),
/// block size, token budget, sequences per step and prefix reuse.
runtime::scheduler_options scheduling_for(const config::cluster_config& cluster, const config::model_config& model);

/// The router. It owns the scheduler: each step takes one decode token of every running
/// request and prompt chunks up to the token budget (continuous batching, chunked prefill),
/// admits requests while cache blocks are free, preempts the youngest by recompute when they
/// run out, and reuses cached prompt prefixes; each entry carries its block table, so stages
/// store latents where the router says. With several stages, as many steps as stages are in
/// the pipeline at once, each with its own share of the running requests (micro-batches), so
/// that the first stage computes the next step while the last one computes this one.
///
/// A failure never loses an accepted request: when the supervisor fences the placement (a
/// node died) or a step fails for want of a node, the step's requests are taken back with
/// every token they streamed, and the next placement recomputes them (greedy requests give
/// the tokens they would have given; sampled ones continue their seeded stream). Clients see
/// a pause, not an error, unless a request fails more than `replay_limit` times.
router_actor::behavior_type make_router(router_actor::stateful_pointer<router_state> self, router_options options,
                                        std::shared_ptr<fabric> book);

}  // namespace shoal::actors
