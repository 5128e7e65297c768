#pragma once
/// \file
/// The expert-placement planner: from measured loads per logical expert, which logical expert
/// each physical expert slot holds (replicas of hot experts included), so that the devices of
/// an expert-parallel cluster carry loads as equal as possible without spreading an expert
/// group over more nodes than DeepSeek's EPLB does. CAF-free: `shoal admin plan` runs it
/// offline, the admin actor will run it on a live cluster's loads.
///
/// Layout of a plan, for each layer: `slots` physical slots, `slots / gpus` contiguous slots per
/// device, `gpus / nodes` contiguous devices per node. Quality of a layer: the heaviest device's
/// load over the mean device load, an expert's load split evenly over its copies (1.0 is
/// perfect). docs/admin.md compares it with EPLB.

#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace shoal::runtime {

/// What to plan: the loads and the shape of the cluster.
struct expert_plan_request {
  /// loads[layer][expert]: load of each logical expert (tokens routed to it over a window);
  /// finite and non-negative, the same number of experts in every layer.
  std::vector<std::vector<double>> loads;
  /// Physical expert slots per layer, at least the number of experts, a multiple of `gpus`.
  int slots = 0;
  /// Nodes (hosts); experts of one group keep to one node when `groups % nodes == 0`.
  int nodes = 1;
  /// Devices in all, a multiple of `nodes`.
  int gpus = 1;
  /// Expert groups (DeepSeek-V3's group-limited routing: 8 groups of 32 experts); divides the
  /// number of experts.
  int groups = 1;
};

/// The plan of one layer.
struct expert_layer_plan {
  /// slots[s]: the logical expert held by physical slot s; every expert appears at least once.
  std::vector<int> slots;
  /// Predicted quality: heaviest device load / mean device load (1.0 when all loads are zero).
  double imbalance = 1.0;
};

/// The plan of every layer.
struct expert_plan {
  std::vector<expert_layer_plan> layers;
  /// True when each expert group keeps to one node (`groups % nodes == 0`); false when the
  /// groups do not divide over the nodes and experts are placed regardless of groups, as EPLB's
  /// global policy does.
  bool group_per_node = false;
};

/// Parses and checks a request from JSON text (`{"loads": [[...], ...], "slots": S, "nodes": N,
/// "gpus": G, "groups": g}`). Throws `shoal::error(errc::invalid_argument)` naming the field
/// that is wrong ("loads[2][7]: -3 is negative", "gpus: 7 does not divide slots (320)").
expert_plan_request parse_expert_plan_request(std::string_view json_text);

/// Checks the shapes and values of a request; throws like `parse_expert_plan_request`.
void validate_expert_plan_request(const expert_plan_request& request);

/// Plans every layer of a valid request (validates it first).
expert_plan plan_experts(const expert_plan_request& request);

/// Heaviest device load / mean device load of one layer's placement: `slots` lists the logical
/// expert of each physical slot, `slots.size() / gpus` per device; an expert's load is split
/// evenly over its copies. 1.0 when the total load is zero.
double placement_imbalance(std::span<const double> loads, std::span<const int> slots, int gpus);

/// The most nodes that the copies of any one expert group are spread over, in one layer's
/// placement (1 when every group keeps to a node).
int placement_nodes_per_group(std::span<const int> slots, int experts, int nodes, int groups);

/// The plan as JSON: `{"layers": [{"slots": [...], "imbalance": x}, ...], "imbalance": {"max":
/// x, "mean": x}, "policy": "group_per_node" | "global", ...}`.
std::string expert_plan_to_json(const expert_plan_request& request, const expert_plan& plan);

}  // namespace shoal::runtime
