#pragma once
/// \file
/// How actors find each other by address. Local actors register under their id; an address
/// on another node resolves to a proxy that carries messages over the transport. In the
/// embedded mode every node lives in one process and resolution is a map lookup.

#include "shoal/actors/messages.hpp"

#include <caf/actor.hpp>

#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace shoal::actors {

class expert_engine;
class stage_engine;

/// Address book of one process. Thread-safe.
class fabric {
 public:
  virtual ~fabric() = default;

  /// Makes a local actor reachable under `address` (replacing any earlier one).
  void register_actor(const actor_address& address, caf::actor handle);
  /// Makes an expert engine of this process callable directly by stages of `address.node`.
  void register_engine(const actor_address& address, std::shared_ptr<expert_engine> engine);
  /// Records a stage engine of this process (for counters read by the process's front end).
  void register_stage_engine(const actor_address& address, std::shared_ptr<stage_engine> engine);
  /// Every stage engine of this process.
  std::vector<std::shared_ptr<stage_engine>> stage_engines();
  /// Tokens the stage engines of this process routed to each expert so far,
  /// `[layer * n_routed_experts + expert]` (empty without stages).
  std::vector<std::uint64_t> routed_tokens();
  /// Rows each expert engine of this process computed so far, by (node, actor id).
  std::map<std::pair<std::string, std::uint64_t>, std::uint64_t> served_rows();
  /// Removes an address (idempotent).
  void unregister(const actor_address& address);

  /// The actor at `address`: a local handle, or a proxy for a remote one. A null handle when
  /// nothing is known there (`not_found` for the caller to report).
  virtual caf::actor resolve(const actor_address& address);
  /// The engine registered at `address`, or null.
  std::shared_ptr<expert_engine> engine(const actor_address& address);
  /// Whether `node` runs in another process (its liveness needs heartbeats; a local node's
  /// agent is monitored directly).
  virtual bool remote(const std::string& node) const { (void)node; return false; }
  /// Drops every connection to `node`, failing the calls waiting on it with `unavailable`
  /// (a node declared dead in `epoch`); idempotent per node and epoch. Nothing to do in one
  /// process.
  virtual void evict(const std::string& node, std::uint64_t epoch) { (void)node; (void)epoch; }
  /// Records a placement epoch seen from the supervisor (outgoing messages carry it) and its
  /// fence: data messages of epochs older than the fence are refused from then on.
  virtual void observe_epoch(std::uint64_t epoch, std::uint64_t fence) noexcept {
    (void)epoch;
    (void)fence;
  }
  /// Connections this process refused because the other end did not prove it holds the
  /// cluster's join secret (none in one process).
  virtual std::uint64_t refused_peers() const { return 0; }
  /// Envelopes from other processes that this process refused, by reason: `malformed` (a
  /// tensor of the wrong dtype or size, a field out of range), `stale_epoch` (data of an
  /// older placement), `unknown_receiver` (no such actor here), `not_permitted` (placement,
  /// spawn or join from a peer that may not send it). Empty in one process.
  virtual std::map<std::string, std::uint64_t> refused_messages() const { return {}; }
  /// Every local actor (for shutdown).
  std::map<std::pair<std::string, std::uint64_t>, caf::actor> local_actors();

 protected:
  /// The locally registered actor at `address`, or null.
  caf::actor find_local(const actor_address& address);

 private:
  std::mutex mutex_;
  std::map<std::pair<std::string, std::uint64_t>, caf::actor> actors_;
  std::map<std::pair<std::string, std::uint64_t>, std::shared_ptr<expert_engine>> engines_;
  std::map<std::pair<std::string, std::uint64_t>, std::shared_ptr<stage_engine>> stage_engines_;
};

}  // namespace shoal::actors
