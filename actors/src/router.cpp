#include "shoal/actors/router.hpp"

#include "shoal/actors/client.hpp"
#include "shoal/actors/engines.hpp"
#include "shoal/actors/fabric.hpp"

#include <caf/actor_cast.hpp>
#include <caf/send.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <mutex>

namespace shoal::actors {

/// The connection to another deployment's head and the requests forwarded there.
struct version_link {
  std::string host;
  std::uint16_t port = 0;
  std::string join_secret;
  std::mutex mutex;
  std::shared_ptr<shoal::client> client;   // Null until connected.
  std::string error;                       // Why the last attempt failed.
  bool connecting = false;
  std::chrono::steady_clock::time_point last_attempt{};
  // Requests forwarded and not finished, by (sink, the sink's request id): the id on `client`
  // (0 while its submission is under way).
  std::map<std::pair<caf::actor_addr, request_id>, std::uint64_t> forwarded;
  std::uint64_t returned = 0;  // Forwarded, then back here before anything streamed.
};

namespace {

using self_ptr = router_actor::stateful_pointer<router_state>;

std::uint64_t now_unix_ms() {
  return static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::milliseconds>(
                                        std::chrono::system_clock::now().time_since_epoch())
                                        .count());
}

// Ends a request: its last chunk goes to the client, its blocks go back to the scheduler
// (full prompt blocks stay for prefix reuse after a normal end), the last stage forgets its
// sampler.
void finish(self_ptr self, std::uint64_t id, finish_reason reason, std::vector<std::int32_t> tokens = {},
            std::vector<float> logits = {}, errc code = errc::internal, std::string message = {}) {
  auto& st = self->state;
  const auto it = st.requests.find(id);
  if (it == st.requests.end()) return;
  token_chunk chunk{.request = it->second.client_id, .tokens = std::move(tokens), .logits = std::move(logits),
                    .finish = reason, .error_code = 0, .error = {},
                    .cached_prompt_tokens = static_cast<std::uint32_t>(st.plan->cached_prompt_tokens(id))};
  if (reason == finish_reason::error) {
    chunk.error_code = static_cast<std::uint8_t>(code);
    chunk.error = std::move(message);
  }
  self->send(it->second.sink, std::move(chunk));
  const bool sampled = !(it->second.spec.sampling == sampling_spec{});
  if (sampled && st.first_stage) self->send(st.first_stage, release_atom::value, std::vector<request_id>{id});
  st.plan->remove(id, /*keep_prefix=*/reason == finish_reason::stop || reason == finish_reason::length);
  st.requests.erase(it);
}

void schedule(self_ptr self);

// Whether request `id` is in a step in the pipeline (its blocks are being written).
bool in_step(const router_state& st, std::uint64_t id) {
  for (const auto& [step, chunks] : st.in_flight)
    for (const auto& chunk : chunks)
      if (chunk.id == id) return true;
  return false;
}

// The steps in flight will not come back usable (a node died, the placement changed): their
// requests go back to the queue with every token they streamed, to be recomputed.
void abandon_step(self_ptr self, const shoal::error& why) {
  auto& st = self->state;
  if (st.in_flight.empty()) return;
  std::vector<runtime::scheduled_chunk> chunks;
  for (auto& [step, part] : st.in_flight) {
    chunks.insert(chunks.end(), part.begin(), part.end());
    ++st.failed_steps;
  }
  st.in_flight.clear();
  for (const auto& chunk : chunks) {
    const auto it = st.requests.find(chunk.id);
    if (it == st.requests.end()) continue;
    auto& r = it->second;
    if (r.cancelled) {
      finish(self, chunk.id, finish_reason::cancelled);
    } else if (++r.replays > st.options.replay_limit) {
      finish(self, chunk.id, finish_reason::error, {}, {}, why.code(),
             fmt::format("the request's step failed {} times; the last time: {}", r.replays, why.what()));
    } else {
      ++st.replays;
    }
  }
  st.plan->requeue_all();
}

void on_sampled(self_ptr self, std::uint64_t step_number, sampled_batch& out) {
  auto& st = self->state;
  const auto node = st.in_flight.extract(step_number);
  const auto& step = node.mapped();
  st.plan->commit(step);
  const std::size_t vocab = out.tokens.empty() ? 0 : out.logits.size() / out.tokens.size();
  std::size_t sampled = 0;
  for (const auto& chunk : step) {
    const auto it = st.requests.find(chunk.id);
    if (!chunk.samples) {
      if (it != st.requests.end() && it->second.cancelled) finish(self, chunk.id, finish_reason::cancelled);
      continue;
    }
    const auto i = sampled++;
    if (it == st.requests.end()) continue;
    auto& r = it->second;
    if (i >= out.tokens.size() || out.tokens[i].request != chunk.id) {
      finish(self, chunk.id, finish_reason::error, {}, {}, errc::internal,
             fmt::format("step {} returned no token for request {}", out.step, r.client_id));
      continue;
    }
    const auto token = out.tokens[i].token;
    st.plan->append(chunk.id, token);
    ++r.generated;
    std::vector<float> logits;
    if (r.spec.want_logits && vocab > 0)
      logits.assign(out.logits.begin() + static_cast<std::ptrdiff_t>(i * vocab),
                    out.logits.begin() + static_cast<std::ptrdiff_t>((i + 1) * vocab));
    const bool stop = std::find(r.spec.stop_tokens.begin(), r.spec.stop_tokens.end(), token) != r.spec.stop_tokens.end();
    if (r.cancelled) {
      finish(self, chunk.id, finish_reason::cancelled, {token}, std::move(logits));
    } else if (stop) {
      finish(self, chunk.id, finish_reason::stop, {token}, std::move(logits));
    } else if (r.generated >= r.spec.max_tokens) {
      finish(self, chunk.id, finish_reason::length, {token}, std::move(logits));
    } else {
      self->send(r.sink, token_chunk{.request = r.client_id, .tokens = {token}, .logits = std::move(logits),
                                     .finish = finish_reason::none, .error_code = 0, .error = {},
                                     .cached_prompt_tokens = static_cast<std::uint32_t>(st.plan->cached_prompt_tokens(chunk.id))});
    }
  }
  schedule(self);
}

void send_step(self_ptr self, std::vector<runtime::scheduled_chunk> chunks);

void schedule(self_ptr self) {
  auto& st = self->state;
  if (st.paused || !st.first_stage) return;
  const auto now = now_unix_ms();
  std::vector<std::uint64_t> expired;
  for (const auto& [id, r] : st.requests)
    if (r.spec.deadline_unix_ms != 0 && now > r.spec.deadline_unix_ms && !in_step(st, id)) expired.push_back(id);
  for (auto id : expired)
    finish(self, id, finish_reason::error, {}, {}, errc::deadline_exceeded, "the request's deadline passed");
  const auto depth = st.options.micro_batches > 0 ? static_cast<std::size_t>(st.options.micro_batches)
                                                  : std::max<std::size_t>(st.stages.size(), 1);
  while (st.in_flight.size() < depth) {
    auto chunks = st.plan->schedule(static_cast<std::int64_t>(depth));
    if (chunks.empty()) return;
    send_step(self, std::move(chunks));
  }
}

// Sends one step down the pipeline.
void send_step(self_ptr self, std::vector<runtime::scheduled_chunk> chunks) {
  auto& st = self->state;
  step_batch batch;
  batch.step = ++st.step;
  for (const auto& chunk : chunks) {
    const auto& r = st.requests.at(chunk.id);
    batch_entry entry{.request = chunk.id,
                      .tokens = {chunk.tokens.begin(), chunk.tokens.end()},
                      .position = static_cast<std::uint32_t>(chunk.start),
                      .sample_after = chunk.samples,
                      .prompt_tokens = static_cast<std::uint32_t>(r.spec.prompt.size()),
                      .sampling = r.spec.sampling,
                      .blocks = {chunk.blocks.begin(), chunk.blocks.end()},
                      .fresh = chunk.fresh,
                      .history = {}};
    // A rebuilt sampler needs every token before the chunk (prefix-cached or computed before
    // a preemption); greedy requests keep no sampler.
    if (chunk.fresh && chunk.start > 0 && !(r.spec.sampling == sampling_spec{})) {
      const auto& all = st.plan->tokens(chunk.id);
      entry.history.assign(all.begin(), all.begin() + chunk.start);
    }
    batch.want_logits = batch.want_logits || r.spec.want_logits;
    batch.entries.push_back(std::move(entry));
  }
  const auto step = st.step;
  st.in_flight.emplace(step, std::move(chunks));
  st.most_in_flight = std::max(st.most_in_flight, st.in_flight.size());
  // A reply to a step that was abandoned meanwhile (fenced, re-placed) is ignored.
  auto current = [self, step] { return self->state.in_flight.contains(step); };
  self->request(st.first_stage, st.options.step_timeout, std::move(batch))
      .then(
          [self, current, step](sampled_batch& out) {
            if (current()) on_sampled(self, step, out);
          },
          [self, current, step](caf::error& e) {
            if (!current()) return;
            auto& st = self->state;
            const auto err = from_caf_error(e);
            if (err.code() == errc::unavailable || err.code() == errc::aborted ||
                err.code() == errc::deadline_exceeded) {
              // A node is gone or going: keep the requests, and step again after a pause or
              // on the placement the supervisor wires next, whichever comes first.
              const auto why = e == caf::sec::request_timeout
                                   ? fmt::format("pipeline step got no answer within the step deadline ({} ms)",
                                                 st.options.step_timeout.count())
                                   : fmt::format("pipeline step failed: {}", err.what());
              abandon_step(self, shoal::error(err.code(), why));
              st.paused = true;
              self->delayed_send(self, st.options.retry_pause, tick_atom::value);
              return;
            }
            const auto node = st.in_flight.extract(step);
            const auto& failed = node.mapped();
            for (const auto& chunk : failed)
              finish(self, chunk.id, finish_reason::error, {}, {}, err.code(),
                     fmt::format("pipeline step failed: {}", err.what()));
            schedule(self);
          });
}

}  // namespace

runtime::scheduler_options scheduling_for(const config::cluster_config& cluster, const config::model_config& model) {
  return {.cache_blocks = config::cache_blocks_for(cluster, model),
          .block_tokens = cluster.block_tokens,
          .max_batch_tokens = cluster.max_batch_tokens,
          .max_running = cluster.max_batch,
          .prefix_cache = cluster.prefix_cache};
}

namespace {

// The version the next request goes to (smooth weighted round robin, as nginx spreads
// weighted upstreams): exact shares over every run of sum-of-weights requests.
router_state::version_share& pick_version(router_state& st) {
  std::int64_t total = 0;
  router_state::version_share* best = nullptr;
  for (auto& v : st.versions) {
    v.credit += v.weight;
    total += v.weight;
    if (v.weight > 0 && (!best || v.credit > best->credit)) best = &v;
  }
  if (!best) return st.versions.front();
  best->credit -= total;
  return *best;
}

// Connects to another version's head in the background (the router never blocks on it); at
// most one attempt every few seconds.
void connect_version(router_state& st, const std::shared_ptr<version_link>& link) {
  static constexpr auto kRetryEvery = std::chrono::seconds(3);
  {
    std::lock_guard lock(link->mutex);
    const auto now = std::chrono::steady_clock::now();
    if (link->client || link->connecting || now - link->last_attempt < kRetryEvery) return;
    link->connecting = true;
    link->last_attempt = now;
  }
  std::erase_if(st.connectors, [](auto& c) {
    if (!c.second->load()) return false;
    c.first.join();
    return true;
  });
  auto finished = std::make_shared<std::atomic<bool>>(false);
  st.connectors.emplace_back(std::thread([link, finished] {
    std::shared_ptr<shoal::client> client;
    std::string error;
    try {
      // A short no-head limit: requests forwarded to a version whose head stays silent come
      // back (unavailable, nothing streamed) and this cluster serves them.
      client = shoal::client::connect(std::vector<head_endpoint>{{link->host, link->port}}, std::chrono::seconds(5),
                                      link->join_secret, std::chrono::seconds(2), std::chrono::seconds(6));
    } catch (const std::exception& e) {
      error = e.what();
    }
    std::lock_guard lock(link->mutex);
    link->client = std::move(client);
    link->error = std::move(error);
    link->connecting = false;
    finished->store(true);
  }), finished);
}

// Sends a request to another version's cluster, its chunks back to `sink` under the sink's
// own request id. False when that cluster is not connected (yet): the caller serves it here.
bool forward(self_ptr self, router_state::version_share& v, const generate_request& spec,
             const token_sink_actor& sink) {
  auto link = v.link;
  std::shared_ptr<shoal::client> client;
  {
    std::lock_guard lock(link->mutex);
    client = link->client;
  }
  if (!client) {
    connect_version(self->state, link);
    return false;
  }
  generate_options o{.prompt = spec.prompt, .sampling = spec.sampling, .max_tokens = spec.max_tokens,
                     .stop_tokens = spec.stop_tokens, .want_logits = spec.want_logits, .deadline = {}};
  if (spec.deadline_unix_ms != 0) {
    const auto now = now_unix_ms();
    o.deadline = std::chrono::milliseconds(spec.deadline_unix_ms > now ? spec.deadline_unix_ms - now : 1);
  }
  const auto key = std::make_pair(sink.address(), spec.request);
  {
    std::lock_guard lock(link->mutex);
    link->forwarded[key] = 0;
  }
  auto router = caf::actor_cast<router_actor>(self);
  auto streamed = std::make_shared<std::atomic<bool>>(false);
  auto original = std::make_shared<generate_request>(spec);
  try {
    // The client keeps this callback while the request runs: a weak link, or link -> client ->
    // callback -> link would never be freed.
    std::weak_ptr<version_link> weak = link;
    auto forget = [weak, key](bool returned) {
      if (auto l = weak.lock()) {
        std::lock_guard lock(l->mutex);
        l->forwarded.erase(key);
        if (returned) ++l->returned;
      }
    };
    const auto id = client->submit(o, [forget, sink, router, streamed, original](const token_event& e) {
      if (e.finish == finish_reason::error && e.error_code == static_cast<std::uint8_t>(errc::unavailable) &&
          !streamed->load()) {
        forget(true);
        caf::anon_send(router, fallback_atom::value, *original, sink);
        return;
      }
      if (!e.tokens.empty()) streamed->store(true);
      token_chunk chunk = e;
      chunk.request = original->request;
      if (e.finish != finish_reason::none) forget(false);
      caf::anon_send(sink, std::move(chunk));
    });
    std::lock_guard lock(link->mutex);
    if (const auto it = link->forwarded.find(key); it != link->forwarded.end()) it->second = id;
  } catch (const std::exception&) {
    std::lock_guard lock(link->mutex);
    link->forwarded.erase(key);
    return false;
  }
  ++v.requests;
  return true;
}

// Each model version's share, requests and connection, for the status (and /metrics).
nlohmann::json versions_json(router_state& st) {
  auto out = nlohmann::json::array();
  for (const auto& v : st.versions) {
    nlohmann::json j{{"name", v.name}, {"weight", v.weight}, {"requests", v.requests}, {"fallbacks", v.fallbacks},
                     {"local", v.link == nullptr}};
    if (v.link) {
      std::lock_guard lock(v.link->mutex);
      j["requests"] = v.requests - v.link->returned;
      j["fallbacks"] = v.fallbacks + v.link->returned;
      j["head"] = fmt::format("{}:{}", v.link->host, v.link->port);
      j["connected"] = v.link->client != nullptr;
      j["error"] = v.link->error;
      j["in_flight"] = v.link->forwarded.size();
    }
    out.push_back(std::move(j));
  }
  return out;
}

// Checks a request and queues it for this cluster's pipeline.
void admit(self_ptr self, generate_request& spec, token_sink_actor& sink) {
  auto& st = self->state;
  const auto id = st.next_id++;
  auto reject = [&](std::string message) {
    self->send(sink, token_chunk{.request = spec.request, .tokens = {}, .logits = {}, .finish = finish_reason::error,
                                 .error_code = static_cast<std::uint8_t>(errc::invalid_argument),
                                 .error = std::move(message), .cached_prompt_tokens = 0});
  };
  if (spec.prompt.empty()) return reject("the prompt is empty");
  if (spec.max_tokens == 0) return reject("max_tokens must be at least 1");
  for (auto t : spec.prompt)
    if (t < 0 || (st.options.vocab_size > 0 && t >= st.options.vocab_size))
      return reject(fmt::format("prompt token {} is outside the vocabulary [0, {})", t, st.options.vocab_size));
  for (auto t : spec.resume)
    if (t < 0 || (st.options.vocab_size > 0 && t >= st.options.vocab_size))
      return reject(fmt::format("resumed token {} is outside the vocabulary [0, {})", t, st.options.vocab_size));
  if (spec.resume.size() >= spec.max_tokens)
    return reject(fmt::format("{} tokens to resume from, but max_tokens is {}: the request is complete",
                              spec.resume.size(), spec.max_tokens));
  try {
    runtime::validate(to_sampling_params(spec.sampling));
  } catch (const shoal::error& e) {
    return reject(e.what());
  }
  const auto total = static_cast<std::int64_t>(spec.prompt.size() + spec.max_tokens);
  if (st.options.max_positions > 0 && total > st.options.max_positions)
    return reject(fmt::format("prompt ({}) + max_tokens ({}) exceeds the model's context of {}",
                              spec.prompt.size(), spec.max_tokens, st.options.max_positions));
  if (total > st.plan->max_sequence_tokens())
    return reject(fmt::format("prompt ({}) + max_tokens ({}) exceeds the {} tokens the latent cache can hold",
                              spec.prompt.size(), spec.max_tokens, st.plan->max_sequence_tokens()));
  if (spec.sampling.temperature != 0.0f && spec.sampling.top_k != 1 && !spec.sampling.has_seed) {
    // Fixed here rather than drawn by the last stage, so that a recompute after a
    // preemption or failure draws the same tokens again.
    spec.sampling.has_seed = true;
    spec.sampling.seed = st.seeds();
  }
  // A resumed request continues where its client is: the tokens it already has are
  // recomputed like a prompt, but count as generated (max_tokens, sampler, penalties).
  auto tokens = spec.prompt;
  tokens.insert(tokens.end(), spec.resume.begin(), spec.resume.end());
  st.plan->add(id, std::move(tokens), static_cast<std::int64_t>(spec.prompt.size()));
  router_state::request r;
  r.client_id = spec.request;
  r.sink = std::move(sink);
  r.generated = static_cast<std::uint32_t>(spec.resume.size());
  if (!spec.resume.empty()) ++st.resumed;
  r.spec = std::move(spec);
  st.requests.emplace(id, std::move(r));
  schedule(self);
}

}  // namespace

router_state::router_state() = default;
router_state::~router_state() {
  for (auto& c : connectors) c.first.join();
}

router_actor::behavior_type make_router(router_actor::stateful_pointer<router_state> self, router_options options,
                                        std::shared_ptr<fabric> book) {
  self->state.options = options;
  self->state.book = std::move(book);
  self->state.plan = std::make_unique<runtime::scheduler>(options.scheduling);
  if (!options.versions.empty()) {
    auto& st = self->state;
    st.versions.push_back({.name = options.version, .weight = options.split.empty() ? 1u : 0u, .credit = 0,
                           .requests = 0, .fallbacks = 0, .link = nullptr});
    for (const auto& v : options.versions) {
      auto link = std::make_shared<version_link>();
      link->host = v.host;
      link->port = v.port;
      link->join_secret = options.join_secret;
      st.versions.push_back({.name = v.name, .weight = 0, .credit = 0, .requests = 0, .fallbacks = 0, .link = link});
    }
    for (auto& v : st.versions)
      for (const auto& [name, weight] : options.split)
        if (name == v.name) v.weight = weight;
    // Connected ahead of the first request it would take.
    for (auto& v : st.versions)
      if (v.link) connect_version(st, v.link);
  }
  return {
      [self](generate_request& spec, token_sink_actor& sink) {
        auto& st = self->state;
        if (st.versions.size() > 1 && spec.resume.empty()) {
          auto& v = pick_version(st);
          if (v.link) {
            if (forward(self, v, spec, sink)) return;
            ++v.fallbacks;
          }
        }
        if (!st.versions.empty()) ++st.versions.front().requests;
        admit(self, spec, sink);
      },
      [self](fallback_atom, generate_request& spec, token_sink_actor& sink) {
        auto& st = self->state;
        if (!st.versions.empty()) ++st.versions.front().requests;
        admit(self, spec, sink);
      },
      [self](split_atom, std::vector<std::string>& names, std::vector<std::uint32_t>& weights) {
        auto& st = self->state;
        for (auto& v : st.versions) {
          v.weight = 0;
          v.credit = 0;
          for (std::size_t i = 0; i < names.size() && i < weights.size(); ++i)
            if (names[i] == v.name) v.weight = weights[i];
        }
      },
      [self](cancel_atom, request_id client_id, token_sink_actor& sink) {
        auto& st = self->state;
        for (auto& v : st.versions) {
          if (!v.link) continue;
          std::shared_ptr<shoal::client> client;
          std::uint64_t id = 0;
          {
            std::lock_guard lock(v.link->mutex);
            const auto it = v.link->forwarded.find({sink.address(), client_id});
            if (it == v.link->forwarded.end()) continue;
            id = it->second;
            client = v.link->client;
          }
          if (client && id != 0) client->cancel(id);
          return;
        }
        for (auto& [id, r] : st.requests) {
          if (r.client_id != client_id || r.sink != sink) continue;
          // Blocks of a request in the step being computed are still written by the stages;
          // it ends when the step returns.
          if (in_step(st, id))
            r.cancelled = true;
          else
            finish(self, id, finish_reason::cancelled);
          return;
        }
      },
      [self](status_atom) -> std::string {
        const auto s = self->state.plan->stats();
        return nlohmann::json{{"requests", self->state.requests.size()},
                              {"waiting", s.waiting},
                              {"running", s.running},
                              {"cache_blocks_total", s.cache_blocks_total},
                              {"cache_blocks_used", s.cache_blocks_used},
                              {"prefix_cache_blocks", s.prefix_cache_blocks},
                              {"preemptions", s.preemptions},
                              {"prefilled_tokens", s.prefilled_tokens},
                              {"cached_prompt_tokens", s.cached_prompt_tokens},
                              {"steps", self->state.step},
                              {"steps_in_flight", self->state.in_flight.size()},
                              {"most_steps_in_flight", self->state.most_in_flight},
                              {"failed_steps", self->state.failed_steps},
                              {"replayed_requests", self->state.replays},
                              {"resumed_requests", self->state.resumed},
                              {"requeued_sequences", s.requeued},
                              {"epoch", self->state.epoch},
                              {"versions", versions_json(self->state)}}
            .dump();
      },
      [self](wire_atom, placement_table& table) -> caf::result<ok_atom> {
        auto& st = self->state;
        if (table.stages.empty()) return to_caf_error(errc::invalid_argument, "placement without stages");
        if (table.epoch < st.epoch)
          return to_caf_error(errc::aborted, fmt::format("placement epoch {} is older than epoch {}", table.epoch, st.epoch));
        auto first = caf::actor_cast<stage_actor>(st.book->resolve(table.stages.front().address));
        if (!first)
          return to_caf_error(errc::not_found, fmt::format("first stage {}/{} is not reachable",
                                                           table.stages.front().address.node,
                                                           table.stages.front().address.actor));
        std::vector<actor_address> stages;
        for (const auto& s : table.stages) stages.push_back(s.address);
        // The same stages and no node lost since the last placement (an expert copied, moved
        // or dropped): the step in flight finishes and the stages keep their latent caches.
        const bool seamless = st.wired && st.first_stage && stages == st.stages && table.fence == st.fence;
        st.first_stage = std::move(first);
        st.epoch = table.epoch;
        st.fence = table.fence;
        st.stages = std::move(stages);
        if (seamless) {
          if (st.paused) {
            st.paused = false;
            schedule(self);
          }
          return ok_atom::value;
        }
        abandon_step(self, shoal::error(errc::aborted, fmt::format("the placement changed (epoch {})", table.epoch)));
        // Stages of a new placement may be new processes with empty stores: recompute all.
        if (st.wired) st.plan->requeue_all();
        st.wired = true;
        st.paused = false;
        schedule(self);
        return ok_atom::value;
      },
      [self](fence_atom, std::uint64_t epoch) {
        auto& st = self->state;
        if (epoch <= st.epoch) return;
        st.epoch = epoch;
        st.first_stage = nullptr;
        abandon_step(self, shoal::error(errc::unavailable, fmt::format("a node of the placement died (epoch {})", epoch)));
      },
      [self](tick_atom) {
        self->state.paused = false;
        schedule(self);
      },
  };
}

}  // namespace shoal::actors
