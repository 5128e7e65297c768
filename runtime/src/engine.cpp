#include "shoal/runtime/engine.hpp"

#include "shoal/base/error.hpp"
#include "shoal/runtime/model.hpp"

#include <algorithm>
#include <condition_variable>
#include <deque>
#include <map>
#include <mutex>
#include <thread>

namespace shoal::runtime {
namespace {

using clock_type = std::chrono::steady_clock;

// Full cache blocks of earlier sequences, keyed by the tokens they hold and by everything before
// them (a trie over token blocks, as SGLang's RadixAttention keeps over tokens). The tree holds
// one reference on each block; a block is evicted, least recently used first, only when no
// sequence holds it and it has no children.
class prefix_tree {
 public:
  prefix_tree(kv_block_pool& pool) : pool_(pool) {}
  ~prefix_tree() { clear(); }

  // Retains and returns the blocks of the longest cached prefix of `tokens`, at most `max_blocks`.
  std::vector<std::int32_t> match(const std::vector<token_id>& tokens, std::int64_t max_blocks) {
    std::vector<std::int32_t> blocks;
    node* current = &root_;
    const auto bt = pool_.block_tokens();
    for (std::int64_t b = 0; b < max_blocks; ++b) {
      auto it = current->children.find(key(tokens, b * bt, bt));
      if (it == current->children.end()) break;
      current = it->second.get();
      current->last_used = ++clock_;
      pool_.retain(current->block);
      blocks.push_back(current->block);
    }
    return blocks;
  }

  // Records the first `positions / block_tokens` full blocks of a sequence's cache.
  void insert(const std::vector<token_id>& tokens, const std::vector<std::int32_t>& blocks, std::int64_t positions) {
    node* current = &root_;
    const auto bt = pool_.block_tokens();
    for (std::int64_t b = 0; b < positions / bt && b < static_cast<std::int64_t>(blocks.size()); ++b) {
      auto& child = current->children[key(tokens, b * bt, bt)];
      if (!child) {
        child = std::make_unique<node>();
        child->block = blocks[b];
        child->parent = current;
        pool_.retain(child->block);
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
      pool_.release(victim->block);
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

  void clear() {
    evict(size_);
  }

 private:
  struct node {
    std::int32_t block = -1;
    std::uint64_t last_used = 0;
    node* parent = nullptr;
    std::map<std::basic_string<token_id>, std::unique_ptr<node>> children;
  };

  static std::basic_string<token_id> key(const std::vector<token_id>& tokens, std::int64_t first, std::int64_t count) {
    return std::basic_string<token_id>(tokens.data() + first, static_cast<std::size_t>(count));
  }

  // Only leaves held by nobody else can go: evicting an inner block would orphan its children.
  void find_lru_leaf(node* n, node*& best) {
    for (auto& [k, child] : n->children) {
      if (child->children.empty()) {
        if (pool_.references(child->block) == 1 && (!best || child->last_used < best->last_used)) best = child.get();
      } else {
        find_lru_leaf(child.get(), best);
      }
    }
  }

  kv_block_pool& pool_;
  node root_;
  std::uint64_t clock_ = 0;
  std::int64_t size_ = 0;
};

}  // namespace

struct engine::impl {
  struct sequence {
    std::uint64_t id = 0;
    generation_request request;
    std::vector<token_id> tokens;  // prompt + generated; the cache holds a prefix of them
    std::int64_t prompt_length = 0;
    std::int64_t cached_prompt = 0;
    std::unique_ptr<latent_cache> cache;
    std::unique_ptr<sampler> sample;
    std::unique_ptr<completion_stream> stream;
    bool counted_cached = false;
  };

  impl(model& n, const tokenizer& t, engine_options o) : net(n), tok(t), options(o) {
    const auto& c = net.config();
    if (options.block_tokens <= 0) shoal::fail(errc::invalid_argument, "block_tokens must be > 0");
    std::int64_t blocks = options.cache_blocks;
    if (blocks <= 0) blocks = options.cache_bytes / kv_block_pool::block_bytes(c, options.block_tokens);
    if (blocks < 2)
      shoal::fail(errc::invalid_argument, "KV cache budget of {} bytes holds {} blocks of {} tokens; at least 2 are needed",
                  options.cache_bytes, blocks, options.block_tokens);
    pool = std::make_unique<kv_block_pool>(c, blocks, options.block_tokens);
    prefix = std::make_unique<prefix_tree>(*pool);
    counters.expert_tokens.assign(static_cast<std::size_t>(c.num_hidden_layers * c.n_routed_experts), 0);
    net.set_route_observer([this](std::int64_t layer, std::int64_t tokens, std::int64_t top_k, const std::int32_t* indices,
                                  const float*) {
      const auto experts = net.config().n_routed_experts;
      std::lock_guard lock(mutex);
      for (std::int64_t i = 0; i < tokens * top_k; ++i) ++counters.expert_tokens[layer * experts + indices[i]];
    });
    eos = tok.eos_id();
    thread = std::thread([this] { loop(); });
  }

  ~impl() {
    stop(false);
    net.set_route_observer({});
  }

  std::int64_t max_sequence_tokens() const {
    return std::min(net.config().max_position_embeddings, pool->total_blocks() * pool->block_tokens());
  }

  std::uint64_t submit(generation_request request) {
    if (request.prompt.empty()) shoal::fail(errc::invalid_argument, "the prompt is empty");
    validate(request.sampling);
    if (request.limits.max_tokens < 1) shoal::fail(errc::invalid_argument, "max_tokens must be >= 1");
    const auto total = static_cast<std::int64_t>(request.prompt.size()) + request.limits.max_tokens;
    if (total > max_sequence_tokens())
      shoal::fail(errc::invalid_argument,
                  "prompt ({} tokens) + max_tokens ({}) exceeds the {} tokens a sequence may hold", request.prompt.size(),
                  request.limits.max_tokens, max_sequence_tokens());
    for (auto id : request.prompt)
      if (id < 0 || id >= net.config().vocab_size)
        shoal::fail(errc::invalid_argument, "token id {} is outside the vocabulary", id);
    auto seq = std::make_unique<sequence>();
    seq->prompt_length = static_cast<std::int64_t>(request.prompt.size());
    seq->tokens = request.prompt;
    if (eos) request.limits.stop_token_ids.push_back(*eos);
    seq->sample = std::make_unique<sampler>(request.sampling, request.prompt, tok.id_limit());
    seq->stream = std::make_unique<completion_stream>(tok, request.limits);
    seq->request = std::move(request);
    std::lock_guard lock(mutex);
    if (stopping) shoal::fail(errc::unavailable, "the engine is shutting down");
    if (static_cast<std::int64_t>(inbox.size()) + counters.waiting >= options.max_waiting)
      shoal::fail(errc::resource_exhausted, "{} requests are already queued", options.max_waiting);
    seq->id = ++next_id;
    const auto id = seq->id;
    counters.prompt_tokens += static_cast<std::uint64_t>(seq->prompt_length);
    inbox.push_back(std::move(seq));
    ++counters.waiting;
    wake.notify_one();
    return id;
  }

  void cancel(std::uint64_t id) {
    std::lock_guard lock(mutex);
    cancels.push_back(id);
    wake.notify_one();
  }

  void stop(bool drain_first) {
    {
      std::lock_guard lock(mutex);
      stopping = true;
      drain = drain_first;
      wake.notify_one();
    }
    if (thread.joinable()) thread.join();
  }

  engine_stats stats() const {
    std::lock_guard lock(mutex);
    engine_stats s = counters;
    return s;
  }

  // ---- engine thread ----

  void emit(sequence& seq, std::string text, std::vector<token_id> new_tokens, bool finished,
            std::optional<errc> error = std::nullopt, std::string message = {}) {
    if (!seq.request.on_event) return;
    generation_event e;
    e.request_id = seq.id;
    e.text = std::move(text);
    e.tokens = std::move(new_tokens);
    e.finished = finished;
    e.reason = error ? finish_reason::none : seq.stream->reason();
    e.error = error;
    e.error_message = std::move(message);
    e.prompt_tokens = seq.prompt_length;
    e.cached_prompt_tokens = seq.cached_prompt;
    e.completion_tokens = static_cast<std::int64_t>(seq.tokens.size()) - seq.prompt_length;
    outbox.emplace_back(seq.request.on_event, std::move(e));
  }

  // Events go out after the iteration's bookkeeping is published, so a handler that sees a
  // request finish also sees its blocks returned in `stats()`.
  void flush_events() {
    for (auto& [handler, event] : outbox) {
      try {
        handler(event);
      } catch (...) {
        // A failing handler must not take the engine down; the request simply ends for it.
      }
    }
    outbox.clear();
  }

  void finish(std::unique_ptr<sequence>& seq, std::optional<errc> error = std::nullopt, std::string message = {}) {
    if (seq->cache) {
      if (options.prefix_cache && !error) prefix->insert(seq->tokens, seq->cache->blocks(), seq->cache->length());
      seq->cache->clear();
    }
    if (error) {
      emit(*seq, seq->stream->finished() ? std::string() : seq->stream->close(), {}, true, error, std::move(message));
    }
    seq.reset();
  }

  // Takes submissions and cancellations from other threads.
  bool collect(bool& idle_wait) {
    std::vector<std::uint64_t> cancelled;
    {
      std::unique_lock lock(mutex);
      if (idle_wait && inbox.empty() && cancels.empty() && !stopping)
        wake.wait_for(lock, std::chrono::milliseconds(100));
      while (!inbox.empty()) {
        waiting.push_back(std::move(inbox.front()));
        inbox.pop_front();
      }
      cancelled.swap(cancels);
      if (stopping && !drain) {
        for (auto& s : waiting) cancelled.push_back(s->id);
        for (auto& s : running) cancelled.push_back(s->id);
      }
    }
    for (auto id : cancelled) {
      const auto message = stopping && !drain ? "the server is shutting down" : "cancelled by the client";
      for (auto& s : waiting)
        if (s && s->id == id) finish(s, errc::cancelled, message);
      for (auto& s : running)
        if (s && s->id == id) finish(s, errc::cancelled, message);
    }
    const auto now = clock_type::now();
    const auto expire = [&](auto& list) {
      for (auto& s : list)
        if (s && s->request.deadline && now > *s->request.deadline)
          finish(s, errc::deadline_exceeded, "the request's deadline passed before it finished");
    };
    expire(waiting);
    expire(running);
    std::erase_if(waiting, [](const auto& s) { return !s; });
    std::erase_if(running, [](const auto& s) { return !s; });
    std::lock_guard lock(mutex);
    return !(stopping && waiting.empty() && running.empty());
  }

  // Frees blocks held only by the prefix tree until `wanted` are free.
  bool make_room(std::int64_t wanted) {
    if (pool->free_blocks() >= wanted) return true;
    prefix->evict(wanted - pool->free_blocks());
    return pool->free_blocks() >= wanted;
  }

  void admit() {
    const auto bt = pool->block_tokens();
    while (!waiting.empty() && static_cast<std::int64_t>(running.size()) < options.max_running) {
      auto& seq = waiting.front();
      const auto length = static_cast<std::int64_t>(seq->tokens.size());
      // Requests that arrive together with a common prefix (a shared system prompt) would
      // each compute it; the first one computes it and the others wait until its blocks are
      // in the tree.
      if (options.prefix_cache && shares_prefix_in_flight(*seq)) break;
      // The last token is always computed here (it yields the logits), so at most the blocks
      // strictly before it come from the tree.
      std::vector<std::int32_t> shared;
      if (options.prefix_cache) shared = prefix->match(seq->tokens, (length - 1) / bt);
      const auto shared_blocks = static_cast<std::int64_t>(shared.size());
      const std::int64_t needed = (length + 1 + bt - 1) / bt - shared_blocks;
      if (!make_room(needed)) {
        for (auto b : shared) pool->release(b);
        break;  // first come, first served: later requests wait behind this one
      }
      seq->cache = std::make_unique<latent_cache>(*pool);
      seq->cache->adopt_prefix(shared, shared_blocks * bt);
      SHOAL_REQUIRE(seq->cache->reserve(length + 1), "reserve after make_room");
      if (!seq->counted_cached) {
        seq->cached_prompt = std::min(shared_blocks * bt, seq->prompt_length);
        seq->counted_cached = true;
        std::lock_guard lock(mutex);
        counters.cached_prompt_tokens += static_cast<std::uint64_t>(seq->cached_prompt);
      }
      running.push_back(std::move(seq));
      waiting.pop_front();
    }
  }

  // Whether a running sequence is still computing a prompt that starts with the same block
  // (its blocks enter the tree as they are computed; the follower then reuses all of them).
  bool shares_prefix_in_flight(const sequence& seq) const {
    const auto bt = pool->block_tokens();
    if (static_cast<std::int64_t>(seq.tokens.size()) <= bt) return false;
    for (const auto& other : running) {
      if (other->prompt_length <= bt || other->cache->length() >= other->prompt_length) continue;
      if (std::equal(seq.tokens.begin(), seq.tokens.begin() + bt, other->tokens.begin())) return true;
    }
    return false;
  }

  // Sends the youngest running sequence back to the queue; it will be recomputed from its
  // prompt and the tokens it already produced.
  void preempt_youngest() {
    auto& victim = running.back();
    victim->cache->clear();
    victim->cache.reset();
    waiting.push_front(std::move(victim));
    running.pop_back();
    std::lock_guard lock(mutex);
    ++counters.preemptions;
  }

  // Makes sure `seq` can take `positions` positions, evicting prefix-tree blocks and then
  // preempting younger sequences (never one already in this iteration: indices < `keep`).
  bool ensure_capacity(sequence& seq, std::int64_t positions, std::size_t keep) {
    const auto bt = pool->block_tokens();
    while (true) {
      const std::int64_t missing = (positions + bt - 1) / bt - static_cast<std::int64_t>(seq.cache->blocks().size());
      if (missing <= 0 || (make_room(missing) && seq.cache->reserve(positions))) return true;
      if (running.size() <= keep + 1 || running.back().get() == &seq) return false;
      preempt_youngest();
    }
  }

  void step() {
    std::vector<sequence_step> steps;
    std::vector<sequence*> owners;
    std::int64_t budget = options.max_batch_tokens;
    // Decode tokens first (one per sequence, cheap and latency-critical), then prompt chunks.
    std::stable_partition(running.begin(), running.end(), [](const auto& s) {
      return static_cast<std::int64_t>(s->tokens.size()) - s->cache->length() == 1;
    });
    for (std::size_t i = 0; i < running.size() && budget > 0; ++i) {
      sequence& seq = *running[i];
      const auto pending = static_cast<std::int64_t>(seq.tokens.size()) - seq.cache->length();
      const std::int64_t take = std::min(pending, budget);
      if (!ensure_capacity(seq, seq.cache->length() + take + 1, i)) {
        preempt_youngest();  // `seq` itself: nothing younger is left to make room
        break;
      }
      steps.push_back({seq.cache.get(), std::span<const token_id>(seq.tokens.data() + seq.cache->length(), take)});
      owners.push_back(&seq);
      budget -= take;
    }
    if (steps.empty()) return;
    const auto logits = net.forward(steps);
    const auto vocab = net.config().vocab_size;
    std::int64_t batch_tokens = 0;
    std::uint64_t prefilled = 0, generated = 0;
    for (std::size_t i = 0; i < steps.size(); ++i) {
      sequence& seq = *owners[i];
      batch_tokens += static_cast<std::int64_t>(steps[i].tokens.size());
      // Prompt blocks become shareable as soon as they are computed, not when the sequence ends.
      if (options.prefix_cache && seq.cache->length() <= seq.prompt_length)
        prefix->insert(seq.tokens, seq.cache->blocks(), seq.cache->length());
      const auto start = seq.cache->length() - static_cast<std::int64_t>(steps[i].tokens.size());
      if (start < seq.prompt_length)
        prefilled += static_cast<std::uint64_t>(std::min(seq.prompt_length, seq.cache->length()) - start);
      if (seq.cache->length() != static_cast<std::int64_t>(seq.tokens.size())) continue;  // mid-prompt chunk
      const auto id = seq.sample->sample(std::span<const float>(logits.data() + i * vocab, vocab));
      seq.tokens.push_back(id);
      ++generated;
      std::string text = seq.stream->push(id);
      emit(seq, std::move(text), {id}, seq.stream->finished());
    }
    for (auto& s : running)
      if (s->stream->finished()) finish(s);
    std::erase_if(running, [](const auto& s) { return !s; });
    std::lock_guard lock(mutex);
    ++counters.steps;
    counters.last_batch_tokens = batch_tokens;
    counters.prefilled_tokens += prefilled;
    counters.generated_tokens += generated;
    counters.last_step_end = clock_type::now();
  }

  void publish() {
    std::lock_guard lock(mutex);
    counters.waiting = static_cast<std::int64_t>(waiting.size() + inbox.size());
    counters.running = static_cast<std::int64_t>(running.size());
    counters.cache_blocks_total = pool->total_blocks();
    counters.cache_blocks_used = pool->total_blocks() - pool->free_blocks();
    counters.prefix_cache_blocks = prefix->size();
  }

  void loop() {
    bool idle = false;
    while (true) {
      try {
        if (!collect(idle)) break;
        admit();
        publish();
        idle = running.empty();
        if (!idle) step();
        publish();
        flush_events();
      } catch (const std::exception& e) {
        // A failure inside a step (a bug, or memory) ends the requests in it, not the server.
        for (auto& s : running)
          if (s) finish(s, errc::internal, e.what());
        running.clear();
        publish();
        flush_events();
      }
    }
    publish();
    flush_events();
  }

  model& net;
  const tokenizer& tok;
  engine_options options;
  std::optional<token_id> eos;
  std::unique_ptr<kv_block_pool> pool;
  std::unique_ptr<prefix_tree> prefix;

  mutable std::mutex mutex;
  std::condition_variable wake;
  std::deque<std::unique_ptr<sequence>> inbox;
  std::vector<std::uint64_t> cancels;
  bool stopping = false;
  bool drain = false;
  std::uint64_t next_id = 0;
  engine_stats counters;

  std::deque<std::unique_ptr<sequence>> waiting;
  std::vector<std::unique_ptr<sequence>> running;
  std::vector<std::pair<std::function<void(const generation_event&)>, generation_event>> outbox;
  std::thread thread;
};

engine::engine(model& net, const tokenizer& tok, engine_options options)
    : impl_(std::make_unique<impl>(net, tok, options)) {}

engine::~engine() = default;

std::uint64_t engine::submit(generation_request request) { return impl_->submit(std::move(request)); }

void engine::cancel(std::uint64_t request_id) { impl_->cancel(request_id); }

void engine::shutdown(bool drain) { impl_->stop(drain); }

engine_stats engine::stats() const { return impl_->stats(); }

std::int64_t engine::max_sequence_tokens() const { return impl_->max_sequence_tokens(); }

}  // namespace shoal::runtime
