#pragma once
/// \file
/// Every actor interface of Shoal, in one place, with a comment per handler. Include this only
/// in actor implementations and tests: it pulls in CAF. Front ends use `client.hpp` and
/// `cluster.hpp`, which do not.

#include "shoal/actors/messages.hpp"
#include "shoal/base/error.hpp"

#include <caf/allowed_unsafe_message_type.hpp>
#include <caf/atom.hpp>
#include <caf/error.hpp>
#include <caf/replies_to.hpp>
#include <caf/typed_actor.hpp>

#include <cstdint>
#include <string>
#include <vector>

namespace shoal::actors {

// Atoms (CAF 0.17: at most 10 characters).
using ok_atom = caf::atom_constant<caf::atom("ok")>;           ///< Acknowledgement.
using join_atom = caf::atom_constant<caf::atom("join")>;       ///< Node joins the supervisor.
using ready_atom = caf::atom_constant<caf::atom("ready")>;     ///< Wait for the cluster.
using status_atom = caf::atom_constant<caf::atom("status")>;   ///< Ask for status.
using wire_atom = caf::atom_constant<caf::atom("wire")>;       ///< Placement handed to an actor.
using release_atom = caf::atom_constant<caf::atom("release")>; ///< Forget requests' caches.
using cancel_atom = caf::atom_constant<caf::atom("cancel")>;   ///< Client cancels a request.
using stop_atom = caf::atom_constant<caf::atom("stop")>;       ///< Orderly shutdown.
using tick_atom = caf::atom_constant<caf::atom("tick")>;       ///< Periodic timer.
using fence_atom = caf::atom_constant<caf::atom("fence")>;     ///< The placement lost a node.
using admin_atom = caf::atom_constant<caf::atom("admin")>;     ///< An operator's command.
using split_atom = caf::atom_constant<caf::atom("split")>;     ///< New shares of the model versions.
using fallback_atom = caf::atom_constant<caf::atom("fallback")>; ///< Another version could not take a request.

/// Receives a request's tokens as they are generated (a client, or a proxy of a remote one).
using token_sink_actor = caf::typed_actor<
    /// A chunk of tokens; the last one has `finish != none`.
    caf::reacts_to<token_chunk>>;

/// Runs a set of routed experts.
using expert_actor = caf::typed_actor<
    /// Computes each row's expert output (unweighted); errors: invalid_argument (an expert
    /// it does not hold, a dense layer).
    caf::replies_to<expert_dispatch>::with<expert_combine>>;

/// A pipeline stage.
using stage_actor = caf::typed_actor<
    /// Runs the stage's layers over a step and passes it on to the next stage; the last stage
    /// replies with the sampled tokens, so the reply reaches the router whichever stage it
    /// asked. Errors: failed_precondition (cache state, layer mismatch), unavailable (an
    /// expert actor or the next stage did not answer in time).
    caf::replies_to<step_batch>::with<sampled_batch>,
    /// Forgets the caches of finished requests and forwards to the next stage.
    caf::reacts_to<release_atom, std::vector<request_id>>,
    /// The placement of this epoch: the stage looks up its next stage and the expert actors.
    caf::replies_to<wire_atom, placement_table>::with<ok_atom>>;

/// Accepts requests and drives the pipeline.
using router_actor = caf::typed_actor<
    /// Queues a request; tokens go to the sink as `token_chunk`s. A request the router cannot
    /// take (cluster not ready, bad prompt) ends at once with an error chunk.
    caf::reacts_to<generate_request, token_sink_actor>,
    /// Cancels a request of that sink; its stream ends with finish == cancelled.
    caf::reacts_to<cancel_atom, request_id, token_sink_actor>,
    /// The shares of the requests each model version gets from now on (names and weights of
    /// the same length; this cluster's version and the config's `versions`; checked by the
    /// supervisor).
    caf::reacts_to<split_atom, std::vector<std::string>, std::vector<std::uint32_t>>,
    /// A request another version could not take before it streamed anything (its cluster
    /// unreachable): this cluster serves it.
    caf::reacts_to<fallback_atom, generate_request, token_sink_actor>,
    /// The placement of this epoch: the router looks up the stages. A new epoch after a
    /// failure: every request is recomputed from its prompt and the tokens it streamed.
    caf::replies_to<wire_atom, placement_table>::with<ok_atom>,
    /// The placement of an older epoch lost a node: stop stepping, take the requests of the
    /// step in flight back (they keep their tokens) and wait for the next `wire_atom`.
    caf::reacts_to<fence_atom, std::uint64_t>,
    /// Resumes stepping after a failed step's pause (sent to itself).
    caf::reacts_to<tick_atom>,
    /// The scheduler's counters as a JSON object (requests waiting and running, cache blocks
    /// total, used and kept for prefix reuse, preemptions, prefilled and cached prompt tokens).
    caf::replies_to<status_atom>::with<std::string>>;

/// One per process: spawns local actors when the supervisor says so.
using node_agent_actor = caf::typed_actor<
    /// Loads a stage's weights and starts it under `cmd.actor`.
    caf::replies_to<spawn_stage_cmd>::with<ok_atom>,
    /// Loads an expert actor's weights and starts it under `cmd.actor`.
    caf::replies_to<spawn_expert_cmd>::with<ok_atom>,
    /// Stops one actor and unregisters it (idempotent: an unknown id is fine).
    caf::replies_to<retire_actor_cmd>::with<ok_atom>,
    /// One part of the weights an expert actor of this node holds, for a copy being started
    /// on another node. Errors: not_found (no such actor, or it lacks an expert),
    /// invalid_argument (a part out of range).
    caf::replies_to<weights_request>::with<weights_part>,
    /// Stops every local actor (idempotent).
    caf::reacts_to<stop_atom>,
    /// Liveness and fencing (see `heartbeat`); the answer carries the node's routed-token
    /// counts. A remote node answers from its transport thread without reaching this actor.
    caf::replies_to<heartbeat>::with<heartbeat>>;

/// Membership and placement.
using supervisor_actor = caf::typed_actor<
    /// A node joins; replies with the current epoch. Errors: invalid_argument (a node the
    /// config does not name, another schema version), aborted (the name already joined).
    caf::replies_to<join_atom, join_request, node_agent_actor>::with<std::uint64_t>,
    /// Replies with the placement once every stage and expert actor runs; deadline_exceeded
    /// (naming what it still waits for) when that takes longer than the config allows.
    caf::replies_to<ready_atom>::with<placement_table>,
    /// Membership, placement and health as JSON, with the router's scheduler counters under
    /// "scheduler", for operators and gateways (also over the wire: StatusRequest).
    caf::replies_to<status_atom>::with<std::string>,
    /// An operator's command (drain or undrain a node); replies with a JSON summary. Errors:
    /// failed_precondition (no admin token configured), invalid_argument (wrong token,
    /// bad command), not_found (no such node), resource_exhausted (nothing has
    /// room for the node's actors), unavailable (a failure or change is under way).
    caf::replies_to<admin_atom, admin_request>::with<std::string>,
    /// Checks the ready deadline (sent to itself).
    caf::reacts_to<tick_atom>>;

/// The error category of Shoal errors carried as `caf::error`.
inline constexpr caf::atom_value shoal_error_category = caf::atom("shoal");

/// `e` as a CAF error value (code and message preserved).
caf::error to_caf_error(const shoal::error& e);
/// `code` and `message` as a CAF error value.
caf::error to_caf_error(errc code, std::string message);
/// A CAF error as a Shoal error: Shoal's own keep their code; CAF's become `unavailable`
/// (timeouts, dead actors) or `internal`.
shoal::error from_caf_error(const caf::error& e);

}  // namespace shoal::actors
