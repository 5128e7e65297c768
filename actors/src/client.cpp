#include "shoal/actors/client.hpp"

#include "client_impl.hpp"
#include "cluster_impl.hpp"
#include "remote.hpp"

#include "shoal/runtime/sampling.hpp"

#include <caf/exit_reason.hpp>
#include <caf/scoped_actor.hpp>
#include <caf/typed_event_based_actor.hpp>

#include <algorithm>
#include <condition_variable>
#include <deque>
#include <map>
#include <mutex>
#include <random>
#include <set>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

namespace shoal {

sampling_options to_sampling_options(const runtime::sampling_params& p, std::uint32_t id_limit) {
  return {.temperature = p.temperature,
          .top_k = static_cast<std::uint32_t>(std::max(0, p.top_k)),
          .top_p = p.top_p,
          .min_p = p.min_p,
          .repetition_penalty = p.repetition_penalty,
          .frequency_penalty = p.frequency_penalty,
          .presence_penalty = p.presence_penalty,
          .has_seed = p.seed.has_value(),
          .seed = p.seed.value_or(0),
          .id_limit = id_limit};
}

actors::token_sink_actor::behavior_type make_client_sink(actors::token_sink_actor::pointer self,
                                                         std::shared_ptr<client_inbox> box) {
  (void)self;
  return {
      [box](actors::token_chunk& chunk) {
        std::shared_ptr<std::function<void(const actors::token_chunk&)>> callback;
        {
          std::lock_guard lock(box->mutex);
          if (box->track) {
            const auto id = chunk.request & id_mask;
            const auto attempt = chunk.request >> attempt_shift;
            const auto t = box->tracked.find(id);
            // Finished here already, or an attempt on a head that was given up: not for us.
            if (t == box->tracked.end() || t->second.attempt != attempt) return;
            chunk.request = id;
            t->second.delivered.insert(t->second.delivered.end(), chunk.tokens.begin(), chunk.tokens.end());
            if (chunk.finish != actors::finish_reason::none) box->tracked.erase(t);
          }
          if (auto it = box->callbacks.find(chunk.request); it != box->callbacks.end()) {
            callback = it->second;
            if (chunk.finish != actors::finish_reason::none) box->callbacks.erase(it);
          } else {
            box->chunks[chunk.request].push_back(std::move(chunk));
          }
        }
        // One sink actor per client: callbacks of a request run one at a time, in order.
        if (callback)
          (*callback)(chunk);
        else
          box->arrived.notify_all();
      },
  };
}

client::client(actors::local_cluster& cluster) : impl_(std::make_unique<impl>()) {
  auto& c = cluster.internals();
  impl_->system = c.system.get();
  impl_->router = c.router;
  impl_->supervisor = c.supervisor;
  impl_->sink = impl_->system->spawn(make_client_sink, impl_->box);
}

client::client(std::unique_ptr<impl> state) : impl_(std::move(state)) {}

std::string client::admin(const std::string& command, const std::vector<std::string>& args, const std::string& token,
                          std::chrono::milliseconds timeout) {
  actors::supervisor_actor supervisor;
  {
    std::lock_guard lock(impl_->route_mutex);
    supervisor = impl_->supervisor;
  }
  caf::scoped_actor self{*impl_->system};
  std::string out;
  std::optional<shoal::error> failure;
  self->request(supervisor, timeout, actors::admin_atom::value,
                actors::admin_request{.command = command, .args = args, .token = token})
      .receive([&](std::string& s) { out = std::move(s); },
               [&](caf::error& e) { failure = actors::from_caf_error(e); });
  if (failure) throw *failure;
  return out;
}

std::string client::status(std::chrono::milliseconds timeout) {
  actors::supervisor_actor supervisor;
  {
    std::lock_guard lock(impl_->route_mutex);
    supervisor = impl_->supervisor;
  }
  caf::scoped_actor self{*impl_->system};
  std::string out;
  std::optional<shoal::error> failure;
  self->request(supervisor, timeout, actors::status_atom::value)
      .receive([&](std::string& s) { out = std::move(s); },
               [&](caf::error& e) { failure = actors::from_caf_error(e); });
  if (failure) throw *failure;
  return out;
}

client::impl::~impl() {
  if (failover_thread.joinable()) {
    {
      std::lock_guard lock(dog->mutex);
      dog->stopping = true;
    }
    dog->wake.notify_all();
    failover_thread.join();
  }
  if (sink) caf::anon_send_exit(sink, caf::exit_reason::user_shutdown);
  sink = nullptr;
  router = nullptr;
  if (remote) remote->stop();
  remote.reset();
}

client::~client() = default;

std::uint64_t client::submit(const generate_options& options) { return submit(options, nullptr); }

std::uint64_t client::submit(const generate_options& options, std::function<void(const token_event&)> on_chunk) {
  std::uint64_t id;
  {
    std::lock_guard lock(impl_->ids_mutex);
    id = impl_->next_id++;
  }
  if (on_chunk) {
    std::lock_guard lock(impl_->box->mutex);
    impl_->box->callbacks.emplace(id, std::make_shared<std::function<void(const token_event&)>>(std::move(on_chunk)));
  }
  actors::generate_request request{.request = id, .prompt = options.prompt, .sampling = options.sampling,
                                   .max_tokens = options.max_tokens, .stop_tokens = options.stop_tokens,
                                   .want_logits = options.want_logits, .deadline_unix_ms = 0, .resume = {}};
  if (options.deadline.count() > 0)
    request.deadline_unix_ms = static_cast<std::uint64_t>(
        std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch() +
                                                              options.deadline)
            .count());
  std::lock_guard route(impl_->route_mutex);
  if (impl_->box->track) {
    // Fixed here, not by the router, so that a resubmission elsewhere draws the same tokens.
    auto& s = request.sampling;
    if (s.temperature != 0.0f && s.top_k != 1 && !s.has_seed) {
      s.has_seed = true;
      s.seed = std::random_device{}() * 0x100000000ull + std::random_device{}();
    }
    std::lock_guard lock(impl_->box->mutex);
    impl_->box->tracked[id] = tracked_request{.request = request, .delivered = {}, .attempt = 0, .cancel_wanted = false};
  }
  caf::anon_send(impl_->router, std::move(request), impl_->sink);
  return id;
}

std::optional<token_event> client::next(std::uint64_t id, std::chrono::milliseconds timeout) {
  std::unique_lock lock(impl_->box->mutex);
  auto& queue = impl_->box->chunks[id];
  if (!impl_->box->arrived.wait_for(lock, timeout, [&] { return !queue.empty(); })) return std::nullopt;
  auto chunk = std::move(queue.front());
  queue.pop_front();
  if (chunk.finish != actors::finish_reason::none && queue.empty()) impl_->box->chunks.erase(id);
  return chunk;
}

void client::cancel(std::uint64_t id) {
  std::lock_guard route(impl_->route_mutex);
  std::uint64_t wire = id;
  if (impl_->box->track) {
    std::lock_guard lock(impl_->box->mutex);
    const auto t = impl_->box->tracked.find(id);
    if (t == impl_->box->tracked.end()) return;  // finished already
    t->second.cancel_wanted = true;
    wire = id | t->second.attempt << attempt_shift;
  }
  caf::anon_send(impl_->router, actors::cancel_atom::value, wire, impl_->sink);
}

std::uint64_t client::failovers() const { return impl_->failovers.load(); }

namespace {

// The head in charge among `heads`: of those whose supervisor answers, the one with the newest
// placement epoch (a head that woke up after its standby took over is older). Empty if none.
std::string find_head(caf::actor_system& system, actors::remote_fabric& remote, const std::vector<head_endpoint>& heads,
                      std::chrono::milliseconds timeout, std::optional<shoal::error>& last,
                      std::set<std::string>* reached = nullptr) {
  std::string best;
  std::uint64_t newest = 0;
  for (const auto& h : heads) {
    std::string node;
    try {
      node = remote.connect(h.host, h.port);
    } catch (const shoal::error& e) {
      last = e;
      continue;
    }
    if (reached) reached->insert(node);
    if (heads.size() == 1) return node;  // nothing to choose from: its connection is enough
    const auto epoch = actors::supervisor_epoch(system, remote, node, timeout);
    if (!epoch) {
      last = shoal::error(errc::unavailable, fmt::format("{}:{} ({}) runs no supervisor now", h.host, h.port, node));
      continue;
    }
    if (best.empty() || *epoch > newest) {
      best = node;
      newest = *epoch;
    }
  }
  return best;
}

}  // namespace

// Pings the head in charge and moves the requests when it is gone (a thread of its own).
void client::impl::watch_heads() {
  const auto interval = std::max(failover_after / 6, std::chrono::milliseconds(100));
  while (true) {
    bool lost = false;
    {
      std::unique_lock lock(dog->mutex);
      dog->wake.wait_for(lock, interval, [&] { return dog->stopping || dog->lost; });
      if (dog->stopping) return;
      lost = dog->lost && dog->lost_node == head_node;
      dog->lost = false;
    }
    if (!lost) {
      // A frozen head keeps its connection open: it must answer a ping (from its transport
      // thread, whatever its actors are doing).
      std::string node;
      {
        std::lock_guard route(route_mutex);
        node = head_node;
      }
      caf::scoped_actor self{*system};
      auto agent = caf::actor_cast<actors::node_agent_actor>(remote->resolve({node, actors::actor_ids::node_agent}));
      bool answered = false;
      self->request(agent, failover_after, actors::heartbeat{}).receive([&](actors::heartbeat&) { answered = true; },
                                                                         [&](caf::error&) {});
      if (answered) continue;
      std::lock_guard dl(dog->mutex);
      if (dog->stopping) return;
    }
    auto lost_since = std::chrono::steady_clock::now();
    while (!fail_over(lost)) {
      // A head that answers pings but not yet as head in charge (a takeover or recovery
      // under way, a loaded machine) is no reason to give up: only silence counts.
      if (any_head_alive()) lost_since = std::chrono::steady_clock::now();
      end_stranded(lost_since);
      std::unique_lock lock(dog->mutex);
      if (dog->wake.wait_for(lock, std::chrono::milliseconds(250), [&] { return dog->stopping; })) return;
    }
  }
}

// Whether the node agent of any head this client reached answers a ping (from its transport's
// thread, whatever its actors are doing) within a second.
bool client::impl::any_head_alive() {
  for (const auto& node : head_names) {
    // Over a connection it has: dialing a frozen process would wait for the connect timeout.
    if (!remote->connected(node)) continue;
    caf::scoped_actor self{*system};
    auto agent = caf::actor_cast<actors::node_agent_actor>(remote->resolve({node, actors::actor_ids::node_agent}));
    if (!agent) continue;
    bool answered = false;
    self->request(agent, std::chrono::seconds(1), actors::heartbeat{})
        .receive([&](actors::heartbeat&) { answered = true; }, [&](caf::error&) {});
    if (answered) return true;
  }
  return false;
}

// While no head answers nothing runs: a request the caller cancelled ends at once, one whose
// deadline passes ends with deadline_exceeded, and once no head answered for `no_head_limit`
// every request ends with unavailable (a gateway answers 503 instead of holding its clients).
void client::impl::end_stranded(std::chrono::steady_clock::time_point lost_since) {
  const auto waited = std::chrono::steady_clock::now() - lost_since;
  const auto now_ms = static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::milliseconds>(
                                                     std::chrono::system_clock::now().time_since_epoch())
                                                     .count());
  std::string tried;
  for (const auto& h : heads) tried += fmt::format("{}{}:{}", tried.empty() ? "" : ", ", h.host, h.port);
  std::vector<actors::token_chunk> ends;
  {
    std::lock_guard lock(box->mutex);
    for (auto& [id, t] : box->tracked) {
      if (t.ending) continue;
      actors::token_chunk end{.request = id | t.attempt << attempt_shift, .tokens = {}, .logits = {},
                              .finish = actors::finish_reason::error, .error_code = 0, .error = {},
                              .cached_prompt_tokens = 0};
      if (t.cancel_wanted) {
        end.finish = actors::finish_reason::cancelled;
      } else if (t.request.deadline_unix_ms != 0 && now_ms > t.request.deadline_unix_ms) {
        end.error_code = static_cast<std::uint8_t>(errc::deadline_exceeded);
        end.error = "the request's deadline passed while no head of the cluster answered";
      } else if (waited >= no_head_limit) {
        end.error_code = static_cast<std::uint8_t>(errc::unavailable);
        end.error = fmt::format("no head of the cluster answered for {} s (tried {})",
                                std::chrono::duration_cast<std::chrono::seconds>(waited).count(), tried);
      } else {
        continue;
      }
      t.ending = true;
      ends.push_back(std::move(end));
    }
  }
  for (auto& end : ends) caf::anon_send(sink, std::move(end));
}

// Finds the head in charge and resubmits there; false when none answered (try again).
bool client::impl::fail_over(bool connection_lost) {
  const auto old = [&] {
    std::lock_guard route(route_mutex);
    return head_node;
  }();
  std::optional<shoal::error> ignored;
  if (const auto node = find_head(*system, *remote, heads, std::chrono::seconds(3), ignored, &head_names); !node.empty()) {
    // The same head answering after a missed ping (a slow machine): its requests still run.
    if (node == old && !connection_lost) return true;
    ++failovers;
    std::vector<std::pair<actors::generate_request, bool>> resubmit;  // request, or a cancel to confirm
    std::lock_guard route(route_mutex);
    auto previous_router = router;
    head_node = node;
    router = caf::actor_cast<actors::router_actor>(remote->resolve({node, actors::actor_ids::router}));
    supervisor = caf::actor_cast<actors::supervisor_actor>(remote->resolve({node, actors::actor_ids::supervisor}));
    {
      std::lock_guard lock(box->mutex);
      for (auto& [id, t] : box->tracked) {
        if (t.ending) continue;
        const auto old_wire = id | t.attempt << attempt_shift;
        if (node == old) caf::anon_send(previous_router, actors::cancel_atom::value, old_wire, sink);
        ++t.attempt;
        auto r = t.request;
        r.request = id | t.attempt << attempt_shift;
        r.resume = t.delivered;
        resubmit.emplace_back(std::move(r), t.cancel_wanted);
      }
    }
    for (auto& [r, cancelled] : resubmit) {
      if (cancelled) {
        // Nothing runs it any more: end it here as the router would have.
        caf::anon_send(sink, actors::token_chunk{.request = r.request, .tokens = {}, .logits = {},
                                                 .finish = actors::finish_reason::cancelled, .error_code = 0,
                                                 .error = {}, .cached_prompt_tokens = 0});
        continue;
      }
      caf::anon_send(router, std::move(r), sink);
    }
    return true;
  }
  return false;
}

std::unique_ptr<client> client::connect(const std::string& host, std::uint16_t port, std::chrono::milliseconds timeout,
                                        const std::string& join_secret) {
  return connect(std::vector<head_endpoint>{{host, port}}, timeout, join_secret);
}

std::unique_ptr<client> client::connect(const std::vector<head_endpoint>& heads, std::chrono::milliseconds timeout,
                                        const std::string& join_secret, std::chrono::milliseconds failover_after,
                                        std::chrono::milliseconds no_head_limit) {
  if (heads.empty()) shoal::fail(errc::invalid_argument, "no head address to connect to");
  auto state = std::make_unique<impl>();
  state->own_config = std::make_unique<caf::actor_system_config>();
  state->own_system = std::make_unique<caf::actor_system>(*state->own_config);
  state->system = state->own_system.get();
  state->heads = heads;
  state->failover_after = failover_after;
  state->no_head_limit = no_head_limit;
  actors::remote_options o;
  o.node = fmt::format("client-{}-{}", ::getpid(), reinterpret_cast<std::uintptr_t>(state.get()) & 0xffffff);
  o.connect_timeout = timeout;
  o.join_secret = join_secret;
  for (const auto& head : heads) o.dial_hosts.push_back(head.host);
  o.on_node_lost = [dog = std::weak_ptr(state->dog)](const std::string& node) {
    if (auto d = dog.lock()) {
      {
        std::lock_guard lock(d->mutex);
        d->lost = true;
        d->lost_node = node;
      }
      d->wake.notify_all();
    }
  };
  state->remote = std::make_shared<actors::remote_fabric>(*state->system, o);
  state->remote->start();
  std::optional<shoal::error> last;
  const auto head = find_head(*state->system, *state->remote, heads, timeout, last, &state->head_names);
  if (head.empty()) throw *last;
  state->head_node = head;
  state->sink = state->system->spawn(make_client_sink, state->box);
  state->remote->address_of(caf::actor_cast<caf::actor>(state->sink));
  state->router = caf::actor_cast<actors::router_actor>(state->remote->resolve({head, actors::actor_ids::router}));
  state->supervisor =
      caf::actor_cast<actors::supervisor_actor>(state->remote->resolve({head, actors::actor_ids::supervisor}));
  // With one head too: it may come back (restarted), and requests must not wait forever meanwhile.
  state->box->track = true;
  state->failover_thread = std::thread([s = state.get()] { s->watch_heads(); });
  return std::unique_ptr<client>(new client(std::move(state)));
}

generate_result client::generate(const generate_options& options, std::chrono::milliseconds timeout) {
  const auto id = submit(options);
  generate_result result;
  while (true) {
    auto chunk = next(id, timeout);
    if (!chunk) {
      cancel(id);
      shoal::fail(errc::deadline_exceeded, "no tokens from the router for {} ms (request {}, {} tokens so far)",
                  timeout.count(), id, result.tokens.size());
    }
    if (chunk->finish == actors::finish_reason::error)
      throw shoal::error(static_cast<errc>(chunk->error_code), chunk->error);
    result.tokens.insert(result.tokens.end(), chunk->tokens.begin(), chunk->tokens.end());
    result.logits.insert(result.logits.end(), chunk->logits.begin(), chunk->logits.end());
    if (chunk->finish != actors::finish_reason::none) {
      result.finish = chunk->finish;
      return result;
    }
  }
}

}  // namespace shoal
