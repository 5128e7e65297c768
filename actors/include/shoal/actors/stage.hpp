#pragma once
/// \file
/// The stage actor: a range of layers of the pipeline.

#include "shoal/actors/protocols.hpp"

#include <caf/stateful_actor.hpp>
#include <caf/typed_event_based_actor.hpp>

#include <chrono>
#include <memory>
#include <string>

namespace shoal::actors {

class fabric;
class stage_engine;
class expert_dispatcher;

/// State of a stage actor.
struct stage_state {
  static inline const char* name = "shoal.stage";  ///< Actor name in CAF logs.
  std::string node;                                ///< Node it runs on.
  std::shared_ptr<stage_engine> engine;            ///< Weights, caches, runtime calls.
  std::shared_ptr<fabric> book;                    ///< Resolves placement addresses.
  std::chrono::milliseconds expert_timeout{0};     ///< Deadline of one expert round trip.
  stage_actor next;                                ///< Next stage; null for the last.
  std::uint64_t epoch = 0;                         ///< Placement epoch it is wired for.
  std::unique_ptr<expert_dispatcher> experts;      ///< Sends tokens to expert actors.
  stage_state();
  ~stage_state();
};

/// Runs `engine`'s layers. Spawn it detached: a step blocks on the model and on expert
/// actors' replies (each with `expert_timeout`). Before the first step it needs the
/// placement (`wire_atom`) unless it is the only stage and holds its experts.
stage_actor::behavior_type make_stage(stage_actor::stateful_pointer<stage_state> self, std::string node,
                                      std::shared_ptr<stage_engine> engine, std::shared_ptr<fabric> book,
                                      std::chrono::milliseconds expert_timeout);

}  // namespace shoal::actors
