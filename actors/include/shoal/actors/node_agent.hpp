#pragma once
/// \file
/// The node agent: one per process. Joins the supervisor, spawns the stages and expert actors
/// it is told to, and keeps them alive (an actor nothing holds a handle to terminates).

#include "shoal/actors/protocols.hpp"
#include "shoal/runtime/weights_crypto.hpp"

#include <caf/actor.hpp>
#include <caf/stateful_actor.hpp>
#include <caf/typed_event_based_actor.hpp>

#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace shoal::actors {

class fabric;
struct weights_fetch;

/// Node agent settings.
struct node_agent_options {
  std::string node;                                ///< This node's name.
  std::string model_override;                      ///< Checkpoint path here, if it differs from the head's.
  int threads = 0;                                 ///< Compute threads per stage/expert actor (0: cores).
  std::chrono::milliseconds expert_timeout{30000}; ///< Deadline of a stage's expert round trip.
  /// Receives weight-loading progress lines of the actors it starts (and of expert weights
  /// streaming in from other nodes); may be empty.
  std::function<void(const std::string&)> progress = {};
  /// Key of a checkpoint encrypted at rest; null for plain files.
  std::shared_ptr<const runtime::weights_key> key = nullptr;
};

/// State of a node agent.
struct node_agent_state {
  static inline const char* name = "shoal.node_agent";  ///< Actor name in CAF logs.
  node_agent_options options;                           ///< Settings.
  std::shared_ptr<fabric> book;                         ///< Where spawned actors register.
  std::vector<caf::actor> children;                     ///< Spawned actors, kept alive.
  std::vector<actor_address> addresses;                 ///< Their addresses.
  /// What each was spawned as (the command's fields): a head that takes over asks again for
  /// what runs already, and gets it without a reload (latent caches and weights stay).
  std::vector<std::string> specs;
  /// Expert actors whose weights are streaming in from a running copy, by actor id.
  std::map<std::uint64_t, std::shared_ptr<weights_fetch>> fetching;
  bool stopped = false;                                 ///< Stop ran.
};

/// The agent. Spawn it detached: loading weights blocks it for as long as it takes.
node_agent_actor::behavior_type make_node_agent(node_agent_actor::stateful_pointer<node_agent_state> self,
                                                node_agent_options options, std::shared_ptr<fabric> book);

}  // namespace shoal::actors
