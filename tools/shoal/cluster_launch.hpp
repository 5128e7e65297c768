#pragma once
// The processes of a cluster config started from this machine: `shoal launch`, `shoal serve
// --cluster CONFIG` and `shoal bench --cluster CONFIG` share them.

#include "shoal/config/cluster_config.hpp"

#include <chrono>
#include <functional>
#include <optional>
#include <string>
#include <vector>

namespace shoal::tools {

/// Every node of a cluster config as a child process: on this machine for local hosts, over
/// ssh (`shoal node ...` on the remote PATH) for the others. Stops them all when destroyed.
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

  /// A node process that has exited since the last call, as (node, exit status), or nothing.
  std::optional<std::pair<std::string, int>> exited_node();

  /// SIGTERM to every node, SIGKILL to those still running 10 s later; idempotent.
  void stop();

 private:
  struct child {
    std::string node;
    int pid = -1;
    int out = -1;  // the head's stdout, read for the ready line
  };
  std::vector<child> children_;
  std::string prefix_;
  std::string ready_line_;
  std::string host_;
  std::uint16_t port_ = 0;
};

}  // namespace shoal::tools
