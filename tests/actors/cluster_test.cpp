// The actors in one process: a 4-node plan (2 stages, 2 expert nodes with disjoint halves of
// the routed experts) and the single-stage embedded plan give the single-process model's
// logits bit for bit and its greedy tokens, on the golden model with MoE layers.

#include "shoal/actors/client.hpp"
#include "shoal/actors/cluster.hpp"
#include "shoal/actors/engines.hpp"
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
#include <numeric>
#include <random>
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

namespace {

// Every MoE layer's output of `engine` for the same pseudo-random rows over `experts`.
std::vector<std::vector<float>> expert_outputs(shoal::actors::expert_engine& engine,
                                               const std::vector<std::uint32_t>& experts) {
  const auto& c = engine.config();
  std::mt19937 random(7);
  std::normal_distribution<float> value(0.0f, 1.0f);
  const std::int64_t rows = 2 * static_cast<std::int64_t>(experts.size());
  std::vector<std::vector<float>> outputs;
  for (std::int64_t layer = 0; layer < c.num_hidden_layers; ++layer) {
    if (!c.is_moe_layer(layer)) continue;
    std::vector<float> x(static_cast<std::size_t>(rows * c.hidden_size));
    for (auto& v : x) v = value(random);
    std::vector<std::int32_t> ids;
    for (std::int64_t r = 0; r < rows; ++r) ids.push_back(static_cast<std::int32_t>(experts[r % experts.size()]));
    std::vector<float> out(x.size());
    engine.compute(layer, x.data(), ids.data(), rows, out.data());
    outputs.push_back(std::move(out));
  }
  return outputs;
}

}  // namespace

TEST_CASE("an expert actor rebuilt from weights streamed in parts computes bit for bit what the original does") {
  for (const char* model : {"tiny-b-bf16", "tiny-a-fp8"}) {
    INFO(model);
    const auto dir = std::string(SHOAL_TEST_DATA_DIR) + "/golden/" + model + "/ckpt";
    const auto n = shoal::config::load_model_config(dir).n_routed_experts;
    std::vector<std::uint32_t> all(static_cast<std::size_t>(n));
    std::iota(all.begin(), all.end(), 0u);
    shoal::actors::expert_engine source(dir, all, 1);
    const std::vector<std::uint32_t> wanted{1, 4, static_cast<std::uint32_t>(n - 1)};
    std::int64_t moe_layers = 0;
    for (std::int64_t l = 0; l < source.config().num_hidden_layers; ++l) moe_layers += source.config().is_moe_layer(l);
    REQUIRE(moe_layers > 0);

    // One (layer, expert) pair per part when parts are tiny, all of them in one when large.
    CHECK(source.weights_part_of(wanted, 0).parts == 1);
    const auto parts_of = [&](std::size_t part_bytes) {
      std::vector<shoal::actors::weights_part> parts;
      const auto first = source.weights_part_of(wanted, 0, part_bytes);
      for (std::uint32_t p = 0; p < first.parts; ++p) parts.push_back(source.weights_part_of(wanted, p, part_bytes));
      return parts;
    };
    auto parts = parts_of(1);
    REQUIRE(parts.size() == static_cast<std::size_t>(moe_layers) * wanted.size());
    // Received in any order.
    std::reverse(parts.begin(), parts.end());
    shoal::actors::expert_engine copy(parts, wanted, 1, "weights from test");
    CHECK(copy.experts() == wanted);
    CHECK_FALSE(copy.holds(0));
    CHECK(expert_outputs(copy, wanted) == expert_outputs(source, wanted));
    // A copy can be the source of the next one: the same bytes leave it.
    CHECK(copy.weights_part_of(wanted, 3, 1).tensors == source.weights_part_of(wanted, 3, 1).tensors);

    SECTION("what is wrong with the parts is refused by name, nothing half built") {
      auto missing = parts_of(1);
      missing.pop_back();
      CHECK_THROWS_WITH(shoal::actors::expert_engine(missing, wanted, 1, "weights from test"),
                        Catch::Contains(fmt::format("{} of {} weights parts received", missing.size(), parts.size())));
      auto twice = parts_of(1);
      twice[1] = twice[0];
      CHECK_THROWS_WITH(shoal::actors::expert_engine(twice, wanted, 1, "weights from test"),
                        Catch::Contains("weights part 1 of"));
      auto truncated = parts_of(1);
      truncated[2].tensors.resize(truncated[2].tensors.size() - 1);
      CHECK_THROWS_WITH(shoal::actors::expert_engine(truncated, wanted, 1, "weights from test"),
                        Catch::Contains("weights from test part 3/"));
      auto other_config = parts_of(1);
      other_config[0].config_json += " ";
      CHECK_THROWS_WITH(shoal::actors::expert_engine(other_config, wanted, 1, "weights from test"),
                        Catch::Contains("was checked against another config.json"));
      // Parts of other experts than the actor is to hold: a tensor it needs is missing.
      CHECK_THROWS_WITH(shoal::actors::expert_engine(parts_of(1), {1, 4, 5}, 1, "weights from test"),
                        Catch::Contains("missing tensor 'model.layers."));
      CHECK_THROWS_WITH(copy.weights_part_of({0}, 0), Catch::Contains("expert 0 is not held by this actor"));
      CHECK_THROWS_WITH(source.weights_part_of(wanted, 1), Catch::Contains("weights part 1 requested; there are 1"));
      CHECK_THROWS_WITH(source.weights_part_of({}, 0), Catch::Contains("must name at least one expert"));
    }
  }
}
