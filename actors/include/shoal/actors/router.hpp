#pragma once
/// \file
/// The router: admits requests, batches them into pipeline steps, streams tokens back, and
/// keeps each request's prompt and generated tokens so it can be replayed from them.

#include "shoal/actors/protocols.hpp"

#include <caf/stateful_actor.hpp>
#include <caf/typed_event_based_actor.hpp>

#include <chrono>
#include <cstdint>
#include <deque>
#include <map>
#include <random>
#include <memory>
#include <vector>

namespace shoal::actors {

class fabric;

/// Router settings.
struct router_options {
  int max_batch = 8;                                 ///< Requests per step at most.
  std::chrono::milliseconds step_timeout{60000};     ///< Deadline of one pipeline step.
  std::int64_t vocab_size = 0;                       ///< Token ids must be below it (0: unchecked).
  std::int64_t max_positions = 0;                    ///< Prompt + max_tokens limit (0: unchecked).
};

/// State of the router.
struct router_state {
  static inline const char* name = "shoal.router";  ///< Actor name in CAF logs.

  /// A request from admission to its last token.
  struct request {
    request_id client_id = 0;              ///< The client's id for it.
    token_sink_actor sink;                 ///< Where its tokens go.
    generate_request spec;                 ///< As submitted.
    std::vector<std::int32_t> generated;   ///< Tokens streamed so far (for replay).
    std::uint32_t cached = 0;              ///< Positions the stages have cached.
    bool in_flight = false;                ///< Part of the step being computed.
    bool cancelled = false;                ///< Cancel arrived while in flight.
  };

  router_options options;                  ///< Settings.
  std::shared_ptr<fabric> book;            ///< Resolves the stages.
  stage_actor first_stage;                 ///< Where steps start; null until wired.
  std::uint64_t epoch = 0;                 ///< Placement epoch.
  std::map<std::uint64_t, request> requests; ///< By router-internal id, in admission order.
  std::uint64_t next_id = 1;               ///< Next internal id.
  std::uint64_t step = 0;                  ///< Steps started.
  bool busy = false;                       ///< A step is in the pipeline.
  std::mt19937_64 seeds{std::random_device{}()}; ///< Seeds for sampled requests that bring none.
};

/// The router. Steps are formed from the oldest `max_batch` requests: a new request sends
/// its whole prompt (prefill), a running one its last token (decode); one step at a time.
/// TODO(perf): continuous batching with several steps in flight and chunked prefill.
router_actor::behavior_type make_router(router_actor::stateful_pointer<router_state> self, router_options options,
                                        std::shared_ptr<fabric> book);

}  // namespace shoal::actors
