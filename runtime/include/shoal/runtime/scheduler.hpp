#pragma once
/// \file
/// Continuous batching and block accounting, without a model: which sequences run in the next
/// step, which of their tokens, and which latent-cache blocks hold them. Whoever computes (the
/// engine's model in one thread, or pipeline stages that each store the blocks of their own
/// layers) receives each sequence's block table with the step, so blocks are decided in one
/// place and a store never runs out behind the scheduler's back (vLLM splits its scheduler and
/// workers the same way).

#include "shoal/runtime/tokenizer.hpp"

#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <span>
#include <vector>

namespace shoal::runtime {

class block_allocator;

/// Sizing and policy of a scheduler.
struct scheduler_options {
  std::int64_t cache_blocks = 0;        ///< Latent-cache blocks to hand out (> 1).
  std::int64_t block_tokens = 32;       ///< Positions per block.
  std::int64_t max_batch_tokens = 256;  ///< Token budget of one step (decode tokens + prompt chunks).
  std::int64_t max_running = 64;        ///< Sequences admitted at once.
  bool prefix_cache = true;             ///< Reuse full blocks of earlier prompts with the same tokens.
};

/// One sequence's share of a step.
struct scheduled_chunk {
  std::uint64_t id = 0;                  ///< The sequence.
  std::int64_t start = 0;                ///< Position of `tokens[0]`; positions before it are cached.
  std::span<const token_id> tokens;      ///< Tokens to compute, positions `[start, start + size)`.
  std::span<const std::int32_t> blocks;  ///< Block table; covers every position up to the end of the chunk.
  bool samples = false;                  ///< The chunk ends at the sequence's last token: choose the next one.
  /// First chunk since the sequence was (re)admitted: positions before `start` come from the
  /// prefix cache, and a per-sequence sampler must be rebuilt from the whole token history.
  bool fresh = false;
};

/// Counters for metrics.
struct scheduler_stats {
  std::int64_t waiting = 0;               ///< Sequences not admitted (new or preempted).
  std::int64_t running = 0;               ///< Sequences holding blocks.
  std::int64_t cache_blocks_total = 0;
  std::int64_t cache_blocks_used = 0;     ///< Held by sequences or the prefix tree.
  std::int64_t prefix_cache_blocks = 0;   ///< Blocks kept for prefix reuse.
  std::uint64_t prefilled_tokens = 0;     ///< Prompt tokens computed (not from the cache).
  std::uint64_t cached_prompt_tokens = 0; ///< Prompt tokens served from the prefix cache.
  std::uint64_t preemptions = 0;          ///< Sequences evicted for recompute.
  std::uint64_t requeued = 0;             ///< Sequences sent back by `requeue_all`.
};

/// Admission, batching and block accounting. A sequence is admitted, first come first served,
/// when blocks for its prompt plus one token are free (after evicting unreferenced prefix
/// blocks); each step takes one decode token of every running sequence first, then prompt
/// chunks (chunked prefill) within `max_batch_tokens`; when a sequence needs a block and none
/// is free, the youngest running sequence is preempted: its blocks are freed and it waits at
/// the front of the queue to be recomputed from its tokens. Full blocks of computed prompts
/// stay in a prefix tree keyed by their tokens (as SGLang's RadixAttention) and are adopted by
/// later sequences with the same prefix.
///
/// Not thread-safe: one owner (an engine thread, a router actor) calls it.
class scheduler {
 public:
  explicit scheduler(scheduler_options options);
  ~scheduler();
  scheduler(const scheduler&) = delete;
  scheduler& operator=(const scheduler&) = delete;

  /// Queues a sequence of `tokens` (a prompt, or a prompt plus tokens generated before) at the
  /// back. `prompt_length` of them are the prompt (all when 0). `id` must be new.
  void add(std::uint64_t id, std::vector<token_id> tokens, std::int64_t prompt_length = 0);
  /// Forgets a sequence, wherever it is. With `keep_prefix`, its computed full blocks stay in
  /// the prefix tree for later sequences (a normal finish); not after an error. Unknown ids
  /// are ignored.
  void remove(std::uint64_t id, bool keep_prefix);
  /// Whether the sequence is known.
  bool contains(std::uint64_t id) const;

  /// Admits what fits and forms the next step (empty when nothing can run) from the running
  /// sequences that are in no step in flight. With `parts` > 1 a step takes at most
  /// 1/`parts` of the running sequences (rounded up), so that `parts` steps can be in a
  /// pipeline of stages at once, each with sequences of its own; a sequence in a step in flight
  /// is never preempted. The chunks point into the scheduler's sequences and stay valid until
  /// that step is committed or `requeue_all` is called.
  std::vector<scheduled_chunk> schedule(std::int64_t parts = 1);
  /// A step formed by `schedule` has been computed: every chunk's positions are cached now,
  /// and computed prompt blocks become shareable. Sequences removed meanwhile are skipped.
  void commit(std::span<const scheduled_chunk> step);
  /// The stores lost their contents (a stage was replaced after a failure), or the steps in
  /// flight were abandoned: every running sequence goes back to the front of the queue, in
  /// order, to be recomputed from its tokens, and the prefix tree is emptied. Tokens and
  /// prompt lengths are kept; no step formed before must be committed.
  void requeue_all();
  /// Appends the token chosen after a chunk that `samples`.
  void append(std::uint64_t id, token_id token);

  /// All tokens of a sequence (prompt, then generated).
  const std::vector<token_id>& tokens(std::uint64_t id) const;
  /// Its prompt length.
  std::int64_t prompt_length(std::uint64_t id) const;
  /// Prompt tokens it took from the prefix cache at its first admission.
  std::int64_t cached_prompt_tokens(std::uint64_t id) const;
  /// Ids of every sequence, waiting ones first, each group in queue order.
  std::vector<std::uint64_t> ids() const;
  /// Whether nothing is waiting or running.
  bool empty() const noexcept;

  /// Longest sequence (prompt plus generated) the cache can ever hold.
  std::int64_t max_sequence_tokens() const noexcept;
  const scheduler_options& options() const noexcept { return options_; }
  scheduler_stats stats() const;

 private:
  struct sequence;
  class prefix_tree;

  bool make_room(std::int64_t wanted);
  void admit();
  bool shares_prefix_in_flight(const sequence& seq) const;
  bool preempt_youngest(const sequence& seq);
  bool ensure_capacity(sequence& seq, std::int64_t positions);
  bool reserve(sequence& seq, std::int64_t positions);
  void release_blocks(sequence& seq);
  sequence& find(std::uint64_t id) const;

  scheduler_options options_;
  std::unique_ptr<block_allocator> blocks_;
  std::unique_ptr<prefix_tree> prefix_;
  std::map<std::uint64_t, std::unique_ptr<sequence>> sequences_;
  std::deque<sequence*> waiting_;
  std::vector<sequence*> running_;
  scheduler_stats counters_;
};

}  // namespace shoal::runtime
