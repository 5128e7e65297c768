#pragma once
/// \file
/// The supervisor: membership and the epoch-numbered placement table.
///
/// Lifecycle of a placed stage or expert actor (one per entry of the placement table):
///
/// ```
///                (1) every node joined
///   +---------+ ---------------------> +----------+  (2) node agent: ok   +---------+
///   | pending |                        | spawning | --------------------> | running |
///   +---------+                        +----------+                       +---------+
///        ^                                  | (3) spawn error                  | (4) wired
///        |                                  |     or deadline                  v
///        |                                  v                            +---------+
///        |     (7) its node rejoined   +--------+   (5) its node dead     | serving |
///        +---------------------------- | failed | <---------------------- +---------+
///                                      +--------+
///   (6) stop: any state -> stopped (idempotent)
/// ```
///
/// 1. When the last node of the config has joined, every expert actor is requested from its
///    node agent, then (once all are running) every stage, so stages can be wired to experts.
/// 2. The node agent loaded the weights and registered the actor under its address.
/// 3. Loading failed (the error names the node and what) or the agent did not answer within
///    the ready deadline: before the cluster first served, it cannot become ready and waiters
///    get the error; after, the cluster stays degraded and says why in its status.
/// 4. Once all are running the supervisor bumps the epoch and sends the placement table to
///    every stage and the router (`wire_atom`); when all acknowledged, the cluster serves and
///    `ready_atom` waiters get the table.
/// 5. A node is declared dead when its connection fails (the node agent's proxy goes down),
///    when it misses `heartbeat_misses` heartbeats in a row (a frozen process), or when a new
///    process joins under its name. Its actors fail; the epoch is bumped (data messages of the
///    old placement are refused from then on); every node drops its connections to it (the
///    next heartbeat carries the eviction), so calls waiting on it fail at once; the router is
///    fenced and takes the requests of the step in flight back. An event line goes to
///    `on_event` so that whoever started the process can kill and restart it.
/// 6. Stop is idempotent and goes through the node agents.
/// 7. A process of a dead node joins again (restarted by `shoal launch` or `shoal serve
///    --cluster`): its actors are spawned there again and the whole placement is wired under a
///    new epoch; the router recomputes every request from its prompt and streamed tokens.
///    A node not back within `replace_after` has its actors re-placed onto surviving nodes
///    that offer the memory for them (nodes of the same role first); if none does, the
///    cluster waits and its status says what fits nowhere.
/// 8. With a `standby` node in the config, a supervisor and router start there when the head
///    dies or freezes (`supervisor_options::takeover_from`); see docs/cluster.md.

#include "shoal/actors/protocols.hpp"
#include "shoal/config/cluster_config.hpp"
#include "shoal/config/model_config.hpp"
#include "shoal/runtime/weights_crypto.hpp"

#include <caf/stateful_actor.hpp>
#include <caf/typed_event_based_actor.hpp>
#include <caf/typed_response_promise.hpp>

#include <chrono>
#include <filesystem>
#include <deque>
#include <functional>
#include <map>
#include <set>
#include <memory>
#include <string>
#include <vector>

namespace shoal::actors {

class fabric;

/// Where a placed actor is in its lifecycle (see the diagram above).
enum class placement_phase { pending, spawning, running, serving, failed, stopped };

/// Name of a phase ("pending", ...).
const char* placement_phase_name(placement_phase phase) noexcept;

/// Supervisor settings.
struct supervisor_options {
  config::cluster_config cluster;                  ///< Validated against `model`.
  config::model_config model;                      ///< The model's architecture.
  std::chrono::milliseconds ready_timeout{120000}; ///< Joins, loads and wiring must finish by then.
  /// Interval of the heartbeats to nodes in other processes; 0 turns them off (failures are
  /// then seen only when a connection fails).
  std::chrono::milliseconds heartbeat_interval{500};
  int heartbeat_misses = 4;                        ///< Missed in a row: the node is declared dead.
  /// A dead node not back after this long has its actors re-placed onto survivors; 0: never.
  std::chrono::milliseconds replace_after{30000};
  /// Expert loads (status, `rebalance`) are counted over this window.
  std::chrono::seconds load_window{60};
  /// Token `shoal admin` commands that change the cluster must bring; empty: they are refused.
  std::string admin_token = {};
  /// Appends one JSON line per admin command (time, command, arguments, result); empty: none.
  std::filesystem::path admin_audit_log = {};
  /// Receives one JSON object per membership event (`node_down`, `node_rejoined`,
  /// `recovered`), e.g. for the launcher that restarts processes; may be empty.
  std::function<void(const std::string&)> on_event = {};
  /// Key of a checkpoint encrypted at rest, to read its shards' headers for the memory each
  /// actor needs (only the chunks holding the headers are decrypted); null for plain files.
  std::shared_ptr<const runtime::weights_key> key = nullptr;
  /// The node this supervisor (and the router beside it) runs on; empty: the config's head.
  std::string node = {};
  /// Non-empty: this supervisor takes over from that head node, which failed. It starts as a
  /// cluster that served and lost that node: the nodes join again (their actors keep running
  /// and are adopted, not reloaded), the dead head's own actors wait for its restart or are
  /// re-placed after `replace_after`, and the placement epoch starts above `epoch`.
  std::string takeover_from = {};
  std::uint64_t epoch = 0;                         ///< Newest epoch seen before a takeover.
  /// With `takeover_from`: the placement the old head last sent to this node as its standby
  /// (stage and expert-group nodes, expert ids, drained nodes; JSON); empty: the config's plan.
  std::string adopt = {};
};

/// State of the supervisor.
struct supervisor_state {
  static inline const char* name = "shoal.supervisor";  ///< Actor name in CAF logs.

  /// A node of the config.
  struct member {
    node_agent_actor agent;  ///< Null until joined and while dead.
    join_request info;       ///< What it said when joining.
    bool down = false;       ///< Declared dead and not back yet.
    std::string down_reason; ///< Why it was declared dead (kept after it is back).
    int restarts = 0;        ///< Joins after the first.
    std::chrono::steady_clock::time_point last_seen; ///< Its last heartbeat answer (or join).
    std::uint64_t answered = 0; ///< Latest heartbeat round it answered (the round current at its join).
    std::chrono::steady_clock::time_point down_at; ///< When it was declared dead.
    /// Tokens its stages routed to each expert, from its latest heartbeat answer (sparse,
    /// `layer * n_routed_experts + expert`).
    std::map<std::uint32_t, std::uint64_t> routed;
    /// Rows each of its expert actors computed, from its latest heartbeat answer, by actor id.
    std::map<std::uint64_t, std::uint64_t> served;
  };
  /// A stage or expert actor of the placement.
  struct placed {
    actor_address address;                      ///< Where it runs.
    placement_phase phase = placement_phase::pending; ///< Lifecycle state.
    std::string error;                          ///< Why it failed.
  };

  supervisor_options options;                    ///< Settings.
  std::shared_ptr<fabric> book;                  ///< Resolves addresses.
  router_actor router;                           ///< The router on this node.
  std::map<std::string, member> members;         ///< By node name.
  std::vector<placed> stages;                    ///< Pipeline order.
  std::vector<placed> experts;                   ///< Expert actors.
  std::uint64_t epoch = 0;                       ///< Current placement epoch.
  placement_table table;                         ///< The placement of `epoch`.
  bool serving = false;                          ///< Every actor serves.
  bool served = false;                           ///< It served at least once (failures heal from then on).
  bool wiring = false;                           ///< A placement table is being acknowledged.
  std::string failure;                           ///< Why the cluster can never serve, if so.
  std::string degraded;                          ///< Why it does not serve right now, while it heals.
  std::uint64_t recoveries = 0;                  ///< Times it served again after a failure.
  bool healing = false;                          ///< A node died or rejoined and the placement is not whole yet.
  bool fresh_router = true;                      ///< No placement acknowledged yet: the first one fences all before it.
  bool superseded = false;                       ///< A node said another head took over (this one was frozen or cut off).
  std::uint64_t heartbeat_sequence = 0;          ///< Heartbeats sent.
  std::vector<std::string> evicted;              ///< Nodes dead in the current epoch.
  std::chrono::steady_clock::time_point last_heartbeat; ///< When the last round went out.
  /// When each recent round went out, by sequence: a node is dead when it left
  /// `heartbeat_misses` rounds in a row unanswered and the first of them went out at least
  /// `heartbeat_misses` intervals ago. Counting rounds rather than time alone keeps a head
  /// that was itself stalled (a loaded machine) from declaring its nodes dead.
  std::map<std::uint64_t, std::chrono::steady_clock::time_point> rounds;
  /// Routed-token counts of node processes that have since died or been replaced, so that
  /// the cluster's counters never go back.
  std::map<std::uint32_t, std::uint64_t> retired_routed;
  std::set<std::string> drained;                 ///< Nodes emptied by `drain`: nothing is placed there.
  std::uint64_t fence = 0;                       ///< Epoch of the last node declared dead (see `placement_table::fence`).
  bool rewire = false;                           ///< The expert placement changed: wire it once nothing is under way.
  /// `move-expert`: once expert group `copy` serves, `expert` is dropped from `sources`.
  struct pending_move {
    std::int64_t expert = 0;
    std::size_t copy = 0;
    std::vector<std::size_t> sources;
  };
  std::vector<pending_move> moves;               ///< Moves waiting for their new copy.
  /// Actors left on a node by a drain or a move, stopped once the placement without them is
  /// acknowledged by every stage (no step can reach them after that).
  std::vector<actor_address> retiring;
  /// Expert loads over time, for loads over `load_window`: per-expert routed tokens (every
  /// placement) and rows computed per expert actor (reset when the expert placement changes).
  struct load_sample {
    std::chrono::steady_clock::time_point at;
    std::vector<std::uint64_t> routed;
    std::map<std::pair<std::string, std::uint64_t>, std::uint64_t> served;
  };
  std::deque<load_sample> routed_history;
  std::deque<load_sample> served_history;
  bool sizes_loaded = false;                     ///< `tensor_sizes` was read (or could not be).
  std::vector<std::pair<std::string, std::uint64_t>> tensor_sizes; ///< Checkpoint tensors' bytes, for placement.
  std::chrono::steady_clock::time_point started; ///< For the ready deadline.
  std::chrono::steady_clock::time_point last_rebalance; ///< The latest scheduled rebalance (or start).
  std::vector<caf::typed_response_promise<placement_table>> waiting; ///< `ready_atom` callers.
};

/// The head's status for operators: the supervisor's membership and placement JSON with the
/// router's scheduler counters under "scheduler" (the supervisor's `status_atom` reply).
/// Throws the supervisor's or router's error.
std::string head_status(caf::actor_system& system, const supervisor_actor& supervisor);

/// The supervisor. `router` runs on the head node and is wired with the stages.
supervisor_actor::behavior_type make_supervisor(supervisor_actor::stateful_pointer<supervisor_state> self,
                                                supervisor_options options, std::shared_ptr<fabric> book,
                                                router_actor router);

}  // namespace shoal::actors
