// The expert planner: layout, every expert placed, groups kept to nodes, at least as balanced as
// EPLB's published example, and bad requests refused with the field named. The comparison with
// EPLB on generated loads is tests/tools/planner_vs_eplb.py (tools_admin_plan_eplb_test).

#include "shoal/runtime/expert_planner.hpp"

#include "shoal/base/error.hpp"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <cmath>
#include <random>
#include <set>
#include <string>
#include <vector>

using shoal::runtime::expert_plan_request;
using shoal::runtime::parse_expert_plan_request;
using shoal::runtime::placement_imbalance;
using shoal::runtime::placement_nodes_per_group;
using shoal::runtime::plan_experts;

namespace {

// Lognormal loads with one hot expert per layer, from a fixed seed.
std::vector<std::vector<double>> skewed_loads(int layers, int experts, unsigned seed) {
  std::mt19937 rng(seed);
  std::lognormal_distribution<double> load(0.0, 1.0);
  std::vector<std::vector<double>> loads(layers, std::vector<double>(experts));
  for (auto& layer : loads) {
    for (auto& value : layer) value = std::round(load(rng) * 1000.0);
    layer[rng() % experts] *= 20;
  }
  return loads;
}

void check_layout(const expert_plan_request& request, const shoal::runtime::expert_plan& plan) {
  const int experts = static_cast<int>(request.loads.front().size());
  REQUIRE(plan.layers.size() == request.loads.size());
  for (std::size_t l = 0; l < plan.layers.size(); ++l) {
    const auto& slots = plan.layers[l].slots;
    REQUIRE(slots.size() == static_cast<std::size_t>(request.slots));
    std::set<int> placed(slots.begin(), slots.end());
    CHECK(placed.size() == static_cast<std::size_t>(experts));
    CHECK(*placed.begin() == 0);
    CHECK(*placed.rbegin() == experts - 1);
    CHECK(plan.layers[l].imbalance ==
          Approx(placement_imbalance(request.loads[l], slots, request.gpus)).epsilon(1e-12));
    CHECK(plan.layers[l].imbalance >= 1.0 - 1e-12);
  }
}

}  // namespace

TEST_CASE("the planner is at least as balanced as EPLB's README example", "[planner]") {
  // The example of https://github.com/deepseek-ai/EPLB (README): 2 layers of 12 experts in 4
  // groups, 16 slots on 2 nodes of 4 GPUs, and the plan EPLB prints for it.
  expert_plan_request request;
  request.loads = {{90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86},
                   {20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27}};
  request.slots = 16;
  request.nodes = 2;
  request.gpus = 8;
  request.groups = 4;
  const std::vector<std::vector<int>> eplb = {{5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1},
                                              {7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1}};
  const auto plan = plan_experts(request);
  check_layout(request, plan);
  CHECK(plan.group_per_node);
  for (std::size_t l = 0; l < 2; ++l) {
    CHECK(plan.layers[l].imbalance <= placement_imbalance(request.loads[l], eplb[l], request.gpus) + 1e-12);
    CHECK(placement_nodes_per_group(plan.layers[l].slots, 12, 2, 4) == 1);
  }
}

TEST_CASE("the planner keeps each group on one node when groups divide over nodes", "[planner]") {
  expert_plan_request request;
  request.loads = skewed_loads(6, 256, 7);
  request.slots = 320;
  request.nodes = 4;
  request.gpus = 32;
  request.groups = 8;
  const auto plan = plan_experts(request);
  check_layout(request, plan);
  CHECK(plan.group_per_node);
  for (const auto& layer : plan.layers) CHECK(placement_nodes_per_group(layer.slots, 256, 4, 8) == 1);
}

TEST_CASE("the planner places globally when groups do not divide over nodes", "[planner]") {
  expert_plan_request request;
  request.loads = skewed_loads(4, 64, 11);
  request.slots = 96;
  request.nodes = 3;
  request.gpus = 12;
  request.groups = 4;
  const auto plan = plan_experts(request);
  check_layout(request, plan);
  CHECK_FALSE(plan.group_per_node);
  // With 32 spare slots for 64 experts, the hot expert's copies spread its load thin.
  for (const auto& layer : plan.layers) CHECK(layer.imbalance < 1.1);
}

TEST_CASE("the planner handles zero, equal and single-expert loads", "[planner]") {
  expert_plan_request request;
  request.slots = 8;
  request.gpus = 4;
  request.loads = {{0, 0, 0, 0}, {5, 5, 5, 5}, {0, 0, 0, 9}};
  const auto plan = plan_experts(request);
  check_layout(request, plan);
  CHECK(plan.layers[0].imbalance == 1.0);
  CHECK(plan.layers[1].imbalance == Approx(1.0));
  // EPLB gives expert 3 all four spare slots: five copies on four devices, two of 9/5 on one
  // of them against a mean of 9/4 (1.6). One copy per device and the spare slots to idle
  // experts is perfect.
  CHECK(plan.layers[2].imbalance == Approx(1.0));
}

TEST_CASE("plan JSON carries the slots, imbalance and policy", "[planner]") {
  const auto request = parse_expert_plan_request(
      R"({"loads": [[1, 2, 3, 4], [4, 3, 2, 1]], "slots": 8, "nodes": 2, "gpus": 4, "groups": 2})");
  const auto plan = plan_experts(request);
  const auto json = nlohmann::json::parse(shoal::runtime::expert_plan_to_json(request, plan));
  REQUIRE(json["layers"].size() == 2);
  CHECK(json["layers"][0]["slots"].size() == 8);
  CHECK(json["layers"][1]["imbalance"].get<double>() == Approx(plan.layers[1].imbalance));
  CHECK(json["policy"] == "group_per_node");
  CHECK(json["max_nodes_per_group"] == 1);
  CHECK(json["imbalance"]["max"].get<double>() >= json["imbalance"]["mean"].get<double>());
}

TEST_CASE("bad plan requests are refused naming the field", "[planner]") {
  const std::string shape = R"(, "slots": 8, "nodes": 2, "gpus": 4, "groups": 2})";
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"[1, 2]", "loads file: must be a JSON object"},
      {"{\"loads\": [[1, 2, 3, 4]]", "loads file: not valid JSON"},
      {R"({"slots": 8, "gpus": 4})", "loads: missing"},
      {R"({"loads": []})" + std::string(), "slots: missing"},
      {R"({"loads": [])" + shape, "loads: no layers"},
      {R"({"loads": [[1, 2, 3, 4], [1, 2, 3]])" + shape, "loads[1]: 3 experts, but loads[0] has 4"},
      {R"({"loads": [[1, 2, -3, 4]])" + shape, "loads[0][2]: -3 is negative"},
      {R"({"loads": [[1, 2, "3", 4]])" + shape, "loads[0][2]: must be a number"},
      {R"({"loads": [[1, 2, true, 4]])" + shape, "loads[0][2]: must be a number"},
      {R"({"loads": [[1, 2, 1e999, 4]])" + shape, "number overflow parsing '1e999'"},
      {R"({"loads": [1, 2, 3, 4])" + shape, "loads[0]: must be a list"},
      {R"({"loads": [[1, 2, 3, 4]], "slots": 8, "nodes": 3, "gpus": 4})", "gpus: 4 is not a multiple of nodes (3)"},
      {R"({"loads": [[1, 2, 3, 4]], "slots": 10, "gpus": 4})", "gpus: 4 does not divide slots (10)"},
      {R"({"loads": [[1, 2, 3, 4]], "slots": 2, "gpus": 2})", "slots: 2 is fewer than the 4 experts"},
      {R"({"loads": [[1, 2, 3, 4]], "slots": 8, "gpus": 4, "groups": 3})", "groups: 3 does not divide the 4 experts"},
      {R"({"loads": [[1, 2, 3, 4]], "slots": 8.5, "gpus": 4})", "slots: must be a positive integer"},
      {R"({"loads": [[1, 2, 3, 4]], "slots": "8", "gpus": 4})", "slots: must be a positive integer"},
      {R"({"loads": [[1, 2, 3, 4]], "slots": 8, "gpus": 0})", "gpus: must be between 1 and"},
      {R"({"loads": [[1, 2, 3, 4]], "slots": 8, "gpu": 4})", "gpu: unknown field"},
  };
  for (const auto& [text, message] : cases) {
    INFO(text);
    try {
      parse_expert_plan_request(text);
      FAIL("accepted");
    } catch (const shoal::error& e) {
      CHECK(e.code() == shoal::errc::invalid_argument);
      CHECK_THAT(e.what(), Catch::Contains(message));
    }
  }
}
