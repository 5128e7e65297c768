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
#include <functional>
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
  if (!s.value("standby", std::string()).empty())
    fmt::print("head {}, standby {}\n\n", s.value("head", std::string()), s.value("standby", std::string()));
  fmt::print("{:<16} {:<8} {:>8} {:>9} {:>12} {:>22}  {}\n", "node", "state", "pid", "restarts", "answered",
             "memory placed/offered", "last failure");
  auto megabytes = [](const nlohmann::json& n, const char* key) {
    const auto bytes = n.value(key, std::uint64_t{0});
    return bytes == 0 ? std::string("?") : fmt::format("{:.0f} MB", static_cast<double>(bytes) / 1e6);
  };
  for (const auto& n : s["nodes"]) {
    const auto state = n.value("down", false) ? "dead" : n.value("joined", false) ? "up" : "absent";
    const auto beat = n.contains("last_heartbeat_ms") ? fmt::format("{} ms ago", n["last_heartbeat_ms"].get<std::int64_t>())
                                                      : std::string("-");
    const auto memory = fmt::format("{} / {}", megabytes(n, "memory_placed_bytes"), megabytes(n, "memory_offered_bytes"));
    fmt::print("{:<16} {:<8} {:>8} {:>9} {:>12} {:>22}  {}\n", n.value("name", std::string()), state, n.value("pid", 0),
               n.value("restarts", 0), beat, memory, n.value("down_reason", std::string()));
  }
  fmt::print("\n{:<16} {:<18} {:<10} {}\n", "actor", "on node", "phase", "error");
  for (std::size_t i = 0; i < s["stages"].size(); ++i) {
    const auto& a = s["stages"][i];
    fmt::print("{:<16} {:<18} {:<10} {}\n", fmt::format("stage {}", i), a.value("node", std::string()),
               a.value("phase", std::string()), a.value("error", std::string()));
  }
  for (std::size_t j = 0; j < s["experts"].size(); ++j) {
    const auto& a = s["experts"][j];
    if (a.value("phase", std::string()) == "stopped") continue;  // a retired copy
    std::string experts;
    if (a.contains("experts")) {
      const auto ids = a["experts"].get<std::vector<std::int64_t>>();
      experts = ids.size() == 1 ? fmt::format("expert {}", ids[0])
                                : ids.empty() ? std::string("none (retiring)")
                                              : fmt::format("experts {}-{} ({})", ids.front(), ids.back(), ids.size());
    }
    fmt::print("{:<16} {:<18} {:<10} {} {}\n", fmt::format("expert group {}", j), a.value("node", std::string()),
               a.value("phase", std::string()), experts, a.value("error", std::string()));
  }
  if (s.value("changes_pending", 0) > 0) fmt::print("changes under way: {}\n", s["changes_pending"].get<int>());
  if (s.contains("scheduler")) {
    const auto& q = s["scheduler"];
    fmt::print("\nrequests {} (waiting {}, running {})  cache blocks {}/{} ({} kept for prefixes)  preemptions {}\n"
               "steps {}  failed steps {}  replayed requests {}\n",
               q.value("requests", 0), q.value("waiting", 0), q.value("running", 0), q.value("cache_blocks_used", 0),
               q.value("cache_blocks_total", 0), q.value("prefix_cache_blocks", 0), q.value("preemptions", 0),
               q.value("steps", 0), q.value("failed_steps", 0), q.value("replayed_requests", 0));
    if (q.contains("versions") && !q["versions"].empty()) {
      fmt::print("\n{:<24} {:>7} {:>10} {:>10}  {}\n", "model version", "weight", "requests", "fallbacks", "where");
      for (const auto& v : q["versions"]) {
        std::string where = "this cluster";
        if (!v.value("local", false))
          where = fmt::format("{} ({})", v.value("head", std::string()),
                              v.value("connected", false) ? "connected"
                                                          : "not connected: " + v.value("error", std::string()));
        fmt::print("{:<24} {:>7} {:>10} {:>10}  {}\n", v.value("name", std::string()), v.value("weight", 0),
                   v.value("requests", 0), v.value("fallbacks", 0), where);
      }
    }
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
  if (s.contains("expert_load")) {
    const auto& l = s["expert_load"];
    fmt::print("\nexpert load over the last {:.0f} s (window {} s): imbalance {:.3f} (heaviest expert node / mean)\n",
               l.value("nodes_measured_s", 0.0), l.value("window_s", 0), l.value("imbalance", 0.0));
    for (const auto& [node, rows] : l["per_node"].items())
      fmt::print("  {:<16} {:>12.0f} rows\n", node, rows.get<double>());
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
  std::string token_file;
  bool json = false;
  int timeout_s = 300;
  // The command's own arguments.
  std::string node;
  std::string from;
  std::int64_t expert = -1;
  bool dry_run = false;
  int max_copies = 8;
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

// Waits until the head reports no change under way and serves, printing what is left now and
// then; `done` may ask for more (a drained node holding nothing).
void wait_settled(shoal::client& client, const std::string& what, int timeout_s,
                  const std::function<std::string(const nlohmann::json&)>& left = {}) {
  const auto start = std::chrono::steady_clock::now();
  const auto deadline = start + std::chrono::seconds(timeout_s);
  auto last_report = start;
  while (true) {
    const auto s = nlohmann::json::parse(client.status());
    const auto pending = s.value("changes_pending", 0);
    const auto extra = left ? left(s) : std::string();
    if (pending == 0 && extra.empty() && s.value("serving", false)) break;
    const auto now = std::chrono::steady_clock::now();
    const auto state = s.value("serving", false) ? std::string("serving") : s.value("degraded", std::string("not serving"));
    if (now > deadline)
      fail(errc::deadline_exceeded, "{}: not finished after {} s ({} changes under way{}; cluster: {})", what, timeout_s,
           pending, extra.empty() ? "" : ", " + extra, state);
    if (now - last_report > std::chrono::seconds(5)) {
      fmt::print(stderr, "[admin] {}: {} changes under way{} ({})\n", what, pending, extra.empty() ? "" : ", " + extra,
                 state);
      last_report = now;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  const std::chrono::duration<double> took = std::chrono::steady_clock::now() - start;
  fmt::print(stderr, "[admin] {}: done in {:.1f} s; the cluster serves on the new placement\n", what, took.count());
}

void print_rebalance(const nlohmann::json& r) {
  fmt::print("measured imbalance {:.3f}; predicted from the expert loads over {:.0f} s: {:.3f} -> {:.3f}\n",
             r.value("measured_imbalance", 0.0), r.value("window_s", 0.0), r.value("predicted_imbalance_before", 0.0),
             r.value("predicted_imbalance_after", 0.0));
  if (r["actions"].empty()) {
    fmt::print("nothing to do: no copy of a hot expert lowers the heaviest expert node's load\n");
    return;
  }
  fmt::print("{:<10} {:<16}\n", "copy of", "onto node");
  for (const auto& a : r["actions"])
    fmt::print("expert {:<3} {:<16}\n", a["replicate"].get<std::int64_t>(), a["to"].get<std::string>());
  fmt::print("{:<16} {:>14} {:>14}\n", "node", "load before", "load after");
  for (const auto& [node, load] : r["predicted_before"].items())
    fmt::print("{:<16} {:>14.0f} {:>14.0f}\n", node, load.get<double>(), r["predicted_after"].value(node, 0.0));
}

// A command that changes the running cluster: sends it with the admin token, then follows it
// until the new placement serves.
void add_admin_change(CLI::App& admin, const std::string& command, const std::string& help) {
  auto o = std::make_shared<change_options>();
  auto* cmd = admin.add_subcommand(command, help);
  if (command == "drain" || command == "undrain") {
    cmd->add_option("node", o->node, "Node name from the cluster config")->required();
  } else if (command != "rebalance") {
    cmd->add_option("expert", o->expert, "Routed expert id (the same in every MoE layer)")->required()->check(CLI::NonNegativeNumber);
    if (command == "drop-replica")
      cmd->add_option("--from", o->node, "Node whose copy stops serving it")->required();
    else
      cmd->add_option("--to", o->node, "Node that loads a copy")->required();
    if (command == "move-expert")
      cmd->add_option("--from", o->from, "Only the copy on this node moves (default: every copy elsewhere)");
  } else {
    cmd->add_flag("--dry-run", o->dry_run, "Show the plan and the predicted imbalance; change nothing");
    cmd->add_option("--max-copies", o->max_copies, "Copies of hot experts to add at most")
        ->capture_default_str()
        ->check(CLI::Range(1, 4096));
  }
  cmd->add_option("--cluster", o->cluster, "HOST:PORT of the head node")->required();
  add_join_secret_option(*cmd, o->join_secret_file);
  cmd->add_option("--token-file", o->token_file, "The cluster's admin token file (default: $SHOAL_ADMIN_TOKEN_FILE)");
  cmd->add_flag("--json", o->json, "Print the head's reply as JSON");
  cmd->add_option("--timeout", o->timeout_s, "Seconds to wait for the new placement to serve")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->callback([o, command] {
    const auto [host, port] = parse_head(o->cluster);
    const auto token = read_token(o->token_file);
    std::vector<std::string> args;
    std::string what;
    if (command == "drain" || command == "undrain") {
      args = {o->node};
      what = fmt::format("{} {}", command, o->node);
    } else if (command == "rebalance") {
      args = {o->dry_run ? "dry-run" : "apply", std::to_string(o->max_copies)};
      what = "rebalance";
    } else {
      args = {std::to_string(o->expert), o->node};
      if (!o->from.empty()) args.push_back(o->from);
      what = fmt::format("{} {} {} {}", command, o->expert, command == "drop-replica" ? "from" : "to", o->node);
    }
    auto client = shoal::client::connect(host, port, std::chrono::seconds(10), join_secret_from(o->join_secret_file));
    const auto reply = nlohmann::json::parse(client->admin(command, args, token));
    if (command == "rebalance" && !o->json) print_rebalance(reply);
    if (command != "undrain" && !(command == "rebalance" && o->dry_run)) {
      if (command == "drain") fmt::print(stderr, "[admin] draining {}: its stages and experts move to other nodes\n", o->node);
      std::function<std::string(const nlohmann::json&)> left;
      if (command == "drain")
        left = [node = o->node](const nlohmann::json& s) {
          std::size_t n = 0;
          for (const auto* list : {&s["stages"], &s["experts"]})
            for (const auto& a : *list)
              if (a.value("node", std::string()) == node && a.value("phase", std::string()) != "stopped") ++n;
          return n == 0 ? std::string() : fmt::format("{} actors still on {}", n, node);
        };
      wait_settled(*client, what, o->timeout_s, left);
      if (command == "drain")
        fmt::print(stderr, "[admin] {} is drained: it can be stopped without affecting clients\n", o->node);
    }
    if (o->json || command != "rebalance") fmt::print("{}\n", reply.dump());
    std::fflush(stdout);
  });
}

// Shares of the requests between model versions served side by side: takes effect with the
// next request, nothing to wait for.
void add_admin_split(CLI::App& admin) {
  auto o = std::make_shared<change_options>();
  auto shares = std::make_shared<std::vector<std::string>>();
  auto* cmd = admin.add_subcommand(
      "split", "Share the requests between this cluster's model version and the deployments of the others listed "
               "under versions in its config (canary, rollback): NAME=WEIGHT for each, versions not named get 0");
  cmd->add_option("shares", *shares, "NAME=WEIGHT, e.g. v1=95 v2=5 (v1=1 alone sends everything to v1)")->required();
  cmd->add_option("--cluster", o->cluster, "HOST:PORT of the head node")->required();
  add_join_secret_option(*cmd, o->join_secret_file);
  cmd->add_option("--token-file", o->token_file, "The cluster's admin token file (default: $SHOAL_ADMIN_TOKEN_FILE)");
  cmd->add_flag("--json", o->json, "Print the head's reply as JSON");
  cmd->callback([o, shares] {
    const auto [host, port] = parse_head(o->cluster);
    const auto token = read_token(o->token_file);
    auto client = shoal::client::connect(host, port, std::chrono::seconds(10), join_secret_from(o->join_secret_file));
    const auto reply = nlohmann::json::parse(client->admin("split", *shares, token));
    if (o->json) {
      fmt::print("{}\n", reply.dump());
    } else {
      std::uint64_t total = 0;
      for (const auto& [name, weight] : reply["split"].items()) total += weight.get<std::uint64_t>();
      for (const auto& [name, weight] : reply["split"].items())
        fmt::print("{:<24} weight {:>7}  {:5.1f}% of new requests\n", name, weight.get<std::uint64_t>(),
                   100.0 * static_cast<double>(weight.get<std::uint64_t>()) / static_cast<double>(std::max<std::uint64_t>(total, 1)));
    }
    std::fflush(stdout);
  });
}

}  // namespace

void add_admin_commands(CLI::App& app) {
  auto* admin = app.add_subcommand("admin", "Operator's console: a running cluster's status, drains, expert copies and moves, rebalancing, "
                                            "offline placement planning");
  admin->require_subcommand(1);
  add_admin_plan(*admin);
  add_admin_status(*admin);
  add_admin_change(*admin, "drain",
                   "Move every stage and expert group off a node (requests in flight are recomputed, none fails), "
                   "so that it can be stopped; needs the cluster's admin token");
  add_admin_change(*admin, "undrain", "Let placement use a drained node again (nothing moves back by itself)");
  add_admin_change(*admin, "replicate-expert",
                   "Load another copy of a routed expert on a node; the stages send each layer's rows of that expert "
                   "to its least loaded copy");
  add_admin_change(*admin, "drop-replica",
                   "Stop serving an expert from one node's copy (refused for its last copy); a copy left with "
                   "nothing is unloaded once no step can reach it");
  add_admin_change(*admin, "move-expert",
                   "Load a copy of a routed expert on a node, switch to it once loaded, then retire the old copies; "
                   "serving goes on throughout");
  add_admin_split(*admin);
  add_admin_change(*admin, "rebalance",
                   "From the expert loads measured over the load window, add copies of hot experts on the least "
                   "loaded expert nodes (within their memory); --dry-run shows the plan and predicted imbalance");
}

}  // namespace shoal::tools
