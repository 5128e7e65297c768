#pragma once
// The single-process greedy loop of `shoal generate` (prefill, then one token per step), as
// the reference the cluster tests compare with.

#include "shoal/config/cluster_config.hpp"
#include "shoal/kernels/thread_pool.hpp"
#include "shoal/runtime/model.hpp"
#include "shoal/runtime/weights.hpp"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <cmath>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

namespace shoal::testing {

inline const std::string kClusterModelDir = std::string(SHOAL_TEST_DATA_DIR) + "/golden/tiny-b-bf16";

// The golden model on 4 in-process nodes: 2 stages of 3 layers, 2 expert nodes with disjoint
// halves of the routed experts. `settings` adds top-level keys (cache and batching).
inline config::cluster_config four_node_plan(const std::string& settings = "") {
  return config::parse_cluster_config("model: ckpt\nthreads: 1\n" + settings + R"(
nodes:
  - {name: s0, port: 1}
  - {name: s1, port: 2}
  - {name: e0, port: 3}
  - {name: e1, port: 4}
plan:
  stages:
    - {node: s0, layers: 0-2}
    - {node: s1, layers: 3-5}
  experts:
    - {node: e0, experts: 0-15}
    - {node: e1, experts: 16-31}
)",
                                      "four-nodes.yaml", kClusterModelDir);
}

struct reference_run {
  std::vector<std::int32_t> tokens;
  std::vector<float> logits;  // [tokens][vocab]
};

inline reference_run single_process(const std::vector<std::int32_t>& prompt, int new_tokens) {
  auto weights =
      runtime::model_weights::load(kClusterModelDir + "/ckpt", {}, runtime::weight_residency::mapped);
  kernels::thread_pool pool(1);
  runtime::model net(*weights, pool);
  runtime::latent_cache cache(net.config(), static_cast<std::int64_t>(prompt.size()) + new_tokens);
  reference_run out;
  runtime::sequence_step step{&cache, prompt};
  for (int i = 0; i < new_tokens; ++i) {
    const auto logits = net.forward(std::span(&step, 1));
    out.logits.insert(out.logits.end(), logits.begin(), logits.end());
    out.tokens.push_back(runtime::argmax(logits));
    step.tokens = std::span(&out.tokens.back(), 1);
  }
  return out;
}

// The golden prompts short enough for quick tests.
inline std::vector<std::vector<std::int32_t>> golden_prompts() {
  std::ifstream in(kClusterModelDir + "/golden.json");
  const auto golden = nlohmann::json::parse(in);
  std::vector<std::vector<std::int32_t>> prompts;
  for (const auto& p : golden["prompts"])
    if (p["tokens"].size() <= 64) prompts.push_back(p["tokens"].get<std::vector<std::int32_t>>());
  REQUIRE(!prompts.empty());  // the loops over them check nothing otherwise
  return prompts;
}

// Same greedy tokens and bit-identical logits.
inline void check_same(const reference_run& want, const std::vector<std::int32_t>& tokens,
                       const std::vector<float>& logits) {
  REQUIRE(tokens == want.tokens);
  REQUIRE(logits.size() == want.logits.size());
  double max_diff = 0;
  for (std::size_t i = 0; i < logits.size(); ++i)
    max_diff = std::max(max_diff, std::abs(static_cast<double>(logits[i]) - want.logits[i]));
  INFO("largest logit difference " << max_diff);
  CHECK(std::memcmp(logits.data(), want.logits.data(), logits.size() * sizeof(float)) == 0);
}

}  // namespace shoal::testing
