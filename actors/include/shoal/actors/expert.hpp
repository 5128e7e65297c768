#pragma once
/// \file
/// The expert actor: serves a set of routed experts to the stages.

#include "shoal/actors/protocols.hpp"

#include <caf/stateful_actor.hpp>
#include <caf/typed_event_based_actor.hpp>

#include <cstdint>
#include <memory>

namespace shoal::actors {

class expert_engine;

/// State of an expert actor.
struct expert_state {
  static inline const char* name = "shoal.expert";  ///< Actor name in CAF logs.
  std::shared_ptr<expert_engine> engine;            ///< The weights and kernel calls.
  std::uint64_t rows_served = 0;                    ///< Rows computed, for load reports.
};

/// Computes dispatched rows with `engine`. Spawn it detached: a dispatch runs the kernel on
/// the engine's thread pool and blocks until it is done.
expert_actor::behavior_type make_expert(expert_actor::stateful_pointer<expert_state> self,
                                        std::shared_ptr<expert_engine> engine);

}  // namespace shoal::actors
