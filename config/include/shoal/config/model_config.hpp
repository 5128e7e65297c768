#pragma once
/// \file
/// The model architecture as described by a Hugging Face `config.json` of a
/// `DeepseekV3ForCausalLM` checkpoint (`model_type: deepseek_v3`).

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace shoal::config {

/// YaRN context extension (`rope_scaling` with `type: yarn`).
struct yarn_scaling {
  double factor = 1.0;                          ///< Context multiplier.
  std::int64_t original_max_position = 4096;    ///< `original_max_position_embeddings`.
  double beta_fast = 32.0;                      ///< High-frequency correction bound.
  double beta_slow = 1.0;                       ///< Low-frequency correction bound.
  double mscale = 1.0;                          ///< Attention temperature coefficient.
  double mscale_all_dim = 1.0;                  ///< Same, applied to all dims (must equal mscale).
};

/// Block-wise FP8 weight quantization (`quantization_config`).
struct fp8_quantization {
  std::int64_t block_rows = 128;  ///< `weight_block_size[0]`.
  std::int64_t block_cols = 128;  ///< `weight_block_size[1]`.
};

/// Every architecture parameter the runtime uses, validated.
struct model_config {
  std::int64_t vocab_size = 0;
  std::int64_t hidden_size = 0;
  std::int64_t intermediate_size = 0;        ///< Dense MLP width.
  std::int64_t moe_intermediate_size = 0;    ///< Width of one routed expert.
  std::int64_t num_hidden_layers = 0;
  std::int64_t num_nextn_predict_layers = 0; ///< MTP layers stored after the main ones.
  std::int64_t num_attention_heads = 0;
  std::int64_t q_lora_rank = 0;              ///< 0: queries come from a plain q_proj.
  std::int64_t kv_lora_rank = 0;
  std::int64_t qk_nope_head_dim = 0;
  std::int64_t qk_rope_head_dim = 0;
  std::int64_t v_head_dim = 0;
  std::int64_t n_routed_experts = 0;
  std::int64_t n_shared_experts = 0;
  std::int64_t num_experts_per_tok = 0;
  std::int64_t n_group = 1;
  std::int64_t topk_group = 1;
  std::int64_t first_k_dense_replace = 0;
  std::int64_t moe_layer_freq = 1;
  std::int64_t max_position_embeddings = 0;
  double rope_theta = 10000.0;
  double rms_norm_eps = 1e-6;
  double routed_scaling_factor = 1.0;
  bool norm_topk_prob = true;
  bool tie_word_embeddings = false;
  std::int64_t bos_token_id = 0;
  std::int64_t eos_token_id = 1;
  std::optional<yarn_scaling> rope_scaling;       ///< Absent: plain rope.
  std::optional<fp8_quantization> quantization;   ///< Absent: unquantized weights.
  /// Keys present in the file that the runtime neither uses nor knows (training-only and
  /// bookkeeping keys such as `aux_loss_alpha` are known and accepted silently); reported,
  /// not fatal, as new versions add such keys.
  std::vector<std::string> ignored_keys;

  /// Whether layer `layer` is a mixture-of-experts layer (else dense MLP).
  bool is_moe_layer(std::int64_t layer) const noexcept {
    return n_routed_experts > 0 && layer >= first_k_dense_replace && layer % moe_layer_freq == 0;
  }
  /// Width of q and k per head.
  std::int64_t qk_head_dim() const noexcept { return qk_nope_head_dim + qk_rope_head_dim; }
  /// Values cached per token per layer: the latent plus the shared rope key.
  std::int64_t latent_dim() const noexcept { return kv_lora_rank + qk_rope_head_dim; }
  /// Softmax scale of attention, with YaRN's mscale^2 correction when YaRN is on.
  double softmax_scale() const noexcept;
};

/// Parses and validates config.json text. `source` (usually the path) prefixes every error,
/// which names the offending key. Throws `shoal::error(errc::invalid_argument)`.
model_config parse_model_config(std::string_view json_text, std::string_view source);

/// Reads and parses `<dir>/config.json`.
model_config load_model_config(const std::filesystem::path& model_dir);

/// Serializes a config back to config.json text (the keys a real checkpoint carries).
std::string model_config_to_json(const model_config& config);

}  // namespace shoal::config
