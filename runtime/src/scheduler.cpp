#include "shoal/runtime/scheduler.hpp"

#include "shoal/base/error.hpp"
#include "shoal/runtime/model.hpp"

#include <algorithm>
#include <string>

namespace shoal::runtime {

struct scheduler::sequence {
  std::uint64_t id = 0;
  std::vector<token_id> tokens;  // prompt + generated; positions [0, computed) are cached
  std::int64_t prompt_length = 0;
  std::int64_t computed = 0;
  std::vector<std::int32_t> blocks;
  bool admitted = false;
  bool fresh = false;            // admitted, no chunk committed yet
  bool in_flight = false;        // in a step formed and not committed yet
  bool taken = false;            // in the step being formed
  bool counted_cached = false;
  std::int64_t cached_prompt = 0;
};

// Full cache blocks of earlier sequences, keyed by the tokens they hold and by everything before
// them (a trie over token blocks). The tree holds one reference on each block; a block is
// evicted, least recently used first, only when no sequence holds it and it has no children.
class scheduler::prefix_tree {
 public:
  prefix_tree(block_allocator& blocks, std::int64_t block_tokens) : blocks_(blocks), block_tokens_(block_tokens) {}
  ~prefix_tree() { evict(size_); }

  // Retains and returns the blocks of the longest cached prefix of `tokens`, at most `max_blocks`.
  std::vector<std::int32_t> match(const std::vector<token_id>& tokens, std::int64_t max_blocks) {
    std::vector<std::int32_t> found;
    node* current = &root_;
    for (std::int64_t b = 0; b < max_blocks; ++b) {
      auto it = current->children.find(key(tokens, b));
      if (it == current->children.end()) break;
      current = it->second.get();
      current->last_used = ++clock_;
      blocks_.retain(current->block);
      found.push_back(current->block);
    }
    return found;
  }

  // Records the first `positions / block_tokens` full blocks of a sequence.
  void insert(const std::vector<token_id>& tokens, const std::vector<std::int32_t>& blocks, std::int64_t positions) {
    node* current = &root_;
    for (std::int64_t b = 0; b < positions / block_tokens_ && b < static_cast<std::int64_t>(blocks.size()); ++b) {
      auto& child = current->children[key(tokens, b)];
      if (!child) {
        child = std::make_unique<node>();
        child->block = blocks[static_cast<std::size_t>(b)];
        child->parent = current;
        blocks_.retain(child->block);
        ++size_;
      }
      // A sequence that recomputed a block already in the tree keeps its own copy; the tree
      // keeps the first one.
      child->last_used = ++clock_;
      current = child.get();
    }
  }

  // Frees up to `wanted` blocks; returns how many were freed.
  std::int64_t evict(std::int64_t wanted) {
    std::int64_t freed = 0;
    while (freed < wanted) {
      node* victim = nullptr;
      find_lru_leaf(&root_, victim);
      if (!victim) break;
      blocks_.release(victim->block);
      --size_;
      node* parent = victim->parent;
      for (auto it = parent->children.begin(); it != parent->children.end(); ++it)
        if (it->second.get() == victim) {
          parent->children.erase(it);
          break;
        }
      ++freed;
    }
    return freed;
  }

  std::int64_t size() const noexcept { return size_; }

  // Forgets every block no sequence holds (all of them once no sequence runs).
  void clear() { evict(size_); }

 private:
  struct node {
    std::int32_t block = -1;
    std::uint64_t last_used = 0;
    node* parent = nullptr;
    std::map<std::basic_string<token_id>, std::unique_ptr<node>> children;
  };

  std::basic_string<token_id> key(const std::vector<token_id>& tokens, std::int64_t block) const {
    return std::basic_string<token_id>(tokens.data() + block * block_tokens_, static_cast<std::size_t>(block_tokens_));
  }

  // Only leaves held by nobody else can go: evicting an inner block would orphan its children.
  void find_lru_leaf(node* n, node*& best) {
    for (auto& [k, child] : n->children) {
      if (child->children.empty()) {
        if (blocks_.references(child->block) == 1 && (!best || child->last_used < best->last_used)) best = child.get();
      } else {
        find_lru_leaf(child.get(), best);
      }
    }
  }

  block_allocator& blocks_;
  std::int64_t block_tokens_;
  node root_;
  std::uint64_t clock_ = 0;
  std::int64_t size_ = 0;
};

scheduler::scheduler(scheduler_options options) : options_(options) {
  if (options_.block_tokens <= 0) shoal::fail(errc::invalid_argument, "block_tokens must be > 0");
  if (options_.cache_blocks < 2)
    shoal::fail(errc::invalid_argument, "the latent cache holds {} blocks of {} tokens; at least 2 are needed",
                options_.cache_blocks, options_.block_tokens);
  if (options_.max_batch_tokens < 1) shoal::fail(errc::invalid_argument, "max_batch_tokens must be >= 1");
  if (options_.max_running < 1) shoal::fail(errc::invalid_argument, "max_running must be >= 1");
  blocks_ = std::make_unique<block_allocator>(options_.cache_blocks);
  prefix_ = std::make_unique<prefix_tree>(*blocks_, options_.block_tokens);
}

scheduler::~scheduler() {
  for (auto& [id, seq] : sequences_) release_blocks(*seq);
  prefix_.reset();
}

std::int64_t scheduler::max_sequence_tokens() const noexcept {
  // One position stays free for the token sampled after the last one.
  return options_.cache_blocks * options_.block_tokens - 1;
}

void scheduler::add(std::uint64_t id, std::vector<token_id> tokens, std::int64_t prompt_length) {
  if (tokens.empty()) shoal::fail(errc::invalid_argument, "sequence {} has no tokens", id);
  if (sequences_.contains(id)) shoal::fail(errc::invalid_argument, "sequence {} is already scheduled", id);
  if (static_cast<std::int64_t>(tokens.size()) > max_sequence_tokens())
    shoal::fail(errc::invalid_argument, "sequence {} has {} tokens; the latent cache holds at most {}", id,
                tokens.size(), max_sequence_tokens());
  auto seq = std::make_unique<sequence>();
  seq->id = id;
  seq->prompt_length = prompt_length > 0 ? prompt_length : static_cast<std::int64_t>(tokens.size());
  seq->tokens = std::move(tokens);
  waiting_.push_back(seq.get());
  sequences_.emplace(id, std::move(seq));
}

scheduler::sequence& scheduler::find(std::uint64_t id) const {
  const auto it = sequences_.find(id);
  SHOAL_REQUIRE(it != sequences_.end(), "sequence {} is not scheduled", id);
  return *it->second;
}

bool scheduler::contains(std::uint64_t id) const { return sequences_.contains(id); }

void scheduler::release_blocks(sequence& seq) {
  for (auto b : seq.blocks) blocks_->release(b);
  seq.blocks.clear();
  seq.computed = 0;
  seq.admitted = false;
  seq.in_flight = false;
}

void scheduler::remove(std::uint64_t id, bool keep_prefix) {
  const auto it = sequences_.find(id);
  if (it == sequences_.end()) return;
  sequence& seq = *it->second;
  if (keep_prefix && options_.prefix_cache && seq.admitted) prefix_->insert(seq.tokens, seq.blocks, seq.computed);
  release_blocks(seq);
  std::erase(waiting_, &seq);
  std::erase(running_, &seq);
  sequences_.erase(it);
}

bool scheduler::make_room(std::int64_t wanted) {
  if (blocks_->free_blocks() >= wanted) return true;
  prefix_->evict(wanted - blocks_->free_blocks());
  return blocks_->free_blocks() >= wanted;
}

bool scheduler::reserve(sequence& seq, std::int64_t positions) {
  const auto bt = options_.block_tokens;
  const std::int64_t missing = (positions + bt - 1) / bt - static_cast<std::int64_t>(seq.blocks.size());
  if (missing <= 0) return true;
  if (!make_room(missing)) return false;
  for (std::int64_t i = 0; i < missing; ++i) seq.blocks.push_back(blocks_->allocate());
  return true;
}

// Whether a running sequence is still computing a prompt that starts with the same block
// (its blocks enter the tree as they are computed; the follower then reuses all of them).
bool scheduler::shares_prefix_in_flight(const sequence& seq) const {
  const auto bt = options_.block_tokens;
  if (static_cast<std::int64_t>(seq.tokens.size()) <= bt) return false;
  for (const auto* other : running_) {
    if (other->prompt_length <= bt || other->computed >= other->prompt_length) continue;
    if (std::equal(seq.tokens.begin(), seq.tokens.begin() + bt, other->tokens.begin())) return true;
  }
  return false;
}

void scheduler::admit() {
  const auto bt = options_.block_tokens;
  while (!waiting_.empty() && static_cast<std::int64_t>(running_.size()) < options_.max_running) {
    sequence& seq = *waiting_.front();
    const auto length = static_cast<std::int64_t>(seq.tokens.size());
    // Requests that arrive together with a common prefix (a shared system prompt) would each
    // compute it; the first computes it and the others wait until its blocks are in the tree.
    if (options_.prefix_cache && shares_prefix_in_flight(seq)) break;
    // The last token is always computed here (it yields the logits), so at most the blocks
    // strictly before it come from the tree.
    std::vector<std::int32_t> shared;
    if (options_.prefix_cache) shared = prefix_->match(seq.tokens, (length - 1) / bt);
    const auto shared_blocks = static_cast<std::int64_t>(shared.size());
    const std::int64_t needed = (length + 1 + bt - 1) / bt - shared_blocks;
    if (!make_room(needed)) {
      for (auto b : shared) blocks_->release(b);
      break;  // first come, first served: later sequences wait behind this one
    }
    seq.blocks = std::move(shared);
    seq.computed = shared_blocks * bt;
    SHOAL_REQUIRE(reserve(seq, length + 1), "reserve after make_room");
    seq.admitted = true;
    seq.fresh = true;
    if (!seq.counted_cached) {
      seq.cached_prompt = std::min(shared_blocks * bt, seq.prompt_length);
      seq.counted_cached = true;
      counters_.cached_prompt_tokens += static_cast<std::uint64_t>(seq.cached_prompt);
    }
    running_.push_back(&seq);
    waiting_.pop_front();
  }
}

void scheduler::requeue_all() {
  for (auto it = running_.rbegin(); it != running_.rend(); ++it) {
    release_blocks(**it);
    waiting_.push_front(*it);
    ++counters_.requeued;
  }
  running_.clear();
  prefix_->clear();
}

// Sends the youngest running sequence that is in no step (in flight or being formed) back to
// the queue, to be recomputed from its tokens; false when that would be `seq` itself or none.
bool scheduler::preempt_youngest(const sequence& seq) {
  for (auto it = running_.rbegin(); it != running_.rend(); ++it) {
    sequence* victim = *it;
    if (victim->in_flight || victim->taken) continue;
    if (victim == &seq) return false;
    running_.erase(std::next(it).base());
    release_blocks(*victim);
    waiting_.push_front(victim);
    ++counters_.preemptions;
    return true;
  }
  return false;
}

// Makes sure `seq` can take `positions` positions, evicting prefix-tree blocks and then
// preempting younger sequences (never one in a step).
bool scheduler::ensure_capacity(sequence& seq, std::int64_t positions) {
  while (true) {
    if (reserve(seq, positions)) return true;
    if (!preempt_youngest(seq)) return false;
  }
}

std::vector<scheduled_chunk> scheduler::schedule(std::int64_t parts) {
  admit();
  std::vector<scheduled_chunk> step;
  std::int64_t budget = options_.max_batch_tokens;
  const auto running = static_cast<std::int64_t>(running_.size());
  const std::int64_t most = parts > 1 ? (running + parts - 1) / parts : running;
  // Decode tokens first (one per sequence, cheap and latency-critical), then prompt chunks.
  std::stable_partition(running_.begin(), running_.end(), [](const sequence* s) {
    return static_cast<std::int64_t>(s->tokens.size()) - s->computed == 1;
  });
  std::vector<sequence*> taken;
  for (std::size_t i = 0; i < running_.size() && budget > 0 && static_cast<std::int64_t>(taken.size()) < most; ++i) {
    sequence& seq = *running_[i];
    if (seq.in_flight) continue;
    const auto pending = static_cast<std::int64_t>(seq.tokens.size()) - seq.computed;
    const std::int64_t take = std::min(pending, budget);
    if (!ensure_capacity(seq, seq.computed + take + 1)) {
      // Nothing younger outside a step is left to make room: `seq` itself waits.
      running_.erase(running_.begin() + static_cast<std::ptrdiff_t>(i));
      release_blocks(seq);
      waiting_.push_front(&seq);
      ++counters_.preemptions;
      break;
    }
    // Every sequence before index i is in a step, and only sequences in no step are
    // preempted, so the spans below stay valid.
    seq.taken = true;
    taken.push_back(&seq);
    step.push_back({.id = seq.id,
                    .start = seq.computed,
                    .tokens = std::span<const token_id>(seq.tokens.data() + seq.computed, static_cast<std::size_t>(take)),
                    .blocks = seq.blocks,
                    .samples = seq.computed + take == static_cast<std::int64_t>(seq.tokens.size()),
                    .fresh = seq.fresh});
    budget -= take;
  }
  for (auto* seq : taken) {
    seq->taken = false;
    seq->in_flight = true;
  }
  return step;
}

void scheduler::commit(std::span<const scheduled_chunk> step) {
  for (const auto& chunk : step) {
    const auto it = sequences_.find(chunk.id);
    if (it == sequences_.end()) continue;
    sequence& seq = *it->second;
    seq.in_flight = false;
    if (!seq.admitted || seq.computed != chunk.start) continue;  // preempted or removed meanwhile
    const auto end = chunk.start + static_cast<std::int64_t>(chunk.tokens.size());
    if (chunk.start < seq.prompt_length)
      counters_.prefilled_tokens += static_cast<std::uint64_t>(std::min(seq.prompt_length, end) - chunk.start);
    seq.computed = end;
    seq.fresh = false;
    // Prompt blocks become shareable as soon as they are computed, not when the sequence ends.
    if (options_.prefix_cache && seq.computed <= seq.prompt_length) prefix_->insert(seq.tokens, seq.blocks, seq.computed);
  }
}

void scheduler::append(std::uint64_t id, token_id token) {
  sequence& seq = find(id);
  seq.tokens.push_back(token);
}

const std::vector<token_id>& scheduler::tokens(std::uint64_t id) const { return find(id).tokens; }

std::int64_t scheduler::prompt_length(std::uint64_t id) const { return find(id).prompt_length; }

std::int64_t scheduler::cached_prompt_tokens(std::uint64_t id) const { return find(id).cached_prompt; }

std::vector<std::uint64_t> scheduler::ids() const {
  std::vector<std::uint64_t> out;
  out.reserve(sequences_.size());
  for (const auto* s : waiting_) out.push_back(s->id);
  for (const auto* s : running_) out.push_back(s->id);
  return out;
}

bool scheduler::empty() const noexcept { return sequences_.empty(); }

scheduler_stats scheduler::stats() const {
  scheduler_stats s = counters_;
  s.waiting = static_cast<std::int64_t>(waiting_.size());
  s.running = static_cast<std::int64_t>(running_.size());
  s.cache_blocks_total = blocks_->total_blocks();
  s.cache_blocks_used = blocks_->total_blocks() - blocks_->free_blocks();
  s.prefix_cache_blocks = prefix_->size();
  return s;
}

}  // namespace shoal::runtime
