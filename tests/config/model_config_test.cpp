#include "shoal/base/error.hpp"
#include "shoal/config/model_config.hpp"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <cmath>
#include <fstream>
#include <sstream>

using namespace shoal;

namespace {

std::string read_file(const std::string& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

std::string golden_config(const std::string& model) {
  return read_file(std::string(SHOAL_TEST_DATA_DIR) + "/golden/" + model + "/ckpt/config.json");
}

// Parses `text` after applying `edit` to its JSON and returns the error message ("" if none).
template <typename Edit>
std::string error_after(const std::string& text, Edit edit) {
  auto j = nlohmann::json::parse(text);
  edit(j);
  try {
    config::parse_model_config(j.dump(), "config.json");
  } catch (const shoal::error& e) {
    CHECK(e.code() == errc::invalid_argument);
    return e.what();
  }
  return "";
}

}  // namespace

TEST_CASE("golden configs parse with every architecture key", "[config]") {
  const auto a = config::parse_model_config(golden_config("tiny-a-fp8"), "tiny-a-fp8");
  CHECK(a.hidden_size == 160);
  CHECK(a.kv_lora_rank == 32);
  CHECK(a.q_lora_rank == 64);
  CHECK(a.n_group == 4);
  CHECK(a.topk_group == 2);
  CHECK(a.routed_scaling_factor == 2.5);
  CHECK(a.first_k_dense_replace == 1);
  CHECK_FALSE(a.is_moe_layer(0));
  CHECK(a.is_moe_layer(1));
  REQUIRE(a.quantization.has_value());
  CHECK_FALSE(a.rope_scaling.has_value());
  CHECK(a.softmax_scale() == Approx(1.0 / std::sqrt(48.0)));

  const auto b = config::parse_model_config(golden_config("tiny-b-bf16"), "tiny-b-bf16");
  REQUIRE(b.rope_scaling.has_value());
  CHECK(b.rope_scaling->factor == 4.0);
  CHECK(b.rope_scaling->original_max_position == 128);
  CHECK(b.num_nextn_predict_layers == 1);
  CHECK(b.v_head_dim == 40);
  const double m = 0.1 * 1.0 * std::log(4.0) + 1.0;
  CHECK(b.softmax_scale() == Approx(m * m / std::sqrt(56.0)));
  // Training-only keys are reported, not fatal.
  CHECK(b.ignored_keys.empty());
}

TEST_CASE("a config survives serialization", "[config]") {
  const auto b = config::parse_model_config(golden_config("tiny-b-bf16"), "b");
  const auto again = config::parse_model_config(config::model_config_to_json(b), "again");
  CHECK(again.hidden_size == b.hidden_size);
  CHECK(again.rope_scaling->beta_fast == b.rope_scaling->beta_fast);
  CHECK(again.n_shared_experts == b.n_shared_experts);
}

TEST_CASE("bad configs are refused with the key named", "[config]") {
  const std::string text = golden_config("tiny-b-bf16");
  using json = nlohmann::json;
  CHECK_THAT(error_after(text, [](json& j) { j.erase("hidden_size"); }),
             Catch::Contains("'hidden_size'") && Catch::Contains("missing"));
  CHECK_THAT(error_after(text, [](json& j) { j["hidden_size"] = "big"; }),
             Catch::Contains("'hidden_size'") && Catch::Contains("integer"));
  CHECK_THAT(error_after(text, [](json& j) { j["n_group"] = 5; }), Catch::Contains("'n_group'"));
  CHECK_THAT(error_after(text, [](json& j) { j["topk_group"] = 9; }), Catch::Contains("'topk_group'"));
  CHECK_THAT(error_after(text, [](json& j) { j["num_experts_per_tok"] = 13; }),
             Catch::Contains("'num_experts_per_tok'"));
  CHECK_THAT(error_after(text, [](json& j) { j["scoring_func"] = "softmax"; }), Catch::Contains("'scoring_func'"));
  CHECK_THAT(error_after(text, [](json& j) { j["topk_method"] = "greedy"; }), Catch::Contains("'topk_method'"));
  CHECK_THAT(error_after(text, [](json& j) { j["model_type"] = "llama"; }), Catch::Contains("'model_type'"));
  CHECK_THAT(error_after(text, [](json& j) { j["qk_rope_head_dim"] = 31; }), Catch::Contains("'qk_rope_head_dim'"));
  CHECK_THAT(error_after(text, [](json& j) { j["rope_scaling"]["type"] = "linear"; }),
             Catch::Contains("'rope_scaling.type'"));
  CHECK_THAT(error_after(text, [](json& j) { j["rope_scaling"].erase("factor"); }),
             Catch::Contains("'rope_scaling.factor'"));
  CHECK_THAT(error_after(text, [](json& j) { j["rope_scaling"]["mscale"] = 0.5; }),
             Catch::Contains("'rope_scaling.mscale'"));
  CHECK_THAT(error_after(text, [](json& j) {
               j["quantization_config"] = {{"quant_method", "fp8"}, {"weight_block_size", {64, 64}}};
             }),
             Catch::Contains("'quantization_config.weight_block_size'"));
  CHECK_THAT(error_after(text, [](json& j) { j["first_k_dense_replace"] = 7; }),
             Catch::Contains("'first_k_dense_replace'"));
  CHECK_THAT(error_after(text, [](json& j) { j["rms_norm_eps"] = -1; }), Catch::Contains("'rms_norm_eps'"));
  CHECK_THAT(error_after(text, [](json& j) { j["num_key_value_heads"] = 1; }),
             Catch::Contains("'num_key_value_heads'"));
  CHECK(error_after(text, [](json&) {}).empty());
  CHECK_THAT(error_after(text, [](json& j) { j["eos_token_id"] = 5000; }), Catch::Contains("'eos_token_id'"));
}

TEST_CASE("malformed JSON names the file", "[config]") {
  CHECK_THROWS_WITH(config::parse_model_config("{\"vocab_size\": ", "/models/x/config.json"),
                    Catch::Contains("/models/x/config.json") && Catch::Contains("JSON"));
  CHECK_THROWS_WITH(config::parse_model_config("[1,2]", "c.json"), Catch::Contains("object"));
}
