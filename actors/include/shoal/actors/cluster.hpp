#pragma once
/// \file
/// A cluster whose nodes all live in this process: the embedded default of `shoal generate`
/// and `shoal serve`, and the head of a multi-process cluster. No CAF in this header.

#include "shoal/actors/messages.hpp"
#include "shoal/config/cluster_config.hpp"
#include "shoal/runtime/weights_crypto.hpp"

#include <chrono>
#include <cstdint>
#include <functional>
#include <vector>
#include <memory>
#include <string>

namespace shoal::actors {

/// Timeouts of a cluster; every wait has one.
struct cluster_options {
  std::chrono::milliseconds ready_timeout{120000};  ///< Joins, weight loads and wiring.
  std::chrono::milliseconds step_timeout{60000};    ///< One pipeline step, router to last stage.
  std::chrono::milliseconds expert_timeout{30000};  ///< One expert round trip of a stage.
  int scheduler_threads = 0;                        ///< CAF scheduler threads (0: CAF's default).
  /// Receives weight-loading progress lines; may be empty.
  std::function<void(const std::string&)> progress = {};
  /// Key of a checkpoint encrypted at rest; null for plain files.
  std::shared_ptr<const runtime::weights_key> key = nullptr;
};

/// Every node of a cluster config inside this process: a supervisor and router on the head
/// node, a node agent per node, the stages and expert actors the plan places. Actors on the
/// same node call each other's engines directly; actors on different nodes exchange messages.
class local_cluster {
 public:
  /// Starts the actors; `config` is validated against the model's config.json first
  /// (`invalid_argument` naming file and line). Returns before the weights are loaded.
  explicit local_cluster(config::cluster_config config, cluster_options options = {});
  /// Stops every actor and waits for them.
  ~local_cluster();
  local_cluster(const local_cluster&) = delete;
  local_cluster& operator=(const local_cluster&) = delete;

  /// Blocks until every stage and expert actor serves; returns the placement. Throws the
  /// supervisor's error (what failed, or what it still waited for at the deadline).
  placement_table wait_ready();
  /// Membership and placement as JSON, with the router's scheduler counters under
  /// "scheduler".
  std::string status();
  /// Tokens routed to each expert so far by this process's stages,
  /// `[layer * n_routed_experts + expert]`.
  std::vector<std::uint64_t> routed_tokens();
  /// The config it runs.
  const config::cluster_config& config() const noexcept;

  class impl;
  /// For `shoal::client`.
  impl& internals() noexcept { return *impl_; }

 private:
  std::unique_ptr<impl> impl_;
};

}  // namespace shoal::actors
