#include "shoal/actors/supervisor.hpp"

#include "shoal/actors/fabric.hpp"

#include <caf/actor_cast.hpp>
#include <caf/scoped_actor.hpp>
#include <caf/system_messages.hpp>

#include <nlohmann/json.hpp>

namespace shoal::actors {
namespace {

using self_ptr = supervisor_actor::stateful_pointer<supervisor_state>;

void fail_cluster(self_ptr self, errc code, std::string message) {
  auto& st = self->state;
  st.serving = false;
  if (st.failure.empty()) st.failure = message;
  for (auto& rp : st.waiting) rp.deliver(to_caf_error(code, message));
  st.waiting.clear();
}

bool all_in(const std::vector<supervisor_state::placed>& v, placement_phase phase) {
  for (const auto& p : v)
    if (p.phase != phase) return false;
  return true;
}

void wire(self_ptr self) {
  auto& st = self->state;
  st.table = placement_table{};
  st.table.epoch = ++st.epoch;
  st.table.router = {st.options.cluster.head, actor_ids::router};
  for (std::size_t i = 0; i < st.stages.size(); ++i) {
    const auto& spec = st.options.cluster.stages[i];
    st.table.stages.push_back({.stage = static_cast<std::uint32_t>(i),
                               .first_layer = static_cast<std::uint32_t>(spec.layer_begin),
                               .end_layer = static_cast<std::uint32_t>(spec.layer_end),
                               .address = st.stages[i].address});
  }
  for (std::size_t j = 0; j < st.experts.size(); ++j) {
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
    for (auto& s : st.stages) s.phase = placement_phase::serving;
    for (auto& e : st.experts) e.phase = placement_phase::serving;
    st.serving = true;
    for (auto& rp : st.waiting) rp.deliver(st.table);
    st.waiting.clear();
  };
  auto failed = [self](std::string what) {
    return [self, what](caf::error& e) {
      fail_cluster(self, errc::unavailable, fmt::format("wiring {} failed: {}", what, from_caf_error(e).what()));
    };
  };
  const auto timeout = st.options.ready_timeout;
  for (auto& s : st.stages) {
    auto handle = caf::actor_cast<stage_actor>(st.book->resolve(s.address));
    if (!handle) return fail_cluster(self, errc::unavailable, fmt::format("stage {}/{} is not reachable", s.address.node, s.address.actor));
    self->request(handle, timeout, wire_atom::value, st.table)
        .then([acked](ok_atom) { acked(); }, failed(fmt::format("stage on {}", s.address.node)));
  }
  self->request(st.router, timeout, wire_atom::value, st.table)
      .then([acked](ok_atom) { acked(); }, failed("the router"));
}

void spawn_stages(self_ptr self) {
  auto& st = self->state;
  const auto& c = st.options.cluster;
  // Every stage stores as many blocks as the router's scheduler hands out.
  std::uint32_t cache_blocks = 0;
  try {
    cache_blocks = static_cast<std::uint32_t>(config::cache_blocks_for(c, st.options.model));
  } catch (const shoal::error& e) {
    return fail_cluster(self, e.code(), e.what());
  }
  for (std::size_t i = 0; i < st.stages.size(); ++i) {
    auto& s = st.stages[i];
    s.phase = placement_phase::spawning;
    const auto& spec = c.stages[i];
    spawn_stage_cmd cmd{.actor = s.address.actor, .stage = static_cast<std::uint32_t>(i),
                        .stage_count = static_cast<std::uint32_t>(st.stages.size()),
                        .first_layer = static_cast<std::uint32_t>(spec.layer_begin),
                        .end_layer = static_cast<std::uint32_t>(spec.layer_end),
                        .hold_experts = c.expert_groups.empty(), .model_path = c.model.string(),
                        .cache_blocks = cache_blocks, .block_tokens = static_cast<std::uint32_t>(c.block_tokens)};
    self->request(st.members[spec.node].agent, st.options.ready_timeout, std::move(cmd))
        .then(
            [self, i](ok_atom) {
              auto& st = self->state;
              st.stages[i].phase = placement_phase::running;
              if (all_in(st.stages, placement_phase::running) && st.failure.empty()) wire(self);
            },
            [self, i](caf::error& e) {
              auto& st = self->state;
              st.stages[i].phase = placement_phase::failed;
              st.stages[i].error = from_caf_error(e).what();
              fail_cluster(self, from_caf_error(e).code(), st.stages[i].error);
            });
  }
}

void place(self_ptr self) {
  auto& st = self->state;
  const auto& c = st.options.cluster;
  if (st.experts.empty()) return spawn_stages(self);
  for (std::size_t j = 0; j < st.experts.size(); ++j) {
    auto& e = st.experts[j];
    e.phase = placement_phase::spawning;
    spawn_expert_cmd cmd{.actor = e.address.actor, .experts = {}, .model_path = c.model.string()};
    for (auto id : c.expert_groups[j].experts) cmd.experts.push_back(static_cast<std::uint32_t>(id));
    self->request(st.members[e.address.node].agent, st.options.ready_timeout, std::move(cmd))
        .then(
            [self, j](ok_atom) {
              auto& st = self->state;
              st.experts[j].phase = placement_phase::running;
              if (all_in(st.experts, placement_phase::running) && st.failure.empty()) spawn_stages(self);
            },
            [self, j](caf::error& e) {
              auto& st = self->state;
              st.experts[j].phase = placement_phase::failed;
              st.experts[j].error = from_caf_error(e).what();
              fail_cluster(self, from_caf_error(e).code(), st.experts[j].error);
            });
  }
}

std::string pending_summary(const supervisor_state& st) {
  std::vector<std::string> parts;
  for (const auto& [name, m] : st.members)
    if (!m.agent) parts.push_back(fmt::format("node {} (not joined)", name));
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

std::string head_status(caf::actor_system& system, const supervisor_actor& supervisor, const router_actor& router) {
  caf::scoped_actor self{system};
  std::optional<shoal::error> failure;
  auto ask = [&](const auto& actor) {
    std::string out;
    self->request(actor, std::chrono::seconds(10), status_atom::value)
        .receive([&](std::string& s) { out = std::move(s); }, [&](caf::error& e) { failure = from_caf_error(e); });
    if (failure) throw *failure;
    return nlohmann::json::parse(out);
  };
  auto status = ask(supervisor);
  status["scheduler"] = ask(router);
  return status.dump();
}

supervisor_actor::behavior_type make_supervisor(supervisor_actor::stateful_pointer<supervisor_state> self,
                                                supervisor_options options, std::shared_ptr<fabric> book,
                                                router_actor router) {
  auto& st = self->state;
  st.options = std::move(options);
  st.book = std::move(book);
  st.router = std::move(router);
  st.started = std::chrono::steady_clock::now();
  for (const auto& n : st.options.cluster.nodes) st.members[n.name] = {};
  for (std::size_t i = 0; i < st.options.cluster.stages.size(); ++i)
    st.stages.push_back({.address = {st.options.cluster.stages[i].node, actor_ids::first_stage + i},
                         .phase = placement_phase::pending, .error = {}});
  for (std::size_t j = 0; j < st.options.cluster.expert_groups.size(); ++j)
    st.experts.push_back({.address = {st.options.cluster.expert_groups[j].node, actor_ids::first_expert + j},
                          .phase = placement_phase::pending, .error = {}});
  self->set_down_handler([self](caf::down_msg& msg) {
    auto& st = self->state;
    for (auto& [name, m] : st.members) {
      if (!m.agent || m.agent.address() != msg.source) continue;
      m.down = true;
      ++st.epoch;  // fences messages of the placement that included it
      for (auto* v : {&st.stages, &st.experts})
        for (auto& p : *v)
          if (p.address.node == name) {
            p.phase = placement_phase::failed;
            p.error = fmt::format("node {} went down", name);
          }
      fail_cluster(self, errc::unavailable, fmt::format("node {} went down; its stages and experts failed", name));
    }
  });
  self->delayed_send(self, std::chrono::milliseconds(200), tick_atom::value);
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
        if (it->second.agent)
          return to_caf_error(errc::aborted, fmt::format("node '{}' has already joined (pid {})", info.node,
                                                         it->second.info.pid));
        it->second.agent = std::move(agent);
        it->second.info = std::move(info);
        self->monitor(it->second.agent);
        bool all = true;
        for (const auto& [name, m] : st.members) all = all && m.agent;
        if (all) place(self);
        return st.epoch;
      },
      [self](ready_atom) -> caf::result<placement_table> {
        auto& st = self->state;
        if (st.serving) return st.table;
        if (!st.failure.empty()) return to_caf_error(errc::unavailable, st.failure);
        auto rp = self->make_response_promise<placement_table>();
        st.waiting.push_back(rp);
        return rp;
      },
      [self](status_atom) -> std::string {
        auto& st = self->state;
        nlohmann::json j;
        j["epoch"] = st.epoch;
        j["serving"] = st.serving;
        j["failure"] = st.failure;
        j["config"] = st.options.cluster.source.string();
        auto& nodes = j["nodes"] = nlohmann::json::array();
        for (const auto& [name, m] : st.members)
          nodes.push_back({{"name", name}, {"joined", static_cast<bool>(m.agent)}, {"down", m.down},
                           {"pid", m.info.pid}});
        auto list = [](const std::vector<supervisor_state::placed>& v) {
          auto a = nlohmann::json::array();
          for (const auto& p : v)
            a.push_back({{"node", p.address.node}, {"actor", p.address.actor},
                         {"phase", placement_phase_name(p.phase)}, {"error", p.error}});
          return a;
        };
        j["stages"] = list(st.stages);
        j["experts"] = list(st.experts);
        return j.dump();
      },
      [self](tick_atom) {
        auto& st = self->state;
        if (st.serving || !st.failure.empty()) return;
        if (std::chrono::steady_clock::now() - st.started > st.options.ready_timeout) {
          fail_cluster(self, errc::deadline_exceeded,
                       fmt::format("the cluster was not ready within {} ms; still waiting for: {}",
                                   st.options.ready_timeout.count(), pending_summary(st)));
          return;
        }
        self->delayed_send(self, std::chrono::milliseconds(200), tick_atom::value);
      },
  };
}

}  // namespace shoal::actors
