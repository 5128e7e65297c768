// The gateway in front of a cluster: requests go to the head node's router through
// `shoal::client`; the text side (detokenization, stop strings, EOS) stays here, where the
// tokenizer is, so the cluster only ever sees token ids.

#include "shoal/gateway/backend.hpp"

#include "shoal/actors/client.hpp"
#include "shoal/base/error.hpp"
#include "shoal/runtime/completion.hpp"

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
                  std::int64_t max_waiting, std::function<void(runtime::engine_stats&)> observe)
      : client_(client), tok_(tok), max_sequence_tokens_(max_sequence_tokens), max_waiting_(max_waiting),
        observe_(std::move(observe)) {}

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
    const auto eos = tok_.eos_id();
    if (eos) spec.limits.stop_token_ids.push_back(*eos);

    generate_options options;
    options.prompt.assign(spec.prompt.begin(), spec.prompt.end());
    options.max_tokens = static_cast<std::uint32_t>(spec.limits.max_tokens);
    options.stop_tokens.assign(spec.limits.stop_token_ids.begin(), spec.limits.stop_token_ids.end());
    const auto& s = spec.sampling;
    options.sampling = {.temperature = s.temperature,
                        .top_k = static_cast<std::uint32_t>(std::max(0, s.top_k)),
                        .top_p = s.top_p,
                        .min_p = s.min_p,
                        .repetition_penalty = s.repetition_penalty,
                        .frequency_penalty = s.frequency_penalty,
                        .presence_penalty = s.presence_penalty,
                        .has_seed = s.seed.has_value(),
                        .seed = s.seed.value_or(0),
                        .id_limit = static_cast<std::uint32_t>(tok_.id_limit())};
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
    if (observe_) observe_(s);
    return s;
  }

  std::int64_t max_sequence_tokens() const override { return max_sequence_tokens_; }

 private:
  shoal::client& client_;
  const runtime::tokenizer& tok_;
  std::int64_t max_sequence_tokens_;
  std::int64_t max_waiting_;
  std::function<void(runtime::engine_stats&)> observe_;
  std::shared_ptr<shared_state> state_ = std::make_shared<shared_state>();
};

}  // namespace

std::unique_ptr<backend> make_cluster_backend(shoal::client& client, const runtime::tokenizer& tok,
                                              std::int64_t max_sequence_tokens, std::int64_t max_waiting,
                                              std::function<void(runtime::engine_stats&)> observe) {
  return std::make_unique<cluster_backend>(client, tok, max_sequence_tokens, max_waiting, std::move(observe));
}

}  // namespace shoal::gateway
