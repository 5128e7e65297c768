#pragma once
/// \file
/// The cluster config (YAML): which processes exist, where they listen, and the parallel plan
/// that places pipeline stages (layer ranges) and routed experts on them. Every error names
/// the file and line of the offending entry.

#include "shoal/config/model_config.hpp"

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace shoal::config {

/// One process of the cluster.
struct node_spec {
  std::string name;                  ///< Unique name, used by the plan.
  std::string host = "127.0.0.1";    ///< Address it listens on and is reached at.
  std::uint16_t port = 0;            ///< Port it listens on.
  std::vector<std::string> devices;  ///< `cpu` or `cuda:N`; empty means `cpu`.
  /// Memory (GB) this node offers for placement after a failure; 0: what the OS reports
  /// available when it joins.
  double memory_gb = 0;
  int line = 0;                      ///< 1-based line of the entry in the config file.
};

/// A pipeline stage: a contiguous range of decoder layers on one node.
struct stage_spec {
  std::string node;               ///< Node it runs on.
  std::int64_t layer_begin = 0;   ///< First layer held.
  std::int64_t layer_end = 0;     ///< One past the last layer held.
  int line = 0;                   ///< 1-based line of the entry.
};

/// An expert actor: a set of routed expert ids (the same ids in every MoE layer) on one node.
struct expert_group_spec {
  std::string node;                   ///< Node it runs on.
  std::vector<std::int64_t> experts;  ///< Routed expert ids, ascending.
  int line = 0;                       ///< 1-based line of the entry.
  /// 0 for the group the plan names; 1 for the second copy `redundancy: 2` adds on another
  /// expert node (same experts, same weights).
  int copy = 0;
};

/// HOST:PORT split at its last colon, the port a whole number in [1, 65535]; nothing when
/// `text` is not that.
std::optional<std::pair<std::string, std::uint16_t>> parse_host_port(std::string_view text);

/// Another deployment serving another version of the model, which this cluster's head may
/// send a share of its requests to (canary, rollback).
struct model_version {
  std::string name;                  ///< How operators, `/metrics` and `split` call it.
  std::string host;                  ///< Its head node's address.
  std::uint16_t port = 0;            ///< Its head node's port.
  int line = 0;                      ///< 1-based line of the entry.
};

/// A parsed cluster config. `expert_groups` empty means every stage computes the routed
/// experts of its own layers itself (no expert actors).
struct cluster_config {
  std::filesystem::path source;                  ///< File it was read from (for errors).
  std::filesystem::path model;                   ///< Checkpoint directory, resolved.
  std::vector<node_spec> nodes;                  ///< In file order.
  std::string head;                              ///< Node hosting the supervisor and router.
  /// Node that takes over as head (supervisor and router) when the head dies or freezes;
  /// empty: none, and the head is a single point of failure.
  std::string standby;
  std::vector<stage_spec> stages;                ///< Pipeline order.
  std::vector<expert_group_spec> expert_groups;  ///< Expert actors.
  /// Expert placement by policy, resolved against the model by `validate_against_model`:
  /// `split` divides the routed experts into contiguous, equal halves/thirds/... over
  /// `expert_policy_nodes`. Empty when experts are placed explicitly or with the stages.
  std::string expert_policy;
  std::vector<std::string> expert_policy_nodes;  ///< Nodes the policy spreads experts over.
  int expert_policy_line = 0;                    ///< Line of the policy entry.
  /// Copies of every routed expert (`plan.redundancy`, 1 or 2): with 2, every expert group
  /// also runs on the next expert node, so that a dead expert node is routed around at once,
  /// without loading anything. Resolved into `expert_groups` by `validate_against_model`.
  int redundancy = 1;
  int redundancy_line = 0;                       ///< Line of the setting.
  int threads = 0;                               ///< Compute threads per process (0: cores).
  int max_batch = 64;                            ///< Sequences admitted (and in one step) at most.
  std::int64_t max_batch_tokens = 256;           ///< Token budget of one step: decode tokens + prompt chunks.
  /// Latent-cache memory, in MiB, of the stage with the most layers; every stage holds as
  /// many blocks (of its own layers), and the router's scheduler hands them out.
  std::int64_t cache_mb = 512;
  std::int64_t cache_blocks = 0;                 ///< Explicit block count instead of `cache_mb` (0: derive).
  std::int64_t block_tokens = 32;                ///< Positions per cache block.
  bool prefix_cache = true;                      ///< Reuse cached blocks of shared prompt prefixes.
  int cache_line = 0;                            ///< Line of the cache settings (for errors).
  int ready_timeout_s = 120;                     ///< How long launch waits for every node.
  /// Heartbeats from the supervisor to every other process: a node that misses
  /// `heartbeat_misses` in a row is declared dead (frozen, hung or cut off). 0: off.
  int heartbeat_ms = 500;
  int heartbeat_misses = 4;                      ///< Consecutive misses that declare a node dead.
  /// A node process that exits or is declared dead is restarted by whoever launched it, at
  /// most `restart_limit` times within `restart_window_s` (then it stays down).
  int restart_limit = 5;
  int restart_window_s = 600;                    ///< Window of `restart_limit`.
  int replay_limit = 5;                          ///< Failed steps a request lives through.
  /// Steps in the pipeline at once, each with its own share of the running requests; 0: one
  /// per stage (stages then never wait for each other), 1: one step at a time.
  int micro_batches = 0;
  /// How each node's actor threads wait for work: "stealing" (CAF's default: idle threads
  /// poll each other's queues for a while before they sleep) or "sharing" (one queue; idle
  /// threads block at once and leave the cores to the kernels: for nodes that share cores
  /// with other nodes).
  std::string actor_scheduler = "stealing";
  /// Where a node starting an expert actor whose experts already run elsewhere gets their
  /// weights: "peer" (streamed over the cluster transport from a running copy, so the node
  /// needs no checkpoint of its own; the checkpoint when no copy is up or the stream fails)
  /// or "checkpoint" (always its own checkpoint directory).
  std::string copy_weights_from = "peer";
  /// The name of the model version this cluster serves (`split` and `/metrics` use it).
  std::string version = "default";
  /// Other deployments the head may send requests to, by share (`split`).
  std::vector<model_version> versions;
  /// Initial shares of the requests, by version name (this one and `versions`); empty: all
  /// to `version`. `shoal admin split` changes them while the cluster serves.
  std::vector<std::pair<std::string, std::uint32_t>> split;
  /// A dead node that has not joined again after this long has its stages and expert groups
  /// re-placed onto surviving nodes with the memory for them. 0: never; wait for it.
  int replace_after_s = 30;
  /// Expert loads that `shoal admin status` and `rebalance` use are counted over the last
  /// this many seconds.
  int load_window_s = 60;
  /// The head rebalances by itself this often (as `shoal admin rebalance` does: copies of hot
  /// experts, within each node's memory), when that lowers the predicted imbalance by at
  /// least 5%; 0: only when an operator asks.
  int rebalance_every_s = 0;
  int rebalance_max_copies = 8;                  ///< Copies one scheduled rebalance adds at most.
  /// File holding the token `shoal admin` commands that change the cluster must bring
  /// (resolved against the config's directory); empty: such commands are refused.
  std::filesystem::path admin_token_file;
  /// File the head appends one JSON line to per `shoal admin` command that changes or tries
  /// to change the cluster (resolved against the config's directory); empty: none.
  std::filesystem::path admin_audit_log;
  /// File holding the secret every process of the cluster (nodes, gateways, admin
  /// commands) must prove it holds when it connects (resolved against the config's
  /// directory); empty: connections are not authenticated.
  std::filesystem::path join_secret_file;

  /// The node named `name`, or null.
  const node_spec* find_node(std::string_view name) const noexcept;
  /// Of the head and the standby, the one that is not `node` (they take each other's place);
  /// "" without a standby, or when `node` is neither.
  std::string other_head(std::string_view node) const;
  /// "file:line" for error messages.
  std::string where(int line) const;
};

/// Parses YAML text. Relative `model` paths are resolved against `base_dir`. Checks what can
/// be checked without the model: keys, types, names, ports, node references, duplicate expert
/// ids, layer ranges that leave gaps or overlap. Throws `shoal::error(errc::invalid_argument)`
/// whose message starts with "source:line: ".
cluster_config parse_cluster_config(std::string_view yaml_text, const std::filesystem::path& source,
                                    const std::filesystem::path& base_dir);

/// Reads and parses a config file.
cluster_config load_cluster_config(const std::filesystem::path& path);

/// Checks the plan against the model (layers covered exactly, every routed expert placed
/// exactly once, ids in range) and resolves an expert policy into `expert_groups`.
void validate_against_model(cluster_config& cluster, const model_config& model);

/// Latent-cache blocks of every stage (and of the router's scheduler): `cache_blocks`, or as
/// many as `cache_mb` holds for the stage with the most layers. Throws `invalid_argument`
/// naming the setting when fewer than 2 blocks result.
std::int64_t cache_blocks_for(const cluster_config& cluster, const model_config& model);

/// The embedded default: one node, one stage holding every layer and expert.
cluster_config embedded_cluster_config(const std::filesystem::path& model, std::int64_t num_layers,
                                       int threads = 0);

}  // namespace shoal::config
