#pragma once
/// \file
/// What the HTTP gateway needs from whatever generates tokens. The server passes an adapter
/// over a cluster's router (in this process or on a head node); tests pass a scripted fake, which keeps HTTP tests fast and
/// lets them stage hangs and overloads that a real engine produces only by accident.

#include "shoal/runtime/engine.hpp"

#include <cstdint>
#include <functional>
#include <memory>

namespace shoal {
class client;
}

namespace shoal::gateway {

/// A token generator as seen from the gateway. All members may be called from any thread.
class backend {
 public:
  virtual ~backend() = default;
  /// Queues a request (see `runtime::engine::submit`). Throws `shoal::error`:
  /// `invalid_argument`, `resource_exhausted` (queue full) or `unavailable` (shutting down).
  /// Events may arrive on another thread before this returns.
  virtual std::uint64_t submit(runtime::generation_request request) = 0;
  /// Cancels a request if it is still known; its last event carries `errc::cancelled`.
  virtual void cancel(std::uint64_t request_id) = 0;
  /// A snapshot for /metrics and /ready.
  virtual runtime::engine_stats stats() const = 0;
  /// Longest prompt plus completion one request may have.
  virtual std::int64_t max_sequence_tokens() const = 0;
};

/// A backend over a cluster's router, reached through `client` (which must outlive it).
/// Prompts go to the cluster as token ids with the request's sampling parameters and stop
/// token ids (the caller puts EOS there unless the request ignores it); the text side
/// (detokenization, stop strings) runs here. `max_sequence_tokens` is
/// the model's context; at most `max_waiting` requests are in progress at once (more get
/// `resource_exhausted`). Stats add what the cluster itself counts, from its status (the
/// scheduler's queue and cache gauges, health, routed tokens per expert).
std::unique_ptr<backend> make_cluster_backend(shoal::client& client, const runtime::tokenizer& tok,
                                              std::int64_t max_sequence_tokens, std::int64_t max_waiting);

}  // namespace shoal::gateway
