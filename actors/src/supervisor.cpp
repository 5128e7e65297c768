#include "shoal/actors/supervisor.hpp"

#include "shoal/actors/fabric.hpp"
#include "shoal/runtime/safetensors.hpp"

#include <openssl/crypto.h>

#include <caf/actor_cast.hpp>
#include <caf/scoped_actor.hpp>
#include <caf/system_messages.hpp>

#include <algorithm>
#include <charconv>
#include <ctime>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <optional>
#include <set>

#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

namespace shoal::actors {
namespace {

using self_ptr = supervisor_actor::stateful_pointer<supervisor_state>;
using clock_type = std::chrono::steady_clock;

// A head that takes over starts a new term: the upper 32 bits of the epoch count takeovers,
// so that no epoch of the head it replaced (which may still be bumping its own, frozen or
// cut off) can reach those of the new one.
std::uint64_t next_term(std::uint64_t epoch) {
  constexpr std::uint64_t term = std::uint64_t{1} << 32;
  return (epoch / term + 1) * term;
}

void emit(self_ptr self, nlohmann::json event) {
  auto& st = self->state;
  event["epoch"] = st.epoch;
  if (st.options.on_event) st.options.on_event(event.dump());
  if (event["event"] == "admin" && !st.options.admin_audit_log.empty()) {
    // Operators' commands are rare: appended and flushed in line, so the trail survives a crash.
    const auto now = std::chrono::system_clock::now();
    const auto seconds = std::chrono::system_clock::to_time_t(now);
    std::tm utc{};
    ::gmtime_r(&seconds, &utc);
    char stamp[32];
    std::strftime(stamp, sizeof(stamp), "%Y-%m-%dT%H:%M:%SZ", &utc);
    event["time"] = stamp;
    std::ofstream out(st.options.admin_audit_log, std::ios::app);
    out << event.dump() << '\n';
    out.flush();
    if (!out) spdlog::warn("cannot append to the admin audit log {}", st.options.admin_audit_log.string());
  }
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
void settle_changes(self_ptr self);

// Whether the placement table routes anything to `address`.
bool in_table(const placement_table& table, const actor_address& address) {
  for (const auto& s : table.stages)
    if (s.address == address) return true;
  for (const auto& e : table.experts)
    if (e.address == address) return true;
  return false;
}

void wire(self_ptr self) {
  auto& st = self->state;
  st.table = placement_table{};
  st.table.epoch = ++st.epoch;
  if (!st.served || st.fresh_router) st.fence = st.epoch;  // nothing sent before the first placement is valid
  st.table.fence = st.fence;
  st.book->observe_epoch(st.epoch, st.fence);
  st.evicted.clear();  // a new epoch: the dead were replaced
  st.wiring = true;
  st.rewire = false;
  st.table.router = {st.options.node, actor_ids::router};
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
    const auto& spec = st.options.cluster.expert_groups[j];
    if (!active(st.experts[j].phase) || spec.experts.empty()) continue;
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
    st.fresh_router = false;
    if (st.served && st.healing) {
      ++st.recoveries;
      emit(self, {{"event", "recovered"}, {"recoveries", st.recoveries}});
      bool whole = true;
      for (const auto& [name, m] : st.members) whole = whole && !m.down;
      for (const auto* v : {&st.stages, &st.experts})
        for (const auto& p : *v) whole = whole && p.phase != placement_phase::failed;
      st.healing = !whole;
    } else if (st.served) {
      emit(self, {{"event", "placement"}, {"stages", st.table.stages.size()}, {"expert_actors", st.table.experts.size()}});
    }
    st.served = true;
    st.degraded.clear();
    for (auto& rp : st.waiting) rp.deliver(st.table);
    st.waiting.clear();
    settle_changes(self);
    place(self);  // a copy that came up while this table was being acknowledged, or a change to wire
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

// A running expert actor, on a node that is up, that holds every expert of group `j`: the new
// actor streams its weights from it. None (empty node) when the config says checkpoint or no
// such copy runs, e.g. at the first start or when the only holder died.
actor_address weights_source(const supervisor_state& st, std::size_t j) {
  const auto& c = st.options.cluster;
  if (c.copy_weights_from != "peer") return {};
  const auto& wanted = c.expert_groups[j].experts;
  // A drain moves the group itself: its old actor serves on until the move is wired.
  const auto& target = st.experts[j].address;
  for (const auto& old : st.retiring)
    if (old.actor == target.actor && old.node != target.node && node_up(st, old.node)) return old;
  for (std::size_t k = 0; k < st.experts.size() && k < c.expert_groups.size(); ++k) {
    const auto& e = st.experts[k];
    if (k == j || (e.phase != placement_phase::running && e.phase != placement_phase::serving) ||
        !node_up(st, e.address.node) || std::count(st.retiring.begin(), st.retiring.end(), e.address))
      continue;
    const auto& held = c.expert_groups[k].experts;
    if (std::all_of(wanted.begin(), wanted.end(),
                    [&](std::int64_t id) { return std::find(held.begin(), held.end(), id) != held.end(); }))
      return e.address;
  }
  return {};
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
    if (c.expert_groups[j].experts.empty() && e.phase != placement_phase::stopped &&
        !std::count(st.retiring.begin(), st.retiring.end(), e.address)) {
      // Emptied by a drop and then failed with its node before it was retired: nothing to load.
      e.phase = placement_phase::stopped;
      continue;
    }
    if (e.phase == placement_phase::spawning) spawning = true;
    if ((e.phase != placement_phase::pending && e.phase != placement_phase::failed) || !node_up(st, e.address.node))
      continue;
    e.phase = placement_phase::spawning;
    e.error.clear();
    spawning = true;
    spawn_expert_cmd cmd{.actor = e.address.actor, .experts = {}, .model_path = c.model.string(),
                         .source = weights_source(st, j)};
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
  if (!st.serving || unwired || st.rewire) wire(self);
}

// The node that takes over if this head fails: the config's standby, or after a takeover the
// config's head (it comes back as the standby); "" without a standby.
std::string standby_of(const supervisor_state& st) { return st.options.cluster.other_head(st.options.node); }

// What a standby needs to take over with the placement as operators and failures left it.
std::string placement_state(const supervisor_state& st) {
  nlohmann::json j;
  auto& stages = j["stages"] = nlohmann::json::array();
  for (const auto& s : st.stages) stages.push_back(s.address.node);
  auto& groups = j["groups"] = nlohmann::json::array();
  for (const auto& g : st.options.cluster.expert_groups)
    groups.push_back({{"node", g.node}, {"experts", g.experts}, {"copy", g.copy}});
  for (std::size_t k = 0; k < st.experts.size() && k < groups.size(); ++k) groups[k]["node"] = st.experts[k].address.node;
  j["drained"] = std::vector<std::string>(st.drained.begin(), st.drained.end());
  for (const auto& [name, weight] : st.options.cluster.split) j["split"][name] = weight;
  return j.dump();
}

// Takes over the placement the old head sent (see `placement_state`); entries naming nodes
// the config does not have are ignored.
void adopt_placement(supervisor_state& st, const std::string& text) {
  const auto j = nlohmann::json::parse(text, nullptr, false);
  if (!j.is_object()) return;
  auto known = [&](const nlohmann::json& node) { return node.is_string() && st.members.contains(node.get<std::string>()); };
  if (j.contains("stages") && j["stages"].is_array() && j["stages"].size() == st.stages.size())
    for (std::size_t i = 0; i < st.stages.size(); ++i)
      if (known(j["stages"][i])) st.stages[i].address.node = j["stages"][i].get<std::string>();
  auto& groups = st.options.cluster.expert_groups;
  if (j.contains("groups") && j["groups"].is_array() && j["groups"].size() >= groups.size()) {
    for (std::size_t k = 0; k < j["groups"].size(); ++k) {
      const auto& g = j["groups"][k];
      if (!g.is_object() || !known(g.value("node", nlohmann::json())) || !g.contains("experts") || !g["experts"].is_array())
        return;
      config::expert_group_spec spec{.node = g["node"].get<std::string>(),
                                     .experts = g["experts"].get<std::vector<std::int64_t>>(),
                                     .line = k < groups.size() ? groups[k].line : 0,
                                     .copy = g.value("copy", 0)};
      if (k < groups.size()) {
        groups[k] = std::move(spec);
        st.experts[k].address.node = groups[k].node;
      } else {
        st.experts.push_back({.address = {spec.node, actor_ids::first_expert + k}, .phase = placement_phase::pending,
                              .error = {}});
        groups.push_back(std::move(spec));
      }
    }
  }
  if (j.contains("drained") && j["drained"].is_array())
    for (const auto& n : j["drained"])
      if (known(n)) st.drained.insert(n.get<std::string>());
  // An operator's split outlives the head it was given to.
  if (j.contains("split") && j["split"].is_object()) {
    std::vector<std::pair<std::string, std::uint32_t>> split;
    for (const auto& [name, weight] : j["split"].items())
      if (weight.is_number_unsigned()) split.emplace_back(name, weight.get<std::uint32_t>());
    if (!split.empty()) st.options.cluster.split = std::move(split);
  }
}

void send_heartbeats(self_ptr self) {
  auto& st = self->state;
  st.last_heartbeat = clock_type::now();
  heartbeat beat;
  beat.epoch = st.epoch;
  beat.sequence = ++st.heartbeat_sequence;
  beat.evicted = st.evicted;
  beat.fence = st.fence;
  st.rounds[beat.sequence] = st.last_heartbeat;
  while (st.rounds.size() > static_cast<std::size_t>(st.options.heartbeat_misses) + 2) st.rounds.erase(st.rounds.begin());
  const auto patience = st.options.heartbeat_interval * st.options.heartbeat_misses;
  const auto standby = standby_of(st);
  for (auto& [name, m] : st.members) {
    if (!m.agent || m.down || !st.book->remote(name)) continue;
    const auto pid = m.info.pid;
    auto one = beat;
    if (name == standby) one.head_state = placement_state(st);
    self->request(m.agent, patience, std::move(one))
        .then(
            [self, name = name, pid, round = beat.sequence](heartbeat& answer) {
              auto& st = self->state;
              auto& m = st.members[name];
              if (m.info.pid != pid || m.down) return;
              m.last_seen = clock_type::now();
              m.answered = std::max(m.answered, round);
              for (std::size_t i = 0; i < answer.routed_index.size() && i < answer.routed_count.size(); ++i)
                m.routed[answer.routed_index[i]] = answer.routed_count[i];
              m.served.clear();
              for (std::size_t i = 0; i < answer.served_actor.size() && i < answer.served_rows.size(); ++i)
                m.served[answer.served_actor[i]] = answer.served_rows[i];
            },
            [self](caf::error& e) {
              // Counted by the missing answer, not by the error; except a node's word that
              // another head took over while this one was frozen or cut off.
              const auto err = from_caf_error(e);
              auto& st = self->state;
              if (err.code() == errc::failed_precondition && !st.superseded &&
                  std::string_view(err.what()).find("took over as head") != std::string_view::npos) {
                st.superseded = true;
                st.serving = false;
                st.degraded = err.what();
                emit(self, {{"event", "superseded"}, {"reason", err.what()}});
              }
            });
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
  m.served.clear();
  ++st.epoch;  // fences messages of the placement that included it
  st.fence = st.epoch;
  st.healing = true;
  st.book->observe_epoch(st.epoch, st.fence);
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

// The checkpoint's tensor sizes, read once on the head; none when it cannot be read here
// (placement then checks only what the nodes report).
void load_tensor_sizes(supervisor_state& st) {
  if (st.sizes_loaded) return;
  st.sizes_loaded = true;
  try {
    // An encrypted checkpoint's shard headers are read with the key.
    const auto ckpt = runtime::checkpoint::open(st.options.cluster.model, {}, st.options.key.get());
    for (const auto& file : ckpt.files())
      for (const auto& [name, entry] : file->entries()) st.tensor_sizes.emplace_back(name, entry.end - entry.begin);
  } catch (const shoal::error&) {
    st.tensor_sizes.clear();
  }
}

std::uint64_t experts_bytes(supervisor_state& st, const std::vector<std::int64_t>& experts);

// Weights (and, for a stage, latent cache) an actor needs, from the checkpoint's tensor sizes
// on the head; 0 when the checkpoint cannot be read here.
std::uint64_t actor_bytes(supervisor_state& st, bool stage, std::size_t index) {
  const auto& c = st.options.cluster;
  load_tensor_sizes(st);
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
  return experts_bytes(st, c.expert_groups[index].experts);
}

// Weights of `experts` (ascending ids) in every MoE layer.
std::uint64_t experts_bytes(supervisor_state& st, const std::vector<std::int64_t>& experts) {
  load_tensor_sizes(st);
  std::uint64_t bytes = 0;
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
    if (st.experts[j].address.node == node && st.experts[j].phase != placement_phase::failed &&
        st.experts[j].phase != placement_phase::stopped)
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
    if (active(p.phase)) st.retiring.push_back(p.address);  // a drain: stopped once the move is wired
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

// --- Expert loads ----------------------------------------------------------------------------

// Tokens routed to each (layer, expert) so far, `[layer * n_routed_experts + expert]`: this
// process's stages, the others' latest heartbeat answers, and what dead processes had counted.
std::vector<std::uint64_t> routed_totals(supervisor_state& st) {
  auto routed = st.book->routed_tokens();
  routed.resize(static_cast<std::size_t>(st.options.model.num_hidden_layers * st.options.model.n_routed_experts), 0);
  auto add = [&](const std::map<std::uint32_t, std::uint64_t>& sparse) {
    for (const auto& [index, count] : sparse)
      if (index < routed.size()) routed[index] += count;
  };
  add(st.retired_routed);
  for (const auto& [name, m] : st.members) add(m.routed);
  return routed;
}

// Rows each expert actor computed so far, by (node, actor id).
std::map<std::pair<std::string, std::uint64_t>, std::uint64_t> served_totals(supervisor_state& st) {
  auto served = st.book->served_rows();
  for (const auto& [name, m] : st.members)
    for (const auto& [actor, rows] : m.served) served[{name, actor}] = rows;
  return served;
}

// Records the counters every 1/12 of the load window, keeping one window of samples.
void sample_loads(self_ptr self, bool placement_changed) {
  auto& st = self->state;
  if (st.options.model.n_routed_experts <= 0 || st.options.cluster.expert_groups.empty()) return;
  const auto now = clock_type::now();
  const auto every = std::max<clock_type::duration>(std::chrono::seconds(1), st.options.load_window / 12);
  if (placement_changed) st.served_history.clear();  // rows per copy describe one placement
  auto record = [&](std::deque<supervisor_state::load_sample>& history, bool routed) {
    if (!history.empty() && now - history.back().at < every) return;
    supervisor_state::load_sample sample{.at = now, .routed = {}, .served = {}};
    if (routed)
      sample.routed = routed_totals(st);
    else
      sample.served = served_totals(st);
    history.push_back(std::move(sample));
    while (history.size() > 1 && now - history[1].at >= st.options.load_window) history.pop_front();
  };
  record(st.routed_history, true);
  record(st.served_history, false);
}

// Measured loads over the window: tokens routed to each expert (summed over layers), and rows
// computed by the expert actors of each node (since the expert placement last changed, if
// that is later).
struct measured_loads {
  std::vector<double> per_expert;
  std::map<std::string, double> per_node;
  double seconds = 0;       // of per_expert
  double node_seconds = 0;  // of per_node
};

// `routed`: `routed_totals(st)`, which the caller may need too.
measured_loads measure(supervisor_state& st, const std::vector<std::uint64_t>& routed) {
  measured_loads out;
  const auto n = st.options.model.n_routed_experts;
  if (n <= 0) return out;
  out.per_expert.assign(static_cast<std::size_t>(n), 0.0);
  const auto now = clock_type::now();
  const auto* base = st.routed_history.empty() ? nullptr : &st.routed_history.front().routed;
  for (std::size_t i = 0; i < routed.size(); ++i) {
    const auto before = base && i < base->size() ? (*base)[i] : 0;
    out.per_expert[i % static_cast<std::size_t>(n)] += static_cast<double>(routed[i] > before ? routed[i] - before : 0);
  }
  if (!st.routed_history.empty())
    out.seconds = std::chrono::duration<double>(now - st.routed_history.front().at).count();
  const auto served = served_totals(st);
  for (std::size_t j = 0; j < st.experts.size(); ++j) {
    const auto& p = st.experts[j];
    if (!active(p.phase)) continue;
    auto& load = out.per_node[p.address.node];
    const auto it = served.find({p.address.node, p.address.actor});
    if (it == served.end()) continue;
    std::uint64_t before = 0;
    if (!st.served_history.empty()) {
      const auto& first = st.served_history.front().served;
      if (const auto b = first.find(it->first); b != first.end()) before = b->second;
    }
    load += static_cast<double>(it->second > before ? it->second - before : 0);
  }
  if (!st.served_history.empty())
    out.node_seconds = std::chrono::duration<double>(now - st.served_history.front().at).count();
  return out;
}

// The heaviest node's load over the mean load of the nodes that hold expert actors (1 is
// perfect balance; 0 when nothing was measured).
double imbalance(const std::map<std::string, double>& per_node) {
  double sum = 0, most = 0;
  for (const auto& [node, load] : per_node) {
    sum += load;
    most = std::max(most, load);
  }
  return sum > 0 ? most / (sum / static_cast<double>(per_node.size())) : 0.0;
}

// --- Expert copies -----------------------------------------------------------------------------

// Expert groups that route `expert` now (serving or about to), by index.
std::vector<std::size_t> copies_of(const supervisor_state& st, std::int64_t expert) {
  std::vector<std::size_t> out;
  for (std::size_t j = 0; j < st.experts.size(); ++j) {
    const auto phase = st.experts[j].phase;
    if (phase == placement_phase::stopped || phase == placement_phase::failed) continue;
    const auto& ids = st.options.cluster.expert_groups[j].experts;
    if (std::binary_search(ids.begin(), ids.end(), expert)) out.push_back(j);
  }
  return out;
}

// Whether `node` may take a new copy: in the cluster, up and not drained; otherwise why not.
std::string refuse_target(const supervisor_state& st, const std::string& node) {
  const auto it = st.members.find(node);
  if (it == st.members.end()) return fmt::format("no node '{}' in the cluster", node);
  if (!it->second.agent || it->second.down) return fmt::format("node {} is not up", node);
  if (st.drained.contains(node)) return fmt::format("node {} is drained (undrain it first)", node);
  return {};
}

// A new expert group holding only `expert` on `node` (spawned by `place`); its index.
std::size_t add_copy(self_ptr self, std::int64_t expert, const std::string& node) {
  auto& st = self->state;
  const auto j = st.experts.size();
  st.options.cluster.expert_groups.push_back({.node = node, .experts = {expert}, .line = 0, .copy = 1});
  st.experts.push_back({.address = {node, actor_ids::first_expert + j}, .phase = placement_phase::pending, .error = {}});
  return j;
}

// Stops routing `expert` to group `j`; a group left with nothing is retired once the placement
// without it is acknowledged. Its weights stay loaded meanwhile, so the change is safe for the
// step in flight.
void drop_from_group(self_ptr self, std::size_t j, std::int64_t expert) {
  auto& st = self->state;
  auto& ids = st.options.cluster.expert_groups[j].experts;
  std::erase(ids, expert);
  if (ids.empty()) st.retiring.push_back(st.experts[j].address);
  st.rewire = true;
}

// After a placement was acknowledged by every stage and the router: moves whose new copy
// serves drop the old ones, and actors no stage can reach any more are stopped.
void settle_changes(self_ptr self) {
  auto& st = self->state;
  for (auto it = st.moves.begin(); it != st.moves.end();) {
    if (st.experts[it->copy].phase != placement_phase::serving) {
      ++it;
      continue;
    }
    for (const auto source : it->sources)
      if (st.experts[source].phase != placement_phase::stopped) drop_from_group(self, source, it->expert);
    emit(self, {{"event", "expert_moved"}, {"expert", it->expert}, {"to", st.experts[it->copy].address.node}});
    it = st.moves.erase(it);
  }
  for (auto it = st.retiring.begin(); it != st.retiring.end();) {
    if (in_table(st.table, *it)) {
      ++it;
      continue;
    }
    const auto address = *it;
    it = st.retiring.erase(it);
    for (std::size_t j = 0; j < st.experts.size(); ++j)
      if (st.experts[j].address == address && st.options.cluster.expert_groups[j].experts.empty())
        st.experts[j].phase = placement_phase::stopped;
    if (!node_up(st, address.node)) continue;
    self->request(st.members[address.node].agent, st.options.ready_timeout, retire_actor_cmd{.actor = address.actor})
        .then([](ok_atom) {}, [](caf::error&) {});  // a node that fails meanwhile is handled as dead
    emit(self, {{"event", "retired"}, {"node", address.node}, {"actor", address.actor}});
  }
  sample_loads(self, true);
}

// Changes still under way: copies loading, placements to wire, moves and retirements waiting.
std::size_t changes_pending(const supervisor_state& st) {
  std::size_t n = st.moves.size() + st.retiring.size() + (st.rewire || st.wiring ? 1 : 0);
  for (const auto* v : {&st.stages, &st.experts})
    for (const auto& p : *v)
      if (p.phase == placement_phase::pending || p.phase == placement_phase::spawning ||
          p.phase == placement_phase::running)
        ++n;
  return n;
}

// --- Rebalancing --------------------------------------------------------------------------------

// A rebalancing plan: copies of hot experts on the least loaded expert nodes, chosen greedily
// against the measured loads (an expert's load split evenly over its copies) within each
// node's memory. Copies only, no moves: every step lowers the heaviest node's load without
// taking anything away from a node that serves it now.
struct rebalance_plan {
  std::vector<std::pair<std::int64_t, std::string>> copies;  // expert, node
  double before = 0;
  double after = 0;
  std::map<std::string, double> predicted_before;
  std::map<std::string, double> predicted_after;
};

rebalance_plan plan_rebalance(supervisor_state& st, const std::vector<double>& per_expert, std::size_t max_copies) {
  rebalance_plan plan;
  // Expert nodes: those running expert actors now, up and not drained.
  std::map<std::string, std::set<std::int64_t>> holds;
  for (std::size_t j = 0; j < st.experts.size(); ++j) {
    const auto& p = st.experts[j];
    if (!active(p.phase) || st.drained.contains(p.address.node) || !node_up(st, p.address.node)) continue;
    for (auto e : st.options.cluster.expert_groups[j].experts) holds[p.address.node].insert(e);
  }
  if (holds.size() < 2) return plan;
  std::map<std::int64_t, int> copies;
  for (const auto& [node, experts] : holds)
    for (auto e : experts) ++copies[e];
  std::map<std::string, std::int64_t> room;
  for (const auto& [node, experts] : holds) {
    const auto [used, offered] = node_memory(st, node);
    room[node] = offered == 0 ? std::numeric_limits<std::int64_t>::max() / 2
                              : static_cast<std::int64_t>(offered) - static_cast<std::int64_t>(used);
  }
  auto node_loads = [&] {
    std::map<std::string, double> load;
    for (const auto& [node, experts] : holds) {
      auto& l = load[node];
      for (auto e : experts)
        if (static_cast<std::size_t>(e) < per_expert.size())
          l += per_expert[static_cast<std::size_t>(e)] / copies[e];
    }
    return load;
  };
  plan.predicted_before = node_loads();
  plan.before = imbalance(plan.predicted_before);
  auto load = plan.predicted_before;
  for (std::size_t step = 0; step < max_copies; ++step) {
    // The heaviest node sheds part of one of its experts to the lightest node that has room
    // and no copy of it; the pair that leaves the lowest maximum wins.
    const auto heaviest = std::max_element(load.begin(), load.end(),
                                           [](const auto& a, const auto& b) { return a.second < b.second; });
    double best_max = heaviest->second;
    std::int64_t best_expert = -1;
    std::string best_node;
    for (auto e : holds[heaviest->first]) {
      const double share = per_expert[static_cast<std::size_t>(e)];
      if (share <= 0) continue;
      const auto bytes = static_cast<std::int64_t>(experts_bytes(st, {e}));
      for (const auto& [node, l] : load) {
        if (holds[node].contains(e) || room[node] < bytes) continue;
        // With one more copy every holder carries share / (copies + 1).
        const double now_each = share / copies[e], then_each = share / (copies[e] + 1);
        double new_max = 0;
        for (const auto& [other, ol] : load) {
          double v = ol;
          if (holds[other].contains(e)) v -= now_each - then_each;
          if (other == node) v += then_each;
          new_max = std::max(new_max, v);
        }
        if (new_max < best_max * 0.99 || (best_expert >= 0 && new_max < best_max)) {
          best_max = new_max;
          best_expert = e;
          best_node = node;
        }
      }
    }
    if (best_expert < 0) break;
    plan.copies.emplace_back(best_expert, best_node);
    holds[best_node].insert(best_expert);
    ++copies[best_expert];
    room[best_node] -= static_cast<std::int64_t>(experts_bytes(st, {best_expert}));
    load = node_loads();
  }
  plan.predicted_after = load;
  plan.after = imbalance(load);
  return plan;
}

// --- Operators' commands ------------------------------------------------------------------------

// An expert id argument, or an error naming it.
std::optional<std::int64_t> parse_expert(const supervisor_state& st, const std::string& text) {
  std::int64_t id = -1;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), id);
  if (ec != std::errc() || end != text.data() + text.size() || id < 0 || id >= st.options.model.n_routed_experts)
    return std::nullopt;
  return id;
}

nlohmann::json loads_json(supervisor_state& st, const std::vector<std::uint64_t>& routed) {
  const auto m = measure(st, routed);
  nlohmann::json nodes = nlohmann::json::object();
  for (const auto& [node, load] : m.per_node) nodes[node] = load;
  return {{"window_s", st.options.load_window.count()}, {"measured_s", m.seconds}, {"nodes_measured_s", m.node_seconds},
          {"per_expert", m.per_expert}, {"per_node", nodes}, {"imbalance", imbalance(m.per_node)}};
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
  const auto& command = request.command;
  const auto& args = request.args;
  static const std::set<std::string> known{"drain", "undrain", "move-expert", "replicate-expert", "drop-replica",
                                           "rebalance", "split"};
  if (!known.contains(command))
    return refuse(errc::invalid_argument,
                  fmt::format("unknown admin command '{}' (known: {})", command, fmt::join(known, ", ")));
  if (command == "split") {
    // args: NAME=WEIGHT for some versions; the others get 0.
    auto& c = st.options.cluster;
    std::vector<std::string> names{c.version};
    for (const auto& v : c.versions) names.push_back(v.name);
    if (c.versions.empty())
      return refuse(errc::failed_precondition,
                    fmt::format("this cluster serves one model version ('{}'); list the deployments of the others "
                                "under versions in the cluster config to split traffic",
                                c.version));
    if (args.empty()) return refuse(errc::invalid_argument, "split takes NAME=WEIGHT for at least one version");
    std::vector<std::uint32_t> weights(names.size(), 0);
    std::vector<bool> given(names.size(), false);
    std::uint64_t total = 0;
    for (const auto& arg : args) {
      const auto eq = arg.find('=');
      const auto name = arg.substr(0, eq);
      const auto at = std::find(names.begin(), names.end(), name) - names.begin();
      if (static_cast<std::size_t>(at) == names.size())
        return refuse(errc::not_found, fmt::format("split: no version '{}' (versions: {})", name, fmt::join(names, ", ")));
      std::uint32_t weight = 0;
      const char* first = arg.data() + (eq == std::string::npos ? arg.size() : eq + 1);
      const auto [end, ec] = std::from_chars(first, arg.data() + arg.size(), weight);
      if (eq == std::string::npos || ec != std::errc() || end != arg.data() + arg.size() || first == end ||
          weight > 1000000)
        return refuse(errc::invalid_argument,
                      fmt::format("split: '{}' must be NAME=WEIGHT with a whole number in [0, 1000000]", arg));
      if (given[static_cast<std::size_t>(at)])
        return refuse(errc::invalid_argument, fmt::format("split: version '{}' is given twice", name));
      given[static_cast<std::size_t>(at)] = true;
      weights[static_cast<std::size_t>(at)] = weight;
      total += weight;
    }
    if (total == 0) return refuse(errc::invalid_argument, "split: at least one version needs a weight above 0");
    c.split.clear();
    nlohmann::json reply{{"command", command}, {"args", args}};
    for (std::size_t i = 0; i < names.size(); ++i) {
      c.split.emplace_back(names[i], weights[i]);
      reply["split"][names[i]] = weights[i];
    }
    self->send(st.router, split_atom::value, names, weights);
    emit(self, {{"event", "admin"}, {"command", command}, {"args", args}, {"result", "ok"}});
    return reply.dump();
  }
  const bool changes_experts = command != "drain" && command != "undrain";
  if (changes_experts && st.options.cluster.expert_groups.empty())
    return refuse(errc::failed_precondition, "this cluster has no expert actors: the stages hold every expert");
  if (command != "undrain" && (!st.serving || st.wiring || !st.moves.empty()))
    return refuse(errc::unavailable,
                  "the cluster is not serving right now (a failure or another change is under way): retry");
  nlohmann::json reply{{"command", command}, {"args", args}};
  auto ok = [&] {
    emit(self, {{"event", "admin"}, {"command", command}, {"args", args}, {"result", "ok"}});
    place(self);
    return reply.dump();
  };

  if (command == "drain" || command == "undrain") {
    if (args.size() != 1) return refuse(errc::invalid_argument, fmt::format("{} takes one node name", command));
    const auto& node = args[0];
    if (!st.members.contains(node)) return refuse(errc::not_found, fmt::format("no node '{}' in the cluster", node));
    reply["node"] = node;
    if (command == "undrain") {
      st.drained.erase(node);
    } else {
      if (node == st.options.node)
        return refuse(errc::invalid_argument,
                      fmt::format("node {} is the head (supervisor and router): it cannot be drained", node));
      st.drained.insert(node);
      const auto unplaced = move_actors(self, node, false, "drain");
      if (!unplaced.empty()) {
        // Nothing moved is undone: the actors that found room move, the others stay.
        st.drained.erase(node);
        place(self);
        return refuse(errc::resource_exhausted,
                      fmt::format("cannot drain {}: nothing else has the memory for: {}", node, fmt::join(unplaced, "; ")));
      }
    }
    reply["drained"] = std::vector<std::string>(st.drained.begin(), st.drained.end());
    return ok();
  }

  if (command == "rebalance") {
    // args: "apply" or "dry-run", then the most copies to add.
    if (args.size() != 2 || (args[0] != "apply" && args[0] != "dry-run"))
      return refuse(errc::invalid_argument, "rebalance takes apply|dry-run and the most copies to add");
    std::size_t max_copies = 0;
    const auto [end, ec] = std::from_chars(args[1].data(), args[1].data() + args[1].size(), max_copies);
    if (ec != std::errc() || end != args[1].data() + args[1].size() || max_copies == 0 || max_copies > 4096)
      return refuse(errc::invalid_argument, fmt::format("rebalance: '{}' is not a number of copies in [1, 4096]", args[1]));
    const auto measured = measure(st, routed_totals(st));
    double total = 0;
    for (auto l : measured.per_expert) total += l;
    if (total <= 0)
      return refuse(errc::failed_precondition,
                    fmt::format("no expert load measured in the last {} s: serve some traffic first",
                                st.options.load_window.count()));
    const auto plan = plan_rebalance(st, measured.per_expert, max_copies);
    auto actions = nlohmann::json::array();
    for (const auto& [expert, node] : plan.copies) actions.push_back({{"replicate", expert}, {"to", node}});
    reply["actions"] = actions;
    reply["dry_run"] = args[0] == "dry-run";
    reply["measured_imbalance"] = imbalance(measured.per_node);
    reply["predicted_imbalance_before"] = plan.before;
    reply["predicted_imbalance_after"] = plan.after;
    reply["predicted_before"] = plan.predicted_before;
    reply["predicted_after"] = plan.predicted_after;
    reply["window_s"] = measured.seconds;
    if (args[0] == "apply") {
      auto groups = nlohmann::json::array();
      for (const auto& [expert, node] : plan.copies) groups.push_back(add_copy(self, expert, node));
      reply["groups"] = groups;
    }
    return ok();
  }

  // move-expert E NODE [FROM], replicate-expert E NODE, drop-replica E NODE
  if (args.size() < 2 || args.size() > (command == "move-expert" ? 3u : 2u))
    return refuse(errc::invalid_argument, fmt::format("{} takes an expert id and a node name", command));
  const auto expert = parse_expert(st, args[0]);
  if (!expert)
    return refuse(errc::invalid_argument, fmt::format("'{}' is not a routed expert id of this model (0-{})", args[0],
                                                      st.options.model.n_routed_experts - 1));
  const auto& node = args[1];
  if (!st.members.contains(node)) return refuse(errc::not_found, fmt::format("no node '{}' in the cluster", node));
  const auto copies = copies_of(st, *expert);
  auto on = [&](const std::string& where) {
    return std::find_if(copies.begin(), copies.end(), [&](std::size_t j) { return st.experts[j].address.node == where; }) !=
           copies.end();
  };
  reply["expert"] = *expert;

  if (command == "drop-replica") {
    std::vector<std::size_t> here, elsewhere;
    for (auto j : copies) (st.experts[j].address.node == node ? here : elsewhere).push_back(j);
    if (here.empty()) return refuse(errc::not_found, fmt::format("node {} holds no copy of expert {}", node, *expert));
    if (elsewhere.empty())
      return refuse(errc::failed_precondition,
                    fmt::format("expert {} has no copy besides the one on {}: dropping it would leave it placed nowhere",
                                *expert, node));
    for (auto j : here) drop_from_group(self, j, *expert);
    reply["from"] = node;
    return ok();
  }

  if (const auto why = refuse_target(st, node); !why.empty()) return refuse(errc::failed_precondition, why);
  const auto bytes = experts_bytes(st, {*expert});
  const auto [used, offered] = node_memory(st, node);
  if (!on(node) && offered != 0 && used + bytes > offered)
    return refuse(errc::resource_exhausted,
                  fmt::format("node {} has {} free, expert {} needs {}", node,
                              human_bytes(static_cast<double>(offered > used ? offered - used : 0)), *expert,
                              human_bytes(static_cast<double>(bytes))));

  if (command == "replicate-expert") {
    if (on(node)) return refuse(errc::invalid_argument, fmt::format("node {} already holds expert {}", node, *expert));
    reply["to"] = node;
    reply["group"] = add_copy(self, *expert, node);
    return ok();
  }

  // move-expert: a copy on the target first; the sources stop serving it once that copy serves.
  std::vector<std::size_t> sources;
  const std::string from = args.size() == 3 ? args[2] : std::string();
  if (!from.empty() && !st.members.contains(from))
    return refuse(errc::not_found, fmt::format("no node '{}' in the cluster", from));
  for (auto j : copies)
    if (st.experts[j].address.node != node && (from.empty() || st.experts[j].address.node == from)) sources.push_back(j);
  if (sources.empty())
    return refuse(errc::invalid_argument,
                  from.empty() ? fmt::format("expert {} is already only on {}", *expert, node)
                               : fmt::format("node {} holds no copy of expert {}", from, *expert));
  reply["to"] = node;
  if (on(node)) {
    for (auto j : sources) drop_from_group(self, j, *expert);  // the target serves it already
  } else {
    const auto copy = add_copy(self, *expert, node);
    reply["group"] = copy;
    st.moves.push_back({.expert = *expert, .copy = copy, .sources = sources});
  }
  return ok();
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

// `rebalance_every_s`: what `shoal admin rebalance` does, by itself, when it pays.
void scheduled_rebalance(self_ptr self) {
  auto& st = self->state;
  const auto& c = st.options.cluster;
  const auto now = clock_type::now();
  if (c.rebalance_every_s <= 0 || c.expert_groups.empty() || now - st.last_rebalance < std::chrono::seconds(c.rebalance_every_s))
    return;
  if (!st.serving || st.wiring || !st.moves.empty() || changes_pending(st) > 0) return;  // next tick
  st.last_rebalance = now;
  const auto measured = measure(st, routed_totals(st));
  double total = 0;
  for (auto l : measured.per_expert) total += l;
  if (total <= 0) return;
  const auto plan = plan_rebalance(st, measured.per_expert, static_cast<std::size_t>(c.rebalance_max_copies));
  if (plan.copies.empty() || plan.after > plan.before * 0.95) return;
  auto actions = nlohmann::json::array();
  for (const auto& [expert, node] : plan.copies) {
    actions.push_back({{"replicate", expert}, {"to", node}});
    add_copy(self, expert, node);
  }
  // In the audit trail like an operator's command.
  emit(self, {{"event", "admin"}, {"command", "rebalance"}, {"args", {"scheduled"}}, {"result", "ok"},
              {"actions", actions}, {"predicted_imbalance_before", plan.before}, {"predicted_imbalance_after", plan.after}});
  place(self);
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
  st.last_rebalance = st.started;
  if (st.options.node.empty()) st.options.node = st.options.cluster.head;
  for (const auto& n : st.options.cluster.nodes) st.members[n.name] = {};
  for (std::size_t i = 0; i < st.options.cluster.stages.size(); ++i)
    st.stages.push_back({.address = {st.options.cluster.stages[i].node, actor_ids::first_stage + i},
                         .phase = placement_phase::pending, .error = {}});
  for (std::size_t j = 0; j < st.options.cluster.expert_groups.size(); ++j)
    st.experts.push_back({.address = {st.options.cluster.expert_groups[j].node, actor_ids::first_expert + j},
                          .phase = placement_phase::pending, .error = {}});
  if (const auto old = st.options.takeover_from; !old.empty()) {
    // The cluster served under the old head: failures heal from the start, the old head's
    // actors are failed like a dead node's, and nothing of the old head's epochs counts.
    st.served = true;
    st.healing = true;
    if (!st.options.adopt.empty()) {
      adopt_placement(st, st.options.adopt);
      std::vector<std::string> names;
      std::vector<std::uint32_t> weights;
      for (const auto& [name, weight] : st.options.cluster.split) {
        names.push_back(name);
        weights.push_back(weight);
      }
      if (!names.empty() && st.router) self->send(st.router, split_atom::value, names, weights);
    }
    st.epoch = next_term(st.options.epoch);
    st.fence = st.epoch;
    st.book->observe_epoch(st.epoch, st.fence);
    auto& m = st.members[old];
    m.down = true;
    m.down_at = st.started;
    m.down_reason = fmt::format("the head failed; {} took over", st.options.node);
    for (auto* v : {&st.stages, &st.experts})
      for (auto& p : *v)
        if (p.address.node == old) {
          p.phase = placement_phase::failed;
          p.error = fmt::format("node {} is dead: {}", old, m.down_reason);
        }
    st.degraded = fmt::format("{} took over as head from {}; waiting for the nodes to join again", st.options.node, old);
    st.book->evict(old, st.epoch);
    st.evicted.push_back(old);
    emit(self, {{"event", "head_takeover"}, {"node", st.options.node}, {"from", old}});
    // For whoever started the old head: it must not wake up (a frozen process) or come back
    // as head; a restarted process joins this one.
    emit(self, {{"event", "node_down"}, {"node", old}, {"pid", 0}, {"reason", m.down_reason}});
  }
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
        if (info.epoch > st.epoch) {
          if (!st.options.takeover_from.empty() && st.fresh_router && !st.wiring) {
            // A head that takes over starts above every epoch a node has seen.
            st.epoch = next_term(info.epoch);
            st.fence = st.epoch;
            st.book->observe_epoch(st.epoch, st.fence);
          } else {
            // The node follows a newer head: this one was frozen or cut off while the other
            // took over.
            const auto why = fmt::format("node {} has seen placement epoch {}, newer than this head's {}: another "
                                         "node took over as head",
                                         info.node, info.epoch, st.epoch);
            if (!st.superseded) {
              st.superseded = true;
              st.serving = false;
              st.degraded = why;
              emit(self, {{"event", "superseded"}, {"reason", why}});
            }
            return to_caf_error(errc::failed_precondition, why);
          }
        }
        m.agent = std::move(agent);
        m.info = std::move(info);
        m.down = false;
        m.last_seen = clock_type::now();
        m.answered = st.heartbeat_sequence;
        std::erase(st.evicted, it->first);
        self->monitor(m.agent);
        if (rejoin) {
          st.healing = true;
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
        // Counted by the head's transport: nodes and clients that dialed the head without
        // the join secret, and nodes the head dialed that could not prove it.
        j["refused_peers"] = st.book->refused_peers();
        j["config"] = st.options.cluster.source.string();
        j["head"] = st.options.node;
        j["standby"] = standby_of(st);
        j["heartbeat_ms"] = st.options.heartbeat_interval.count();
        j["drained"] = std::vector<std::string>(st.drained.begin(), st.drained.end());
        auto& nodes = j["nodes"] = nlohmann::json::array();
        for (const auto& [name, m] : st.members) {
          nlohmann::json n{{"name", name},          {"joined", static_cast<bool>(m.agent) || m.down},
                           {"down", m.down},        {"pid", m.info.pid},
                           {"restarts", m.restarts}, {"down_reason", m.down_reason}};
          if (m.agent && st.book->remote(name))
            n["last_heartbeat_ms"] = std::chrono::duration_cast<std::chrono::milliseconds>(now - m.last_seen).count();
          // What the placement puts there (weights of its actors and a stage's latent cache,
          // from the checkpoint's tensor sizes) against what the node offers (0: unknown).
          const auto [placed, offered] = node_memory(st, name);
          n["memory_placed_bytes"] = placed;
          n["memory_offered_bytes"] = offered;
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
        for (std::size_t g = 0; g < st.experts.size(); ++g) {
          j["experts"][g]["experts"] = st.options.cluster.expert_groups[g].experts;
          j["experts"][g]["copy"] = st.options.cluster.expert_groups[g].copy > 0;
        }
        j["changes_pending"] = changes_pending(st);
        if (st.options.model.n_routed_experts > 0) {
          const auto routed = routed_totals(st);
          j["routed_tokens"] = routed;
          if (!st.options.cluster.expert_groups.empty()) j["expert_load"] = loads_json(st, routed);
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
        scheduled_rebalance(self);
        sample_loads(self, false);
        // A wiring that failed after a recovery is retried on the next tick.
        if (st.served && !st.serving && !st.wiring && st.degraded.starts_with("wiring")) place(self);
        self->delayed_send(self, tick_every, tick_atom::value);
      },
  };
}

}  // namespace shoal::actors
