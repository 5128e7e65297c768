#include "shoal/runtime/engine.hpp"

#include "shoal/base/error.hpp"
#include "shoal/runtime/model.hpp"
#include "shoal/runtime/scheduler.hpp"

#include <algorithm>
#include <condition_variable>
#include <deque>
#include <map>
#include <mutex>
#include <thread>

namespace shoal::runtime {
namespace {

using clock_type = std::chrono::steady_clock;

}  // namespace

struct engine::impl {
  // What the engine keeps of a request beside the scheduler's tokens and blocks.
  struct sequence {
    std::uint64_t id = 0;
    generation_request request;
    std::int64_t prompt_length = 0;
    std::unique_ptr<sampler> sample;
    std::unique_ptr<completion_stream> stream;
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
    plan = std::make_unique<scheduler>(scheduler_options{.cache_blocks = blocks,
                                                         .block_tokens = options.block_tokens,
                                                         .max_batch_tokens = options.max_batch_tokens,
                                                         .max_running = options.max_running,
                                                         .prefix_cache = options.prefix_cache});
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
    return std::min(net.config().max_position_embeddings, plan->max_sequence_tokens());
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
    if (finished && !error) e.matched_stop = seq.stream->matched_stop();
    e.error = error;
    e.error_message = std::move(message);
    e.prompt_tokens = seq.prompt_length;
    e.cached_prompt_tokens = plan->cached_prompt_tokens(seq.id);
    e.completion_tokens = static_cast<std::int64_t>(plan->tokens(seq.id).size()) - seq.prompt_length;
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

  void finish(std::uint64_t id, std::optional<errc> error = std::nullopt, std::string message = {}) {
    const auto it = sequences.find(id);
    if (it == sequences.end()) return;
    sequence& seq = *it->second;
    if (error) emit(seq, seq.stream->finished() ? std::string() : seq.stream->close(), {}, true, error, std::move(message));
    plan->remove(id, /*keep_prefix=*/!error);
    sequences.erase(it);
  }

  // Takes submissions and cancellations from other threads.
  bool collect(bool& idle_wait) {
    std::vector<std::uint64_t> cancelled;
    {
      std::unique_lock lock(mutex);
      if (idle_wait && inbox.empty() && cancels.empty() && !stopping)
        wake.wait_for(lock, std::chrono::milliseconds(100));
      while (!inbox.empty()) {
        auto seq = std::move(inbox.front());
        inbox.pop_front();
        plan->add(seq->id, seq->request.prompt);
        sequences.emplace(seq->id, std::move(seq));
      }
      cancelled.swap(cancels);
      if (stopping && !drain)
        for (auto id : plan->ids()) cancelled.push_back(id);
    }
    for (auto id : cancelled)
      finish(id, errc::cancelled, stopping && !drain ? "the server is shutting down" : "cancelled by the client");
    const auto now = clock_type::now();
    for (auto id : plan->ids()) {
      const auto& deadline = sequences.at(id)->request.deadline;
      if (deadline && now > *deadline) finish(id, errc::deadline_exceeded, "the request's deadline passed before it finished");
    }
    std::lock_guard lock(mutex);
    return !(stopping && plan->empty());
  }

  void step() {
    const auto chunks = plan->schedule();
    if (chunks.empty()) return;
    in_step.clear();
    for (const auto& chunk : chunks) in_step.push_back(chunk.id);
    // Latent caches over the scheduler's block tables; the forward pass advances them.
    std::vector<std::unique_ptr<latent_cache>> caches;
    std::vector<sequence_step> steps;
    caches.reserve(chunks.size());
    for (const auto& chunk : chunks) {
      caches.push_back(std::make_unique<latent_cache>(*pool, chunk.blocks, chunk.start));
      steps.push_back({caches.back().get(), chunk.tokens});
    }
    const auto logits = net.forward(steps);
    plan->commit(chunks);
    const auto vocab = net.config().vocab_size;
    std::int64_t batch_tokens = 0;
    std::uint64_t generated = 0;
    std::vector<std::uint64_t> done;
    for (std::size_t i = 0; i < chunks.size(); ++i) {
      batch_tokens += static_cast<std::int64_t>(chunks[i].tokens.size());
      if (!chunks[i].samples) continue;  // mid-prompt chunk
      sequence& seq = *sequences.at(chunks[i].id);
      const auto id = seq.sample->sample(std::span<const float>(logits.data() + i * vocab, vocab));
      plan->append(seq.id, id);
      ++generated;
      std::string text = seq.stream->push(id);
      emit(seq, std::move(text), {id}, seq.stream->finished());
      if (seq.stream->finished()) done.push_back(seq.id);
    }
    for (auto id : done) finish(id);
    in_step.clear();
    std::lock_guard lock(mutex);
    ++counters.steps;
    counters.last_batch_tokens = batch_tokens;
    counters.generated_tokens += generated;
    counters.last_step_end = clock_type::now();
  }

  void publish() {
    const auto s = plan->stats();
    std::lock_guard lock(mutex);
    counters.waiting = s.waiting + static_cast<std::int64_t>(inbox.size());
    counters.running = s.running;
    counters.cache_blocks_total = s.cache_blocks_total;
    counters.cache_blocks_used = s.cache_blocks_used;
    counters.prefix_cache_blocks = s.prefix_cache_blocks;
    counters.prefilled_tokens = s.prefilled_tokens;
    counters.cached_prompt_tokens = s.cached_prompt_tokens;
    counters.preemptions = s.preemptions;
  }

  void loop() {
    bool idle = false;
    while (true) {
      try {
        if (!collect(idle)) break;
        publish();
        idle = plan->empty();
        if (!idle) step();
        publish();
        flush_events();
      } catch (const std::exception& e) {
        // A failure inside a step (a bug, or memory) ends the requests in it, not the server.
        for (auto id : in_step) finish(id, errc::internal, e.what());
        in_step.clear();
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
  std::unique_ptr<kv_block_pool> pool;  // storage only: the scheduler accounts for the blocks
  std::unique_ptr<scheduler> plan;

  mutable std::mutex mutex;
  std::condition_variable wake;
  std::deque<std::unique_ptr<sequence>> inbox;
  std::vector<std::uint64_t> cancels;
  bool stopping = false;
  bool drain = false;
  std::uint64_t next_id = 0;
  engine_stats counters;

  std::map<std::uint64_t, std::unique_ptr<sequence>> sequences;
  std::vector<std::uint64_t> in_step;  // the step being computed, to end on failure
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
