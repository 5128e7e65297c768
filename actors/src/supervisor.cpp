#include "shoal/actors/supervisor.hpp"

#include "shoal/actors/fabric.hpp"
#include "shoal/runtime/safetensors.hpp"

#include <openssl/crypto.h>

#include <caf/actor_cast.hpp>
#include <caf/scoped_actor.hpp>
#include <caf/system_messages.hpp>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <set>

#include <nlohmann/json.hpp>

namespace shoal::actors {
namespace {

using self_ptr = supervisor_actor::stateful_pointer<supervisor_state>;
using clock_type = std::chrono::steady_clock;

void emit(self_ptr self, nlohmann::json event) {
  auto& st = self->state;
  event["epoch"] = st.epoch;
  if (st.options.on_event) st.options.on_event(event.dump());
}

void fail_cluster(self_ptr self, errc code, std::string message) {
  auto& st = self->state;
  st.serving = false;
  if (st.failure.empty()) st.failure = message;
  for (auto& rp : st.waiting) rp.deliver(to_caf_error(code, message));
  st.waiting.clear();
}

// Before the cluster first served, a failure is final (the operator fixes the config or the
// node); after, the cluster waits for the node to come back and says why meanwhile.
void setback(self_ptr self, errc code, std::string message) {
  auto& st = self->state;
  if (!st.served) return fail_cluster(self, code, std::move(message));
  st.serving = false;
  st.degraded = std::move(message);
}

bool active(placement_phase phase) { return phase == placement_phase::running || phase == placement_phase::serving; }

bool all_active(const std::vector<supervisor_state::placed>& v) {
  for (const auto& p : v)
    if (!active(p.phase)) return false;
  return true;
}

bool node_up(const supervisor_state& st, const std::string& node) {
  const auto it = st.members.find(node);
  return it != st.members.end() && it->second.agent && !it->second.down;
}

void place(self_ptr self);

void wire(self_ptr self) {
  auto& st = self->state;
  st.table = placement_table{};
  st.table.epoch = ++st.epoch;
  st.book->observe_epoch(st.epoch);
  st.evicted.clear();  // a new epoch: the dead were replaced
  st.wiring = true;
  st.table.router = {st.options.cluster.head, actor_ids::router};
  for (std::size_t i = 0; i < st.stages.size(); ++i) {
    const auto& spec = st.options.cluster.stages[i];
    st.table.stages.push_back({.stage = static_cast<std::uint32_t>(i),
                               .first_layer = static_cast<std::uint32_t>(spec.layer_begin),
                               .end_layer = static_cast<std::uint32_t>(spec.layer_end),
                               .address = st.stages[i].address});
  }
  // Expert groups that run; with redundancy a dead node's copies are left out and the
  // stages route to the other copy.
  for (std::size_t j = 0; j < st.experts.size(); ++j) {
    if (!active(st.experts[j].phase)) continue;
    const auto& spec = st.options.cluster.expert_groups[j];
    expert_placement p;
    for (auto e : spec.experts) p.experts.push_back(static_cast<std::uint32_t>(e));
    p.address = st.experts[j].address;
    st.table.experts.push_back(std::move(p));
  }
  auto pending = std::make_shared<std::size_t>(st.stages.size() + 1);
  const auto epoch = st.epoch;
  auto acked = [self, pending, epoch] {
    auto& st = self->state;
    if (--*pending > 0 || st.epoch != epoch || !st.failure.empty()) return;
    st.wiring = false;
    for (auto& s : st.stages) s.phase = placement_phase::serving;
    for (const auto& p : st.table.experts)
      for (auto& e : st.experts)
        if (e.address == p.address && e.phase == placement_phase::running) e.phase = placement_phase::serving;
    st.serving = true;
    if (st.served) {
      ++st.recoveries;
      emit(self, {{"event", "recovered"}, {"recoveries", st.recoveries}});
    }
    st.served = true;
    st.degraded.clear();
    for (auto& rp : st.waiting) rp.deliver(st.table);
    st.waiting.clear();
    place(self);  // a copy that came up while this table was being acknowledged
  };
  auto failed = [self, epoch](std::string what) {
    return [self, epoch, what](caf::error& e) {
      auto& st = self->state;
      if (st.epoch != epoch) return;  // a newer placement is under way
      st.wiring = false;
      setback(self, errc::unavailable, fmt::format("wiring {} failed: {}", what, from_caf_error(e).what()));
    };
  };
  const auto timeout = st.options.ready_timeout;
  for (auto& s : st.stages) {
    auto handle = caf::actor_cast<stage_actor>(st.book->resolve(s.address));
    if (!handle) {
      st.wiring = false;
      return setback(self, errc::unavailable, fmt::format("stage {}/{} is not reachable", s.address.node, s.address.actor));
    }
    self->request(handle, timeout, wire_atom::value, st.table)
        .then([acked](ok_atom) { acked(); }, failed(fmt::format("stage on {}", s.address.node)));
  }
  self->request(st.router, timeout, wire_atom::value, st.table)
      .then([acked](ok_atom) { acked(); }, failed("the router"));
}

// Whether every routed expert has a running copy (trivially so when stages hold them).
bool experts_covered(const supervisor_state& st) {
  std::set<std::int64_t> missing;
  for (const auto& g : st.options.cluster.expert_groups) missing.insert(g.experts.begin(), g.experts.end());
  for (std::size_t j = 0; j < st.experts.size(); ++j)
    if (active(st.experts[j].phase))
      for (auto e : st.options.cluster.expert_groups[j].experts) missing.erase(e);
  return missing.empty();
}

// Spawns what is not running on nodes that are up (experts first, so that stages can be
// wired to them), then wires the placement once every stage runs and every expert has a
// running copy; again when a copy that the table lacks comes up (a node back after a
// failure).
void place(self_ptr self) {
  auto& st = self->state;
  if (!st.failure.empty() || st.wiring) return;
  const auto& c = st.options.cluster;
  if (!st.served)
    for (const auto& [name, m] : st.members)
      if (!m.agent || m.down) return;  // the first placement waits for every node
  auto spawned = [self](std::vector<supervisor_state::placed> supervisor_state::*list, std::size_t i,
                        std::string node) {
    return [self, list, i, node](ok_atom) {
      auto& st = self->state;
      auto& p = (st.*list)[i];
      if (p.phase != placement_phase::spawning || !node_up(st, node)) return;  // its node died meanwhile
      p.phase = placement_phase::running;
      place(self);
    };
  };
  auto refused = [self](std::vector<supervisor_state::placed> supervisor_state::*list, std::size_t i) {
    return [self, list, i](caf::error& e) {
      auto& st = self->state;
      auto& p = (st.*list)[i];
      if (p.phase != placement_phase::spawning) return;
      p.phase = placement_phase::failed;
      p.error = from_caf_error(e).what();
      setback(self, from_caf_error(e).code(), p.error);
    };
  };
  bool spawning = false;
  for (std::size_t j = 0; j < st.experts.size(); ++j) {
    auto& e = st.experts[j];
    if (e.phase == placement_phase::spawning) spawning = true;
    if ((e.phase != placement_phase::pending && e.phase != placement_phase::failed) || !node_up(st, e.address.node))
      continue;
    e.phase = placement_phase::spawning;
    e.error.clear();
    spawning = true;
    spawn_expert_cmd cmd{.actor = e.address.actor, .experts = {}, .model_path = c.model.string()};
    for (auto id : c.expert_groups[j].experts) cmd.experts.push_back(static_cast<std::uint32_t>(id));
    self->request(st.members[e.address.node].agent, st.options.ready_timeout, std::move(cmd))
        .then(spawned(&supervisor_state::experts, j, e.address.node), refused(&supervisor_state::experts, j));
  }
  if (!experts_covered(st)) return;
  if (!all_active(st.stages)) {
    if (spawning && !st.served) return;  // first start: stages after every expert
    // Every stage stores as many blocks as the router's scheduler hands out.
    std::uint32_t cache_blocks = 0;
    try {
      cache_blocks = static_cast<std::uint32_t>(config::cache_blocks_for(c, st.options.model));
    } catch (const shoal::error& e) {
      return fail_cluster(self, e.code(), e.what());
    }
    for (std::size_t i = 0; i < st.stages.size(); ++i) {
      auto& s = st.stages[i];
      if ((s.phase != placement_phase::pending && s.phase != placement_phase::failed) || !node_up(st, s.address.node))
        continue;
      s.phase = placement_phase::spawning;
      s.error.clear();
      const auto& spec = c.stages[i];
      spawn_stage_cmd cmd{.actor = s.address.actor, .stage = static_cast<std::uint32_t>(i),
                          .stage_count = static_cast<std::uint32_t>(st.stages.size()),
                          .first_layer = static_cast<std::uint32_t>(spec.layer_begin),
                          .end_layer = static_cast<std::uint32_t>(spec.layer_end),
                          .hold_experts = c.expert_groups.empty(), .model_path = c.model.string(),
                          .cache_blocks = cache_blocks, .block_tokens = static_cast<std::uint32_t>(c.block_tokens)};
      self->request(st.members[s.address.node].agent, st.options.ready_timeout, std::move(cmd))
          .then(spawned(&supervisor_state::stages, i, s.address.node), refused(&supervisor_state::stages, i));
    }
    return;
  }
  // First start: wire once everything runs. Serving already: wait for every actor under way,
  // then wire again for actors the table lacks (a copy back, an actor moved by a drain).
  if (spawning && (!st.served || st.serving)) return;
  bool unwired = false;
  for (const auto* v : {&st.stages, &st.experts})
    for (const auto& p : *v) unwired = unwired || p.phase == placement_phase::running;
  if (!st.serving || unwired) wire(self);
}

void send_heartbeats(self_ptr self) {
  auto& st = self->state;
  st.last_heartbeat = clock_type::now();
  const heartbeat beat{.epoch = st.epoch, .sequence = ++st.heartbeat_sequence, .evicted = st.evicted, .routed_index = {}, .routed_count = {}};
  st.rounds[beat.sequence] = st.last_heartbeat;
  while (st.rounds.size() > static_cast<std::size_t>(st.options.heartbeat_misses) + 2) st.rounds.erase(st.rounds.begin());
  const auto patience = st.options.heartbeat_interval * st.options.heartbeat_misses;
  for (auto& [name, m] : st.members) {
    if (!m.agent || m.down || !st.book->remote(name)) continue;
    const auto pid = m.info.pid;
    self->request(m.agent, patience, beat)
        .then(
            [self, name = name, pid, round = beat.sequence](heartbeat& answer) {
              auto& st = self->state;
              auto& m = st.members[name];
              if (m.info.pid != pid || m.down) return;
              m.last_seen = clock_type::now();
              m.answered = std::max(m.answered, round);
              for (std::size_t i = 0; i < answer.routed_index.size() && i < answer.routed_count.size(); ++i)
                m.routed[answer.routed_index[i]] = answer.routed_count[i];
            },
            [](caf::error&) {});  // counted by the missing answer, not by the error
  }
}

// A node is gone: fence it and everything of the placement that included it.
void declare_dead(self_ptr self, const std::string& name, const std::string& reason, bool evict) {
  auto& st = self->state;
  auto& m = st.members[name];
  if (m.down || !m.agent) return;
  const auto pid = m.info.pid;
  self->demonitor(m.agent.address());
  m.agent = nullptr;
  m.down = true;
  m.down_reason = reason;
  m.down_at = clock_type::now();
  for (const auto& [index, count] : m.routed) st.retired_routed[index] += count;
  m.routed.clear();
  ++st.epoch;  // fences messages of the placement that included it
  st.book->observe_epoch(st.epoch);
  st.wiring = false;
  for (auto* v : {&st.stages, &st.experts})
    for (auto& p : *v)
      if (p.address.node == name) {
        p.phase = placement_phase::failed;
        p.error = fmt::format("node {} is dead: {}", name, reason);
      }
  const auto message = fmt::format("node {} is dead ({}); waiting for it to come back", name, reason);
  if (!st.served) return fail_cluster(self, errc::unavailable, fmt::format("node {} went down: {}", name, reason));
  st.serving = false;
  st.degraded = message;
  if (evict) {
    st.book->evict(name, st.epoch);
    st.evicted.push_back(name);
  }
  self->send(st.router, fence_atom::value, st.epoch);
  emit(self, {{"event", "node_down"}, {"node", name}, {"pid", pid}, {"reason", reason}});
  // Tell the others now rather than at the next heartbeat: calls waiting on the dead node
  // fail as soon as they drop its connections.
  if (st.options.heartbeat_interval.count() > 0) send_heartbeats(self);
  // With a second copy of its experts elsewhere (and no stage on it), serve on at once.
  place(self);
}

// Weights (and, for a stage, latent cache) an actor needs, from the checkpoint's tensor sizes
// on the head; 0 when the checkpoint cannot be read here.
std::uint64_t actor_bytes(supervisor_state& st, bool stage, std::size_t index) {
  const auto& c = st.options.cluster;
  if (!st.sizes_loaded) {
    st.sizes_loaded = true;
    try {
      const auto ckpt = runtime::checkpoint::open(c.model);
      for (const auto& file : ckpt.files())
        for (const auto& [name, entry] : file->entries()) st.tensor_sizes.emplace_back(name, entry.end - entry.begin);
    } catch (const shoal::error&) {
      st.tensor_sizes.clear();  // sizes unknown: placement checks only what the nodes report
    }
  }
  std::uint64_t bytes = 0;
  auto in_layers = [](const std::string& name, std::int64_t first, std::int64_t end) {
    constexpr std::string_view prefix = "model.layers.";
    if (!name.starts_with(prefix)) return false;
    const auto layer = std::atoll(name.c_str() + prefix.size());
    return layer >= first && layer < end;
  };
  if (stage) {
    const auto& spec = c.stages[index];
    const bool first = index == 0, last = index + 1 == c.stages.size();
    for (const auto& [name, size] : st.tensor_sizes)
      if ((in_layers(name, spec.layer_begin, spec.layer_end) &&
           (c.expert_groups.empty() || name.find(".mlp.experts.") == std::string::npos)) ||
          (first && name.starts_with("model.embed_tokens.")) ||
          (last && (name.starts_with("model.norm.") || name.starts_with("lm_head."))))
        bytes += size;
    try {
      bytes += static_cast<std::uint64_t>(config::cache_blocks_for(c, st.options.model) * c.block_tokens *
                                          st.options.model.latent_dim() * (spec.layer_end - spec.layer_begin)) *
               sizeof(float);
    } catch (const shoal::error&) {
    }
    return bytes;
  }
  const auto& experts = c.expert_groups[index].experts;
  for (const auto& [name, size] : st.tensor_sizes) {
    const auto at = name.find(".mlp.experts.");
    if (at == std::string::npos) continue;
    const auto id = std::atoll(name.c_str() + at + 13);
    if (std::binary_search(experts.begin(), experts.end(), id)) bytes += size;
  }
  return bytes;
}

std::string human_bytes(double bytes) {
  return bytes >= 1e9 ? fmt::format("{:.2f} GB", bytes / 1e9) : fmt::format("{:.1f} MB", bytes / 1e6);
}

// What the actors placed on `node` take, and what it offers (0: unknown, no limit).
std::pair<std::uint64_t, std::uint64_t> node_memory(supervisor_state& st, const std::string& node) {
  std::uint64_t used = 0;
  for (std::size_t i = 0; i < st.stages.size(); ++i)
    if (st.stages[i].address.node == node && st.stages[i].phase != placement_phase::failed) used += actor_bytes(st, true, i);
  for (std::size_t j = 0; j < st.experts.size(); ++j)
    if (st.experts[j].address.node == node && st.experts[j].phase != placement_phase::failed)
      used += actor_bytes(st, false, j);
  return {used, st.members[node].info.memory_bytes};
}

// Moves the actors on `from` (only the failed ones, or all of them) to other nodes that are
// up, not drained, and have the memory (nodes of the same role first, then the one with the
// most room). Returns what fits nowhere, each with what it needs and every node's room.
std::vector<std::string> move_actors(self_ptr self, const std::string& from, bool only_failed, const char* cause) {
  auto& st = self->state;
  const auto& c = st.options.cluster;
  std::vector<std::string> unplaced;
  auto move = [&](supervisor_state::placed& p, bool stage, std::size_t index, const std::string& what) {
    const auto bytes = actor_bytes(st, stage, index);
    std::string best;
    bool best_same_role = false;
    std::int64_t best_room = 0;
    std::vector<std::string> rooms;
    for (const auto& [name, m] : st.members) {
      if (name == from || !m.agent || m.down || st.drained.contains(name)) continue;
      const auto [used, offered] = node_memory(st, name);
      const auto room = offered == 0 ? std::numeric_limits<std::int64_t>::max()
                                     : static_cast<std::int64_t>(offered) - static_cast<std::int64_t>(used);
      rooms.push_back(offered == 0 ? fmt::format("{} unknown", name)
                                   : fmt::format("{} {}", name, human_bytes(static_cast<double>(room))));
      if (room < static_cast<std::int64_t>(bytes)) continue;
      bool same_role = false;
      if (stage)
        for (const auto& s : c.stages) same_role = same_role || s.node == name;
      else
        for (const auto& g : c.expert_groups) same_role = same_role || g.node == name;
      if (best.empty() || (same_role && !best_same_role) || (same_role == best_same_role && room > best_room)) {
        best = name;
        best_same_role = same_role;
        best_room = room;
      }
    }
    if (best.empty()) {
      unplaced.push_back(fmt::format("{} needs {}; room: {}", what, human_bytes(static_cast<double>(bytes)),
                                     rooms.empty() ? std::string("no other node is up")
                                                   : fmt::format("{}", fmt::join(rooms, ", "))));
      return;
    }
    emit(self, {{"event", "replaced"}, {"cause", cause}, {"actor", p.address.actor}, {"what", what}, {"from", from},
                {"to", best}, {"bytes", bytes}});
    p.address.node = best;
    p.phase = placement_phase::pending;
    p.error.clear();
  };
  auto movable = [&](const supervisor_state::placed& p) {
    return p.address.node == from && (p.phase == placement_phase::failed || (!only_failed && active(p.phase)));
  };
  for (std::size_t j = 0; j < st.experts.size(); ++j)
    if (movable(st.experts[j])) move(st.experts[j], false, j, fmt::format("expert group {}", j));
  for (std::size_t i = 0; i < st.stages.size(); ++i)
    if (movable(st.stages[i]))
      move(st.stages[i], true, i,
           fmt::format("stage {} (layers {}-{})", i, c.stages[i].layer_begin, c.stages[i].layer_end - 1));
  return unplaced;
}

// A node that did not come back in time: its stages and expert groups move to survivors.
void replace_node(self_ptr self, const std::string& dead) {
  auto& st = self->state;
  const auto unplaced = move_actors(self, dead, true, "dead");
  if (!unplaced.empty())
    st.degraded = fmt::format("node {} is dead and did not come back; nothing surviving has the memory for: {}", dead,
                              fmt::join(unplaced, "; "));
  place(self);
}

// An operator's command (`shoal admin`). Changes need the admin token of the cluster config.
caf::result<std::string> admin_command(self_ptr self, admin_request& request) {
  auto& st = self->state;
  const auto refuse = [&](errc code, std::string message) {
    emit(self, {{"event", "admin"}, {"command", request.command}, {"args", request.args}, {"result", message}});
    return to_caf_error(code, std::move(message));
  };
  if (st.options.admin_token.empty())
    return refuse(errc::failed_precondition,
                  "admin commands are disabled: set admin_token_file in the cluster config to enable them");
  if (request.token.size() != st.options.admin_token.size() ||
      CRYPTO_memcmp(request.token.data(), st.options.admin_token.data(), request.token.size()) != 0)
    return refuse(errc::invalid_argument, "the admin token is wrong");
  if (request.command != "drain" && request.command != "undrain")
    return refuse(errc::invalid_argument, fmt::format("unknown admin command '{}' (known: drain, undrain)", request.command));
  if (request.args.size() != 1) return refuse(errc::invalid_argument, fmt::format("{} takes one node name", request.command));
  const auto& node = request.args[0];
  const auto it = st.members.find(node);
  if (it == st.members.end()) return refuse(errc::not_found, fmt::format("no node '{}' in the cluster", node));
  nlohmann::json reply{{"command", request.command}, {"node", node}};
  if (request.command == "undrain") {
    st.drained.erase(node);
  } else {
    if (node == st.options.cluster.head)
      return refuse(errc::invalid_argument, fmt::format("node {} is the head (supervisor and router): it cannot be drained", node));
    if (!st.serving || st.wiring)
      return refuse(errc::unavailable, "the cluster is not serving right now (a failure or a change is under way): retry");
    st.drained.insert(node);
    const auto unplaced = move_actors(self, node, false, "drain");
    if (!unplaced.empty()) {
      // Nothing moved is undone: the actors that found room move, the others stay.
      st.drained.erase(node);
      place(self);
      return refuse(errc::resource_exhausted,
                    fmt::format("cannot drain {}: nothing else has the memory for: {}", node, fmt::join(unplaced, "; ")));
    }
    place(self);
  }
  reply["drained"] = std::vector<std::string>(st.drained.begin(), st.drained.end());
  emit(self, {{"event", "admin"}, {"command", request.command}, {"args", request.args}, {"result", "ok"}});
  return reply.dump();
}

void check_replacements(self_ptr self) {
  auto& st = self->state;
  if (!st.served || st.options.replace_after.count() <= 0) return;
  const auto now = clock_type::now();
  for (const auto& [name, m] : st.members) {
    if (!m.down || now - m.down_at < st.options.replace_after) continue;
    bool holds = false;
    for (const auto* v : {&st.stages, &st.experts})
      for (const auto& p : *v) holds = holds || (p.address.node == name && p.phase == placement_phase::failed);
    if (holds) return replace_node(self, name);  // one node per tick; `place` re-wires
  }
}

void check_heartbeats(self_ptr self) {
  auto& st = self->state;
  if (st.options.heartbeat_interval.count() <= 0 || !st.failure.empty()) return;
  const auto now = clock_type::now();
  const auto patience = st.options.heartbeat_interval * st.options.heartbeat_misses;
  std::vector<std::pair<std::string, std::string>> dead;
  for (const auto& [name, m] : st.members) {
    if (!m.agent || m.down || !st.book->remote(name)) continue;
    const auto missed = st.heartbeat_sequence - m.answered;
    if (missed < static_cast<std::uint64_t>(st.options.heartbeat_misses)) continue;
    const auto first = st.rounds.lower_bound(m.answered + 1);  // the oldest unanswered round kept
    if (first == st.rounds.end() || now - first->second < patience) continue;
    dead.emplace_back(name, fmt::format("no heartbeat answer for {} ms ({} missed)",
                                        std::chrono::duration_cast<std::chrono::milliseconds>(now - m.last_seen).count(),
                                        missed));
  }
  for (const auto& [name, reason] : dead) declare_dead(self, name, reason, true);
  if (now - st.last_heartbeat >= st.options.heartbeat_interval) send_heartbeats(self);
}

std::string pending_summary(const supervisor_state& st) {
  std::vector<std::string> parts;
  for (const auto& [name, m] : st.members)
    if (!m.agent) parts.push_back(fmt::format("node {} ({})", name, m.down ? "dead" : "not joined"));
  for (std::size_t i = 0; i < st.stages.size(); ++i)
    if (st.stages[i].phase != placement_phase::serving)
      parts.push_back(fmt::format("stage {} on {} ({})", i, st.stages[i].address.node,
                                  placement_phase_name(st.stages[i].phase)));
  for (std::size_t j = 0; j < st.experts.size(); ++j)
    if (st.experts[j].phase != placement_phase::serving)
      parts.push_back(fmt::format("expert actor {} on {} ({})", j, st.experts[j].address.node,
                                  placement_phase_name(st.experts[j].phase)));
  return fmt::format("{}", fmt::join(parts, ", "));
}

}  // namespace

const char* placement_phase_name(placement_phase phase) noexcept {
  switch (phase) {
    case placement_phase::pending: return "pending";
    case placement_phase::spawning: return "spawning";
    case placement_phase::running: return "running";
    case placement_phase::serving: return "serving";
    case placement_phase::failed: return "failed";
    case placement_phase::stopped: return "stopped";
  }
  return "unknown";
}

std::string head_status(caf::actor_system& system, const supervisor_actor& supervisor) {
  caf::scoped_actor self{system};
  std::string out;
  std::optional<shoal::error> failure;
  self->request(supervisor, std::chrono::seconds(15), status_atom::value)
      .receive([&](std::string& s) { out = std::move(s); }, [&](caf::error& e) { failure = from_caf_error(e); });
  if (failure) throw *failure;
  return out;
}

supervisor_actor::behavior_type make_supervisor(supervisor_actor::stateful_pointer<supervisor_state> self,
                                                supervisor_options options, std::shared_ptr<fabric> book,
                                                router_actor router) {
  auto& st = self->state;
  st.options = std::move(options);
  st.book = std::move(book);
  st.router = std::move(router);
  st.started = clock_type::now();
  st.last_heartbeat = st.started;
  for (const auto& n : st.options.cluster.nodes) st.members[n.name] = {};
  for (std::size_t i = 0; i < st.options.cluster.stages.size(); ++i)
    st.stages.push_back({.address = {st.options.cluster.stages[i].node, actor_ids::first_stage + i},
                         .phase = placement_phase::pending, .error = {}});
  for (std::size_t j = 0; j < st.options.cluster.expert_groups.size(); ++j)
    st.experts.push_back({.address = {st.options.cluster.expert_groups[j].node, actor_ids::first_expert + j},
                          .phase = placement_phase::pending, .error = {}});
  self->set_down_handler([self](caf::down_msg& msg) {
    auto& st = self->state;
    for (auto& [name, m] : st.members)
      if (m.agent && m.agent.address() == msg.source) {
        declare_dead(self, name, "its connection failed", true);
        return;
      }
  });
  const auto tick_every = std::chrono::milliseconds(
      st.options.heartbeat_interval.count() > 0 ? std::min<std::int64_t>(st.options.heartbeat_interval.count(), 200) : 200);
  self->delayed_send(self, tick_every, tick_atom::value);
  return {
      [self](join_atom, join_request& info, node_agent_actor& agent) -> caf::result<std::uint64_t> {
        auto& st = self->state;
        const auto it = st.members.find(info.node);
        if (info.schema_version != schema_version)
          return to_caf_error(errc::invalid_argument,
                              fmt::format("node {} speaks message schema version {}, this cluster speaks {}",
                                          info.node, info.schema_version, schema_version));
        if (it == st.members.end()) {
          std::vector<std::string> names;
          for (const auto& [name, m] : st.members) names.push_back(name);
          return to_caf_error(errc::invalid_argument,
                              fmt::format("node '{}' is not in the cluster config {} (nodes: {})", info.node,
                                          st.options.cluster.source.string(), fmt::join(names, ", ")));
        }
        auto& m = it->second;
        if (m.agent && !m.down) {
          if (m.info.pid == info.pid && m.info.host == info.host)
            return to_caf_error(errc::aborted, fmt::format("node '{}' has already joined (pid {})", info.node, m.info.pid));
          // Another process under the name: the old one is gone (it would hold the port
          // otherwise) or must be fenced. The transport already dropped its connections.
          if (!st.served)
            return to_caf_error(errc::aborted, fmt::format("node '{}' has already joined (pid {})", info.node, m.info.pid));
          declare_dead(self, info.node, fmt::format("replaced by a new process (pid {})", info.pid), false);
        }
        const bool rejoin = m.down;
        if (rejoin) ++m.restarts;
        m.agent = std::move(agent);
        m.info = std::move(info);
        m.down = false;
        m.last_seen = clock_type::now();
        m.answered = st.heartbeat_sequence;
        std::erase(st.evicted, it->first);
        self->monitor(m.agent);
        if (rejoin) {
          emit(self, {{"event", "node_rejoined"}, {"node", it->first}, {"pid", m.info.pid}, {"restarts", m.restarts}});
          st.degraded = fmt::format("node {} rejoined; loading its stages and experts", it->first);
        }
        bool all = true;
        for (const auto& [name, other] : st.members) all = all && other.agent;
        if (all || st.served) place(self);
        return st.epoch;
      },
      [self](admin_atom, admin_request& request) -> caf::result<std::string> { return admin_command(self, request); },
      [self](ready_atom) -> caf::result<placement_table> {
        auto& st = self->state;
        if (st.serving) return st.table;
        if (!st.failure.empty()) return to_caf_error(errc::unavailable, st.failure);
        auto rp = self->make_response_promise<placement_table>();
        st.waiting.push_back(rp);
        return rp;
      },
      [self](status_atom) -> caf::result<std::string> {
        auto& st = self->state;
        const auto now = clock_type::now();
        nlohmann::json j;
        j["epoch"] = st.epoch;
        j["serving"] = st.serving;
        j["failure"] = st.failure;
        j["degraded"] = st.degraded;
        j["recoveries"] = st.recoveries;
        j["config"] = st.options.cluster.source.string();
        j["heartbeat_ms"] = st.options.heartbeat_interval.count();
        j["drained"] = std::vector<std::string>(st.drained.begin(), st.drained.end());
        auto& nodes = j["nodes"] = nlohmann::json::array();
        for (const auto& [name, m] : st.members) {
          nlohmann::json n{{"name", name},          {"joined", static_cast<bool>(m.agent) || m.down},
                           {"down", m.down},        {"pid", m.info.pid},
                           {"restarts", m.restarts}, {"down_reason", m.down_reason}};
          if (m.agent && st.book->remote(name))
            n["last_heartbeat_ms"] = std::chrono::duration_cast<std::chrono::milliseconds>(now - m.last_seen).count();
          nodes.push_back(std::move(n));
        }
        auto list = [](const std::vector<supervisor_state::placed>& v) {
          auto a = nlohmann::json::array();
          for (const auto& p : v)
            a.push_back({{"node", p.address.node}, {"actor", p.address.actor},
                         {"phase", placement_phase_name(p.phase)}, {"error", p.error}});
          return a;
        };
        j["stages"] = list(st.stages);
        j["experts"] = list(st.experts);
        // Tokens routed to each expert: this process's stages, the others' latest heartbeat
        // answers, and what dead processes had counted.
        if (st.options.model.n_routed_experts > 0) {
          auto routed = st.book->routed_tokens();
          routed.resize(static_cast<std::size_t>(st.options.model.num_hidden_layers * st.options.model.n_routed_experts), 0);
          auto add = [&](const std::map<std::uint32_t, std::uint64_t>& sparse) {
            for (const auto& [index, count] : sparse)
              if (index < routed.size()) routed[index] += count;
          };
          add(st.retired_routed);
          for (const auto& [name, m] : st.members) add(m.routed);
          j["routed_tokens"] = routed;
        }
        // Envelopes the head process refused (malformed, stale, misaddressed, not permitted).
        j["refused_messages"] = st.book->refused_messages();
        // The router's scheduler counters complete it under "scheduler".
        auto rp = self->make_response_promise<std::string>();
        self->request(st.router, std::chrono::seconds(10), status_atom::value)
            .then(
                [rp, j](std::string& scheduler) mutable {
                  j["scheduler"] = nlohmann::json::parse(scheduler);
                  rp.deliver(j.dump());
                },
                [rp](caf::error& e) mutable { rp.deliver(e); });
        return rp;
      },
      [self, tick_every](tick_atom) {
        auto& st = self->state;
        if (!st.failure.empty()) return;
        if (!st.served && clock_type::now() - st.started > st.options.ready_timeout) {
          fail_cluster(self, errc::deadline_exceeded,
                       fmt::format("the cluster was not ready within {} ms; still waiting for: {}",
                                   st.options.ready_timeout.count(), pending_summary(st)));
          return;
        }
        check_heartbeats(self);
        check_replacements(self);
        // A wiring that failed after a recovery is retried on the next tick.
        if (st.served && !st.serving && !st.wiring && st.degraded.starts_with("wiring")) place(self);
        self->delayed_send(self, tick_every, tick_atom::value);
      },
  };
}

}  // namespace shoal::actors
