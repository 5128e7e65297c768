#include "shoal/runtime/expert_planner.hpp"

#include "shoal/base/error.hpp"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <numeric>
#include <queue>
#include <utility>

namespace shoal::runtime {
namespace {

// Past these a file is a mistake, not a cluster; they keep a plan's memory bounded.
constexpr int kMaxSlots = 1 << 16;
constexpr std::size_t kMaxLayers = 1 << 12;
// Swap rounds of the local search per placement domain; it converges in far fewer.
constexpr int kMaxSwapRounds = 4096;

// The plan of one placement domain (a node, or the whole cluster under the global policy):
// devices[d] lists the domain-local expert index of each slot of device d.
struct domain_placement {
  std::vector<std::vector<int>> devices;
};

// Replica counts that minimise the largest per-copy load (each extra slot goes to the expert
// whose copies carry the most, the lowest index on a tie). The seed is computed in float32, as
// EPLB computes it, so that our starting point is EPLB's own plan; the local search afterwards
// only ever lowers the heaviest device. Returns the local expert of each physical copy: every
// expert once in order, then the extra copies in the order they were added.
std::vector<int> replicate(const std::vector<float>& loads, int copies, std::vector<int>& count) {
  const int n = static_cast<int>(loads.size());
  count.assign(n, 1);
  std::vector<int> items(n);
  std::iota(items.begin(), items.end(), 0);
  auto heavier = [&](const std::pair<float, int>& a, const std::pair<float, int>& b) {
    return a.first < b.first || (a.first == b.first && a.second > b.second);
  };
  std::priority_queue<std::pair<float, int>, std::vector<std::pair<float, int>>, decltype(heavier)>
      queue(heavier);
  for (int e = 0; e < n; ++e) queue.emplace(loads[e], e);
  for (int extra = n; extra < copies; ++extra) {
    const int e = queue.top().second;
    queue.pop();
    items.push_back(e);
    ++count[e];
    queue.emplace(loads[e] / static_cast<float>(count[e]), e);
  }
  return items;
}

// Packs weighted items into `packs` packs of exactly items/packs each: heaviest first, each to
// the lightest pack with room (EPLB's greedy, float32 like it). Returns each pack's items.
std::vector<std::vector<int>> pack_greedy(const std::vector<float>& weight, int packs) {
  const int n = static_cast<int>(weight.size());
  const int per_pack = n / packs;
  std::vector<std::vector<int>> result(packs);
  if (per_pack == 1) {
    for (int i = 0; i < n; ++i) result[i].push_back(i);
    return result;
  }
  std::vector<int> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return weight[a] > weight[b]; });
  std::vector<float> sum(packs, 0.0f);
  for (const int item : order) {
    int best = -1;
    for (int p = 0; p < packs; ++p) {
      if (static_cast<int>(result[p].size()) < per_pack && (best < 0 || sum[p] < sum[best])) best = p;
    }
    result[best].push_back(item);
    sum[best] += weight[item];
  }
  return result;
}

// Lowers the heaviest pack by swapping one of its items with a lighter item of another pack,
// the swap that leaves the two packs' larger load smallest, until no swap helps. Every swap
// strictly lowers the larger of the two loads it touches, so the sorted load vector decreases
// and the search ends.
void improve_by_swaps(std::vector<std::vector<int>>& packs, const std::vector<double>& weight) {
  const int count = static_cast<int>(packs.size());
  if (count < 2) return;
  std::vector<double> load(count, 0.0);
  for (int p = 0; p < count; ++p) {
    for (const int item : packs[p]) load[p] += weight[item];
  }
  for (int round = 0; round < kMaxSwapRounds; ++round) {
    const int a = static_cast<int>(std::max_element(load.begin(), load.end()) - load.begin());
    const double tolerance = load[a] * 1e-12;
    double best = load[a] - tolerance;
    int best_b = -1;
    std::size_t best_i = 0;
    std::size_t best_j = 0;
    for (int b = 0; b < count; ++b) {
      if (b == a) continue;
      for (std::size_t i = 0; i < packs[a].size(); ++i) {
        const double wi = weight[packs[a][i]];
        for (std::size_t j = 0; j < packs[b].size(); ++j) {
          const double delta = wi - weight[packs[b][j]];
          if (delta <= 0) continue;
          const double larger = std::max(load[a] - delta, load[b] + delta);
          if (larger < best) {
            best = larger;
            best_b = b;
            best_i = i;
            best_j = j;
          }
        }
      }
    }
    if (best_b < 0) return;
    const double delta = weight[packs[a][best_i]] - weight[packs[best_b][best_j]];
    std::swap(packs[a][best_i], packs[best_b][best_j]);
    load[a] -= delta;
    load[best_b] += delta;
  }
}

// Device loads of a domain whose devices list local experts, each expert's load split over
// its `count` copies.
std::vector<double> device_loads(const std::vector<std::vector<int>>& devices, const std::vector<double>& load,
                                 const std::vector<int>& count) {
  std::vector<double> result(devices.size(), 0.0);
  for (std::size_t d = 0; d < devices.size(); ++d) {
    for (const int e : devices[d]) result[d] += load[e] / count[e];
  }
  return result;
}

// Lowers the heaviest device by giving one of its slots that holds a spare copy (of an expert
// with two or more) to another expert: the spare's expert gets heavier on its other devices,
// the receiving expert lighter on all of its. Makes the move that leaves the heaviest device of
// the domain lightest, if that is lighter than now; returns whether it moved.
bool move_one_copy(std::vector<std::vector<int>>& devices, const std::vector<double>& load, std::vector<int>& count) {
  const int n = static_cast<int>(devices.size());
  const std::vector<double> loads = device_loads(devices, load, count);
  std::vector<int> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int x, int y) { return loads[x] > loads[y]; });
  const int a = order.front();
  // holders[e]: the devices holding a copy of e, once per copy.
  std::vector<std::vector<int>> holders(load.size());
  for (int d = 0; d < n; ++d) {
    for (const int e : devices[d]) holders[e].push_back(d);
  }
  std::vector<double> change(n, 0.0);
  std::vector<char> touched(n, 0);
  double best = loads[a] * (1 - 1e-12);
  std::size_t best_slot = 0;
  int best_to = -1;
  for (std::size_t slot = 0; slot < devices[a].size(); ++slot) {
    const int x = devices[a][slot];
    if (count[x] < 2) continue;
    const double dx = load[x] / (count[x] - 1) - load[x] / count[x];
    for (int y = 0; y < static_cast<int>(load.size()); ++y) {
      if (y == x) continue;
      const double dy = load[y] / count[y] - load[y] / (count[y] + 1);
      for (const int d : holders[x]) change[d] += dx, touched[d] = 1;
      for (const int d : holders[y]) change[d] -= dy, touched[d] = 1;
      // Device a loses this copy of x (its share was counted above as growing) and gains y.
      change[a] += -load[x] / count[x] - dx + load[y] / (count[y] + 1);
      touched[a] = 1;
      double heaviest = 0;
      for (const int d : order) {
        if (!touched[d]) {
          heaviest = std::max(heaviest, loads[d]);
          break;
        }
      }
      for (const int d : holders[x]) heaviest = std::max(heaviest, loads[d] + change[d]);
      for (const int d : holders[y]) heaviest = std::max(heaviest, loads[d] + change[d]);
      heaviest = std::max(heaviest, loads[a] + change[a]);
      if (heaviest < best) {
        best = heaviest;
        best_slot = slot;
        best_to = y;
      }
      for (const int d : holders[x]) change[d] = 0, touched[d] = 0;
      for (const int d : holders[y]) change[d] = 0, touched[d] = 0;
      change[a] = 0;
      touched[a] = 0;
    }
  }
  if (best_to < 0) return false;
  --count[devices[a][best_slot]];
  ++count[best_to];
  devices[a][best_slot] = best_to;
  return true;
}

// Swaps copies between devices (improve_by_swaps) on a domain whose devices list local experts.
void swap_copies(std::vector<std::vector<int>>& devices, const std::vector<double>& load, const std::vector<int>& count) {
  std::vector<int> expert_of;
  std::vector<double> weight;
  std::vector<std::vector<int>> packs(devices.size());
  for (std::size_t d = 0; d < devices.size(); ++d) {
    for (const int e : devices[d]) {
      packs[d].push_back(static_cast<int>(expert_of.size()));
      expert_of.push_back(e);
      weight.push_back(load[e] / count[e]);
    }
  }
  improve_by_swaps(packs, weight);
  for (std::size_t d = 0; d < devices.size(); ++d) {
    for (std::size_t s = 0; s < packs[d].size(); ++s) devices[d][s] = expert_of[packs[d][s]];
  }
}

// Places the experts `experts` (logical ids, in the order EPLB numbers them inside the domain)
// on `devices` devices of `per_device` slots.
domain_placement place_domain(const std::vector<double>& layer, const std::vector<int>& experts,
                              int devices, int per_device) {
  const int n = static_cast<int>(experts.size());
  std::vector<float> load32(n);
  for (int e = 0; e < n; ++e) load32[e] = static_cast<float>(layer[experts[e]]);
  std::vector<int> count;
  const std::vector<int> items = replicate(load32, devices * per_device, count);
  std::vector<float> item_load32(items.size());
  std::vector<double> item_load(items.size());
  for (std::size_t i = 0; i < items.size(); ++i) {
    item_load32[i] = load32[items[i]] / static_cast<float>(count[items[i]]);
    item_load[i] = layer[experts[items[i]]] / count[items[i]];
  }
  std::vector<std::vector<int>> packs = pack_greedy(item_load32, devices);
  improve_by_swaps(packs, item_load);
  domain_placement placement;
  placement.devices.resize(devices);
  for (int d = 0; d < devices; ++d) {
    for (const int item : packs[d]) placement.devices[d].push_back(items[item]);
  }
  // Then move spare copies from the heaviest device to other experts, re-swapping after each.
  std::vector<double> load(n);
  for (int e = 0; e < n; ++e) load[e] = layer[experts[e]];
  for (int round = 0; round < kMaxSwapRounds && move_one_copy(placement.devices, load, count); ++round) {
    swap_copies(placement.devices, load, count);
  }
  return placement;
}

// Lowers the heaviest node by swapping whole groups between nodes (the same search as for
// device packs, on group loads).
std::vector<std::vector<int>> improve_group_packing(std::vector<std::vector<int>> nodes,
                                                    const std::vector<double>& group_load) {
  improve_by_swaps(nodes, group_load);
  return nodes;
}

// One layer under a given assignment of groups to nodes (`node_groups[n]` lists node n's
// groups in the order their experts are numbered on the node).
std::vector<int> place_layer(const std::vector<double>& layer, const expert_plan_request& request,
                             const std::vector<std::vector<int>>& node_groups) {
  const int group_size = static_cast<int>(layer.size()) / request.groups;
  const int devices_per_node = request.gpus / request.nodes;
  const int per_device = request.slots / request.gpus;
  std::vector<int> slots(request.slots, -1);
  for (std::size_t node = 0; node < node_groups.size(); ++node) {
    std::vector<int> experts;
    for (const int group : node_groups[node]) {
      for (int k = 0; k < group_size; ++k) experts.push_back(group * group_size + k);
    }
    const domain_placement placement = place_domain(layer, experts, devices_per_node, per_device);
    for (int d = 0; d < devices_per_node; ++d) {
      const std::size_t first =
          (node * devices_per_node + static_cast<std::size_t>(d)) * static_cast<std::size_t>(per_device);
      for (int s = 0; s < per_device; ++s) slots[first + s] = experts[placement.devices[d][s]];
    }
  }
  return slots;
}

expert_layer_plan plan_layer(const std::vector<double>& layer, const expert_plan_request& request,
                             bool group_per_node) {
  const int experts = static_cast<int>(layer.size());
  std::vector<std::vector<std::vector<int>>> candidates;
  if (!group_per_node) {
    // EPLB's global policy: one domain, experts in index order.
    candidates.push_back({std::vector<int>{0}});
    expert_plan_request whole = request;
    whole.groups = 1;
    whole.nodes = 1;
    expert_layer_plan plan;
    plan.slots = place_layer(layer, whole, candidates.front());
    plan.imbalance = placement_imbalance(layer, plan.slots, request.gpus);
    return plan;
  }
  const int group_size = experts / request.groups;
  std::vector<float> group_load32(request.groups, 0.0f);
  std::vector<double> group_load(request.groups, 0.0);
  for (int g = 0; g < request.groups; ++g) {
    for (int k = 0; k < group_size; ++k) {
      group_load32[g] += static_cast<float>(layer[g * group_size + k]);
      group_load[g] += layer[g * group_size + k];
    }
  }
  // EPLB's assignment of groups to nodes, then the same improved by swapping groups; each is
  // placed in full and the better layer kept, so the plan is never worse than the first.
  std::vector<std::vector<int>> seed = pack_greedy(group_load32, request.nodes);
  candidates.push_back(seed);
  std::vector<std::vector<int>> swapped = improve_group_packing(seed, group_load);
  if (swapped != seed) candidates.push_back(std::move(swapped));
  expert_layer_plan best;
  best.imbalance = std::numeric_limits<double>::infinity();
  for (const auto& node_groups : candidates) {
    std::vector<int> slots = place_layer(layer, request, node_groups);
    const double imbalance = placement_imbalance(layer, slots, request.gpus);
    if (imbalance < best.imbalance) {
      best.slots = std::move(slots);
      best.imbalance = imbalance;
    }
  }
  return best;
}

int positive_int_field(const nlohmann::json& spec, const char* name, bool required) {
  const auto it = spec.find(name);
  if (it == spec.end()) {
    if (required) fail(errc::invalid_argument, "{}: missing (a positive integer)", name);
    return 1;
  }
  if (!it->is_number_integer()) {
    fail(errc::invalid_argument, "{}: must be a positive integer, got {}", name, it->dump());
  }
  const auto value = it->get<long long>();
  if (value < 1 || value > kMaxSlots) {
    fail(errc::invalid_argument, "{}: must be between 1 and {}, got {}", name, kMaxSlots, value);
  }
  return static_cast<int>(value);
}

}  // namespace

expert_plan_request parse_expert_plan_request(std::string_view json_text) {
  nlohmann::json spec;
  try {
    spec = nlohmann::json::parse(json_text);
  } catch (const nlohmann::json::exception& e) {
    // parse_error, and out_of_range for a number beyond double (1e999).
    fail(errc::invalid_argument, "loads file: not valid JSON: {}", e.what());
  }
  if (!spec.is_object()) {
    fail(errc::invalid_argument,
         "loads file: must be a JSON object with loads, slots, nodes, gpus and groups");
  }
  for (const auto& [key, value] : spec.items()) {
    if (key != "loads" && key != "slots" && key != "nodes" && key != "gpus" && key != "groups") {
      fail(errc::invalid_argument, "{}: unknown field (expected loads, slots, nodes, gpus, groups)",
           key);
    }
  }
  expert_plan_request request;
  const auto loads = spec.find("loads");
  if (loads == spec.end()) fail(errc::invalid_argument, "loads: missing (a list of layers)");
  if (!loads->is_array()) {
    fail(errc::invalid_argument, "loads: must be a list of layers, each a list of loads per expert");
  }
  if (loads->size() > kMaxLayers) {
    fail(errc::invalid_argument, "loads: {} layers, at most {}", loads->size(), kMaxLayers);
  }
  for (std::size_t l = 0; l < loads->size(); ++l) {
    const nlohmann::json& row = (*loads)[l];
    if (!row.is_array()) {
      fail(errc::invalid_argument, "loads[{}]: must be a list of loads per expert, got {}", l,
           row.type_name());
    }
    if (row.size() > static_cast<std::size_t>(kMaxSlots)) {
      fail(errc::invalid_argument, "loads[{}]: {} experts, at most {}", l, row.size(), kMaxSlots);
    }
    std::vector<double> layer;
    layer.reserve(row.size());
    for (std::size_t e = 0; e < row.size(); ++e) {
      if (!row[e].is_number()) {
        fail(errc::invalid_argument, "loads[{}][{}]: must be a number, got {}", l, e, row[e].dump());
      }
      layer.push_back(row[e].get<double>());
    }
    request.loads.push_back(std::move(layer));
  }
  request.slots = positive_int_field(spec, "slots", true);
  request.gpus = positive_int_field(spec, "gpus", true);
  request.nodes = positive_int_field(spec, "nodes", false);
  request.groups = positive_int_field(spec, "groups", false);
  validate_expert_plan_request(request);
  return request;
}

void validate_expert_plan_request(const expert_plan_request& request) {
  if (request.loads.empty()) fail(errc::invalid_argument, "loads: no layers");
  const std::size_t experts = request.loads.front().size();
  if (experts == 0) fail(errc::invalid_argument, "loads[0]: no experts");
  for (std::size_t l = 0; l < request.loads.size(); ++l) {
    const auto& layer = request.loads[l];
    if (layer.size() != experts) {
      fail(errc::invalid_argument, "loads[{}]: {} experts, but loads[0] has {}", l, layer.size(),
           experts);
    }
    for (std::size_t e = 0; e < layer.size(); ++e) {
      if (!std::isfinite(layer[e])) {
        fail(errc::invalid_argument, "loads[{}][{}]: {} is not a finite number", l, e, layer[e]);
      }
      if (layer[e] < 0) fail(errc::invalid_argument, "loads[{}][{}]: {} is negative", l, e, layer[e]);
    }
  }
  for (const auto& [name, value] : {std::pair{"slots", request.slots}, std::pair{"nodes", request.nodes},
                                    std::pair{"gpus", request.gpus}, std::pair{"groups", request.groups}}) {
    if (value < 1 || value > kMaxSlots) {
      fail(errc::invalid_argument, "{}: must be between 1 and {}, got {}", name, kMaxSlots, value);
    }
  }
  if (request.gpus % request.nodes != 0) {
    fail(errc::invalid_argument, "gpus: {} is not a multiple of nodes ({})", request.gpus,
         request.nodes);
  }
  if (request.slots % request.gpus != 0) {
    fail(errc::invalid_argument, "gpus: {} does not divide slots ({})", request.gpus, request.slots);
  }
  if (static_cast<std::size_t>(request.slots) < experts) {
    fail(errc::invalid_argument, "slots: {} is fewer than the {} experts of each layer", request.slots,
         experts);
  }
  if (experts % static_cast<std::size_t>(request.groups) != 0) {
    fail(errc::invalid_argument, "groups: {} does not divide the {} experts of each layer",
         request.groups, experts);
  }
}

expert_plan plan_experts(const expert_plan_request& request) {
  validate_expert_plan_request(request);
  expert_plan plan;
  // As EPLB: groups keep to a node when they divide evenly over the nodes; otherwise experts
  // are placed over all devices regardless of groups.
  plan.group_per_node = request.groups % request.nodes == 0;
  plan.layers.reserve(request.loads.size());
  for (const auto& layer : request.loads) {
    plan.layers.push_back(plan_layer(layer, request, plan.group_per_node));
  }
  return plan;
}

double placement_imbalance(std::span<const double> loads, std::span<const int> slots, int gpus) {
  SHOAL_REQUIRE(gpus > 0 && slots.size() % static_cast<std::size_t>(gpus) == 0,
                "{} slots on {} devices", slots.size(), gpus);
  std::vector<int> copies(loads.size(), 0);
  for (const int e : slots) {
    SHOAL_REQUIRE(e >= 0 && static_cast<std::size_t>(e) < loads.size(), "slot holds expert {}", e);
    ++copies[e];
  }
  const std::size_t per_device = slots.size() / gpus;
  double total = 0;
  double heaviest = 0;
  for (int d = 0; d < gpus; ++d) {
    double device = 0;
    for (std::size_t s = 0; s < per_device; ++s) {
      const int e = slots[d * per_device + s];
      device += loads[e] / copies[e];
    }
    total += device;
    heaviest = std::max(heaviest, device);
  }
  return total > 0 ? heaviest / (total / gpus) : 1.0;
}

int placement_nodes_per_group(std::span<const int> slots, int experts, int nodes, int groups) {
  SHOAL_REQUIRE(nodes > 0 && groups > 0 && experts % groups == 0 &&
                    slots.size() % static_cast<std::size_t>(nodes) == 0,
                "{} slots, {} experts, {} nodes, {} groups", slots.size(), experts, nodes, groups);
  const int group_size = experts / groups;
  const std::size_t per_node = slots.size() / nodes;
  std::vector<std::vector<bool>> on_node(groups, std::vector<bool>(nodes, false));
  for (std::size_t s = 0; s < slots.size(); ++s) on_node[slots[s] / group_size][s / per_node] = true;
  int most = 0;
  for (const auto& group : on_node) most = std::max(most, static_cast<int>(std::count(group.begin(), group.end(), true)));
  return most;
}

std::string expert_plan_to_json(const expert_plan_request& request, const expert_plan& plan) {
  nlohmann::json layers = nlohmann::json::array();
  double worst = plan.layers.empty() ? 1.0 : 0.0;
  double sum = 0;
  const int experts = static_cast<int>(request.loads.front().size());
  int nodes_per_group = 0;
  for (const auto& layer : plan.layers) {
    layers.push_back({{"slots", layer.slots}, {"imbalance", layer.imbalance}});
    worst = std::max(worst, layer.imbalance);
    sum += layer.imbalance;
    nodes_per_group = std::max(
        nodes_per_group, placement_nodes_per_group(layer.slots, experts, request.nodes, request.groups));
  }
  const nlohmann::json out = {
      {"layers", std::move(layers)},
      {"imbalance",
       {{"max", worst}, {"mean", plan.layers.empty() ? 1.0 : sum / plan.layers.size()}}},
      {"policy", plan.group_per_node ? "group_per_node" : "global"},
      {"max_nodes_per_group", nodes_per_group},
      {"slots", request.slots},
      {"nodes", request.nodes},
      {"gpus", request.gpus},
      {"groups", request.groups},
  };
  return out.dump();
}

}  // namespace shoal::runtime
