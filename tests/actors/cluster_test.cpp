// The actors in one process: a 4-node plan (2 stages, 2 expert nodes with disjoint halves of
// the routed experts) and the single-stage embedded plan give the single-process model's
// logits bit for bit and its greedy tokens, on the golden model with MoE layers.

#include "shoal/actors/client.hpp"
#include "shoal/actors/cluster.hpp"
#include "shoal/base/error.hpp"
#include "shoal/config/cluster_config.hpp"
#include "shoal/kernels/thread_pool.hpp"
#include "shoal/runtime/model.hpp"
#include "shoal/runtime/weights.hpp"

#include "reference.hpp"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <cmath>
#include <cstring>
#include <fstream>
#include <string>

namespace {

using shoal::testing::check_same;
using shoal::testing::golden_prompts;
using shoal::testing::single_process;
const std::string kModelDir = shoal::testing::kClusterModelDir;

shoal::config::cluster_config four_nodes() { return shoal::testing::four_node_plan(); }

void check_same(const shoal::testing::reference_run& want, const shoal::generate_result& got) {
  check_same(want, got.tokens, got.logits);
}

}  // namespace

TEST_CASE("a 4-node plan in one process matches the single-process model bit for bit") {
  constexpr int kNewTokens = 8;
  shoal::actors::local_cluster cluster(four_nodes(), {.ready_timeout = std::chrono::seconds(60)});
  const auto table = cluster.wait_ready();
  CHECK(table.stages.size() == 2);
  CHECK(table.experts.size() == 2);
  shoal::client client(cluster);
  for (const auto& prompt : golden_prompts()) {
    INFO("prompt of " << prompt.size() << " tokens");
    const auto want = single_process(prompt, kNewTokens);
    const auto got = client.generate({.prompt = prompt, .sampling = {}, .max_tokens = kNewTokens, .stop_tokens = {},
                                      .want_logits = true, .deadline = {}},
                                     std::chrono::seconds(30));
    CHECK(got.finish == shoal::actors::finish_reason::length);
    check_same(want, got);
  }
  const auto status = nlohmann::json::parse(cluster.status());
  CHECK(status["serving"] == true);
}

TEST_CASE("the embedded plan matches, streams tokens one by one, and refuses bad requests") {
  auto config = shoal::config::embedded_cluster_config(kModelDir + "/ckpt", 6, 1);
  shoal::actors::local_cluster cluster(config, {.ready_timeout = std::chrono::seconds(60)});
  cluster.wait_ready();
  shoal::client client(cluster);
  const std::vector<std::int32_t> prompt{605, 3, 17};
  const auto want = single_process(prompt, 4);
  const auto id = client.submit({.prompt = prompt, .sampling = {}, .max_tokens = 4, .stop_tokens = {}, .want_logits = true, .deadline = {}});
  shoal::generate_result got;
  int chunks = 0;
  while (true) {
    auto chunk = client.next(id, std::chrono::seconds(30));
    REQUIRE(chunk);
    ++chunks;
    got.tokens.insert(got.tokens.end(), chunk->tokens.begin(), chunk->tokens.end());
    got.logits.insert(got.logits.end(), chunk->logits.begin(), chunk->logits.end());
    if (chunk->finish != shoal::actors::finish_reason::none) break;
  }
  CHECK(chunks == 4);
  check_same(want, got);

  // A stop token ends the stream early.
  const auto stopped = client.generate({.prompt = prompt, .sampling = {}, .max_tokens = 4, .stop_tokens = {want.tokens[1]},
                                        .want_logits = false, .deadline = {}},
                                       std::chrono::seconds(30));
  CHECK(stopped.finish == shoal::actors::finish_reason::stop);
  CHECK(stopped.tokens == std::vector<std::int32_t>(want.tokens.begin(), want.tokens.begin() + 2));

  CHECK_THROWS_WITH(client.generate({.prompt = {5, 100000}, .sampling = {}, .max_tokens = 2, .stop_tokens = {}, .want_logits = false,
                                     .deadline = {}},
                                    std::chrono::seconds(10)),
                    Catch::Contains("prompt token 100000 is outside the vocabulary [0, 1000)"));
  CHECK_THROWS_WITH(client.generate({.prompt = {}, .sampling = {}, .max_tokens = 2, .stop_tokens = {}, .want_logits = false, .deadline = {}},
                                    std::chrono::seconds(10)),
                    Catch::Contains("the prompt is empty"));
  CHECK_THROWS_WITH(client.generate({.prompt = {1}, .sampling = {}, .max_tokens = 600, .stop_tokens = {}, .want_logits = false,
                                     .deadline = {}},
                                    std::chrono::seconds(10)),
                    Catch::Contains("exceeds the model's context of 512"));
}

TEST_CASE("a cluster whose weights cannot load fails with what and where instead of hanging") {
  auto config = four_nodes();
  config.model = kModelDir + "/no-such-ckpt";
  CHECK_THROWS_WITH(shoal::actors::local_cluster(config), Catch::Contains("config.json"));
}
