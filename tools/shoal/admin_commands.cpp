// shoal admin: the operator's console. `plan` runs the expert-placement planner offline on a
// loads file; the subcommands that act on a running cluster join the group here, each with an
// add_admin_* function of its own.

#include "commands.hpp"

#include "shoal/base/error.hpp"
#include "shoal/runtime/expert_planner.hpp"

#include <CLI/CLI.hpp>
#include <fmt/core.h>

#include <algorithm>
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

}  // namespace

void add_admin_commands(CLI::App& app) {
  auto* admin = app.add_subcommand("admin", "Operator's console: expert placement (and, later, a running cluster)");
  admin->require_subcommand(1);
  add_admin_plan(*admin);
}

}  // namespace shoal::tools
