#include "shoal/actors/node_agent.hpp"

#include "shoal/actors/engines.hpp"
#include "shoal/actors/expert.hpp"
#include "shoal/actors/fabric.hpp"
#include "shoal/actors/stage.hpp"

#include <caf/actor_cast.hpp>
#include <caf/exit_reason.hpp>
#include <caf/typed_response_promise.hpp>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <chrono>
#include <optional>

namespace shoal::actors {

/// An expert actor's weights on their way from a running copy on another node.
struct weights_fetch {
  spawn_expert_cmd cmd;
  std::string spec;
  /// Whoever asked for the actor (a head that takes over may ask again while it streams).
  std::vector<caf::typed_response_promise<ok_atom>> waiting;
  std::vector<weights_part> parts;  ///< Received so far, in arrival order.
  std::uint32_t total = 0;          ///< Parts in all (0: not known before the first answer).
  std::uint32_t next = 0;           ///< The next part to ask for.
  std::uint32_t in_flight = 0;      ///< Asked for, not answered.
  std::size_t bytes = 0;
  std::chrono::steady_clock::time_point start = std::chrono::steady_clock::now();
  std::chrono::steady_clock::time_point reported = start;
};

namespace {

using agent_pointer = node_agent_actor::stateful_pointer<node_agent_state>;

// A part may wait behind a busy link or a source node loading something else; a source that
// dies fails the call at once.
constexpr std::chrono::seconds kWeightsPartTimeout{300};
constexpr std::chrono::seconds kWeightsProgressEvery{5};
// Parts asked for at once: enough to keep encoding, wire and checking busy together, few
// enough that a copy streaming in holds little beyond what it received.
constexpr std::uint32_t kWeightsPartsInFlight = 3;

void progress(agent_pointer self, const std::string& line) {
  if (self->state.options.progress) self->state.options.progress(line);
}

// Starts the expert actor `address` on `engine` and keeps it.
void start_expert(agent_pointer self, const actor_address& address, const std::string& spec,
                  std::shared_ptr<expert_engine> engine) {
  auto& st = self->state;
  auto handle = self->spawn<caf::detached>(make_expert, engine);
  st.book->register_actor(address, caf::actor_cast<caf::actor>(handle));
  st.book->register_engine(address, engine);
  st.children.push_back(caf::actor_cast<caf::actor>(handle));
  st.addresses.push_back(address);
  st.specs.push_back(spec);
}

std::shared_ptr<expert_engine> expert_from_checkpoint(agent_pointer self, const spawn_expert_cmd& cmd) {
  const auto& o = self->state.options;
  return std::make_shared<expert_engine>(o.model_override.empty() ? cmd.model_path : o.model_override, cmd.experts,
                                         o.threads, o.key);
}

// Builds the actor from the parts received (or, when the stream failed, from the checkpoint)
// and answers everyone waiting for it.
void finish_fetch(agent_pointer self, const std::shared_ptr<weights_fetch>& f, std::optional<shoal::error> failed) {
  auto& st = self->state;
  const auto it = st.fetching.find(f->cmd.actor);
  if (it == st.fetching.end() || it->second != f) return;  // superseded, or the node stopped
  st.fetching.erase(it);
  const auto& cmd = f->cmd;
  const actor_address address{st.options.node, cmd.actor};
  const auto from = fmt::format("node {} (actor {})", cmd.source.node, cmd.source.actor);
  try {
    std::shared_ptr<expert_engine> engine;
    if (!failed) {
      try {
        engine = std::make_shared<expert_engine>(std::move(f->parts), cmd.experts, st.options.threads,
                                                 "weights from " + from);
      } catch (const shoal::error& e) {
        failed = e;
      }
    }
    if (failed) {
      progress(self, fmt::format("expert actor {}: weights from {} failed ({}); loading them from the checkpoint",
                                 cmd.actor, from, failed->what()));
      try {
        engine = expert_from_checkpoint(self, cmd);
      } catch (const shoal::error& e) {
        throw shoal::error(e.code(), fmt::format("{} (streaming them from {} failed first: {})", e.what(), from,
                                                 failed->what()));
      }
    } else {
      const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - f->start).count();
      progress(self, fmt::format("expert actor {}: received the weights of experts {} from {}: {:.3f} GB in {:.1f} s "
                                 "({:.2f} GB/s)",
                                 cmd.actor, fmt::join(cmd.experts, ","), from, static_cast<double>(f->bytes) / 1e9,
                                 seconds, static_cast<double>(f->bytes) / 1e9 / std::max(seconds, 1e-6)));
    }
    start_expert(self, address, f->spec, std::move(engine));
    for (auto& rp : f->waiting) rp.deliver(ok_atom::value);
  } catch (const shoal::error& e) {
    const auto error = to_caf_error(e.code(), fmt::format("node {}: expert actor {}: {}", st.options.node, cmd.actor,
                                                          e.what()));
    for (auto& rp : f->waiting) rp.deliver(error);
  }
}

// Whether `f` is still what the agent waits for (not finished, superseded or stopped).
bool current(agent_pointer self, const std::shared_ptr<weights_fetch>& f) {
  const auto it = self->state.fetching.find(f->cmd.actor);
  return it != self->state.fetching.end() && it->second == f;
}

void fetch_part(agent_pointer self, const std::shared_ptr<weights_fetch>& f, std::uint32_t part);

// Keeps up to kWeightsPartsInFlight parts asked for, so that the source encoding one part, the
// wire carrying another and this node checking a third overlap; the number of parts is known
// from the first answer.
void fetch_more(agent_pointer self, const std::shared_ptr<weights_fetch>& f) {
  while (f->next < f->total && f->in_flight < kWeightsPartsInFlight) fetch_part(self, f, f->next++);
}

void fetch_part(agent_pointer self, const std::shared_ptr<weights_fetch>& f, std::uint32_t part) {
  auto& st = self->state;
  auto source = caf::actor_cast<node_agent_actor>(st.book->resolve({f->cmd.source.node, actor_ids::node_agent}));
  if (!source)
    return finish_fetch(self, f, shoal::error(errc::unavailable, fmt::format("node {} cannot be reached",
                                                                             f->cmd.source.node)));
  ++f->in_flight;
  self->request(source, kWeightsPartTimeout, weights_request{.actor = f->cmd.source.actor, .experts = f->cmd.experts,
                                                             .part = part})
      .then(
          [self, f, part](weights_part& p) {
            --f->in_flight;
            if (!current(self, f)) return;
            if (p.part != part || p.parts == 0 || (f->total != 0 && p.parts != f->total))
              return finish_fetch(self, f, shoal::error(errc::invalid_argument,
                                                        fmt::format("asked for weights part {}, got part {} of {}",
                                                                    part + 1, p.part + 1, p.parts)));
            f->total = p.parts;
            f->bytes += p.tensors.size();
            f->parts.push_back(std::move(p));
            const auto now = std::chrono::steady_clock::now();
            if (f->parts.size() < f->total && now - f->reported >= kWeightsProgressEvery) {
              f->reported = now;
              progress(self, fmt::format("expert actor {}: receiving weights from node {}: {}/{} parts, {:.3f} GB",
                                         f->cmd.actor, f->cmd.source.node, f->parts.size(), f->total,
                                         static_cast<double>(f->bytes) / 1e9));
            }
            if (f->parts.size() == f->total) return finish_fetch(self, f, std::nullopt);
            fetch_more(self, f);
          },
          [self, f](caf::error& e) {
            --f->in_flight;
            if (current(self, f)) finish_fetch(self, f, from_caf_error(e));
          });
}

}  // namespace

node_agent_actor::behavior_type make_node_agent(node_agent_actor::stateful_pointer<node_agent_state> self,
                                                node_agent_options options, std::shared_ptr<fabric> book) {
  self->state.options = std::move(options);
  self->state.book = std::move(book);
  auto stop = [self] {
    auto& st = self->state;
    if (st.stopped) return;
    st.stopped = true;
    for (const auto& a : st.addresses) st.book->unregister(a);
    for (auto& child : st.children) self->send_exit(child, caf::exit_reason::user_shutdown);
    st.children.clear();
    for (auto& [actor, f] : st.fetching)
      for (auto& rp : f->waiting)
        rp.deliver(to_caf_error(errc::failed_precondition, "node " + st.options.node + " is stopping"));
    st.fetching.clear();
  };
  self->attach_functor([stop] { stop(); });
  // Whether `address` runs as `spec` already (true: nothing to do); an actor at the address
  // spawned as something else is stopped first.
  auto already = [self](const actor_address& address, const std::string& spec) {
    auto& st = self->state;
    for (std::size_t i = 0; i < st.addresses.size(); ++i) {
      if (st.addresses[i] != address) continue;
      if (st.specs[i] == spec) return true;
      st.book->unregister(address);
      self->send_exit(st.children[i], caf::exit_reason::user_shutdown);
      const auto at = static_cast<std::ptrdiff_t>(i);
      st.children.erase(st.children.begin() + at);
      st.addresses.erase(st.addresses.begin() + at);
      st.specs.erase(st.specs.begin() + at);
      break;
    }
    return false;
  };
  return {
      [self, already](spawn_stage_cmd& cmd) -> caf::result<ok_atom> {
        auto& st = self->state;
        if (st.stopped) return to_caf_error(errc::failed_precondition, "node " + st.options.node + " is stopping");
        const actor_address address{st.options.node, cmd.actor};
        const auto spec = fmt::format("stage {}/{} layers {}-{} experts {} model {} blocks {}x{}", cmd.stage,
                                      cmd.stage_count, cmd.first_layer, cmd.end_layer, cmd.hold_experts, cmd.model_path,
                                      cmd.cache_blocks, cmd.block_tokens);
        if (already(address, spec)) return ok_atom::value;
        try {
          stage_engine::options o{.model = st.options.model_override.empty() ? cmd.model_path : st.options.model_override,
                                  .first_layer = cmd.first_layer, .end_layer = cmd.end_layer,
                                  .first = cmd.stage == 0, .last = cmd.stage + 1 == cmd.stage_count,
                                  .hold_experts = cmd.hold_experts, .threads = st.options.threads,
                                  .cache_blocks = cmd.cache_blocks, .block_tokens = cmd.block_tokens,
                                  .progress = st.options.progress, .key = st.options.key};
          auto engine = std::make_shared<stage_engine>(o);
          auto handle = self->spawn<caf::detached>(make_stage, st.options.node, engine, st.book,
                                                   st.options.expert_timeout);
          st.book->register_actor(address, caf::actor_cast<caf::actor>(handle));
          st.book->register_stage_engine(address, engine);
          st.children.push_back(caf::actor_cast<caf::actor>(handle));
          st.addresses.push_back(address);
          st.specs.push_back(spec);
        } catch (const shoal::error& e) {
          return to_caf_error(e.code(), fmt::format("node {}: stage {} (layers {}-{}): {}", st.options.node, cmd.stage,
                                                    cmd.first_layer, cmd.end_layer - 1, e.what()));
        }
        return ok_atom::value;
      },
      [self, already](spawn_expert_cmd& cmd) -> caf::result<ok_atom> {
        auto& st = self->state;
        if (st.stopped) return to_caf_error(errc::failed_precondition, "node " + st.options.node + " is stopping");
        const actor_address address{st.options.node, cmd.actor};
        // Where the weights come from is not part of what the actor is: a head that takes over
        // may name another source for the same actor.
        const auto spec = fmt::format("experts {} model {}", fmt::join(cmd.experts, ","), cmd.model_path);
        if (already(address, spec)) return ok_atom::value;
        if (const auto it = st.fetching.find(cmd.actor); it != st.fetching.end()) {
          if (it->second->spec == spec) {
            auto rp = self->make_response_promise<ok_atom>();
            it->second->waiting.push_back(rp);
            return rp;
          }
          for (auto& rp : it->second->waiting)
            rp.deliver(to_caf_error(errc::aborted, fmt::format("node {}: expert actor {} was asked for again as {}",
                                                               st.options.node, cmd.actor, spec)));
          st.fetching.erase(it);
        }
        if (!cmd.source.node.empty()) {
          auto f = std::make_shared<weights_fetch>();
          f->cmd = cmd;
          f->spec = spec;
          auto rp = self->make_response_promise<ok_atom>();
          f->waiting.push_back(rp);
          st.fetching[cmd.actor] = f;
          progress(self, fmt::format("expert actor {}: streaming the weights of experts {} from node {}", cmd.actor,
                                     fmt::join(cmd.experts, ","), cmd.source.node));
          f->next = 1;
          fetch_part(self, f, 0);
          return rp;
        }
        try {
          start_expert(self, address, spec, expert_from_checkpoint(self, cmd));
        } catch (const shoal::error& e) {
          return to_caf_error(e.code(), fmt::format("node {}: expert actor {}: {}", st.options.node, cmd.actor, e.what()));
        }
        return ok_atom::value;
      },
      [self](weights_request& request) -> caf::result<weights_part> {
        auto& st = self->state;
        auto engine = st.book->engine({st.options.node, request.actor});
        if (!engine)
          return to_caf_error(errc::not_found, fmt::format("node {} runs no expert actor {}", st.options.node,
                                                           request.actor));
        try {
          return engine->weights_part_of(request.experts, request.part);
        } catch (const shoal::error& e) {
          return to_caf_error(e.code(), fmt::format("node {}: expert actor {}: {}", st.options.node, request.actor,
                                                    e.what()));
        }
      },
      [self](retire_actor_cmd& cmd) -> caf::result<ok_atom> {
        auto& st = self->state;
        const actor_address address{st.options.node, cmd.actor};
        if (const auto it = st.fetching.find(cmd.actor); it != st.fetching.end()) {
          for (auto& rp : it->second->waiting)
            rp.deliver(to_caf_error(errc::aborted, fmt::format("node {}: expert actor {} was retired while its weights "
                                                               "streamed in", st.options.node, cmd.actor)));
          st.fetching.erase(it);
        }
        for (std::size_t i = 0; i < st.addresses.size(); ++i) {
          if (st.addresses[i] != address) continue;
          st.book->unregister(address);
          self->send_exit(st.children[i], caf::exit_reason::user_shutdown);
          st.children.erase(st.children.begin() + static_cast<std::ptrdiff_t>(i));
          st.addresses.erase(st.addresses.begin() + static_cast<std::ptrdiff_t>(i));
          st.specs.erase(st.specs.begin() + static_cast<std::ptrdiff_t>(i));
          break;
        }
        return ok_atom::value;
      },
      [self, stop](stop_atom) {
        stop();
        self->quit();
      },
      [](heartbeat& h) {
        heartbeat answer;
        answer.epoch = h.epoch;
        answer.sequence = h.sequence;
        return answer;
      },
  };
}

}  // namespace shoal::actors
