// The model against DeepSeek's own reference implementation (../shared/golden, copied into
// tests/data/golden): logits, greedy continuations and router choices of tiny checkpoints.

#include "shoal/kernels/thread_pool.hpp"
#include "shoal/runtime/model.hpp"
#include "shoal/runtime/weights.hpp"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>

using namespace shoal;
using json = nlohmann::json;
namespace fs = std::filesystem;

namespace {

// The golden README's recommendation for an fp32 runtime: two independent fp32
// implementations agree to 1e-5; the goldens are rounded to 6 significant digits.
constexpr double kLogitTolerance = 1e-4;
constexpr double kRoutingWeightTolerance = 1e-4;

struct golden_model {
  std::string name;
  json golden;
  std::unique_ptr<runtime::model_weights> weights;
};

const std::vector<golden_model>& golden_models() {
  static const std::vector<golden_model> models = [] {
    std::vector<golden_model> result;
    const fs::path root = fs::path(SHOAL_TEST_DATA_DIR) / "golden";
    std::vector<fs::path> dirs;
    for (const auto& entry : fs::directory_iterator(root))
      if (entry.is_directory() && fs::exists(entry.path() / "golden.json")) dirs.push_back(entry.path());
    std::sort(dirs.begin(), dirs.end());
    for (const auto& dir : dirs) {
      golden_model m;
      m.name = dir.filename().string();
      std::ifstream in(dir / "golden.json");
      m.golden = json::parse(in);
      m.weights = runtime::model_weights::load(dir / "ckpt", {}, runtime::weight_residency::copy);
      result.push_back(std::move(m));
    }
    return result;
  }();
  return models;
}

double max_abs_diff(const float* actual, const json& expected) {
  double diff = 0.0;
  for (std::size_t i = 0; i < expected.size(); ++i)
    diff = std::max(diff, std::fabs(static_cast<double>(actual[i]) - expected[i].get<double>()));
  return diff;
}

std::vector<std::int32_t> tokens_of(const json& prompt) { return prompt["tokens"].get<std::vector<std::int32_t>>(); }

}  // namespace

TEST_CASE("golden data is present for every model", "[golden]") {
  REQUIRE(golden_models().size() >= 3);
}

TEST_CASE("prefill logits match DeepSeek's reference at every position", "[golden]") {
  kernels::thread_pool pool(2);
  for (const auto& m : golden_models()) {
    const auto vocab = m.weights->config().vocab_size;
    for (const auto mode : {runtime::kernel_mode::optimized, runtime::kernel_mode::reference}) {
      runtime::model net(*m.weights, pool, mode);
      for (const auto& prompt : m.golden["prompts"]) {
        const auto tokens = tokens_of(prompt);
        // The plain kernels are slow; they check the short prompts only.
        if (mode == runtime::kernel_mode::reference && tokens.size() > 40) continue;
        CAPTURE(m.name, prompt["name"].get<std::string>(), mode == runtime::kernel_mode::reference);
        runtime::latent_cache cache(m.weights->config(), static_cast<std::int64_t>(tokens.size()));
        const runtime::sequence_step step{&cache, tokens};
        const auto logits = net.forward(std::span(&step, 1), /*all_positions=*/true);
        REQUIRE(logits.size() == tokens.size() * vocab);
        CHECK(max_abs_diff(logits.data() + (tokens.size() - 1) * vocab, prompt["last_logits"]) < kLogitTolerance);
        if (prompt.contains("all_logits")) {
          for (std::size_t p = 0; p < tokens.size(); ++p) {
            CAPTURE(p);
            CHECK(max_abs_diff(logits.data() + p * vocab, prompt["all_logits"][p]) < kLogitTolerance);
          }
        }
        if (prompt.contains("logits_at_positions")) {
          for (const auto& [position, row] : prompt["logits_at_positions"].items()) {
            CAPTURE(position);
            CHECK(max_abs_diff(logits.data() + std::stoul(position) * vocab, row) < kLogitTolerance);
          }
        }
      }
    }
  }
}

TEST_CASE("greedy decoding with the latent cache reproduces the reference tokens", "[golden]") {
  kernels::thread_pool pool(2);
  for (const auto& m : golden_models()) {
    runtime::model net(*m.weights, pool);
    const auto vocab = m.weights->config().vocab_size;
    for (const auto& prompt : m.golden["prompts"]) {
      CAPTURE(m.name, prompt["name"].get<std::string>());
      const auto tokens = tokens_of(prompt);
      const auto expected = prompt["greedy_tokens"].get<std::vector<std::int32_t>>();
      runtime::latent_cache cache(m.weights->config(), static_cast<std::int64_t>(tokens.size() + expected.size()));
      runtime::sequence_step step{&cache, tokens};
      auto logits = net.forward(std::span(&step, 1));
      std::vector<std::int32_t> generated;
      for (std::size_t i = 0; i < expected.size(); ++i) {
        if (prompt.contains("greedy_step_logits")) {
          CAPTURE(i);
          CHECK(max_abs_diff(logits.data(), prompt["greedy_step_logits"][i]) < kLogitTolerance);
        }
        generated.push_back(runtime::argmax(logits));
        if (i + 1 == expected.size()) break;  // the last token is never fed back
        step.tokens = std::span(&generated.back(), 1);
        logits = net.forward(std::span(&step, 1));
        REQUIRE(static_cast<std::int64_t>(logits.size()) == vocab);
      }
      CHECK(generated == expected);
      CHECK(cache.length() == static_cast<std::int64_t>(tokens.size() + expected.size() - 1));
    }
  }
}

TEST_CASE("the router picks the reference's experts with the reference's weights", "[golden]") {
  kernels::thread_pool pool(2);
  for (const auto& m : golden_models()) {
    runtime::model net(*m.weights, pool);
    std::map<std::int64_t, std::vector<std::set<std::int32_t>>> chosen;
    std::map<std::int64_t, std::vector<std::map<std::int32_t, float>>> weight_of;
    net.set_route_observer([&](std::int64_t layer, std::int64_t tokens, std::int64_t top_k, const std::int32_t* indices,
                               const float* weights) {
      for (std::int64_t t = 0; t < tokens; ++t) {
        std::set<std::int32_t> set;
        std::map<std::int32_t, float> w;
        for (std::int64_t k = 0; k < top_k; ++k) {
          set.insert(indices[t * top_k + k]);
          w[indices[t * top_k + k]] = weights[t * top_k + k];
        }
        chosen[layer].push_back(set);
        weight_of[layer].push_back(w);
      }
    });
    for (const auto& prompt : m.golden["prompts"]) {
      if (!prompt.contains("routing")) continue;
      CAPTURE(m.name, prompt["name"].get<std::string>());
      chosen.clear();
      weight_of.clear();
      const auto tokens = tokens_of(prompt);
      runtime::latent_cache cache(m.weights->config(), static_cast<std::int64_t>(tokens.size()));
      const runtime::sequence_step step{&cache, tokens};
      net.forward(std::span(&step, 1));
      const json& routing = prompt["routing"];
      std::size_t layers_checked = 0;
      for (const auto& layer_routing : routing) {
        const auto layer = layer_routing["layer"].get<std::int64_t>();
        CAPTURE(layer);
        REQUIRE(chosen[layer].size() == tokens.size());
        for (std::size_t t = 0; t < tokens.size(); ++t) {
          const auto indices = layer_routing["topk_indices"][t].get<std::vector<std::int32_t>>();
          const auto weights = layer_routing["topk_weights"][t].get<std::vector<double>>();
          CHECK(chosen[layer][t] == std::set<std::int32_t>(indices.begin(), indices.end()));
          for (std::size_t k = 0; k < indices.size(); ++k)
            CHECK(std::fabs(weight_of[layer][t][indices[k]] - weights[k]) < kRoutingWeightTolerance);
        }
        ++layers_checked;
      }
      CHECK(layers_checked > 0);
    }
  }
}
