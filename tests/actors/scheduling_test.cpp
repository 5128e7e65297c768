// The router's scheduler on the actor path in one process: a 4-node plan (2 stages, 2 expert
// nodes) and the embedded single-stage plan, under settings that force continuous batching,
// chunked prefill, preemption and prefix reuse, reproduce DeepSeek's reference tokens.

#include "scheduling.hpp"

#include "shoal/actors/client.hpp"
#include "shoal/actors/cluster.hpp"
#include "shoal/config/cluster_config.hpp"

#include <catch2/catch.hpp>

#include <thread>

namespace {

using namespace shoal::testing;

shoal::config::cluster_config four_nodes(const std::string& settings) { return four_node_plan(settings); }

nlohmann::json run_golden(shoal::config::cluster_config config, int copies) {
  shoal::actors::local_cluster cluster(std::move(config), {.ready_timeout = std::chrono::seconds(60)});
  cluster.wait_ready();
  shoal::client client(cluster);
  check_concurrent_golden(client, copies);
  const auto status = scheduler_status(cluster.status());
  check_no_block_leaked(status);
  return status;
}

}  // namespace

TEST_CASE("actor path: concurrent requests are batched and give the reference tokens", "[actors][scheduling]") {
  const auto s = run_golden(four_nodes("cache_blocks: 256\nblock_tokens: 16\nmax_batch: 16\n"), 2);
  // All requests were in the pipeline together: fewer steps than one request at a time would take.
  std::int64_t sequential_steps = 0;
  for (const auto& p : scheduling_prompts()) sequential_steps += 2 * static_cast<std::int64_t>(p.greedy.size());
  CHECK(s["steps"].get<std::int64_t>() < sequential_steps);
}

TEST_CASE("actor path: chunked prefill with a 7-token budget gives the same tokens", "[actors][scheduling]") {
  const auto s = run_golden(four_nodes("cache_blocks: 256\nblock_tokens: 8\nmax_batch_tokens: 7\n"), 1);
  // The 300-token prompt alone needs at least 300 / 7 steps.
  CHECK(s["steps"].get<std::int64_t>() > 300 / 7);
}

TEST_CASE("actor path: cache pressure preempts and recomputes without changing results", "[actors][scheduling]") {
  // 48 blocks of 8: the 300-token prompt plus a few short ones.
  const auto s = run_golden(four_nodes("cache_blocks: 48\nblock_tokens: 8\nprefix_cache: false\n"), 2);
  CHECK(s["preemptions"].get<std::int64_t>() > 0);
}

TEST_CASE("actor path: a shared prompt prefix is computed once, on one stage or two", "[actors][scheduling]") {
  for (const bool embedded : {true, false}) {
    CAPTURE(embedded);
    auto config = embedded ? shoal::config::embedded_cluster_config(kClusterModelDir + "/ckpt", 6, 1)
                           : four_nodes("cache_blocks: 128\nblock_tokens: 8\n");
    config.cache_blocks = 128;
    config.block_tokens = 8;
    shoal::actors::local_cluster cluster(std::move(config), {.ready_timeout = std::chrono::seconds(60)});
    cluster.wait_ready();
    shoal::client client(cluster);
    const auto prompts = scheduling_prompts();
    const auto& longest = *std::max_element(prompts.begin(), prompts.end(), [](const auto& a, const auto& b) {
      return a.tokens.size() < b.tokens.size();
    });
    REQUIRE(longest.tokens.size() == 300);
    const shoal::generate_options request{.prompt = longest.tokens, .sampling = {},
                                          .max_tokens = static_cast<std::uint32_t>(longest.greedy.size()),
                                          .stop_tokens = {}, .want_logits = false, .deadline = {}};
    const auto first = client.generate(request, std::chrono::seconds(120));
    CHECK(first.tokens == longest.greedy);
    const auto before = scheduler_status(cluster.status());
    CHECK(before["prefilled_tokens"] == 300);
    // Again: every full block but the one holding the last prompt token comes from the tree.
    const auto second = client.generate(request, std::chrono::seconds(120));
    CHECK(second.tokens == longest.greedy);
    const auto after = scheduler_status(cluster.status());
    CHECK(after["prefilled_tokens"].get<std::int64_t>() - before["prefilled_tokens"].get<std::int64_t>() == 4);
    CHECK(after["cached_prompt_tokens"] == 296);
    check_no_block_leaked(after);
  }
}

TEST_CASE("actor path: cancelling a decoding request and a passed deadline free their blocks",
          "[actors][scheduling]") {
  shoal::actors::local_cluster cluster(four_nodes("cache_blocks: 64\nblock_tokens: 8\nprefix_cache: false\n"),
                                       {.ready_timeout = std::chrono::seconds(60)});
  cluster.wait_ready();
  shoal::client client(cluster);
  shoal::generate_options request{.prompt = {5, 6, 7}, .sampling = {}, .max_tokens = 400, .stop_tokens = {},
                                  .want_logits = false, .deadline = {}};
  request.sampling.temperature = 1.0f;
  request.sampling.seed = 3;
  request.sampling.has_seed = true;
  const auto id = client.submit(request);
  // Let it decode a few tokens, then cancel it mid-generation.
  int received = 0;
  shoal::actors::finish_reason finish = shoal::actors::finish_reason::none;
  while (received < 3) {
    const auto chunk = client.next(id, std::chrono::seconds(30));
    REQUIRE(chunk);
    received += static_cast<int>(chunk->tokens.size());
    REQUIRE(chunk->finish == shoal::actors::finish_reason::none);
  }
  client.cancel(id);
  while (finish == shoal::actors::finish_reason::none) {
    const auto chunk = client.next(id, std::chrono::seconds(30));
    REQUIRE(chunk);
    finish = chunk->finish;
  }
  CHECK(finish == shoal::actors::finish_reason::cancelled);

  // Expires while its first steps run: the router ends it at the next step boundary.
  request.deadline = std::chrono::milliseconds(1);
  CHECK_THROWS_WITH(client.generate(request, std::chrono::seconds(30)), Catch::Contains("deadline"));
  check_no_block_leaked(scheduler_status(cluster.status()));
}

TEST_CASE("actor path: seeded sampling survives batching and preemption", "[actors][scheduling]") {
  // A sampled request's tokens depend only on its seed: with room for everyone, and when
  // requests are preempted and recomputed (their samplers rebuilt from the history the router
  // sends along), every stream is the same.
  auto sample = [](const std::string& settings) {
    shoal::actors::local_cluster cluster(four_nodes(settings), {.ready_timeout = std::chrono::seconds(60)});
    cluster.wait_ready();
    shoal::client client(cluster);
    stream_collector streams;
    constexpr int kRequests = 6;
    for (int i = 0; i < kRequests; ++i) {
      shoal::generate_options r{.prompt = {3, 14, 15, 92, 65, 35, 89, 79, 32, 38, i}, .sampling = {}, .max_tokens = 24,
                                .stop_tokens = {}, .want_logits = false, .deadline = {}};
      r.sampling.temperature = 0.8f;
      r.sampling.top_p = 0.9f;
      r.sampling.repetition_penalty = 1.3f;
      r.sampling.seed = 42 + static_cast<std::uint64_t>(i);
      r.sampling.has_seed = true;
      client.submit(r, streams.sink(static_cast<std::uint64_t>(i)));
    }
    REQUIRE(streams.wait(kRequests, std::chrono::seconds(120)));
    const auto s = scheduler_status(cluster.status());
    check_no_block_leaked(s);
    std::lock_guard lock(streams.mutex);
    return std::make_pair(streams.tokens, s["preemptions"].get<std::int64_t>());
  };
  const auto [roomy, none] = sample("cache_blocks: 64\nblock_tokens: 8\n");
  CHECK(none == 0);
  // 6 requests of up to 35 tokens need 30 blocks of 8; 12 make them take turns.
  const auto [tight, preempted] = sample("cache_blocks: 12\nblock_tokens: 8\nprefix_cache: false\n");
  CHECK(preempted > 0);
  for (const auto& [slot, tokens] : roomy) {
    CAPTURE(slot);
    CHECK(tokens.size() == 24);
    CHECK(tight.at(slot) == tokens);
  }
}
