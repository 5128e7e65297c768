#pragma once
// The processes of a cluster config started from this machine: `shoal launch`, `shoal serve
// --cluster CONFIG` and `shoal bench --cluster CONFIG` share them.

#include "shoal/config/cluster_config.hpp"

#include <atomic>
#include <chrono>
#include <map>
#include <mutex>
#include <thread>
#include <functional>
#include <optional>
#include <string>
#include <vector>

namespace shoal::tools {

/// Every node of a cluster config as a child process: on this machine for local hosts, over
/// ssh (`shoal node ...` on the remote PATH) for the others. Stops them all when destroyed.
/// Each runs in a process group of its own, so that Ctrl-C reaches only the launcher (which
/// then stops them, after draining when it serves HTTP), and gets SIGTERM if the launcher
/// dies.
///
/// Once the cluster is ready, a watcher thread keeps it whole: a node process that exits is
/// started again after a backoff (0.5 s doubling to 8 s), at most `restart_limit` times within
/// `restart_window`; a node the head declares dead (it prints a `node_down` event line, e.g.
/// for a frozen process that missed its heartbeats) is killed first, so that its port is free
/// and it can never come back under the old placement. Without a `standby` in the config the
/// head node itself is not restarted: its exit is reported by `exited_node`. With one, the
/// head is restarted like any node (the standby has taken over; the restarted process joins
/// it), and the events of both are read, whichever is in charge.
class launched_cluster {
 public:
  /// How to start the nodes.
  struct settings {
    std::string config_path;                 ///< The YAML file; absolute, nodes read it too.
    std::vector<std::string> node_arguments; ///< Extra `shoal node` options (timeouts, transports).
    std::chrono::seconds ready_timeout{120}; ///< How long the head may take to report ready.
    /// Polled while waiting; returning true gives up with `errc::cancelled` (e.g. Ctrl-C).
    std::function<bool()> interrupted;
    std::string log_prefix = "[launch]";     ///< Prefix of the progress lines on stderr.
    int restart_limit = 5;                   ///< Restarts of one node within `restart_window` (0: none).
    std::chrono::seconds restart_window{600};
  };

  /// Starts the nodes and waits for the head node's ready line. Throws `unavailable` when a
  /// node exits first, `deadline_exceeded` after `ready_timeout`, `cancelled` when
  /// `interrupted`; the nodes started so far are stopped before it throws.
  launched_cluster(const config::cluster_config& cluster, settings s);
  ~launched_cluster();
  launched_cluster(const launched_cluster&) = delete;
  launched_cluster& operator=(const launched_cluster&) = delete;

  /// The head's ready line (JSON: ready, connect, epoch, stages, expert_actors).
  const std::string& ready_line() const { return ready_line_; }
  /// Where clients connect: the head's host and port.
  const std::string& host() const { return host_; }
  std::uint16_t port() const { return port_; }
  /// Every node that can be head: the head, then the standby if the config has one.
  const std::vector<std::pair<std::string, std::uint16_t>>& heads() const { return heads_; }

  /// Before the cluster is ready: a node process that has exited since the last call, as
  /// (node, exit status). After: only the head node (others are restarted), or nothing.
  std::optional<std::pair<std::string, int>> exited_node();
  /// Restarts of each node so far.
  std::map<std::string, int> restarts() const;

  /// SIGTERM to every node, SIGKILL to those still running 10 s later; idempotent.
  void stop();
  /// SIGKILL to every node, reaped before it returns; for a stop that cannot wait. Safe from
  /// any thread; `stop` afterwards has nothing left to do.
  void kill_now();

 private:
  struct child {
    std::string node;
    std::vector<std::string> args;
    bool head = false;
    bool watched = false;  // head or standby: its stdout carries the supervisor's events
    int pid = -1;
    int out = -1;  // a watched node's stdout, read for the ready line and events
    std::string buffer;  // its stdout up to the next newline
    int restarts = 0;
    std::vector<std::chrono::steady_clock::time_point> recent;  // restart times in the window
    std::chrono::steady_clock::time_point restart_at{};         // pending restart, if pid < 0
    bool restart_pending = false;
    bool given_up = false;
  };
  void spawn(child& c);
  void watch();
  void on_head_line(const std::string& line, const std::string& from);
  void read_output(child& c);

  settings settings_;
  mutable std::mutex mutex_;  // children_ and head_exit_, once the watcher runs
  std::vector<child> children_;
  std::string prefix_;
  std::string ready_line_;
  std::string host_;
  std::uint16_t port_ = 0;
  std::vector<std::pair<std::string, std::uint16_t>> heads_;
  bool standby_ = false;  // the config has a standby head
  std::optional<std::pair<std::string, int>> head_exit_;  // until `exited_node` reports it
  bool head_gone_ = false;
  std::atomic<bool> stopping_{false};
  std::thread watcher_;
};

}  // namespace shoal::tools
