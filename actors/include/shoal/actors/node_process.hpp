#pragma once
/// \file
/// One node of a multi-process cluster: its transport endpoint, its node agent, and on the
/// head node the supervisor and router. `shoal node` runs one; `shoal launch` starts one per
/// node of a config. No CAF in this header.

#include "shoal/actors/cluster.hpp"
#include "shoal/actors/messages.hpp"
#include "shoal/config/cluster_config.hpp"

#include <memory>
#include <functional>
#include <string>

namespace shoal::actors {

/// How a node process starts.
struct node_process_options {
  config::cluster_config cluster;    ///< The whole cluster's config (validated on start).
  std::string node;                  ///< Which of its nodes this process is.
  cluster_options timeouts;          ///< Deadlines (ready, step, expert round trip).
  std::string transports;            ///< UCX transports (UCX_TLS); empty: UCX's default.
  std::string model_override;        ///< Checkpoint path on this machine, if not the config's.
  /// Key of a checkpoint encrypted at rest (this node's own key file); null for plain files.
  std::shared_ptr<const runtime::weights_key> key = nullptr;
  /// On the head: receives the supervisor's membership events as JSON lines (node_down,
  /// node_rejoined, recovered); called on an actor thread.
  std::function<void(const std::string&)> on_event = {};
};

/// A running node. The head node listens for the others' joins and for clients; every other
/// node joins the head, retrying until the ready deadline (the head may start later).
///
/// With a `standby` in the config, the head and the standby can both run the supervisor and
/// router, one at a time. The standby joins the head like any node and watches it; when the
/// head's connection fails or it is silent for `heartbeat_ms` x `heartbeat_misses`, the
/// standby takes over (`supervisor_options::takeover_from`) and every other node joins it,
/// keeping its actors. A restarted process of either finds the other one in charge and joins
/// it, becoming the standby in turn.
class node_process {
 public:
  /// Starts listening on the node's host:port and joins (or, on the head, waits for joins).
  /// Throws `invalid_argument` for a node the config does not name, `unavailable` when the
  /// port cannot be bound, the supervisor's refusal when it refuses the join, and
  /// `deadline_exceeded` when the head could not be reached before the ready deadline.
  explicit node_process(node_process_options options);
  /// Stops the local actors and the transport.
  ~node_process();
  node_process(const node_process&) = delete;
  node_process& operator=(const node_process&) = delete;

  /// Whether this process runs the supervisor and router now.
  bool is_head() const noexcept;
  /// Head only: blocks until the cluster serves; returns the placement or throws what failed.
  placement_table wait_ready();
  /// Head only: membership and placement as JSON.
  std::string status();
  /// Keeps this node with a head; call it every few hundred milliseconds. Notices a head that
  /// is gone and, with a standby in the config, takes over (on the standby) or joins the new
  /// head (elsewhere), one step per call. Returns false when the node should stop: the head
  /// is gone and nothing takes over, or no head accepted it within the ready deadline.
  bool watch();
  /// The node whose supervisor this process belongs to now (itself when `is_head`).
  std::string head() const;

  struct impl;

 private:
  std::unique_ptr<impl> impl_;
};

}  // namespace shoal::actors
