#include "shoal/gateway/metrics.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>

namespace shoal::gateway {

histogram::histogram(std::vector<double> bounds) : bounds_(std::move(bounds)), counts_(bounds_.size() + 1, 0) {}

void histogram::observe(double value) {
  const auto it = std::lower_bound(bounds_.begin(), bounds_.end(), value);
  ++counts_[static_cast<std::size_t>(it - bounds_.begin())];
  sum_ += value;
  ++count_;
}

void histogram::render(std::string& out, std::string_view name, std::string_view help) const {
  fmt::format_to(std::back_inserter(out), "# HELP {} {}\n# TYPE {} histogram\n", name, help, name);
  std::uint64_t cumulative = 0;
  for (std::size_t i = 0; i < bounds_.size(); ++i) {
    cumulative += counts_[i];
    fmt::format_to(std::back_inserter(out), "{}_bucket{{le=\"{}\"}} {}\n", name, bounds_[i], cumulative);
  }
  cumulative += counts_.back();
  fmt::format_to(std::back_inserter(out), "{}_bucket{{le=\"+Inf\"}} {}\n{}_sum {}\n{}_count {}\n", name, cumulative, name,
                 sum_, name, count_);
}

metrics::metrics()
    : ttft_({0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60}),
      tpot_({0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5}) {}

void metrics::count_request(std::string_view route, int status) {
  std::lock_guard lock(mutex_);
  ++requests_[{std::string(route), status}];
}

void metrics::count_slow_client() {
  std::lock_guard lock(mutex_);
  ++slow_clients_;
}

void metrics::count_tokens(std::int64_t prompt, std::int64_t completion, std::int64_t cached) {
  std::lock_guard lock(mutex_);
  prompt_tokens_ += static_cast<std::uint64_t>(prompt);
  completion_tokens_ += static_cast<std::uint64_t>(completion);
  cached_tokens_ += static_cast<std::uint64_t>(cached);
}

void metrics::observe_ttft(double seconds) {
  std::lock_guard lock(mutex_);
  ttft_.observe(seconds);
}

void metrics::observe_tpot(double seconds) {
  std::lock_guard lock(mutex_);
  tpot_.observe(seconds);
}

std::string metrics::render(const runtime::engine_stats& e, std::int64_t in_flight, std::int64_t experts_per_layer) const {
  std::string out;
  auto series = [&](std::string_view name, std::string_view type, std::string_view help, auto value) {
    fmt::format_to(std::back_inserter(out), "# HELP {} {}\n# TYPE {} {}\n{} {}\n", name, help, name, type, name, value);
  };
  {
    std::lock_guard lock(mutex_);
    out += "# HELP shoal_http_requests_total HTTP requests answered, by route and status.\n"
           "# TYPE shoal_http_requests_total counter\n";
    for (const auto& [key, count] : requests_)
      fmt::format_to(std::back_inserter(out), "shoal_http_requests_total{{route=\"{}\",status=\"{}\"}} {}\n", key.first,
                     key.second, count);
    series("shoal_request_prompt_tokens_total", "counter", "Prompt tokens of finished generation requests.", prompt_tokens_);
    series("shoal_request_generated_tokens_total", "counter", "Tokens generated for finished requests.", completion_tokens_);
    series("shoal_request_cached_prompt_tokens_total", "counter",
           "Prompt tokens of finished requests served from the prefix cache.", cached_tokens_);
    series("shoal_http_slow_client_disconnects_total", "counter",
           "Connections closed, and their requests cancelled, because the client read too slowly.", slow_clients_);
    ttft_.render(out, "shoal_time_to_first_token_seconds", "Time from request arrival to the first generated token.");
    tpot_.render(out, "shoal_time_per_output_token_seconds", "Mean time between output tokens of a request.");
  }
  series("shoal_requests_in_flight", "gauge", "Generation requests the gateway is serving.", in_flight);
  series("shoal_queue_depth", "gauge", "Requests queued in the engine, not yet admitted.", e.waiting);
  series("shoal_running_sequences", "gauge", "Sequences admitted to the running batch.", e.running);
  series("shoal_last_batch_tokens", "gauge", "Tokens in the latest engine iteration.", e.last_batch_tokens);
  series("shoal_cache_blocks_total", "gauge", "Latent-cache blocks.", e.cache_blocks_total);
  series("shoal_cache_blocks_used", "gauge", "Latent-cache blocks held by sequences or the prefix cache.", e.cache_blocks_used);
  series("shoal_cache_blocks_free", "gauge", "Latent-cache blocks free.", e.cache_blocks_total - e.cache_blocks_used);
  series("shoal_prefix_cache_blocks", "gauge", "Blocks kept for prefix reuse.", e.prefix_cache_blocks);
  series("shoal_engine_steps_total", "counter", "Engine iterations completed.", e.steps);
  series("shoal_engine_prompt_tokens_total", "counter", "Prompt tokens admitted by the engine.", e.prompt_tokens);
  series("shoal_engine_prefilled_tokens_total", "counter", "Prompt tokens computed (not served from the cache).",
         e.prefilled_tokens);
  series("shoal_engine_cached_prompt_tokens_total", "counter", "Prompt tokens served from the prefix cache.",
         e.cached_prompt_tokens);
  series("shoal_engine_generated_tokens_total", "counter", "Tokens sampled by the engine.", e.generated_tokens);
  series("shoal_engine_preemptions_total", "counter", "Sequences preempted for recompute.", e.preemptions);
  const auto since_step = e.steps == 0 ? -1.0
                                       : std::chrono::duration<double>(std::chrono::steady_clock::now() - e.last_step_end).count();
  series("shoal_engine_seconds_since_last_step", "gauge", "Seconds since the latest iteration ended (-1: none yet).", since_step);
  if (e.cluster.nodes > 0) {
    series("shoal_cluster_nodes", "gauge", "Nodes in the cluster config.", e.cluster.nodes);
    series("shoal_cluster_nodes_down", "gauge", "Nodes declared dead and not back yet.", e.cluster.nodes_down);
    series("shoal_cluster_node_restarts_total", "counter", "Nodes that joined again after being declared dead.",
           e.cluster.node_restarts);
    series("shoal_cluster_recoveries_total", "counter", "Times the cluster served again after a node failure.",
           e.cluster.recoveries);
    series("shoal_cluster_replayed_requests_total", "counter",
           "Requests recomputed from their prompt and streamed tokens after a failed step.", e.cluster.replayed_requests);
    series("shoal_cluster_failed_steps_total", "counter", "Pipeline steps abandoned because a node failed.",
           e.cluster.failed_steps);
    series("shoal_cluster_head_failovers_total", "counter",
           "Times this gateway moved its streams to another head (the head died, froze or its connection failed).",
           e.cluster.head_failovers);
    series("shoal_cluster_resumed_requests_total", "counter",
           "Requests the head in charge took over from a gateway with the tokens already streamed (head failovers).",
           e.cluster.resumed_requests);
    series("shoal_cluster_refused_peers_total", "counter",
           "Connections the head node refused because they did not prove the cluster's join secret.",
           e.cluster.refused_peers);
    series("shoal_cluster_placement_epoch", "gauge",
           "Placement epoch (bumped on every failure, re-placement and operator's change).", e.cluster.epoch);
    series("shoal_cluster_expert_node_imbalance", "gauge",
           "Rows computed by the heaviest expert node over the mean of the expert nodes, over the load window "
           "(1: balanced; 0: not measured or no expert nodes).",
           e.cluster.expert_imbalance);
    series("shoal_cluster_serving", "gauge", "1 while every stage and expert actor serves, 0 while the cluster heals.",
           e.unavailable.empty() ? 1 : 0);
  }
  if (!e.cluster.versions.empty()) {
    // One family per metric, a line per model version (split).
    auto by_version = [&](const char* name, const char* type, const char* help, auto value) {
      fmt::format_to(std::back_inserter(out), "# HELP {} {}\n# TYPE {} {}\n", name, help, name, type);
      for (const auto& v : e.cluster.versions)
        fmt::format_to(std::back_inserter(out), "{}{{version=\"{}\"}} {}\n", name, v.name, value(v));
    };
    by_version("shoal_version_weight", "gauge", "Share of new requests each model version gets (relative weight).",
               [](const auto& v) { return v.weight; });
    by_version("shoal_version_requests_total", "counter", "Requests each model version served.",
               [](const auto& v) { return v.requests; });
    by_version("shoal_version_fallbacks_total", "counter",
               "Requests a model version was picked for but could not take (its deployment unreachable); this "
               "cluster served them.",
               [](const auto& v) { return v.fallbacks; });
    by_version("shoal_version_up", "gauge", "1: this cluster, or the version's head is connected.",
               [](const auto& v) { return v.up ? 1 : 0; });
  }
  out += "# HELP shoal_expert_routed_tokens_total Tokens routed to each expert.\n"
         "# TYPE shoal_expert_routed_tokens_total counter\n";
  for (std::size_t i = 0; i < e.expert_tokens.size(); ++i) {
    if (experts_per_layer > 0)
      fmt::format_to(std::back_inserter(out), "shoal_expert_routed_tokens_total{{layer=\"{}\",expert=\"{}\"}} {}\n",
                     static_cast<std::int64_t>(i) / experts_per_layer, static_cast<std::int64_t>(i) % experts_per_layer,
                     e.expert_tokens[i]);
    else
      fmt::format_to(std::back_inserter(out), "shoal_expert_routed_tokens_total{{index=\"{}\"}} {}\n", i, e.expert_tokens[i]);
  }
  return out;
}

}  // namespace shoal::gateway
