#pragma once
/// \file
/// DeepSeek-V3 weights loaded from a checkpoint into memory, checked tensor by tensor.

#include "shoal/config/model_config.hpp"
#include "shoal/kernels/matrix.hpp"
#include "shoal/kernels/moe.hpp"
#include "shoal/runtime/safetensors.hpp"
#include "shoal/runtime/weights_crypto.hpp"

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <set>
#include <string>
#include <vector>

namespace shoal::runtime {

/// Which part of the model a process holds (a pipeline stage holds a layer range; an expert
/// actor holds some routed experts). The default is everything.
struct weight_selection {
  std::int64_t layer_begin = 0;    ///< First decoder layer held.
  std::int64_t layer_end = -1;     ///< One past the last; -1: all layers.
  bool embedding = true;           ///< `model.embed_tokens`.
  bool head = true;                ///< `model.norm` and `lm_head`.
  bool attention = true;           ///< Attention, norms, dense MLPs, gates, shared experts.
  /// Routed experts held, by id; empty function: all of them.
  std::function<bool(std::int64_t layer, std::int64_t expert)> expert_filter;
};

/// Where loaded weights live.
enum class weight_residency {
  /// Copied into anonymous memory: no page faults on the token path (file pages of rarely
  /// used experts get evicted and re-read otherwise).
  copy,
  /// Left in the page cache behind the mapping: fast start, for tools and tests.
  mapped,
};

/// One decoder layer's weights. Matrices view memory owned by `model_weights`.
struct layer_weights {
  std::vector<float> input_norm;          ///< `[hidden]`.
  std::vector<float> post_attention_norm; ///< `[hidden]`.
  kernels::matrix_view q_a;               ///< `[q_lora][hidden]` (absent without q_lora).
  std::vector<float> q_a_norm;            ///< `[q_lora]`.
  kernels::matrix_view q_b;               ///< `[heads*(nope+rope)][q_lora]` (or q_proj on hidden).
  kernels::matrix_view kv_a;              ///< `[kv_lora+rope][hidden]`.
  std::vector<float> kv_a_norm;           ///< `[kv_lora]`.
  kernels::matrix_view kv_b;              ///< `[heads*(nope+v)][kv_lora]`.
  kernels::matrix_view o;                 ///< `[hidden][heads*v]`.
  bool moe = false;                       ///< MoE layer (else dense MLP in `dense`).
  kernels::expert_weights dense;          ///< Dense SwiGLU MLP.
  kernels::matrix_view router;            ///< `[experts][hidden]`.
  std::vector<float> router_bias;         ///< `[experts]`.
  std::vector<kernels::expert_weights> experts;  ///< By id; absent ones have null data.
  kernels::expert_weights shared;         ///< Shared experts as one wide SwiGLU.
};

/// All weights a process holds, plus the config they were checked against.
class model_weights {
 public:
  using progress_fn = std::function<void(const std::string& message)>;

  /// Loads from a checkpoint directory. Every tensor the selection needs must be present with
  /// the right dtype and shape; a tensor the architecture does not know is an error (MTP
  /// layers `model.layers.{num_hidden_layers + k}` are recognised and skipped). Errors name
  /// the file and the tensor. A directory with `shoal-manifest.json` is first checked against
  /// it (`verify_manifest`, manifest.hpp): a changed, missing or unlisted file is refused by name.
  /// With `key` the shards are encrypted (weights_crypto.hpp): only the chunks holding the
  /// selection's tensors are decrypted, into anonymous memory that then holds the weights
  /// whatever `residency` says (no second copy).
  static std::unique_ptr<model_weights> load(const std::filesystem::path& dir,
                                             const weight_selection& selection = {},
                                             weight_residency residency = weight_residency::copy,
                                             const progress_fn& progress = {},
                                             const weights_key* key = nullptr);

  /// Loads from tensors already open (e.g. received from a peer), checked against `config`
  /// exactly as a directory's are; errors name the files' labels.
  static std::unique_ptr<model_weights> load(config::model_config config, checkpoint files,
                                             const weight_selection& selection = {},
                                             weight_residency residency = weight_residency::copy,
                                             const progress_fn& progress = {});

  ~model_weights();

  /// Owns the memory behind the views (the mapping, or the copies).
  struct storage;

  const config::model_config& config() const noexcept { return config_; }
  const weight_selection& selection() const noexcept { return selection_; }
  /// `[vocab][hidden]`.
  const kernels::matrix_view& embedding() const noexcept { return embedding_; }
  /// `[hidden]`.
  const std::vector<float>& final_norm() const noexcept { return final_norm_; }
  /// `[vocab][hidden]`.
  const kernels::matrix_view& lm_head() const noexcept { return lm_head_; }
  /// Layers by index; layers outside the selection are empty.
  const std::vector<layer_weights>& layers() const noexcept { return layers_; }
  /// Bytes of weights held in memory.
  std::size_t resident_bytes() const noexcept { return resident_bytes_; }

 private:
  model_weights() = default;
  // Checks and holds the selection's tensors; `used_files` gets the shards read.
  static std::unique_ptr<model_weights> assemble(config::model_config config, checkpoint files,
                                                 const weight_selection& selection, weight_residency residency,
                                                 const progress_fn& progress, std::set<std::string>& used_files);
  config::model_config config_;
  weight_selection selection_;
  kernels::matrix_view embedding_;
  std::vector<float> final_norm_;
  kernels::matrix_view lm_head_;
  std::vector<layer_weights> layers_;
  std::unique_ptr<storage> storage_;
  std::size_t resident_bytes_ = 0;
};

}  // namespace shoal::runtime
