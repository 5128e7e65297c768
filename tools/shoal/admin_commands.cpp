// shoal admin: the operator's console. `plan` runs the expert-placement planner offline on a
// loads file; the subcommands that act on a running cluster join the group here, each with an
// add_admin_* function of its own.

#include "commands.hpp"

#include "shoal/actors/client.hpp"
#include "shoal/base/error.hpp"
#include "shoal/runtime/expert_planner.hpp"

#include <CLI/CLI.hpp>
#include <fmt/core.h>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <thread>
#include <cstdlib>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <iterator>
#include <memory>
#include <sstream>
#include <string>

namespace shoal::tools {
namespace {

struct plan_options {
  std::string loads;
  bool json = false;
};

std::string read_loads(const std::string& path) {
  if (path == "-") return {std::istreambuf_iterator<char>(std::cin), std::istreambuf_iterator<char>()};
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(errc::not_found, "--loads: cannot open {}", path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

void print_plan_summary(const runtime::expert_plan_request& request, const runtime::expert_plan& plan,
                        double seconds) {
  fmt::print("{} layers x {} experts -> {} slots on {} devices ({} nodes, {} groups), policy {}\n",
             request.loads.size(), request.loads.front().size(), request.slots, request.gpus, request.nodes,
             request.groups, plan.group_per_node ? "group per node" : "global");
  fmt::print("layer  imbalance (heaviest device / mean)\n");
  double worst = 0;
  double sum = 0;
  for (std::size_t l = 0; l < plan.layers.size(); ++l) {
    fmt::print("{:>5}  {:.4f}\n", l, plan.layers[l].imbalance);
    worst = std::max(worst, plan.layers[l].imbalance);
    sum += plan.layers[l].imbalance;
  }
  fmt::print("imbalance: max {:.4f}, mean {:.4f}; planned in {:.1f} ms; --json prints the slots\n", worst,
             sum / static_cast<double>(plan.layers.size()), seconds * 1e3);
}

void add_admin_plan(CLI::App& admin) {
  auto o = std::make_shared<plan_options>();
  auto* cmd = admin.add_subcommand(
      "plan", "Plan expert replicas and placement from a loads file, offline (no cluster): which logical expert "
              "each physical slot holds, and the predicted imbalance per layer");
  cmd->add_option("--loads", o->loads,
                  "JSON file (- for stdin): {\"loads\": [[load per expert] per layer], \"slots\": S, \"nodes\": N, "
                  "\"gpus\": G, \"groups\": g}")
      ->required();
  cmd->add_flag("--json", o->json, "Print the plan as JSON: {\"layers\": [{\"slots\": [...], \"imbalance\": x}], ...}");
  cmd->callback([o] {
    const auto request = runtime::parse_expert_plan_request(read_loads(o->loads));
    const auto start = std::chrono::steady_clock::now();
    const auto plan = runtime::plan_experts(request);
    const std::chrono::duration<double> seconds = std::chrono::steady_clock::now() - start;
    if (o->json) {
      fmt::print("{}\n", runtime::expert_plan_to_json(request, plan));
    } else {
      print_plan_summary(request, plan, seconds.count());
    }
    std::fflush(stdout);
  });
}

// HOST:PORT of a head node, or a refusal naming the option.
std::pair<std::string, std::uint16_t> parse_head(const std::string& spec) {
  auto address = head_address(spec);
  if (!address) fail(errc::invalid_argument, "--cluster '{}' is not HOST:PORT of a head node (shoal launch prints it)", spec);
  return *address;
}

// The status for people: health first, then nodes, placement, scheduler and expert load.
void print_status(const nlohmann::json& s) {
  const bool serving = s.value("serving", false);
  std::string health = serving ? "serving" : "NOT SERVING";
  if (!s.value("failure", std::string()).empty())
    health += ": " + s["failure"].get<std::string>();
  else if (!s.value("degraded", std::string()).empty())
    health += ": " + s["degraded"].get<std::string>();
  fmt::print("cluster {}  epoch {}  recoveries {}  refused connections {}\n{}\n\n", s.value("config", std::string()),
             s.value("epoch", 0), s.value("recoveries", 0), s.value("refused_peers", 0), health);
  fmt::print("{:<16} {:<8} {:>8} {:>9} {:>12}  {}\n", "node", "state", "pid", "restarts", "answered", "last failure");
  for (const auto& n : s["nodes"]) {
    const auto state = n.value("down", false) ? "dead" : n.value("joined", false) ? "up" : "absent";
    const auto beat = n.contains("last_heartbeat_ms") ? fmt::format("{} ms ago", n["last_heartbeat_ms"].get<std::int64_t>())
                                                      : std::string("-");
    fmt::print("{:<16} {:<8} {:>8} {:>9} {:>12}  {}\n", n.value("name", std::string()), state, n.value("pid", 0),
               n.value("restarts", 0), beat, n.value("down_reason", std::string()));
  }
  fmt::print("\n{:<16} {:<18} {:<10} {}\n", "actor", "on node", "phase", "error");
  for (std::size_t i = 0; i < s["stages"].size(); ++i) {
    const auto& a = s["stages"][i];
    fmt::print("{:<16} {:<18} {:<10} {}\n", fmt::format("stage {}", i), a.value("node", std::string()),
               a.value("phase", std::string()), a.value("error", std::string()));
  }
  for (std::size_t j = 0; j < s["experts"].size(); ++j) {
    const auto& a = s["experts"][j];
    fmt::print("{:<16} {:<18} {:<10} {}\n", fmt::format("expert group {}", j), a.value("node", std::string()),
               a.value("phase", std::string()), a.value("error", std::string()));
  }
  if (s.contains("scheduler")) {
    const auto& q = s["scheduler"];
    fmt::print("\nrequests {} (waiting {}, running {})  cache blocks {}/{} ({} kept for prefixes)  preemptions {}\n"
               "steps {}  failed steps {}  replayed requests {}\n",
               q.value("requests", 0), q.value("waiting", 0), q.value("running", 0), q.value("cache_blocks_used", 0),
               q.value("cache_blocks_total", 0), q.value("prefix_cache_blocks", 0), q.value("preemptions", 0),
               q.value("steps", 0), q.value("failed_steps", 0), q.value("replayed_requests", 0));
  }
  if (s.contains("routed_tokens")) {
    std::uint64_t total = 0, hottest = 0;
    std::size_t hot = 0, used = 0;
    const auto& routed = s["routed_tokens"];
    for (std::size_t i = 0; i < routed.size(); ++i) {
      const auto n = routed[i].get<std::uint64_t>();
      total += n;
      if (n > 0) ++used;
      if (n > hottest) {
        hottest = n;
        hot = i;
      }
    }
    fmt::print("routed tokens {} over {} (layer, expert) pairs; hottest: index {} with {}\n", total, used, hot, hottest);
  }
}

struct status_options {
  std::string cluster;
  std::string join_secret_file;
  bool json = false;
  int timeout_s = 10;
};

void add_admin_status(CLI::App& admin) {
  auto o = std::make_shared<status_options>();
  auto* cmd = admin.add_subcommand("status", "A running cluster's health: nodes (dead, restarts, heartbeats), placement, "
                                             "epoch, scheduler counters, routed tokens");
  cmd->add_option("--cluster", o->cluster, "HOST:PORT of the head node")->required();
  add_join_secret_option(*cmd, o->join_secret_file);
  cmd->add_flag("--json", o->json, "Print the head's status JSON as is");
  cmd->add_option("--timeout", o->timeout_s, "Seconds to wait for the head")->capture_default_str()->check(CLI::PositiveNumber);
  cmd->callback([o] {
    const auto [host, port] = parse_head(o->cluster);
    const auto timeout = std::chrono::seconds(o->timeout_s);
    auto client = shoal::client::connect(host, port, timeout, join_secret_from(o->join_secret_file));
    const auto status = nlohmann::json::parse(client->status(timeout));
    if (o->json)
      fmt::print("{}\n", status.dump());
    else
      print_status(status);
    std::fflush(stdout);
  });
}

struct change_options {
  std::string cluster;
  std::string join_secret_file;
  std::string node;
  std::string token_file;
  int timeout_s = 300;
};

std::string read_token(const std::string& option_value) {
  std::string path = option_value;
  if (path.empty())
    if (const char* env = std::getenv("SHOAL_ADMIN_TOKEN_FILE")) path = env;
  if (path.empty())
    fail(errc::invalid_argument, "--token-file (or SHOAL_ADMIN_TOKEN_FILE) must name the cluster's admin token file");
  std::ifstream in(path);
  if (!in) fail(errc::not_found, "{}: cannot read the admin token file", path);
  std::stringstream text;
  text << in.rdbuf();
  auto token = text.str();
  const auto first = token.find_first_not_of(" \t\r\n");
  const auto last = token.find_last_not_of(" \t\r\n");
  return first == std::string::npos ? std::string() : token.substr(first, last - first + 1);
}

// drain / undrain: the command, then (drain) progress until nothing is left on the node and
// the cluster serves on the new placement.
void add_admin_change(CLI::App& admin, const std::string& command, const std::string& help) {
  auto o = std::make_shared<change_options>();
  auto* cmd = admin.add_subcommand(command, help);
  cmd->add_option("node", o->node, "Node name from the cluster config")->required();
  cmd->add_option("--cluster", o->cluster, "HOST:PORT of the head node")->required();
  add_join_secret_option(*cmd, o->join_secret_file);
  cmd->add_option("--token-file", o->token_file, "The cluster's admin token file (default: $SHOAL_ADMIN_TOKEN_FILE)");
  cmd->add_option("--timeout", o->timeout_s, "Seconds to wait for the new placement to serve")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->callback([o, command] {
    const auto [host, port] = parse_head(o->cluster);
    const auto token = read_token(o->token_file);
    auto client = shoal::client::connect(host, port, std::chrono::seconds(10), join_secret_from(o->join_secret_file));
    const auto start = std::chrono::steady_clock::now();
    const auto reply = nlohmann::json::parse(client->admin(command, {o->node}, token));
    if (command == "drain") {
      fmt::print(stderr, "[admin] draining {}: its stages and experts move to other nodes\n", o->node);
      const auto deadline = start + std::chrono::seconds(o->timeout_s);
      while (true) {
        const auto s = nlohmann::json::parse(client->status());
        std::size_t left = 0;
        for (const auto* list : {&s["stages"], &s["experts"]})
          for (const auto& a : *list)
            if (a.value("node", std::string()) == o->node) ++left;
        if (left == 0 && s.value("serving", false)) break;
        if (std::chrono::steady_clock::now() > deadline)
          fail(errc::deadline_exceeded, "node {} still holds {} actors after {} s (cluster: {})", o->node, left,
               o->timeout_s, s.value("serving", false) ? "serving" : s.value("degraded", std::string("not serving")));
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
      }
      const std::chrono::duration<double> took = std::chrono::steady_clock::now() - start;
      fmt::print(stderr, "[admin] {} is drained ({:.1f} s): it can be stopped without affecting clients\n", o->node,
                 took.count());
    }
    fmt::print("{}\n", reply.dump());
    std::fflush(stdout);
  });
}

}  // namespace

void add_admin_commands(CLI::App& app) {
  auto* admin = app.add_subcommand("admin", "Operator's console: a running cluster's status, expert placement planning");
  admin->require_subcommand(1);
  add_admin_plan(*admin);
  add_admin_status(*admin);
  add_admin_change(*admin, "drain",
                   "Move every stage and expert group off a node (requests in flight are recomputed, none fails), "
                   "so that it can be stopped; needs the cluster's admin token");
  add_admin_change(*admin, "undrain", "Let placement use a drained node again (nothing moves back by itself)");
}

}  // namespace shoal::tools
