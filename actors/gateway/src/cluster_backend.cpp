// The gateway in front of a cluster: requests go to the head node's router through
// `shoal::client`; the text side (detokenization, stop strings, EOS) stays here, where the
// tokenizer is, so the cluster only ever sees token ids.

#include "shoal/gateway/backend.hpp"

#include "shoal/actors/client.hpp"
#include "shoal/base/error.hpp"
#include "shoal/runtime/completion.hpp"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <map>
#include <mutex>

namespace shoal::gateway {
namespace {

using clock_type = std::chrono::steady_clock;

// What the backend and the client's callbacks share; callbacks hold it, so a chunk arriving
// after the backend is gone finds it still alive.
struct shared_state {
  struct request {
    runtime::generation_request spec;
    std::unique_ptr<runtime::completion_stream> stream;
    std::uint64_t cluster_id = 0;
    bool cancel_wanted = false;
  };
  std::mutex mutex;
  std::map<std::uint64_t, std::shared_ptr<request>> active;
  std::uint64_t next_id = 0;
  runtime::engine_stats counters;
};

class cluster_backend final : public backend {
 public:
  cluster_backend(shoal::client& client, const runtime::tokenizer& tok, std::int64_t max_sequence_tokens,
                  std::int64_t max_waiting)
      : client_(client), tok_(tok), max_sequence_tokens_(max_sequence_tokens), max_waiting_(max_waiting) {}

  ~cluster_backend() override {
    std::vector<std::uint64_t> ids;
    {
      std::lock_guard lock(state_->mutex);
      for (auto& [id, r] : state_->active) ids.push_back(r->cluster_id);
    }
    for (auto id : ids) client_.cancel(id);
  }

  std::uint64_t submit(runtime::generation_request spec) override {
    if (spec.prompt.empty()) shoal::fail(errc::invalid_argument, "the prompt is empty");
    runtime::validate(spec.sampling);
    if (spec.limits.max_tokens < 1) shoal::fail(errc::invalid_argument, "max_tokens must be >= 1");
    const auto total = static_cast<std::int64_t>(spec.prompt.size()) + spec.limits.max_tokens;
    if (total > max_sequence_tokens_)
      shoal::fail(errc::invalid_argument, "prompt ({} tokens) + max_tokens ({}) exceeds the {} tokens a sequence may hold",
                  spec.prompt.size(), spec.limits.max_tokens, max_sequence_tokens_);

    generate_options options;
    options.prompt.assign(spec.prompt.begin(), spec.prompt.end());
    options.max_tokens = static_cast<std::uint32_t>(spec.limits.max_tokens);
    options.stop_tokens.assign(spec.limits.stop_token_ids.begin(), spec.limits.stop_token_ids.end());
    options.sampling = to_sampling_options(spec.sampling, static_cast<std::uint32_t>(tok_.id_limit()));
    if (spec.deadline) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(*spec.deadline - clock_type::now());
      options.deadline = std::max(left, std::chrono::milliseconds(1));
    }

    auto r = std::make_shared<shared_state::request>();
    r->stream = std::make_unique<runtime::completion_stream>(tok_, spec.limits);
    r->spec = std::move(spec);
    std::uint64_t id;
    {
      std::lock_guard lock(state_->mutex);
      if (static_cast<std::int64_t>(state_->active.size()) >= max_waiting_)
        shoal::fail(errc::resource_exhausted, "{} requests are already in progress", max_waiting_);
      id = ++state_->next_id;
      state_->active.emplace(id, r);
      state_->counters.prompt_tokens += static_cast<std::uint64_t>(r->spec.prompt.size());
      state_->counters.running = static_cast<std::int64_t>(state_->active.size());
    }
    // Chunks of one request arrive one at a time and in order (the client's sink is one actor).
    auto on_chunk = [state = state_, r, id, &client = client_](const token_event& chunk) {
      runtime::generation_event e;
      e.request_id = id;
      e.prompt_tokens = static_cast<std::int64_t>(r->spec.prompt.size());
      e.cached_prompt_tokens = chunk.cached_prompt_tokens;
      bool cancel_cluster = false;
      {
        std::lock_guard lock(state->mutex);
        if (!state->active.contains(id)) return;  // already finished here (stop string, error)
        state->counters.steps += 1;
        state->counters.last_step_end = clock_type::now();
        state->counters.generated_tokens += chunk.tokens.size();
      }
      for (auto t : chunk.tokens) {
        if (r->stream->finished()) break;
        e.text += r->stream->push(t);
        e.tokens.push_back(t);
      }
      if (chunk.finish == actors::finish_reason::error) {
        e.finished = true;
        e.error = static_cast<errc>(chunk.error_code);
        e.error_message = chunk.error;
      } else if (r->stream->finished()) {
        e.finished = true;
        e.reason = r->stream->reason();
        e.matched_stop = r->stream->matched_stop();
        cancel_cluster = chunk.finish == actors::finish_reason::none;  // a stop string, found here
      } else if (chunk.finish == actors::finish_reason::cancelled) {
        e.finished = true;
        e.error = errc::cancelled;
        e.error_message = "cancelled";
      } else if (chunk.finish != actors::finish_reason::none) {
        // The router ended it (length) before the text side did: show what is held back.
        e.text += r->stream->close();
        e.finished = true;
        e.reason = r->stream->reason();
      }
      e.completion_tokens = static_cast<std::int64_t>(r->stream->tokens().size());
      std::uint64_t cluster_id = 0;
      if (e.finished) {
        std::lock_guard lock(state->mutex);
        state->active.erase(id);
        state->counters.running = static_cast<std::int64_t>(state->active.size());
        if (cancel_cluster) {
          cluster_id = r->cluster_id;
          if (cluster_id == 0) r->cancel_wanted = true;  // `submit` has not stored it yet: it cancels
        }
      }
      if (cluster_id != 0) client.cancel(cluster_id);
      if (r->spec.on_event) r->spec.on_event(e);
    };
    std::uint64_t cluster_id = 0;
    try {
      cluster_id = client_.submit(options, on_chunk);
    } catch (...) {
      std::lock_guard lock(state_->mutex);
      state_->active.erase(id);
      throw;
    }
    // Chunks may have arrived already, and a cancel (from `cancel` or a stop string) may have
    // been wanted before the cluster's id was known.
    bool cancel_now = false;
    {
      std::lock_guard lock(state_->mutex);
      r->cluster_id = cluster_id;
      cancel_now = r->cancel_wanted;
    }
    if (cancel_now) client_.cancel(cluster_id);
    return id;
  }

  void cancel(std::uint64_t request_id) override {
    std::uint64_t cluster_id = 0;
    {
      std::lock_guard lock(state_->mutex);
      const auto it = state_->active.find(request_id);
      if (it == state_->active.end()) return;
      cluster_id = it->second->cluster_id;
      if (cluster_id == 0) {
        it->second->cancel_wanted = true;
        return;
      }
    }
    client_.cancel(cluster_id);
  }

  runtime::engine_stats stats() const override {
    runtime::engine_stats s;
    {
      std::lock_guard lock(state_->mutex);
      s = state_->counters;
    }
    apply_cluster_status(s);
    return s;
  }

  std::int64_t max_sequence_tokens() const override { return max_sequence_tokens_; }

 private:
  // The queue and cache gauges come from the router's scheduler, health from the supervisor,
  // both in the head's status (one round trip, at most every `kStatusAge` for metric and
  // readiness scrapes that come in bursts).
  void apply_cluster_status(runtime::engine_stats& s) const {
    static constexpr auto kStatusAge = std::chrono::milliseconds(250);
    std::lock_guard lock(status_mutex_);
    const auto now = clock_type::now();
    if (status_at_ == clock_type::time_point{} || now - status_at_ > kStatusAge) {
      status_at_ = now;
      try {
        status_ = nlohmann::json::parse(client_.status(std::chrono::seconds(3)));
        status_error_.clear();
      } catch (const std::exception& e) {
        status_error_ = e.what();
      }
    }
    if (!status_error_.empty()) {
      s.unavailable = fmt::format("the cluster's head node does not answer: {}", status_error_);
      return;
    }
    try {
      const auto& sched = status_.at("scheduler");
      s.waiting = sched.at("waiting").get<std::int64_t>();
      s.running = sched.at("running").get<std::int64_t>();
      s.cache_blocks_total = sched.at("cache_blocks_total").get<std::int64_t>();
      s.cache_blocks_used = sched.at("cache_blocks_used").get<std::int64_t>();
      s.prefix_cache_blocks = sched.at("prefix_cache_blocks").get<std::int64_t>();
      s.preemptions = sched.at("preemptions").get<std::uint64_t>();
      s.prefilled_tokens = sched.at("prefilled_tokens").get<std::uint64_t>();
      s.cached_prompt_tokens = sched.at("cached_prompt_tokens").get<std::uint64_t>();
      s.cluster.replayed_requests = sched.at("replayed_requests").get<std::uint64_t>();
      s.cluster.failed_steps = sched.at("failed_steps").get<std::uint64_t>();
      s.cluster.resumed_requests = sched.value("resumed_requests", std::uint64_t{0});
      if (sched.contains("versions"))
        for (const auto& v : sched.at("versions"))
          s.cluster.versions.push_back({.name = v.at("name").get<std::string>(),
                                        .weight = v.at("weight").get<std::uint32_t>(),
                                        .requests = v.at("requests").get<std::uint64_t>(),
                                        .fallbacks = v.at("fallbacks").get<std::uint64_t>(),
                                        .up = v.value("local", false) || v.value("connected", false)});
      s.cluster.head_failovers = client_.failovers();
      s.cluster.epoch = status_.at("epoch").get<std::uint64_t>();
      if (status_.contains("routed_tokens")) s.expert_tokens = status_.at("routed_tokens").get<std::vector<std::uint64_t>>();
      s.cluster.recoveries = status_.at("recoveries").get<std::uint64_t>();
      if (status_.contains("expert_load"))
        s.cluster.expert_imbalance = status_.at("expert_load").at("imbalance").get<double>();
      s.cluster.refused_peers = status_.value("refused_peers", std::uint64_t{0});
      for (const auto& n : status_.at("nodes")) {
        ++s.cluster.nodes;
        if (n.at("down").get<bool>()) ++s.cluster.nodes_down;
        s.cluster.node_restarts += n.at("restarts").get<std::uint64_t>();
      }
      if (!status_.at("serving").get<bool>()) {
        auto why = status_.at("failure").get<std::string>();
        if (why.empty()) why = status_.at("degraded").get<std::string>();
        s.unavailable = why.empty() ? "the cluster is not serving yet" : why;
      }
    } catch (const std::exception& e) {
      s.unavailable = fmt::format("the cluster's status is not understood: {}", e.what());
    }
  }

  shoal::client& client_;
  const runtime::tokenizer& tok_;
  std::int64_t max_sequence_tokens_;
  std::int64_t max_waiting_;
  mutable std::mutex status_mutex_;
  mutable clock_type::time_point status_at_{};
  mutable nlohmann::json status_;
  mutable std::string status_error_;
  std::shared_ptr<shared_state> state_ = std::make_shared<shared_state>();
};

}  // namespace

std::unique_ptr<backend> make_cluster_backend(shoal::client& client, const runtime::tokenizer& tok,
                                              std::int64_t max_sequence_tokens, std::int64_t max_waiting) {
  return std::make_unique<cluster_backend>(client, tok, max_sequence_tokens, max_waiting);
}

}  // namespace shoal::gateway
