#pragma once
// Private: the cross-process fabric. Addresses on other nodes resolve to proxy actors that
// turn CAF messages into Cap'n Proto envelopes on the transport; a bridge actor turns
// incoming envelopes into requests to local actors and sends their replies back.

#include "shoal/actors/fabric.hpp"
#include "shoal/actors/protocols.hpp"
#include "shoal/config/cluster_config.hpp"

#include <shoal/transport/node.hpp>

#include <caf/actor_system.hpp>

#include <array>
#include <atomic>
#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <vector>

namespace shoal::actors {

/// Settings of a process's fabric.
struct remote_options {
  std::string node;                                  ///< This process's node name.
  std::string listen_host;                           ///< Empty: do not listen (clients).
  std::uint16_t listen_port = 0;                     ///< Port to listen on.
  std::string transports;                            ///< UCX_TLS value; empty: UCX default.
  std::map<std::string, std::pair<std::string, std::uint16_t>> addresses; ///< Node -> host:port.
  std::vector<std::string> dial_hosts;               ///< Other hosts it dials (a client's heads).
  /// The head node (supervisor): the only peer whose placement tables and spawn commands are
  /// obeyed, and which accepts joins only from the nodes in `addresses`. Empty: no such
  /// checks (a client).
  std::string head;
  /// The node that takes over as head if the head fails: its placement tables and spawn
  /// commands are obeyed too (the epoch tells which head is current). Empty: none.
  std::string standby;
  /// Called (on the transport's thread) when the last connection to a node is lost.
  std::function<void(const std::string& node)> on_node_lost;
  std::chrono::milliseconds call_timeout{60000};     ///< Local steps and expert calls made for remote callers.
  /// Local spawns, retirements, wiring, joins, weight parts and status calls made for remote
  /// callers: loading a checkpoint takes minutes, whatever one step may take.
  std::chrono::milliseconds control_timeout{120000};
  std::chrono::milliseconds connect_timeout{10000};  ///< One connection attempt.
  bool stages_hold_experts = true;                   ///< Stages spawned here compute their experts.
  std::string join_secret;                           ///< The cluster's join secret; empty: none.
};

class remote_fabric;

/// The placement epoch of `node`'s supervisor if it runs one now (it answers a status request
/// within `timeout`), else nothing. Of two heads that both answer, the newer epoch is in charge.
std::optional<std::uint64_t> supervisor_epoch(caf::actor_system& system, remote_fabric& remote, const std::string& node,
                                              std::chrono::milliseconds timeout);

class remote_fabric final : public fabric, public std::enable_shared_from_this<remote_fabric> {
 public:
  remote_fabric(caf::actor_system& system, remote_options options);
  ~remote_fabric() override;

  /// Starts the transport node and the bridge; must be called once after construction.
  void start();
  /// Stops the transport (idempotent); proxies fail their pending calls.
  void stop();

  caf::actor resolve(const actor_address& address) override;
  /// Whether a connection to `node` is up.
  bool connected(const std::string& node);
  /// When the last message from `node` arrived (any kind; the head's heartbeats come every
  /// interval), or nothing if none did.
  std::optional<std::chrono::steady_clock::time_point> last_heard(const std::string& node);
  /// The head this node belongs to now (of the config's head and standby). Heartbeats of the
  /// other one are refused: a head that was frozen and replaced learns so from its nodes.
  void set_head(const std::string& node);
  /// The latest placement the head sent this node as its standby (JSON), or "".
  std::string head_state();
  /// Connects to `host:port` now and records the peer under the name it announced.
  std::string connect(const std::string& host, std::uint16_t port);

  // Used by proxies and the bridge.
  std::uint64_t next_correlation() noexcept { return ++correlation_; }
  void track(std::uint64_t correlation, caf::actor proxy);
  void untrack(std::uint64_t correlation);
  /// Sends to the node named `node`, connecting first if needed; throws `unavailable`.
  void send_to(const std::string& node, transport::outgoing_message message);
  /// Sends on a known peer (replies go back on the connection the call came in on).
  void send_to_peer(transport::peer_id peer, transport::outgoing_message message);
  /// Address of a local actor, for envelopes' sender field (registers it if unknown).
  actor_address address_of(const caf::actor& handle);
  const remote_options& options() const noexcept { return options_; }
  caf::actor_system& system() noexcept { return system_; }
  std::uint64_t epoch() const noexcept { return epoch_.load(); }
  std::uint64_t fence() const noexcept { return fence_.load(); }
  void observe_epoch(std::uint64_t epoch, std::uint64_t fence) noexcept override;
  bool remote(const std::string& node) const override;
  void evict(const std::string& node, std::uint64_t epoch) override;
  std::uint64_t refused_peers() const override;
  std::map<std::string, std::uint64_t> refused_messages() const override;

  /// Why an envelope was refused (see `fabric::refused_messages`).
  enum class refusal { malformed, stale_epoch, unknown_receiver, not_permitted };
  /// Counts a refused envelope; the caller has answered it (or it needed no answer).
  void count_refusal(refusal why) noexcept { refused_[static_cast<std::size_t>(why)].fetch_add(1); }

 private:
  void on_message(transport::peer_id peer, transport::incoming_message message);
  void on_peer_lost(transport::peer_id peer, const shoal::error& reason, bool orderly);
  transport::peer_id peer_for(const std::string& node);
  /// The node name `peer` announced when it connected; empty if none.
  std::string announced_name(transport::peer_id peer);
  /// Whether `node` names the config's head or standby: the nodes whose placements, spawns,
  /// fences and evictions this node obeys.
  bool is_head_or_standby(const std::string& node) const;

  caf::actor_system& system_;
  remote_options options_;
  std::unique_ptr<transport::node> node_;
  mutable std::mutex node_mutex_;  // held to read node_ from actors while stop() may reset it
  caf::actor bridge_;
  std::mutex mutex_;
  std::map<std::string, transport::peer_id> peers_;   // by node name
  std::map<transport::peer_id, std::string> names_;
  std::map<std::pair<std::string, std::uint64_t>, caf::actor> proxies_;
  std::map<std::uint64_t, caf::actor> pending_;       // correlation -> proxy
  std::set<std::pair<std::string, std::uint64_t>> evictions_;
  std::map<std::string, std::chrono::steady_clock::time_point> heard_;  // by node name
  std::string head_now_;  // set_head
  std::string head_state_;  // head_state  // (node, epoch) already evicted
  std::mutex connect_mutex_;
  std::atomic<std::uint64_t> correlation_{0};
  std::atomic<std::uint64_t> epoch_{0};
  std::atomic<std::uint64_t> fence_{0};
  std::array<std::atomic<std::uint64_t>, 4> refused_{};
  std::uint64_t next_local_id_ = actor_ids::first_client;
  bool trace_ = false;  // SHOAL_TRACE_WIRE set: log every envelope

};

}  // namespace shoal::actors
