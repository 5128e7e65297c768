// The scheduler alone, without a model: admission, token budgets, chunked prefill, block
// tables, preemption, prefix reuse and block accounting. What it computes with a model (the
// golden tokens) is tested through the engine and the actor cluster that run on it.

#include "shoal/runtime/scheduler.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <deque>
#include <map>
#include <numeric>
#include <random>
#include <set>

using namespace shoal;
using runtime::scheduled_chunk;
using runtime::scheduler;
using runtime::scheduler_options;
using runtime::token_id;

namespace {

std::vector<token_id> tokens(std::int32_t first, std::size_t count) {
  std::vector<token_id> t(count);
  std::iota(t.begin(), t.end(), first);
  return t;
}

// Plays the model: commits each step and appends `next` to every sequence that samples.
// Returns the chunks of the step.
std::vector<scheduled_chunk> run_step(scheduler& s, token_id next = 7) {
  auto step = s.schedule();
  std::vector<scheduled_chunk> copy(step.begin(), step.end());
  std::vector<std::uint64_t> sampled;
  for (const auto& c : step)
    if (c.samples) sampled.push_back(c.id);
  s.commit(step);
  for (auto id : sampled) s.append(id, next);
  return copy;
}

// Every position a chunk computes lies in a block no other running sequence writes to.
void check_blocks_disjoint(const std::vector<scheduled_chunk>& step, std::int64_t block_tokens) {
  std::map<std::int32_t, std::uint64_t> writer;
  for (const auto& c : step) {
    const auto end = c.start + static_cast<std::int64_t>(c.tokens.size());
    REQUIRE(static_cast<std::int64_t>(c.blocks.size()) * block_tokens >= end);
    for (auto p = c.start; p < end; ++p) {
      const auto block = c.blocks[static_cast<std::size_t>(p / block_tokens)];
      const auto [it, inserted] = writer.emplace(block, c.id);
      CHECK((inserted || it->second == c.id));
    }
  }
}

}  // namespace

TEST_CASE("scheduler: one prompt is prefilled in budget-sized chunks, then decoded a token per step",
          "[scheduler]") {
  scheduler s({.cache_blocks = 16, .block_tokens = 4, .max_batch_tokens = 5, .max_running = 4, .prefix_cache = false});
  s.add(1, tokens(100, 12));
  auto step = run_step(s);
  REQUIRE(step.size() == 1);
  CHECK(step[0].start == 0);
  CHECK(step[0].tokens.size() == 5);
  CHECK(step[0].fresh);
  CHECK_FALSE(step[0].samples);
  step = run_step(s);
  CHECK(step[0].start == 5);
  CHECK(step[0].tokens.size() == 5);
  CHECK_FALSE(step[0].fresh);
  step = run_step(s);
  CHECK(step[0].start == 10);
  CHECK(step[0].tokens.size() == 2);
  CHECK(step[0].samples);
  step = run_step(s);  // decode: the sampled token
  CHECK(step[0].start == 12);
  REQUIRE(step[0].tokens.size() == 1);
  CHECK(step[0].tokens[0] == 7);
  CHECK(s.tokens(1).size() == 14);
  CHECK(s.stats().prefilled_tokens == 12);
  s.remove(1, false);
  CHECK(s.stats().cache_blocks_used == 0);
  CHECK(s.empty());
}

TEST_CASE("scheduler: decode tokens go first, prompt chunks fill the rest of the budget", "[scheduler]") {
  scheduler s({.cache_blocks = 32, .block_tokens = 4, .max_batch_tokens = 6, .max_running = 8, .prefix_cache = false});
  s.add(1, tokens(100, 3));
  run_step(s);  // 1 prefilled and sampled
  s.add(2, tokens(200, 20));
  s.add(3, tokens(300, 20));
  auto step = run_step(s);
  REQUIRE(step.size() == 2);
  CHECK(step[0].id == 1);
  CHECK(step[0].tokens.size() == 1);
  CHECK(step[1].id == 2);
  CHECK(step[1].tokens.size() == 5);
  check_blocks_disjoint(step, 4);
  std::int64_t total = 0;
  for (const auto& c : step) total += static_cast<std::int64_t>(c.tokens.size());
  CHECK(total <= 6);
}

TEST_CASE("scheduler: admission waits for blocks, first come first served", "[scheduler]") {
  // 6 blocks of 4: a 15-token prompt needs 4 (prompt + 1), so a second one cannot start.
  scheduler s({.cache_blocks = 6, .block_tokens = 4, .max_batch_tokens = 64, .max_running = 8, .prefix_cache = false});
  s.add(1, tokens(100, 15));
  s.add(2, tokens(200, 15));
  s.add(3, tokens(300, 2));  // small, but must not overtake 2
  auto step = run_step(s);
  REQUIRE(step.size() == 1);
  CHECK(step[0].id == 1);
  CHECK(s.stats().waiting == 2);
  s.remove(1, false);
  step = run_step(s);
  REQUIRE(step.size() == 2);
  CHECK(step[0].id == 2);
  CHECK(step[1].id == 3);
}

TEST_CASE("scheduler: when blocks run out the youngest sequence is preempted and recomputed", "[scheduler]") {
  scheduler s({.cache_blocks = 4, .block_tokens = 4, .max_batch_tokens = 64, .max_running = 8, .prefix_cache = false});
  s.add(1, tokens(100, 6));  // 2 blocks
  s.add(2, tokens(200, 6));  // 2 blocks
  auto step = run_step(s);
  REQUIRE(step.size() == 2);
  // Both decode until 1 needs a third block: 2 (the youngest) gives its blocks up.
  std::uint64_t preempted_at = 0;
  for (int i = 0; i < 4 && preempted_at == 0; ++i) {
    step = run_step(s);
    check_blocks_disjoint(step, 4);
    if (s.stats().preemptions > 0) preempted_at = static_cast<std::uint64_t>(i + 1);
  }
  REQUIRE(s.stats().preemptions == 1);
  CHECK(s.stats().waiting == 1);
  const auto generated_by_2 = s.tokens(2).size();
  s.remove(1, false);
  // 2 comes back fresh from position 0 with everything it had, prompt and generated tokens.
  step = run_step(s);
  REQUIRE(step.size() == 1);
  CHECK(step[0].id == 2);
  CHECK(step[0].fresh);
  CHECK(step[0].start == 0);
  CHECK(step[0].tokens.size() == generated_by_2);
  CHECK(step[0].samples);
  CHECK(s.prompt_length(2) == 6);
}

TEST_CASE("scheduler: a finished prompt's full blocks are reused by the next one with that prefix", "[scheduler]") {
  scheduler s({.cache_blocks = 16, .block_tokens = 4, .max_batch_tokens = 64, .max_running = 8, .prefix_cache = true});
  auto shared = tokens(100, 10);
  s.add(1, shared);
  const auto first = run_step(s);
  s.remove(1, /*keep_prefix=*/true);
  CHECK(s.stats().prefix_cache_blocks == 2);  // positions 0-7; the partial third block is not kept

  auto longer = shared;
  longer.push_back(555);
  longer.push_back(556);
  s.add(2, longer);
  const auto step = run_step(s);
  REQUIRE(step.size() == 1);
  CHECK(step[0].fresh);
  CHECK(step[0].start == 8);
  CHECK(step[0].tokens.size() == 4);
  CHECK(step[0].blocks[0] == first[0].blocks[0]);
  CHECK(step[0].blocks[1] == first[0].blocks[1]);
  CHECK(s.cached_prompt_tokens(2) == 8);
  CHECK(s.stats().cached_prompt_tokens == 8);
  // Its own computed prompt block (positions 8-11) entered the tree as it was computed.
  CHECK(s.stats().prefix_cache_blocks == 3);
  s.remove(2, false);
  CHECK(s.stats().cache_blocks_used == 3);

  // The tree gives unreferenced blocks up when a sequence needs them: 60 tokens take 16 blocks.
  s.add(3, tokens(900, 60));
  const auto big = run_step(s);
  REQUIRE(big.size() == 1);
  CHECK(big[0].start == 0);
  CHECK(big[0].tokens.size() == 60);
  s.remove(3, false);
  CHECK(s.stats().cache_blocks_used == s.stats().prefix_cache_blocks);
}

TEST_CASE("scheduler: sequences that share a prompt prefix in one burst compute it once", "[scheduler]") {
  scheduler s({.cache_blocks = 32, .block_tokens = 4, .max_batch_tokens = 64, .max_running = 8, .prefix_cache = true});
  auto a = tokens(100, 12), b = tokens(100, 12);
  a.push_back(1);
  b.push_back(2);
  s.add(1, a);
  s.add(2, b);
  auto step = run_step(s);
  REQUIRE(step.size() == 1);  // 2 waits for 1's prompt blocks
  step = run_step(s);
  std::set<std::uint64_t> ids;
  for (const auto& c : step) ids.insert(c.id);
  CHECK(ids.contains(2));
  for (const auto& c : step)
    if (c.id == 2) CHECK(c.start == 12);
  CHECK(s.stats().prefilled_tokens == 13 + 1);
}

TEST_CASE("scheduler: random traffic never shares a written block and leaks nothing", "[scheduler]") {
  std::mt19937 rng(5);
  for (const bool prefix : {false, true}) {
    scheduler s({.cache_blocks = 24, .block_tokens = 4, .max_batch_tokens = 16, .max_running = 6, .prefix_cache = prefix});
    std::map<std::uint64_t, std::size_t> budget;  // tokens each sequence may still generate
    std::uint64_t next = 1;
    for (int round = 0; round < 400; ++round) {
      if (rng() % 3 == 0 && budget.size() < 10) {
        // Prompts of 1-30 tokens over a small alphabet, so prefixes repeat.
        auto t = tokens(static_cast<std::int32_t>(rng() % 3), 1 + rng() % 30);
        budget[next] = 1 + rng() % 12;
        s.add(next++, std::move(t));
      }
      if (!budget.empty() && rng() % 17 == 0) {
        auto it = std::next(budget.begin(), static_cast<long>(rng() % budget.size()));
        s.remove(it->first, false);  // cancelled
        budget.erase(it);
      }
      const auto step = run_step(s);
      check_blocks_disjoint(step, 4);
      for (const auto& c : step) {
        if (!c.samples) continue;
        if (--budget[c.id] == 0) {
          s.remove(c.id, true);
          budget.erase(c.id);
        }
      }
    }
    for (auto& [id, left] : budget) s.remove(id, true);
    const auto st = s.stats();
    INFO("prefix cache " << prefix);
    CHECK(st.running == 0);
    CHECK(st.waiting == 0);
    CHECK(st.cache_blocks_used == st.prefix_cache_blocks);
  }
}

TEST_CASE("scheduler: refuses what can never fit", "[scheduler]") {
  CHECK_THROWS_WITH(scheduler({.cache_blocks = 1, .block_tokens = 4}), Catch::Contains("at least 2"));
  scheduler s({.cache_blocks = 2, .block_tokens = 4});
  CHECK_THROWS_WITH(s.add(1, tokens(0, 8)), Catch::Contains("at most 7"));
  CHECK_THROWS_WITH(s.add(2, {}), Catch::Contains("no tokens"));
  s.add(3, tokens(0, 2));
  CHECK_THROWS_WITH(s.add(3, tokens(0, 2)), Catch::Contains("already"));
}

TEST_CASE("scheduler: steps in flight at once hold disjoint sequences and blocks, and are never preempted",
          "[scheduler]") {
  // A pipeline of stages keeps `parts` steps in flight: each takes its share of the running
  // sequences, none of a step in flight is scheduled or preempted again until it commits, and
  // no block is written by two steps at once.
  std::mt19937 rng(9);
  for (const std::int64_t parts : {2, 3}) {
    CAPTURE(parts);
    scheduler s({.cache_blocks = 20, .block_tokens = 4, .max_batch_tokens = 12, .max_running = 6, .prefix_cache = true});
    std::map<std::uint64_t, std::size_t> budget;
    std::deque<std::vector<scheduled_chunk>> pipeline;  // oldest first, as stages return them
    std::uint64_t next = 1;
    std::uint64_t steps = 0;
    for (int round = 0; round < 600; ++round) {
      if (rng() % 3 == 0 && budget.size() < 9) {
        auto t = tokens(static_cast<std::int32_t>(rng() % 3), 1 + rng() % 20);
        budget[next] = 1 + rng() % 10;
        s.add(next++, std::move(t));
      }
      // Fill the pipeline, then the oldest step returns.
      while (static_cast<std::int64_t>(pipeline.size()) < parts) {
        auto step = s.schedule(parts);
        if (step.empty()) break;
        ++steps;
        std::set<std::uint64_t> in_flight;
        std::map<std::int32_t, std::uint64_t> writer;
        for (const auto& other : pipeline)
          for (const auto& c : other) {
            in_flight.insert(c.id);
            const auto end = c.start + static_cast<std::int64_t>(c.tokens.size());
            for (auto p = c.start; p < end; ++p) writer[c.blocks[static_cast<std::size_t>(p / 4)]] = c.id;
          }
        for (const auto& c : step) {
          CHECK_FALSE(in_flight.contains(c.id));
          const auto end = c.start + static_cast<std::int64_t>(c.tokens.size());
          for (auto p = c.start; p < end; ++p) CHECK_FALSE(writer.contains(c.blocks[static_cast<std::size_t>(p / 4)]));
        }
        check_blocks_disjoint(step, 4);
        pipeline.emplace_back(step.begin(), step.end());
      }
      if (pipeline.empty()) continue;
      const auto step = std::move(pipeline.front());
      pipeline.pop_front();
      // Its sequences were neither preempted nor moved meanwhile: committing advances them.
      for (const auto& c : step) {
        CHECK(s.contains(c.id));
        CHECK(static_cast<std::int64_t>(s.tokens(c.id).size()) >= c.start + static_cast<std::int64_t>(c.tokens.size()));
      }
      s.commit(step);
      for (const auto& c : step) {
        if (!c.samples) continue;
        s.append(c.id, 7);
        if (--budget[c.id] == 0) {
          s.remove(c.id, true);
          budget.erase(c.id);
        }
      }
    }
    while (!pipeline.empty()) {
      s.commit(pipeline.front());
      pipeline.pop_front();
    }
    for (auto& [id, left] : budget) s.remove(id, true);
    const auto st = s.stats();
    CHECK(steps > 300);
    CHECK(st.running == 0);
    CHECK(st.cache_blocks_used == st.prefix_cache_blocks);
  }
}
