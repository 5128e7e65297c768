#include "shoal/actors/router.hpp"

#include "shoal/actors/engines.hpp"
#include "shoal/actors/fabric.hpp"

#include <caf/actor_cast.hpp>

#include <algorithm>
#include <chrono>

namespace shoal::actors {
namespace {

using self_ptr = router_actor::stateful_pointer<router_state>;

std::uint64_t now_unix_ms() {
  return static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::milliseconds>(
                                        std::chrono::system_clock::now().time_since_epoch())
                                        .count());
}

void finish(self_ptr self, std::uint64_t id, finish_reason reason, std::vector<std::int32_t> tokens = {},
            std::vector<float> logits = {}, errc code = errc::internal, std::string message = {}) {
  auto& st = self->state;
  const auto it = st.requests.find(id);
  if (it == st.requests.end()) return;
  token_chunk chunk{.request = it->second.client_id, .tokens = std::move(tokens), .logits = std::move(logits),
                    .finish = reason, .error_code = 0, .error = {}};
  if (reason == finish_reason::error) {
    chunk.error_code = static_cast<std::uint8_t>(code);
    chunk.error = std::move(message);
  }
  self->send(it->second.sink, std::move(chunk));
  if (it->second.cached > 0 && st.first_stage)
    self->send(st.first_stage, release_atom::value, std::vector<request_id>{id});
  st.requests.erase(it);
}

void schedule(self_ptr self);

void on_sampled(self_ptr self, std::vector<std::uint64_t> ids, std::vector<std::uint32_t> sent, sampled_batch& out) {
  auto& st = self->state;
  st.busy = false;
  const std::size_t vocab = out.tokens.empty() ? 0 : out.logits.size() / out.tokens.size();
  for (std::size_t i = 0; i < ids.size(); ++i) {
    const auto it = st.requests.find(ids[i]);
    if (it == st.requests.end()) continue;
    auto& r = it->second;
    r.in_flight = false;
    r.cached += sent[i];
    if (i >= out.tokens.size() || out.tokens[i].request != ids[i]) {
      finish(self, ids[i], finish_reason::error, {}, {}, errc::internal,
             fmt::format("step {} returned no token for request {}", out.step, r.client_id));
      continue;
    }
    const auto token = out.tokens[i].token;
    r.generated.push_back(token);
    std::vector<float> logits;
    if (r.spec.want_logits && vocab > 0)
      logits.assign(out.logits.begin() + static_cast<std::ptrdiff_t>(i * vocab),
                    out.logits.begin() + static_cast<std::ptrdiff_t>((i + 1) * vocab));
    const bool stop = std::find(r.spec.stop_tokens.begin(), r.spec.stop_tokens.end(), token) != r.spec.stop_tokens.end();
    if (r.cancelled) {
      finish(self, ids[i], finish_reason::cancelled, {token}, std::move(logits));
    } else if (stop) {
      finish(self, ids[i], finish_reason::stop, {token}, std::move(logits));
    } else if (r.generated.size() >= r.spec.max_tokens) {
      finish(self, ids[i], finish_reason::length, {token}, std::move(logits));
    } else {
      self->send(r.sink, token_chunk{.request = r.client_id, .tokens = {token}, .logits = std::move(logits),
                                     .finish = finish_reason::none, .error_code = 0, .error = {}});
    }
  }
  schedule(self);
}

void schedule(self_ptr self) {
  auto& st = self->state;
  if (st.busy || !st.first_stage) return;
  const auto now = now_unix_ms();
  step_batch batch;
  batch.step = ++st.step;
  std::vector<std::uint64_t> ids;
  std::vector<std::uint32_t> sent;
  std::vector<std::uint64_t> expired;
  for (auto& [id, r] : st.requests) {
    if (r.spec.deadline_unix_ms != 0 && now > r.spec.deadline_unix_ms) {
      expired.push_back(id);
      continue;
    }
    if (static_cast<int>(ids.size()) >= st.options.max_batch) break;
    batch_entry entry{.request = id, .tokens = {}, .position = r.cached, .sample_after = true, .prompt_tokens = 0,
                      .sampling = r.spec.sampling};
    if (r.cached == 0) {
      // Prefill, or a replay after a failure: the prompt plus every token streamed so far,
      // so the next sampled token is the first one the client has not seen.
      entry.prompt_tokens = static_cast<std::uint32_t>(r.spec.prompt.size());
      entry.tokens = r.spec.prompt;
      entry.tokens.insert(entry.tokens.end(), r.generated.begin(), r.generated.end());
    } else {
      entry.tokens = {r.generated.back()};
    }
    batch.want_logits = batch.want_logits || r.spec.want_logits;
    sent.push_back(static_cast<std::uint32_t>(entry.tokens.size()));
    batch.entries.push_back(std::move(entry));
    ids.push_back(id);
    r.in_flight = true;
  }
  for (auto id : expired)
    finish(self, id, finish_reason::error, {}, {}, errc::deadline_exceeded, "the request's deadline passed");
  if (ids.empty()) return;
  st.busy = true;
  self->request(st.first_stage, st.options.step_timeout, std::move(batch))
      .then([self, ids, sent](sampled_batch& out) { on_sampled(self, ids, sent, out); },
            [self, ids](caf::error& e) {
              auto& st = self->state;
              st.busy = false;
              const auto err = from_caf_error(e);
              // TODO(test): replay on a re-placed pipeline instead of failing, once the
              // supervisor re-places failed stages.
              for (auto id : ids) finish(self, id, finish_reason::error, {}, {}, err.code(),
                                         fmt::format("pipeline step failed: {}", err.what()));
              schedule(self);
            });
}

}  // namespace

router_actor::behavior_type make_router(router_actor::stateful_pointer<router_state> self, router_options options,
                                        std::shared_ptr<fabric> book) {
  self->state.options = options;
  self->state.book = std::move(book);
  return {
      [self](generate_request& spec, token_sink_actor& sink) {
        auto& st = self->state;
        const auto id = st.next_id++;
        auto reject = [&](std::string message) {
          self->send(sink, token_chunk{.request = spec.request, .tokens = {}, .logits = {}, .finish = finish_reason::error,
                                       .error_code = static_cast<std::uint8_t>(errc::invalid_argument),
                                       .error = std::move(message)});
        };
        if (spec.prompt.empty()) return reject("the prompt is empty");
        if (spec.max_tokens == 0) return reject("max_tokens must be at least 1");
        for (auto t : spec.prompt)
          if (t < 0 || (st.options.vocab_size > 0 && t >= st.options.vocab_size))
            return reject(fmt::format("prompt token {} is outside the vocabulary [0, {})", t, st.options.vocab_size));
        try {
          runtime::validate(to_sampling_params(spec.sampling));
        } catch (const shoal::error& e) {
          return reject(e.what());
        }
        if (st.options.max_positions > 0 &&
            static_cast<std::int64_t>(spec.prompt.size() + spec.max_tokens) > st.options.max_positions)
          return reject(fmt::format("prompt ({}) + max_tokens ({}) exceeds the model's context of {}",
                                    spec.prompt.size(), spec.max_tokens, st.options.max_positions));
        if (spec.sampling.temperature != 0.0f && spec.sampling.top_k != 1 && !spec.sampling.has_seed) {
          // Fixed here rather than drawn by the last stage, so that a replay after a failure
          // draws the same tokens again.
          spec.sampling.has_seed = true;
          spec.sampling.seed = st.seeds();
        }
        router_state::request r;
        r.client_id = spec.request;
        r.sink = std::move(sink);
        r.spec = std::move(spec);
        st.requests.emplace(id, std::move(r));
        schedule(self);
      },
      [self](cancel_atom, request_id client_id, token_sink_actor& sink) {
        auto& st = self->state;
        for (auto& [id, r] : st.requests) {
          if (r.client_id != client_id || r.sink != sink) continue;
          if (r.in_flight)
            r.cancelled = true;
          else
            finish(self, id, finish_reason::cancelled);
          return;
        }
      },
      [self](wire_atom, placement_table& table) -> caf::result<ok_atom> {
        auto& st = self->state;
        if (table.stages.empty()) return to_caf_error(errc::invalid_argument, "placement without stages");
        auto first = caf::actor_cast<stage_actor>(st.book->resolve(table.stages.front().address));
        if (!first)
          return to_caf_error(errc::not_found, fmt::format("first stage {}/{} is not reachable",
                                                           table.stages.front().address.node,
                                                           table.stages.front().address.actor));
        st.first_stage = std::move(first);
        st.epoch = table.epoch;
        schedule(self);
        return ok_atom::value;
      },
  };
}

}  // namespace shoal::actors
