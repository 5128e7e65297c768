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
  // Training-only and bookkeeping keys that Shoal knows (aux_loss_alpha, architectures, ...)
  // are accepted silently.
  CHECK(nlohmann::json::parse(golden_config("tiny-b-bf16")).contains("aux_loss_alpha"));
  CHECK(b.ignored_keys.empty());
}

TEST_CASE("keys Shoal does not know are reported, not fatal", "[config]") {
  auto j = nlohmann::json::parse(golden_config("tiny-b-bf16"));
  j["moe_future_knob"] = 3;
  j["zz_note"] = "x";
  const auto c = config::parse_model_config(j.dump(), "config.json");
  CHECK(c.ignored_keys == std::vector<std::string>{"moe_future_knob", "zz_note"});
  CHECK(c.hidden_size == 144);
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
  // Found by the model_config fuzzer: a number too large for a double is nlohmann's
  // out_of_range, not parse_error, and escaped the parser (the shoal command exited 1).
  try {
    config::parse_model_config(R"({"rms_norm_eps": 5e7777})", "/models/x/config.json");
    FAIL("parsed a number that overflows a double");
  } catch (const shoal::error& e) {
    CHECK(e.code() == errc::invalid_argument);
    CHECK_THAT(e.what(), Catch::StartsWith("/models/x/config.json: not valid JSON") && Catch::Contains("number overflow"));
  }
}

TEST_CASE("every refusal of config.json names the file and the key", "[config]") {
  const std::string text = golden_config("tiny-b-bf16");
  using json = nlohmann::json;
  const auto refusal = [&](const std::string& key, auto edit) {
    const std::string message = error_after(text, edit);
    CHECK_THAT(message, Catch::StartsWith("config.json: key '" + key + "': "));
    return message;
  };
  CHECK_THAT(refusal("vocab_size", [](json& j) { j["vocab_size"] = 0; }), Catch::Contains("must be >= 1, got 0"));
  CHECK_THAT(refusal("q_lora_rank", [](json& j) { j["q_lora_rank"] = -3; }), Catch::Contains("must be >= 1, got -3"));
  CHECK_THAT(refusal("hidden_size", [](json& j) { j["hidden_size"] = 1.5; }), Catch::Contains("expected an integer, got 1.5"));
  CHECK_THAT(refusal("hidden_size", [](json& j) { j["hidden_size"] = 18446744073709551615ull; }), Catch::Contains("must be >= 1"));
  CHECK_THAT(refusal("rope_theta", [](json& j) { j["rope_theta"] = "10000"; }), Catch::Contains("expected a number, got \"10000\""));
  CHECK_THAT(refusal("rope_theta", [](json& j) { j["rope_theta"] = 0; }), Catch::Contains("must be > 0, got 0"));
  CHECK_THAT(refusal("routed_scaling_factor", [](json& j) { j["routed_scaling_factor"] = -2.5; }), Catch::Contains("must be > 0"));
  CHECK_THAT(refusal("norm_topk_prob", [](json& j) { j["norm_topk_prob"] = 1; }), Catch::Contains("expected true or false, got 1"));
  CHECK_THAT(refusal("tie_word_embeddings", [](json& j) { j["tie_word_embeddings"] = "no"; }), Catch::Contains("expected true or false"));
  CHECK_THAT(refusal("model_type", [](json& j) { j["model_type"] = 3; }), Catch::Contains("expected a string, got 3"));
  CHECK_THAT(refusal("model_type", [](json& j) { j.erase("model_type"); }), Catch::Contains("expected \"deepseek_v3\", got \"\""));
  CHECK_THAT(refusal("hidden_act", [](json& j) { j["hidden_act"] = "gelu"; }), Catch::Contains("only \"silu\""));
  CHECK_THAT(refusal("attention_bias", [](json& j) { j["attention_bias"] = true; }), Catch::Contains("no bias"));
  CHECK_THAT(refusal("n_group", [](json& j) { j["n_group"] = 5; }), Catch::Contains("not divisible by n_group (5)"));
  CHECK_THAT(refusal("topk_group", [](json& j) { j["topk_group"] = 9; }), Catch::Contains("exceeds n_group"));
  CHECK_THAT(refusal("num_experts_per_tok", [](json& j) { j["num_experts_per_tok"] = 13; }), Catch::Contains("exceeds the experts in the kept groups"));
  CHECK_THAT(refusal("first_k_dense_replace", [](json& j) { j["first_k_dense_replace"] = 7; }), Catch::Contains("exceeds num_hidden_layers (6)"));
  CHECK_THAT(refusal("qk_rope_head_dim", [](json& j) { j["qk_rope_head_dim"] = 31; }), Catch::Contains("must be even"));
  CHECK_THAT(refusal("num_key_value_heads", [](json& j) { j["num_key_value_heads"] = 1; }), Catch::Contains("num_key_value_heads == num_attention_heads"));
  CHECK_THAT(refusal("bos_token_id", [](json& j) { j["bos_token_id"] = 1 << 20; }), Catch::Contains("outside the vocabulary"));
  CHECK_THAT(refusal("eos_token_id", [](json& j) { j["eos_token_id"] = 1 << 20; }), Catch::Contains("outside the vocabulary"));
  CHECK_THAT(refusal("rope_scaling", [](json& j) { j["rope_scaling"] = "yarn"; }), Catch::Contains("expected an object or null"));
  CHECK_THAT(refusal("rope_scaling.type", [](json& j) { j["rope_scaling"]["type"] = "linear"; }), Catch::Contains("only \"yarn\""));
  CHECK_THAT(refusal("rope_scaling.factor", [](json& j) { j["rope_scaling"].erase("factor"); }), Catch::Contains("missing"));
  CHECK_THAT(refusal("rope_scaling.original_max_position_embeddings",
                     [](json& j) { j["rope_scaling"]["original_max_position_embeddings"] = 0; }), Catch::Contains("must be >= 1"));
  CHECK_THAT(refusal("rope_scaling.mscale", [](json& j) { j["rope_scaling"]["mscale"] = 0.5; }), Catch::Contains("!= mscale_all_dim"));
  CHECK_THAT(refusal("rope_scaling.beta_slow", [](json& j) {
               j["rope_scaling"]["beta_slow"] = 64;
               j["rope_scaling"]["beta_fast"] = 32;
             }), Catch::Contains("must be below beta_fast"));
  const json fp8 = {{"quant_method", "fp8"}, {"fmt", "e4m3"}, {"activation_scheme", "dynamic"}, {"weight_block_size", {128, 128}}};
  CHECK(error_after(text, [&](json& j) { j["quantization_config"] = fp8; }).empty());
  CHECK_THAT(refusal("quantization_config", [](json& j) { j["quantization_config"] = json::array(); }), Catch::Contains("expected an object"));
  CHECK_THAT(refusal("quantization_config.quant_method", [&](json& j) { j["quantization_config"] = fp8; j["quantization_config"]["quant_method"] = "gptq"; }),
             Catch::Contains("only \"fp8\""));
  CHECK_THAT(refusal("quantization_config.fmt", [&](json& j) { j["quantization_config"] = fp8; j["quantization_config"]["fmt"] = "e5m2"; }),
             Catch::Contains("only \"e4m3\""));
  CHECK_THAT(refusal("quantization_config.activation_scheme", [&](json& j) { j["quantization_config"] = fp8; j["quantization_config"]["activation_scheme"] = "static"; }),
             Catch::Contains("only \"dynamic\""));
  CHECK_THAT(refusal("quantization_config.weight_block_size", [&](json& j) { j["quantization_config"] = fp8; j["quantization_config"].erase("weight_block_size"); }),
             Catch::Contains("missing"));
  CHECK_THAT(refusal("quantization_config.weight_block_size", [&](json& j) { j["quantization_config"] = fp8; j["quantization_config"]["weight_block_size"] = {128, "128"}; }),
             Catch::Contains("expected [128, 128]"));
}

TEST_CASE("a model directory without config.json is named", "[config]") {
  try {
    config::load_model_config("/nonexistent/model");
    FAIL("loaded a config from a directory that does not exist");
  } catch (const shoal::error& e) {
    CHECK(e.code() == errc::not_found);
    CHECK_THAT(e.what(), Catch::StartsWith("/nonexistent/model/config.json: cannot open"));
  }
}
