#pragma once
/// \file
/// The values actors exchange. Plain structs without CAF, one per Cap'n Proto message kind of
/// transport/schemas (field names follow the schemas); `inspect` overloads let CAF carry them
/// between local actors. Bulk tensors are plain vectors here and separate UCX messages on the
/// wire.

#include <cstdint>
#include <string>
#include <vector>

namespace shoal::actors {

/// Version of the messages this binary speaks (the wire schemas' `schemaVersion`); a node
/// that speaks another one is refused when it joins.
/// 2: steps carry block tables decided by the router; stages no longer keep caches per request.
/// 3: the supervisor sends heartbeats carrying its epoch and the nodes it evicted.
/// 4: the transport's hello carries nonces for the join-secret proof.
/// 5: placement tables and heartbeats carry the fence; expert copies are retired one by one.
/// 6: joins carry the epoch a node has seen; heartbeats to the standby carry the head's placement.
/// 7: steps carry the call that began them; the last stage answers the router directly.
/// 8: an expert copy's weights stream from a running copy (WeightsRequest/WeightsReply).
inline constexpr std::uint16_t schema_version = 9;

/// Identifies a request for its whole life, including replays after a failure.
using request_id = std::uint64_t;

/// Well-known actor ids within a node (the schemas' ActorAddress.actor).
namespace actor_ids {
inline constexpr std::uint64_t node_agent = 0;   ///< Every node's agent.
inline constexpr std::uint64_t supervisor = 1;   ///< On the head node.
inline constexpr std::uint64_t router = 2;       ///< On the head node.
inline constexpr std::uint64_t first_stage = 100;   ///< Stage i has id first_stage + i.
inline constexpr std::uint64_t first_expert = 1000; ///< Expert group j has id first_expert + j.
inline constexpr std::uint64_t first_client = 1u << 20; ///< Clients get ids from here on.
}  // namespace actor_ids

/// An actor somewhere in the cluster.
struct actor_address {
  std::string node;       ///< Node name from the cluster config.
  std::uint64_t actor = 0; ///< Id within the node (see `actor_ids`).
  friend bool operator==(const actor_address&, const actor_address&) = default;
};

/// How the last stage picks a request's tokens (`runtime::sampling_params` on the wire). The
/// defaults are greedy decoding.
struct sampling_spec {
  float temperature = 0.0f;          ///< 0: greedy (argmax).
  std::uint32_t top_k = 0;           ///< 0: no top-k cut.
  float top_p = 1.0f;                ///< 1: no nucleus cut.
  float min_p = 0.0f;                ///< 0: no min-p cut.
  float repetition_penalty = 1.0f;   ///< Over prompt and output tokens.
  float frequency_penalty = 0.0f;    ///< Over output tokens.
  float presence_penalty = 0.0f;     ///< Over output tokens.
  bool has_seed = false;             ///< Whether `seed` is set; without one the stage draws a seed.
  std::uint64_t seed = 0;            ///< Same seed, same logits: same tokens.
  std::uint32_t id_limit = 0;        ///< Ids at or above are never chosen (tokenizer's limit); 0: none.
  friend bool operator==(const sampling_spec&, const sampling_spec&) = default;
};

/// One request's share of a pipeline step, as the router's scheduler decided it.
struct batch_entry {
  request_id request = 0;             ///< Whose tokens these are.
  std::vector<std::int32_t> tokens;   ///< New tokens (a prompt chunk, or one decode token).
  std::uint32_t position = 0;         ///< Sequence position of tokens[0]; positions before it are cached.
  bool sample_after = true;           ///< Whether the last stage samples after these tokens.
  /// How many tokens of the whole sequence are the prompt; the rest were generated (before a
  /// preemption or replay), and a rebuilt sampler treats them as its own output.
  std::uint32_t prompt_tokens = 0;
  sampling_spec sampling;             ///< How the last stage samples this request.
  /// Latent-cache block table of the sequence (block ids of every stage's pool), covering
  /// every position up to the end of `tokens`. Blocks are decided by the router only.
  std::vector<std::int32_t> blocks;
  /// First chunk since the request was (re)admitted: the last stage rebuilds its sampler.
  bool fresh = false;
  /// When `fresh` and sampling is not greedy: the tokens before `position` (from the prefix
  /// cache, or computed before a preemption), which the rebuilt sampler needs.
  std::vector<std::int32_t> history;
};

/// A pipeline step travelling through the stages: router -> first stage (`hidden` empty),
/// stage i -> stage i+1 (`hidden` holds the activations after layer `next_layer - 1`).
struct step_batch {
  std::uint64_t step = 0;             ///< Router's iteration number.
  std::uint32_t next_layer = 0;       ///< First layer the receiver runs.
  std::vector<batch_entry> entries;   ///< Token rows, in order.
  std::vector<float> hidden;          ///< `[rows][hidden_size]`, rows as in `entries`.
  bool want_logits = false;           ///< The last stage returns the logits it sampled from.
  /// Set when a step crosses nodes: the call of the node that began it (the router's). The
  /// last stage answers that call itself, so sampled tokens go straight back to the router
  /// instead of retracing every stage. 0 = answer whoever sent it.
  actor_address return_to;
  std::uint64_t return_call = 0;
};

/// A token chosen by the last stage.
struct sampled_token {
  request_id request = 0;  ///< Whose token.
  std::int32_t token = 0;  ///< The token id.
};

/// Last stage -> router: the tokens of one step.
struct sampled_batch {
  std::uint64_t step = 0;              ///< As in the step_batch.
  std::vector<sampled_token> tokens;   ///< One per entry with `sample_after`, in entry order.
  std::vector<float> logits;           ///< `[tokens][vocab]` when the step wanted logits.
  /// Not a result: the step went on to another node, whose last stage answers the caller in
  /// `step_batch::return_to` directly. Never leaves the process.
  bool forwarded = false;
};

/// Stage -> expert actor: token rows routed to the receiver's experts in one layer. One row
/// per (token, choice) so the expert returns each choice's output unweighted and the stage
/// sums them in expert-id order, exactly as the single-process kernel does.
struct expert_dispatch {
  std::uint64_t step = 0;               ///< Step it belongs to.
  std::uint32_t layer = 0;              ///< Decoder layer.
  std::vector<float> hidden;            ///< `[rows][hidden_size]` expert inputs.
  std::vector<std::int32_t> expert_ids; ///< `[rows]` routed expert of each row.
};

/// Expert actor -> stage: each dispatched row's expert output, unweighted.
struct expert_combine {
  std::uint64_t step = 0;       ///< As dispatched.
  std::uint32_t layer = 0;      ///< As dispatched.
  std::vector<float> output;    ///< `[rows][hidden_size]`.
};

/// A pipeline stage in the placement table.
struct stage_placement {
  std::uint32_t stage = 0;        ///< Position in the pipeline.
  std::uint32_t first_layer = 0;  ///< First layer.
  std::uint32_t end_layer = 0;    ///< One past the last.
  actor_address address;          ///< Where it runs.
};

/// An expert actor in the placement table.
struct expert_placement {
  std::vector<std::uint32_t> experts;  ///< Routed expert ids it serves (every MoE layer).
  actor_address address;               ///< Where it runs.
};

/// Where everything runs, valid for one epoch.
struct placement_table {
  std::uint64_t epoch = 0;                  ///< Bumped on every change.
  std::vector<stage_placement> stages;      ///< Pipeline order.
  std::vector<expert_placement> experts;    ///< Empty: stages compute their experts.
  actor_address router;                     ///< The router.
  /// Data messages of older epochs are refused: the epoch in which a node was last declared
  /// dead (or the first placement's). A change that loses no node (an expert copied, moved or dropped) moves the epoch
  /// but not the fence, so that the step in flight finishes on the old placement.
  std::uint64_t fence = 0;
};

/// Supervisor -> node agent: start stage `stage` of `stage_count` over [first, end) layers.
struct spawn_stage_cmd {
  std::uint64_t actor = 0;          ///< Id it gets on the node.
  std::uint32_t stage = 0;          ///< Position in the pipeline.
  std::uint32_t stage_count = 0;    ///< Stages in the pipeline.
  std::uint32_t first_layer = 0;    ///< First layer.
  std::uint32_t end_layer = 0;      ///< One past the last.
  bool hold_experts = true;         ///< Compute routed experts itself (no expert actors).
  std::string model_path;           ///< Checkpoint directory on that node.
  std::uint32_t cache_blocks = 0;   ///< Latent-cache blocks for its layers (the router's scheduler has as many).
  std::uint32_t block_tokens = 0;   ///< Positions per block.
};

/// Supervisor -> node agent: start an expert actor holding `experts` of every MoE layer.
struct spawn_expert_cmd {
  std::uint64_t actor = 0;             ///< Id it gets on the node.
  std::vector<std::uint32_t> experts;  ///< Routed expert ids.
  std::string model_path;              ///< Checkpoint directory on that node.
  /// A running expert actor holding all of `experts`: their weights stream from it over the
  /// transport (the checkpoint is the fallback). Empty node: load from the checkpoint.
  actor_address source;
};

/// Node agent -> node agent: part `part` of the weights of `experts` (every MoE layer) that
/// the expert actor `actor` of the receiving node holds.
struct weights_request {
  std::uint64_t actor = 0;             ///< The holding expert actor's id on that node.
  std::vector<std::uint32_t> experts;  ///< Routed expert ids, each held by it.
  std::uint32_t part = 0;              ///< From 0 to `weights_part::parts` - 1.
};

/// The answer: some (layer, expert) pairs' tensors as one safetensors file, in checkpoint
/// names and dtypes, plus the checkpoint's config.json they were checked against.
struct weights_part {
  std::uint32_t part = 0;              ///< Which one.
  std::uint32_t parts = 0;             ///< How many make up the whole set.
  std::string config_json;             ///< The source's config.json text.
  std::vector<std::uint8_t> tensors;   ///< A safetensors file.
};

/// Supervisor -> node agent: stop actor `actor` and free what it holds (an expert copy that
/// the placement no longer routes to, once every stage has acknowledged that placement).
struct retire_actor_cmd {
  std::uint64_t actor = 0;             ///< Its id on the node.
};

/// Node -> supervisor: the first message of a node.
struct join_request {
  std::string node;                    ///< Name from the cluster config.
  std::string host;                    ///< Address others reach it at.
  std::uint16_t port = 0;              ///< Port it listens on.
  std::uint32_t pid = 0;               ///< Process id, for operators.
  std::uint16_t schema_version = 0;    ///< Wire schema version it speaks.
  /// Memory it offers for placement: the node's `memory_gb`, or what the OS reports available
  /// at the join (0: unknown). Re-placement after a failure keeps within it.
  std::uint64_t memory_bytes = 0;
  /// Newest placement epoch the node has seen: a head that takes over starts above it, so
  /// that nothing of the old head's placements passes the new fence.
  std::uint64_t epoch = 0;
};

/// Supervisor -> node, every heartbeat interval; the node answers at once from its transport
/// thread, so a frozen process (SIGSTOP, a hung host, a cut link) stops answering even when
/// its connections stay open.
struct heartbeat {
  std::uint64_t epoch = 0;             ///< The supervisor's placement epoch: messages of older ones are refused.
  std::uint64_t sequence = 0;          ///< Increments by one per heartbeat.
  /// Nodes declared dead in this epoch: every node drops its connections to them, so calls
  /// waiting on a frozen node fail now instead of at their deadline.
  std::vector<std::string> evicted;
  /// In a node's answer: tokens its stages routed to each expert so far, as sparse
  /// `[layer * n_routed_experts + expert]` indices and counts (nonzero ones only).
  std::vector<std::uint32_t> routed_index;
  std::vector<std::uint64_t> routed_count;
  std::uint64_t fence = 0;             ///< See `placement_table::fence`.
  /// In a node's answer: its expert actors and the rows each computed so far (the measured
  /// load of each copy).
  std::vector<std::uint64_t> served_actor;
  std::vector<std::uint64_t> served_rows;
  /// To the standby head only: the placement as operators and failures left it (stage and
  /// expert-group nodes, expert ids, drained nodes; JSON), so that a takeover keeps it.
  std::string head_state;
};

/// Operator -> supervisor (`shoal admin`): a command that changes the cluster.
struct admin_request {
  std::string command;                 ///< drain, move-expert, rebalance, ... (see `shoal admin`).
  std::vector<std::string> args;       ///< Its arguments (a node name).
  std::string token;                   ///< The cluster's admin token.
};

/// Client -> router: generate tokens after a prompt.
struct generate_request {
  request_id request = 0;              ///< Chosen by the client, unique per client.
  std::vector<std::int32_t> prompt;    ///< Prompt token ids.
  sampling_spec sampling;              ///< Token choice (greedy by default).
  std::uint32_t max_tokens = 16;       ///< Tokens to generate at most.
  std::vector<std::int32_t> stop_tokens; ///< Generation ends after one of these.
  bool want_logits = false;            ///< Return the logits of each sampled token too.
  std::uint64_t deadline_unix_ms = 0;  ///< 0: none.
  /// Tokens of this request the client already received (it resumes on a new head after a
  /// failover): they are recomputed after the prompt, count towards `max_tokens` and advance
  /// the sampler's random stream, and are not sent again.
  std::vector<std::int32_t> resume;
};

/// Why a request's stream ended (the schema's FinishReason).
enum class finish_reason : std::uint8_t {
  none = 0,       ///< More chunks follow.
  stop = 1,       ///< A stop token was generated.
  length = 2,     ///< `max_tokens` reached.
  cancelled = 3,  ///< The client cancelled.
  error = 4,      ///< Failed; `error` says why.
};

/// Router -> client: tokens as they are generated; the last chunk has `finish != none`.
struct token_chunk {
  request_id request = 0;             ///< Which request.
  std::vector<std::int32_t> tokens;   ///< New tokens, in order.
  std::vector<float> logits;          ///< `[tokens][vocab]` when the request wanted logits.
  finish_reason finish = finish_reason::none; ///< Whether and why the stream ended.
  std::uint8_t error_code = 0;        ///< `shoal::errc` value when finish == error.
  std::string error;                  ///< What went wrong, when finish == error.
  std::uint32_t cached_prompt_tokens = 0; ///< Prompt tokens the router served from its prefix cache.
};

// CAF 0.17 inspection: lets local actors pass these by value and prints them in logs.
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, actor_address& x) {
  return f(x.node, x.actor);
}
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, sampling_spec& x) {
  return f(x.temperature, x.top_k, x.top_p, x.min_p, x.repetition_penalty, x.frequency_penalty, x.presence_penalty,
           x.has_seed, x.seed, x.id_limit);
}
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, batch_entry& x) {
  return f(x.request, x.tokens, x.position, x.sample_after, x.prompt_tokens, x.sampling, x.blocks, x.fresh, x.history);
}
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, step_batch& x) {
  return f(x.step, x.next_layer, x.entries, x.hidden, x.want_logits, x.return_to, x.return_call);
}
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, sampled_token& x) {
  return f(x.request, x.token);
}
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, sampled_batch& x) {
  return f(x.step, x.tokens, x.logits, x.forwarded);
}
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, expert_dispatch& x) {
  return f(x.step, x.layer, x.hidden, x.expert_ids);
}
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, expert_combine& x) {
  return f(x.step, x.layer, x.output);
}
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, stage_placement& x) {
  return f(x.stage, x.first_layer, x.end_layer, x.address);
}
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, expert_placement& x) {
  return f(x.experts, x.address);
}
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, placement_table& x) {
  return f(x.epoch, x.stages, x.experts, x.router, x.fence);
}
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, spawn_stage_cmd& x) {
  return f(x.actor, x.stage, x.stage_count, x.first_layer, x.end_layer, x.hold_experts, x.model_path, x.cache_blocks,
           x.block_tokens);
}
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, spawn_expert_cmd& x) {
  return f(x.actor, x.experts, x.model_path, x.source);
}
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, weights_request& x) {
  return f(x.actor, x.experts, x.part);
}
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, weights_part& x) {
  return f(x.part, x.parts, x.config_json, x.tensors);
}
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, retire_actor_cmd& x) {
  return f(x.actor);
}
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, join_request& x) {
  return f(x.node, x.host, x.port, x.pid, x.schema_version, x.memory_bytes, x.epoch);
}
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, heartbeat& x) {
  return f(x.epoch, x.sequence, x.evicted, x.routed_index, x.routed_count, x.fence, x.served_actor, x.served_rows,
           x.head_state);
}
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, admin_request& x) {
  return f(x.command, x.args, x.token);
}
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, generate_request& x) {
  return f(x.request, x.prompt, x.sampling, x.max_tokens, x.stop_tokens, x.want_logits, x.deadline_unix_ms, x.resume);
}
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, token_chunk& x) {
  return f(x.request, x.tokens, x.logits, x.finish, x.error_code, x.error, x.cached_prompt_tokens);
}

}  // namespace shoal::actors
