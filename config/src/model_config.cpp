#include "shoal/config/model_config.hpp"

#include "shoal/base/error.hpp"

#include <nlohmann/json.hpp>

#include <cmath>
#include <fstream>
#include <set>
#include <sstream>

namespace shoal::config {
namespace {

using json = nlohmann::json;

// Keys of real DeepSeek-V3 configs that do not affect inference here.
const std::set<std::string, std::less<>> kIgnoredKeys = {
    "architectures", "attention_dropout", "auto_map", "aux_loss_alpha", "ep_size",
    "initializer_range", "pretraining_tp", "seq_aux", "torch_dtype", "transformers_version",
    "use_cache", "_name_or_path", "num_key_value_heads", "model_type", "hidden_act",
    "scoring_func", "topk_method", "attention_bias", "rope_scaling", "quantization_config",
    "dtype"};

class reader {
 public:
  reader(const json& object, std::string_view source, std::string prefix = "")
      : object_(object), source_(source), prefix_(std::move(prefix)) {}

  [[noreturn]] void fail_key(std::string_view key, std::string_view what) const {
    shoal::fail(errc::invalid_argument, "{}: key '{}{}': {}", source_, prefix_, key, what);
  }

  bool has(std::string_view key) const {
    auto it = object_.find(key);
    return it != object_.end() && !it->is_null();
  }

  const json& get(std::string_view key) const {
    auto it = object_.find(key);
    if (it == object_.end()) fail_key(key, "missing");
    return *it;
  }

  std::int64_t integer(std::string_view key, std::int64_t min_value) const {
    const json& value = get(key);
    if (!value.is_number_integer()) fail_key(key, fmt::format("expected an integer, got {}", value.dump()));
    const std::int64_t result = value.get<std::int64_t>();
    if (result < min_value)
      fail_key(key, fmt::format("must be >= {}, got {}", min_value, result));
    return result;
  }

  std::int64_t integer_or(std::string_view key, std::int64_t min_value, std::int64_t fallback) const {
    return has(key) ? integer(key, min_value) : fallback;
  }

  double number(std::string_view key) const {
    const json& value = get(key);
    if (!value.is_number()) fail_key(key, fmt::format("expected a number, got {}", value.dump()));
    const double result = value.get<double>();
    if (!std::isfinite(result)) fail_key(key, "must be finite");
    return result;
  }

  double positive_number(std::string_view key) const {
    const double result = number(key);
    if (result <= 0) fail_key(key, fmt::format("must be > 0, got {}", result));
    return result;
  }

  double number_or(std::string_view key, double fallback) const {
    return has(key) ? number(key) : fallback;
  }

  bool boolean_or(std::string_view key, bool fallback) const {
    if (!has(key)) return fallback;
    const json& value = get(key);
    if (!value.is_boolean()) fail_key(key, fmt::format("expected true or false, got {}", value.dump()));
    return value.get<bool>();
  }

  std::string string_or(std::string_view key, std::string fallback) const {
    if (!has(key)) return fallback;
    const json& value = get(key);
    if (!value.is_string()) fail_key(key, fmt::format("expected a string, got {}", value.dump()));
    return value.get<std::string>();
  }

 private:
  const json& object_;
  std::string_view source_;
  std::string prefix_;
};

}  // namespace

double model_config::softmax_scale() const noexcept {
  double scale = 1.0 / std::sqrt(static_cast<double>(qk_head_dim()));
  if (rope_scaling && rope_scaling->factor > 1.0) {
    const double m = 0.1 * rope_scaling->mscale_all_dim * std::log(rope_scaling->factor) + 1.0;
    scale *= m * m;
  }
  return scale;
}

model_config parse_model_config(std::string_view json_text, std::string_view source) {
  json root;
  try {
    root = json::parse(json_text);
  } catch (const json::exception& e) {
    shoal::fail(errc::invalid_argument, "{}: not valid JSON: {}", source, e.what());
  }
  if (!root.is_object()) shoal::fail(errc::invalid_argument, "{}: expected a JSON object", source);
  const reader r(root, source);
  model_config c;

  const std::string model_type = r.string_or("model_type", "");
  if (model_type != "deepseek_v3")
    r.fail_key("model_type", fmt::format("expected \"deepseek_v3\", got \"{}\"", model_type));
  if (const std::string act = r.string_or("hidden_act", "silu"); act != "silu")
    r.fail_key("hidden_act", fmt::format("only \"silu\" is supported, got \"{}\"", act));
  if (const std::string f = r.string_or("scoring_func", "sigmoid"); f != "sigmoid")
    r.fail_key("scoring_func", fmt::format("only \"sigmoid\" (DeepSeek-V3) is supported, got \"{}\"", f));
  if (const std::string m = r.string_or("topk_method", "noaux_tc"); m != "noaux_tc")
    r.fail_key("topk_method", fmt::format("only \"noaux_tc\" (DeepSeek-V3) is supported, got \"{}\"", m));
  if (r.boolean_or("attention_bias", false))
    r.fail_key("attention_bias", "DeepSeek-V3 attention has no bias; true is not supported");

  c.vocab_size = r.integer("vocab_size", 1);
  c.hidden_size = r.integer("hidden_size", 1);
  c.intermediate_size = r.integer("intermediate_size", 1);
  c.moe_intermediate_size = r.integer("moe_intermediate_size", 1);
  c.num_hidden_layers = r.integer("num_hidden_layers", 1);
  c.num_nextn_predict_layers = r.integer_or("num_nextn_predict_layers", 0, 0);
  c.num_attention_heads = r.integer("num_attention_heads", 1);
  c.q_lora_rank = r.has("q_lora_rank") ? r.integer("q_lora_rank", 1) : 0;
  c.kv_lora_rank = r.integer("kv_lora_rank", 1);
  c.qk_nope_head_dim = r.integer("qk_nope_head_dim", 1);
  c.qk_rope_head_dim = r.integer("qk_rope_head_dim", 2);
  c.v_head_dim = r.integer("v_head_dim", 1);
  c.n_routed_experts = r.integer("n_routed_experts", 1);
  c.n_shared_experts = r.integer_or("n_shared_experts", 0, 0);
  c.num_experts_per_tok = r.integer("num_experts_per_tok", 1);
  c.n_group = r.integer_or("n_group", 1, 1);
  c.topk_group = r.integer_or("topk_group", 1, 1);
  c.first_k_dense_replace = r.integer_or("first_k_dense_replace", 0, 0);
  c.moe_layer_freq = r.integer_or("moe_layer_freq", 1, 1);
  c.max_position_embeddings = r.integer("max_position_embeddings", 1);
  c.rope_theta = r.positive_number("rope_theta");
  c.rms_norm_eps = r.has("rms_norm_eps") ? r.positive_number("rms_norm_eps") : 1e-6;
  c.routed_scaling_factor = r.has("routed_scaling_factor") ? r.positive_number("routed_scaling_factor") : 1.0;
  c.norm_topk_prob = r.boolean_or("norm_topk_prob", true);
  c.tie_word_embeddings = r.boolean_or("tie_word_embeddings", false);
  c.bos_token_id = r.integer_or("bos_token_id", 0, 0);
  c.eos_token_id = r.integer_or("eos_token_id", 0, 1);

  if (r.has("num_key_value_heads") &&
      r.integer("num_key_value_heads", 1) != c.num_attention_heads)
    r.fail_key("num_key_value_heads", "MLA needs num_key_value_heads == num_attention_heads");
  if (c.qk_rope_head_dim % 2 != 0) r.fail_key("qk_rope_head_dim", "must be even (rope rotates pairs)");
  if (c.n_routed_experts % c.n_group != 0)
    r.fail_key("n_group", fmt::format("n_routed_experts ({}) is not divisible by n_group ({})",
                                      c.n_routed_experts, c.n_group));
  if (c.topk_group > c.n_group)
    r.fail_key("topk_group", fmt::format("{} exceeds n_group ({})", c.topk_group, c.n_group));
  if (c.num_experts_per_tok > (c.n_routed_experts / c.n_group) * c.topk_group)
    r.fail_key("num_experts_per_tok",
               fmt::format("{} exceeds the experts in the kept groups ({} groups of {})",
                           c.num_experts_per_tok, c.topk_group, c.n_routed_experts / c.n_group));
  if (c.first_k_dense_replace > c.num_hidden_layers)
    r.fail_key("first_k_dense_replace",
               fmt::format("{} exceeds num_hidden_layers ({})", c.first_k_dense_replace, c.num_hidden_layers));
  if (c.bos_token_id >= c.vocab_size) r.fail_key("bos_token_id", "outside the vocabulary");
  if (c.eos_token_id >= c.vocab_size) r.fail_key("eos_token_id", "outside the vocabulary");

  if (r.has("rope_scaling")) {
    const json& scaling = root["rope_scaling"];
    if (!scaling.is_object()) r.fail_key("rope_scaling", "expected an object or null");
    const reader s(scaling, source, "rope_scaling.");
    const std::string type = s.string_or("type", s.string_or("rope_type", ""));
    if (type != "yarn")
      s.fail_key("type", fmt::format("only \"yarn\" is supported, got \"{}\"", type));
    yarn_scaling y;
    y.factor = s.positive_number("factor");
    y.original_max_position = s.integer("original_max_position_embeddings", 1);
    y.beta_fast = s.has("beta_fast") ? s.positive_number("beta_fast") : 32.0;
    y.beta_slow = s.has("beta_slow") ? s.positive_number("beta_slow") : 1.0;
    y.mscale = s.number_or("mscale", 1.0);
    y.mscale_all_dim = s.number_or("mscale_all_dim", y.mscale);
    if (y.mscale != y.mscale_all_dim)
      s.fail_key("mscale", fmt::format("mscale ({}) != mscale_all_dim ({}) is not supported",
                                       y.mscale, y.mscale_all_dim));
    if (y.beta_slow >= y.beta_fast) s.fail_key("beta_slow", "must be below beta_fast");
    c.rope_scaling = y;
  }
  if (r.has("quantization_config")) {
    const json& q = root["quantization_config"];
    if (!q.is_object()) r.fail_key("quantization_config", "expected an object");
    const reader s(q, source, "quantization_config.");
    if (const std::string m = s.string_or("quant_method", ""); m != "fp8")
      s.fail_key("quant_method", fmt::format("only \"fp8\" is supported, got \"{}\"", m));
    if (const std::string f = s.string_or("fmt", "e4m3"); f != "e4m3")
      s.fail_key("fmt", fmt::format("only \"e4m3\" is supported, got \"{}\"", f));
    if (const std::string a = s.string_or("activation_scheme", "dynamic"); a != "dynamic")
      s.fail_key("activation_scheme", fmt::format("only \"dynamic\" is supported, got \"{}\"", a));
    const json& block = s.get("weight_block_size");
    if (!block.is_array() || block.size() != 2 || !block[0].is_number_integer() ||
        !block[1].is_number_integer() || block[0] != 128 || block[1] != 128)
      s.fail_key("weight_block_size", fmt::format("expected [128, 128], got {}", block.dump()));
    c.quantization = fp8_quantization{};
  }
  static const std::set<std::string, std::less<>> kUsed = {
      "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
      "num_hidden_layers", "num_nextn_predict_layers", "num_attention_heads", "q_lora_rank",
      "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts",
      "n_shared_experts", "num_experts_per_tok", "n_group", "topk_group",
      "first_k_dense_replace", "moe_layer_freq", "max_position_embeddings", "rope_theta",
      "rms_norm_eps", "routed_scaling_factor", "norm_topk_prob", "tie_word_embeddings",
      "bos_token_id", "eos_token_id"};
  for (const auto& [key, value] : root.items())
    if (!kUsed.contains(key) && !kIgnoredKeys.contains(key)) c.ignored_keys.push_back(key);
  return c;
}

model_config load_model_config(const std::filesystem::path& model_dir) {
  const auto path = model_dir / "config.json";
  std::ifstream in(path);
  if (!in) shoal::fail(errc::not_found, "{}: cannot open (is this a model directory?)", path.string());
  std::stringstream text;
  text << in.rdbuf();
  return parse_model_config(text.str(), path.string());
}

std::string model_config_to_json(const model_config& c) {
  json j = {
      {"architectures", {"DeepseekV3ForCausalLM"}},
      {"model_type", "deepseek_v3"},
      {"attention_bias", false},
      {"bos_token_id", c.bos_token_id},
      {"eos_token_id", c.eos_token_id},
      {"first_k_dense_replace", c.first_k_dense_replace},
      {"hidden_act", "silu"},
      {"hidden_size", c.hidden_size},
      {"intermediate_size", c.intermediate_size},
      {"kv_lora_rank", c.kv_lora_rank},
      {"max_position_embeddings", c.max_position_embeddings},
      {"moe_intermediate_size", c.moe_intermediate_size},
      {"moe_layer_freq", c.moe_layer_freq},
      {"n_group", c.n_group},
      {"n_routed_experts", c.n_routed_experts},
      {"n_shared_experts", c.n_shared_experts},
      {"norm_topk_prob", c.norm_topk_prob},
      {"num_attention_heads", c.num_attention_heads},
      {"num_experts_per_tok", c.num_experts_per_tok},
      {"num_hidden_layers", c.num_hidden_layers},
      {"num_key_value_heads", c.num_attention_heads},
      {"num_nextn_predict_layers", c.num_nextn_predict_layers},
      {"qk_nope_head_dim", c.qk_nope_head_dim},
      {"qk_rope_head_dim", c.qk_rope_head_dim},
      {"rms_norm_eps", c.rms_norm_eps},
      {"rope_theta", c.rope_theta},
      {"routed_scaling_factor", c.routed_scaling_factor},
      {"scoring_func", "sigmoid"},
      {"tie_word_embeddings", c.tie_word_embeddings},
      {"topk_group", c.topk_group},
      {"topk_method", "noaux_tc"},
      {"torch_dtype", "bfloat16"},
      {"v_head_dim", c.v_head_dim},
      {"vocab_size", c.vocab_size},
  };
  j["q_lora_rank"] = c.q_lora_rank > 0 ? json(c.q_lora_rank) : json(nullptr);
  if (c.rope_scaling) {
    const auto& y = *c.rope_scaling;
    j["rope_scaling"] = {{"type", "yarn"}, {"factor", y.factor},
                         {"original_max_position_embeddings", y.original_max_position},
                         {"beta_fast", y.beta_fast}, {"beta_slow", y.beta_slow},
                         {"mscale", y.mscale}, {"mscale_all_dim", y.mscale_all_dim}};
  } else {
    j["rope_scaling"] = nullptr;
  }
  if (c.quantization)
    j["quantization_config"] = {{"activation_scheme", "dynamic"}, {"fmt", "e4m3"},
                                {"quant_method", "fp8"}, {"weight_block_size", {128, 128}}};
  return j.dump(2) + "\n";
}

}  // namespace shoal::config
