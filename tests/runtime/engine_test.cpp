// The serving engine against DeepSeek's reference: batched, chunked, preempted and
// prefix-cached generation must give exactly the golden greedy tokens.

#include "shoal/kernels/thread_pool.hpp"
#include "shoal/runtime/engine.hpp"
#include "shoal/runtime/model.hpp"
#include "shoal/runtime/tokenizer.hpp"
#include "shoal/runtime/weights.hpp"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <condition_variable>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <optional>
#include <thread>

using namespace shoal;
using namespace std::chrono_literals;
namespace fs = std::filesystem;

namespace {

const fs::path kData = fs::path(SHOAL_TEST_DATA_DIR);

struct fixture {
  explicit fixture(const std::string& name)
      : weights(runtime::model_weights::load(kData / "golden" / name / "ckpt")),
        pool(2),
        net(*weights, pool),
        tok(runtime::tokenizer::load(kData / "tokenizer")) {
    std::ifstream in(kData / "golden" / name / "golden.json");
    golden = nlohmann::json::parse(in);
  }
  std::unique_ptr<runtime::model_weights> weights;
  kernels::thread_pool pool;
  runtime::model net;
  runtime::tokenizer tok;
  nlohmann::json golden;
};

// Collects the events of many requests and waits for them to finish.
struct collector {
  std::mutex mutex;
  std::condition_variable done;
  std::map<std::uint64_t, std::vector<runtime::generation_event>> events;
  std::size_t finished = 0;

  std::function<void(const runtime::generation_event&)> sink() {
    return [this](const runtime::generation_event& e) {
      std::lock_guard lock(mutex);
      events[e.request_id].push_back(e);
      if (e.finished) {
        ++finished;
        done.notify_all();
      }
    };
  }
  bool wait(std::size_t count, std::chrono::seconds limit = 60s) {
    std::unique_lock lock(mutex);
    return done.wait_for(lock, limit, [&] { return finished >= count; });
  }
  std::vector<runtime::token_id> tokens(std::uint64_t id) {
    std::lock_guard lock(mutex);
    std::vector<runtime::token_id> out;
    for (const auto& e : events[id]) out.insert(out.end(), e.tokens.begin(), e.tokens.end());
    return out;
  }
  const runtime::generation_event& last(std::uint64_t id) {
    std::lock_guard lock(mutex);
    return events[id].back();
  }
};

// The golden continuation up to and including the first EOS (the reference does not stop).
std::vector<runtime::token_id> expected_tokens(const nlohmann::json& prompt, runtime::token_id eos) {
  std::vector<runtime::token_id> out;
  for (const auto& t : prompt["greedy_tokens"]) {
    out.push_back(t.get<runtime::token_id>());
    if (out.back() == eos) break;
  }
  return out;
}

runtime::generation_request greedy(const nlohmann::json& prompt, collector& c) {
  runtime::generation_request r;
  r.prompt = prompt["tokens"].get<std::vector<runtime::token_id>>();
  r.limits.max_tokens = static_cast<std::int64_t>(prompt["greedy_tokens"].size());
  r.on_event = c.sink();
  return r;
}

void check_all_prompts(fixture& f, runtime::engine_options options, int copies, runtime::engine_stats* stats_out = nullptr) {
  runtime::engine engine(f.net, f.tok, options);
  collector c;
  std::vector<std::pair<std::uint64_t, const nlohmann::json*>> submitted;
  for (int copy = 0; copy < copies; ++copy)
    for (const auto& prompt : f.golden["prompts"]) submitted.emplace_back(engine.submit(greedy(prompt, c)), &prompt);
  REQUIRE(c.wait(submitted.size()));
  for (const auto& [id, prompt] : submitted) {
    CAPTURE((*prompt)["name"].get<std::string>(), id);
    CHECK(c.tokens(id) == expected_tokens(*prompt, *f.tok.eos_id()));
    CHECK(c.last(id).finished);
    CHECK_FALSE(c.last(id).error.has_value());
  }
  const auto stats = engine.stats();
  CHECK(stats.running == 0);
  CHECK(stats.waiting == 0);
  CHECK(stats.cache_blocks_used == stats.prefix_cache_blocks);  // nothing leaked
  if (stats_out) *stats_out = stats;
}

// 64 blocks of 8 positions, no prefix reuse: every block a request holds is its own.
runtime::engine_options small_cache_options() {
  runtime::engine_options options;
  options.cache_blocks = 64;
  options.block_tokens = 8;
  options.prefix_cache = false;
  return options;
}

// A seeded sampled request that would run for 400 tokens unless something ends it.
runtime::generation_request long_sampled_request() {
  runtime::generation_request r;
  r.prompt = {5, 6, 7};
  r.limits.max_tokens = 400;
  r.sampling.temperature = 1.0f;
  r.sampling.seed = 3;
  return r;
}

// Request `id` ended with `code`, and nothing of it (or of any other request) is left running
// or holding cache blocks.
void check_ended_and_freed(collector& c, runtime::engine& engine, std::uint64_t id, errc code) {
  REQUIRE(c.last(id).error.has_value());
  CHECK(*c.last(id).error == code);
  const auto stats = engine.stats();
  CHECK(stats.cache_blocks_used == 0);
  CHECK(stats.running == 0);
}

}  // namespace

TEST_CASE("batched greedy generation reproduces the reference tokens", "[engine][golden]") {
  fixture f("tiny-b-bf16");
  runtime::engine_options options;
  options.cache_blocks = 256;
  options.block_tokens = 16;
  check_all_prompts(f, options, 2);
}

TEST_CASE("chunked prefill with a small token budget gives the same tokens", "[engine][golden]") {
  fixture f("tiny-a-fp8");
  runtime::engine_options options;
  options.cache_blocks = 256;
  options.block_tokens = 8;
  options.max_batch_tokens = 7;  // prompts are split into many chunks, mixed with decode steps
  check_all_prompts(f, options, 1);
}

TEST_CASE("running out of cache blocks preempts and recomputes without changing results", "[engine][golden]") {
  fixture f("tiny-a-bf16");
  runtime::engine_options options;
  options.block_tokens = 8;
  options.cache_blocks = 48;  // 384 positions: the 300-token prompt plus a few short ones
  options.prefix_cache = false;
  runtime::engine_stats stats;
  check_all_prompts(f, options, 2, &stats);
  CHECK(stats.preemptions > 0);
}

TEST_CASE("a shared prompt prefix is computed once and reused", "[engine]") {
  fixture f("tiny-b-bf16");
  runtime::engine_options options;
  options.cache_blocks = 128;
  options.block_tokens = 8;
  runtime::engine engine(f.net, f.tok, options);
  collector c;
  const auto& long_prompt = f.golden["prompts"][3];  // 300 tokens
  auto first = greedy(long_prompt, c);
  const auto id1 = engine.submit(first);
  REQUIRE(c.wait(1));
  const auto prefilled_once = engine.stats().prefilled_tokens;
  CHECK(prefilled_once == 300);
  // Same prompt again: all full blocks but the one holding the last token come from the tree.
  const auto id2 = engine.submit(greedy(long_prompt, c));
  REQUIRE(c.wait(2));
  CHECK(c.tokens(id2) == c.tokens(id1));
  CHECK(c.tokens(id1) == expected_tokens(long_prompt, *f.tok.eos_id()));
  CHECK(c.last(id2).cached_prompt_tokens == 296);
  CHECK(engine.stats().prefilled_tokens - prefilled_once == 4);
  CHECK(engine.stats().cached_prompt_tokens == 296);
}

TEST_CASE("requests arriving together with a shared prefix compute it once", "[engine]") {
  fixture f("tiny-b-bf16");
  runtime::engine_options options;
  options.cache_blocks = 256;
  options.block_tokens = 8;
  runtime::engine engine(f.net, f.tok, options);
  collector c;
  const auto& long_prompt = f.golden["prompts"][3];  // 300 tokens: 37 full blocks + 4
  std::vector<std::uint64_t> ids;
  for (int i = 0; i < 6; ++i) ids.push_back(engine.submit(greedy(long_prompt, c)));
  REQUIRE(c.wait(ids.size()));
  for (auto id : ids) CHECK(c.tokens(id) == expected_tokens(long_prompt, *f.tok.eos_id()));
  // The first computes 300 tokens; each of the others only the 4 after the shared blocks.
  CHECK(engine.stats().prefilled_tokens == 300 + 5 * 4);
  CHECK(engine.stats().cached_prompt_tokens == 5 * 296);
}

TEST_CASE("cancellation and deadlines end requests and free their blocks", "[engine]") {
  fixture f("tiny-a-bf16");
  runtime::engine engine(f.net, f.tok, small_cache_options());
  collector c;
  auto r = long_sampled_request();
  r.on_event = c.sink();
  const auto id = engine.submit(r);
  engine.cancel(id);
  REQUIRE(c.wait(1));
  REQUIRE(c.last(id).error.has_value());
  CHECK(*c.last(id).error == errc::cancelled);

  r.deadline = std::chrono::steady_clock::now() - 1s;
  const auto late = engine.submit(r);
  REQUIRE(c.wait(2));
  check_ended_and_freed(c, engine, late, errc::deadline_exceeded);
}

TEST_CASE("a request cancelled or out of time while decoding ends there and frees its blocks", "[engine]") {
  fixture f("tiny-a-bf16");
  runtime::engine engine(f.net, f.tok, small_cache_options());
  collector c;
  // The sink runs on the engine thread between steps: acting there at the third token puts
  // the cancel or the passed deadline exactly between the third and the fourth token.
  const auto sink = c.sink();
  std::size_t seen = 0;
  std::optional<std::chrono::steady_clock::time_point> deadline;
  auto r = long_sampled_request();
  std::uint64_t id = 0;
  r.on_event = [&](const runtime::generation_event& e) {
    sink(e);
    if (e.tokens.empty() || ++seen != 3) return;
    if (deadline)
      std::this_thread::sleep_until(*deadline + 10ms);
    else
      engine.cancel(e.request_id);
  };
  id = engine.submit(r);
  REQUIRE(c.wait(1));
  check_ended_and_freed(c, engine, id, errc::cancelled);
  CHECK(c.tokens(id).size() == 3);

  seen = 0;
  deadline = std::chrono::steady_clock::now() + 3s;
  r.deadline = deadline;
  id = engine.submit(r);
  REQUIRE(c.wait(2, 30s));
  check_ended_and_freed(c, engine, id, errc::deadline_exceeded);
  CHECK(c.tokens(id).size() == 3);
}

TEST_CASE("shutdown without draining cancels the requests decoding and waiting, then refuses new ones", "[engine]") {
  fixture f("tiny-a-bf16");
  runtime::engine_options options;
  options.cache_blocks = 64;
  options.block_tokens = 8;
  options.max_running = 1;  // the second request waits behind the first
  options.prefix_cache = false;
  runtime::engine engine(f.net, f.tok, options);
  collector c;
  const auto sink = c.sink();
  std::mutex m;
  std::condition_variable cv;
  bool third_token = false, shutting_down = false;
  runtime::generation_request r;
  r.prompt = {5, 6, 7};
  r.limits.max_tokens = 400;
  std::size_t seen = 0;
  r.on_event = [&](const runtime::generation_event& e) {
    sink(e);
    if (e.tokens.empty() || ++seen != 3) return;
    std::unique_lock lock(m);
    third_token = true;
    cv.notify_all();
    // Hold the engine thread until shutdown has been asked for, then give it time to take the
    // engine's lock and set its flag: the next iteration must see it.
    cv.wait(lock, [&] { return shutting_down; });
    lock.unlock();
    std::this_thread::sleep_for(200ms);
  };
  const auto running = engine.submit(r);
  r.on_event = sink;
  const auto waiting = engine.submit(r);
  {
    std::unique_lock lock(m);
    REQUIRE(cv.wait_for(lock, 60s, [&] { return third_token; }));
    shutting_down = true;
    cv.notify_all();
  }
  engine.shutdown(false);
  REQUIRE(c.wait(2, 1s));  // both have ended when shutdown returns
  for (const auto id : {running, waiting}) {
    CAPTURE(id);
    REQUIRE(c.last(id).error.has_value());
    CHECK(*c.last(id).error == errc::cancelled);
    CHECK_THAT(c.last(id).error_message, Catch::Contains("shutting down"));
  }
  CHECK(c.tokens(running).size() == 3);
  CHECK(c.tokens(waiting).empty());
  const auto stats = engine.stats();
  CHECK(stats.running == 0);
  CHECK(stats.waiting == 0);
  CHECK(stats.cache_blocks_used == 0);
  try {
    engine.submit(r);
    FAIL("a request was accepted after shutdown");
  } catch (const shoal::error& e) {
    CHECK(e.code() == errc::unavailable);
  }
  engine.shutdown(false);  // idempotent
}

TEST_CASE("bad requests are refused at submission with a reason", "[engine]") {
  fixture f("tiny-a-bf16");
  runtime::engine_options options;
  options.cache_blocks = 16;
  options.block_tokens = 8;
  runtime::engine engine(f.net, f.tok, options);
  runtime::generation_request r;
  CHECK_THROWS_WITH(engine.submit(r), Catch::Contains("empty"));
  r.prompt = {1, 2, 3};
  r.limits.max_tokens = 1000;
  CHECK_THROWS_WITH(engine.submit(r), Catch::Contains("exceeds"));
  r.limits.max_tokens = 4;
  r.sampling.temperature = -1.0f;
  CHECK_THROWS_AS(engine.submit(r), shoal::error);
  r.sampling.temperature = 0.0f;
  r.prompt = {1, 100000};
  CHECK_THROWS_WITH(engine.submit(r), Catch::Contains("100000"));
}

TEST_CASE("seeded sampling is reproducible across batch compositions", "[engine]") {
  fixture f("tiny-b-bf16");
  runtime::engine_options options;
  options.cache_blocks = 128;
  options.block_tokens = 16;
  runtime::engine engine(f.net, f.tok, options);
  collector c;
  runtime::generation_request r;
  r.prompt = {3, 14, 15, 92, 65};
  r.limits.max_tokens = 12;
  r.sampling.temperature = 0.8f;
  r.sampling.top_p = 0.9f;
  r.sampling.seed = 42;
  r.on_event = c.sink();
  const auto alone = engine.submit(r);
  REQUIRE(c.wait(1));
  std::vector<std::uint64_t> crowd;
  for (int i = 0; i < 5; ++i) {
    auto other = r;
    other.sampling.seed = 100 + i;
    crowd.push_back(engine.submit(other));
  }
  const auto again = engine.submit(r);
  REQUIRE(c.wait(7));
  CHECK(c.tokens(again) == c.tokens(alone));
  CHECK(c.tokens(alone).size() >= 1);
}
