// The supervisor under CAF's deterministic test scheduler: joins that must be refused, the
// ready deadline naming what it still waits for, a failed spawn reaching the waiters.

#include "shoal/actors/fabric.hpp"
#include "shoal/actors/router.hpp"
#include "shoal/actors/supervisor.hpp"

#include <catch2/catch.hpp>
#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/scheduler/test_coordinator.hpp>
#include <caf/exit_reason.hpp>
#include <caf/scoped_actor.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <optional>
#include <string>

using namespace shoal::actors;

namespace {

// Refuses every spawn, as a node whose weights cannot load would.
node_agent_actor::behavior_type refusing_agent(node_agent_actor::pointer) {
  return {
      [](spawn_stage_cmd&) -> caf::result<ok_atom> {
        return to_caf_error(shoal::errc::not_found, "node b: model.safetensors.index.json: no such file");
      },
      [](spawn_expert_cmd&) -> caf::result<ok_atom> { return to_caf_error(shoal::errc::not_found, "unused"); },
      [](retire_actor_cmd&) -> caf::result<ok_atom> { return ok_atom::value; },
      [](weights_request&) -> caf::result<weights_part> { return to_caf_error(shoal::errc::not_found, "unused"); },
      [](stop_atom) {},
      [](heartbeat& h) { return h; },
  };
}

struct fixture {
  caf::actor_system_config cfg;
  std::unique_ptr<caf::actor_system> sys;
  caf::scheduler::test_coordinator* sched = nullptr;
  supervisor_actor supervisor;
  router_actor router;
  node_agent_actor agent;

  // The test scheduler only terminates actors when it runs them.
  ~fixture() {
    caf::anon_send_exit(supervisor, caf::exit_reason::user_shutdown);
    caf::anon_send_exit(router, caf::exit_reason::user_shutdown);
    caf::anon_send_exit(agent, caf::exit_reason::user_shutdown);
    supervisor = nullptr;
    router = nullptr;
    agent = nullptr;
    sched->run();
  }

  explicit fixture(std::chrono::milliseconds ready_timeout) {
    cfg.set("scheduler.policy", caf::atom("testing"));
    cfg.set("logger.verbosity", caf::atom("quiet"));
    sys = std::make_unique<caf::actor_system>(cfg);
    sched = &dynamic_cast<caf::scheduler::test_coordinator&>(sys->scheduler());
    auto cluster = shoal::config::parse_cluster_config(R"(model: ckpt
nodes:
  - {name: a, port: 1}
  - {name: b, port: 2}
plan:
  stages:
    - {node: a, layers: 0-0}
    - {node: b, layers: 1-1}
)",
                                                        "two.yaml", "/");
    shoal::config::model_config model;
    model.num_hidden_layers = 2;
    model.kv_lora_rank = 64;
    model.qk_rope_head_dim = 64;
    auto book = std::make_shared<fabric>();
    router = sys->spawn(make_router, router_options{.scheduling = {.cache_blocks = 64}}, book);
    supervisor = sys->spawn(make_supervisor, supervisor_options{cluster, model, ready_timeout}, book, router);
    agent = sys->spawn(refusing_agent);
    sched->run();
  }

  // Sends a join and runs the supervisor; returns the epoch or the error.
  std::pair<std::optional<std::uint64_t>, std::string> join(const std::string& node, std::uint16_t version) {
    caf::scoped_actor self{*sys};
    self->send(supervisor, join_atom::value, join_request{node, "h", 1, 42, version, 0}, agent);
    sched->run();
    std::pair<std::optional<std::uint64_t>, std::string> out;
    self->receive([&](std::uint64_t epoch) { out.first = epoch; },
                  [&](caf::error& e) { out.second = from_caf_error(e).what(); },
                  caf::after(std::chrono::seconds(1)) >> [&] { out.second = "no reply"; });
    return out;
  }
};

}  // namespace

TEST_CASE("the supervisor refuses unknown nodes, other schema versions and double joins") {
  fixture f(std::chrono::minutes(1));
  CHECK_THAT(f.join("a", schema_version + 1).second, Catch::Contains(fmt::format("node a speaks message schema version {}, this cluster speaks {}", schema_version + 1, schema_version)));
  CHECK_THAT(f.join("zz", schema_version).second, Catch::Contains("node 'zz' is not in the cluster config two.yaml (nodes: a, b)"));
  CHECK(f.join("a", schema_version).first == std::uint64_t{0});
  CHECK_THAT(f.join("a", schema_version).second, Catch::Contains("node 'a' has already joined (pid 42)"));
  caf::scoped_actor self{*f.sys};
  self->send(f.supervisor, status_atom::value);
  f.sched->run();
  self->receive([&](std::string& s) {
    const auto j = nlohmann::json::parse(s);
    CHECK(j["serving"] == false);
    CHECK(j["nodes"][0]["joined"] == true);
    CHECK(j["nodes"][1]["joined"] == false);
  });
}

TEST_CASE("waiting for readiness ends at the deadline saying what is missing") {
  fixture f(std::chrono::milliseconds(0));
  CHECK(f.join("a", schema_version).first);
  caf::scoped_actor self{*f.sys};
  self->send(f.supervisor, ready_atom::value);
  f.sched->run();
  f.sched->trigger_timeouts();
  f.sched->run();
  std::string message;
  self->receive([&](placement_table&) { message = "ready?"; }, [&](caf::error& e) { message = from_caf_error(e).what(); },
                caf::after(std::chrono::seconds(1)) >> [&] { message = "no reply"; });
  CHECK_THAT(message, Catch::Contains("not ready within 0 ms; still waiting for: node b (not joined), stage 0 on a (pending)"));
}

TEST_CASE("a stage that fails to load fails the waiters with the node's error") {
  fixture f(std::chrono::minutes(1));
  caf::scoped_actor self{*f.sys};
  self->send(f.supervisor, ready_atom::value);
  f.sched->run();
  CHECK(f.join("a", schema_version).first);
  CHECK(f.join("b", schema_version).first);  // the last join starts placement
  f.sched->run();
  std::string message;
  self->receive([&](placement_table&) { message = "ready?"; }, [&](caf::error& e) { message = from_caf_error(e).what(); },
                caf::after(std::chrono::seconds(1)) >> [&] { message = "no reply"; });
  CHECK_THAT(message, Catch::Contains("model.safetensors.index.json: no such file"));
}
