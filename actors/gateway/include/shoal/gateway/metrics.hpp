#pragma once
/// \file
/// Gateway metrics in the Prometheus text format (version 0.0.4): what the gateway counts
/// itself (requests by status, tokens, latency histograms) beside a snapshot of the engine.

#include "shoal/runtime/engine.hpp"

#include <cstdint>
#include <map>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace shoal::gateway {

/// A cumulative histogram with fixed upper bounds (seconds).
class histogram {
 public:
  /// `bounds` ascending; a +Inf bucket is implied.
  explicit histogram(std::vector<double> bounds);
  /// Records one value.
  void observe(double value);
  /// Appends the `_bucket`, `_sum` and `_count` series of `name`.
  void render(std::string& out, std::string_view name, std::string_view help) const;

 private:
  std::vector<double> bounds_;
  std::vector<std::uint64_t> counts_;  // per bucket, not cumulative; the last one is +Inf
  double sum_ = 0;
  std::uint64_t count_ = 0;
};

/// Everything /metrics reports. Thread-safe.
class metrics {
 public:
  metrics();
  /// A finished HTTP request on `route` ("/v1/chat/completions", ...) with `status`.
  void count_request(std::string_view route, int status);
  /// Tokens of a finished generation request.
  void count_tokens(std::int64_t prompt, std::int64_t completion, std::int64_t cached);
  /// Seconds from a request's arrival to its first generated token.
  void observe_ttft(double seconds);
  /// Mean seconds between output tokens of one request (after the first).
  void observe_tpot(double seconds);
  /// A connection closed because its client did not read fast enough (its write queue
  /// passed `server_options::max_write_queue_bytes`).
  void count_slow_client();
  /// The text of /metrics: the gateway's series, `in_flight` generation requests, and the
  /// engine snapshot (`experts_per_layer` splits `expert_tokens` into layer and expert labels;
  /// 0: one `index` label).
  std::string render(const runtime::engine_stats& engine, std::int64_t in_flight, std::int64_t experts_per_layer) const;

 private:
  mutable std::mutex mutex_;
  std::map<std::pair<std::string, int>, std::uint64_t> requests_;
  std::uint64_t prompt_tokens_ = 0, completion_tokens_ = 0, cached_tokens_ = 0;
  std::uint64_t slow_clients_ = 0;
  histogram ttft_;
  histogram tpot_;
};

}  // namespace shoal::gateway
