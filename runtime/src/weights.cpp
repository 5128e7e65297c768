#include "shoal/runtime/weights.hpp"

#include "shoal/base/error.hpp"
#include "shoal/runtime/manifest.hpp"
#include "shoal/runtime/safetensors.hpp"

#include <cstdlib>
#include <cstring>
#include <regex>
#include <set>

namespace shoal::runtime {

using kernels::dtype;
using kernels::matrix_view;

struct model_weights::storage {
  checkpoint files;
  std::vector<std::unique_ptr<std::byte, decltype(&std::free)>> buffers;
};

model_weights::~model_weights() = default;

namespace {

class loader {
 public:
  loader(const checkpoint& files, model_weights::storage& storage, weight_residency residency,
         bool quantized)
      : files_(files), storage_(storage), residency_(residency), quantized_(quantized) {}

  // Records a tensor that belongs to the architecture but is not held by this process.
  void skip(const std::string& name) {
    known_.insert(name);
    known_.insert(name + "_scale_inv");
  }

  matrix_view matrix(const std::string& name, std::int64_t rows, std::int64_t cols, bool may_be_fp8) {
    const tensor_ref ref = require(name);
    const auto& e = *ref.entry;
    if (!e.type) fail_tensor(ref, fmt::format("dtype {} is not supported for weights", e.dtype_name));
    if (*e.type == dtype::f8_e4m3 && !(may_be_fp8 && quantized_))
      fail_tensor(ref, may_be_fp8 ? "F8_E4M3 but config.json has no quantization_config"
                                  : "F8_E4M3 is not expected for this tensor");
    check_shape(ref, {rows, cols});
    matrix_view view;
    view.type = *e.type;
    view.rows = rows;
    view.cols = cols;
    view.data = hold(ref);
    const std::string scale_name = name + "_scale_inv";
    if (view.type == dtype::f8_e4m3) {
      const tensor_ref scale = require(scale_name);
      if (scale.entry->type != dtype::f32)
        fail_tensor(scale, fmt::format("dtype {}, expected F32", scale.entry->dtype_name));
      check_shape(scale, {view.scale_rows(), view.scale_cols()});
      view.scale_inv = static_cast<const float*>(hold(scale));
    } else if (files_.find(scale_name).entry) {
      fail_tensor(files_.find(scale_name), "a block scale for a tensor that is not F8_E4M3");
    }
    return view;
  }

  std::vector<float> vector(const std::string& name, std::int64_t size) {
    const tensor_ref ref = require(name);
    const auto& e = *ref.entry;
    if (!e.type || *e.type == dtype::f8_e4m3)
      fail_tensor(ref, fmt::format("dtype {}, expected F32, BF16 or F16", e.dtype_name));
    check_shape(ref, {size});
    matrix_view view{*e.type, 1, size, ref.bytes(), nullptr};
    std::vector<float> values(size);
    kernels::dequantize_row(view, 0, 0, size, values.data());
    return values;
  }

  // Every tensor of the checkpoint must be something the architecture knows.
  void check_no_unexpected(const config::model_config& config) const {
    const std::regex layer_pattern(R"(^model\.layers\.(\d+)\.)");
    for (const auto& name : files_.names()) {
      if (known_.contains(name)) continue;
      std::smatch match;
      if (std::regex_search(name, match, layer_pattern)) {
        const auto layer = std::stoll(match[1].str());
        if (layer >= config.num_hidden_layers &&
            layer < config.num_hidden_layers + config.num_nextn_predict_layers)
          continue;  // MTP (next-token prediction) layer: recognised, not used for decoding.
      }
      const tensor_ref ref = files_.find(name);
      fail_tensor(ref, "unexpected tensor: not part of the DeepSeek-V3 architecture in config.json");
    }
  }

  std::size_t resident_bytes() const noexcept { return resident_bytes_; }
  /// Shards (normalized paths) that held a tensor this load read.
  const std::set<std::string>& used_files() const noexcept { return used_files_; }

 private:
  tensor_ref require(const std::string& name) {
    known_.insert(name);
    const tensor_ref ref = files_.find(name);
    if (!ref.entry)
      shoal::fail(errc::invalid_argument, "{}: missing tensor '{}'", files_.directory().string(), name);
    used_files_.insert(ref.file->path().lexically_normal().string());
    return ref;
  }

  [[noreturn]] void fail_tensor(const tensor_ref& ref, std::string_view what) const {
    shoal::fail(errc::invalid_argument, "{}: tensor '{}': {}", ref.file->path().string(),
                ref.entry->name, what);
  }

  void check_shape(const tensor_ref& ref, const std::vector<std::int64_t>& expected) const {
    if (ref.entry->shape != expected)
      fail_tensor(ref, fmt::format("shape [{}], expected [{}]", fmt::join(ref.entry->shape, ", "),
                                   fmt::join(expected, ", ")));
  }

  const void* hold(const tensor_ref& ref) {
    const std::size_t bytes = ref.entry->end - ref.entry->begin;
    if (residency_ == weight_residency::mapped) return ref.bytes();
    // Decrypted or received weights already live in anonymous memory: copying them would
    // hold them twice.
    if (ref.file->anonymous()) {
      resident_bytes_ += bytes;
      return ref.bytes();
    }
    // 64-byte alignment keeps SIMD loads within cache lines.
    void* memory = std::aligned_alloc(64, ((bytes + 63) / 64) * 64 + 64);
    if (!memory) shoal::fail(errc::resource_exhausted, "out of memory loading tensor '{}'", ref.entry->name);
    std::memcpy(memory, ref.bytes(), bytes);
    storage_.buffers.emplace_back(static_cast<std::byte*>(memory), &std::free);
    resident_bytes_ += bytes;
    return memory;
  }

  const checkpoint& files_;
  model_weights::storage& storage_;
  weight_residency residency_;
  bool quantized_;
  std::set<std::string, std::less<>> known_;
  std::set<std::string> used_files_;
  std::size_t resident_bytes_ = 0;
};

kernels::expert_weights load_mlp(loader& l, const std::string& prefix, std::int64_t hidden,
                                 std::int64_t inter, bool held) {
  if (!held) {
    for (const char* part : {"gate_proj", "up_proj", "down_proj"}) l.skip(prefix + part + ".weight");
    return {};
  }
  kernels::expert_weights w;
  w.gate = l.matrix(prefix + "gate_proj.weight", inter, hidden, true);
  w.up = l.matrix(prefix + "up_proj.weight", inter, hidden, true);
  w.down = l.matrix(prefix + "down_proj.weight", hidden, inter, true);
  return w;
}

}  // namespace

std::unique_ptr<model_weights> model_weights::load(const std::filesystem::path& dir,
                                                   const weight_selection& selection,
                                                   weight_residency residency,
                                                   const progress_fn& progress,
                                                   const weights_key* key) {
  // With a manifest: before anything is parsed, every file's size and the small files'
  // hashes (config, index, tokenizer); the shards this selection read, once they are loaded
  // and before any weight is used. A node holding a slice of the model hashes its slice.
  auto report = [&progress](const std::optional<manifest_summary>& checked) {
    if (checked && progress && checked->files > 0)
      progress(fmt::format("{} files ({:.2f} GB) match {} ({:.1f} s)", checked->files,
                           static_cast<double>(checked->bytes) / 1e9, kManifestFile, checked->seconds));
  };
  const auto manifest = verify_manifest(dir, progress, [](const std::string& name) {
    return !name.ends_with(".safetensors");
  });
  report(manifest);
  auto config = config::load_model_config(dir);
  auto files = checkpoint::open(dir, [&](std::size_t done, std::size_t total, const std::filesystem::path& path) {
    if (progress) progress(fmt::format("opened shard {}/{}: {}", done, total, path.filename().string()));
  }, key);
  std::set<std::string> used;
  auto result = assemble(std::move(config), std::move(files), selection, residency, progress, used);
  if (manifest) {
    report(verify_manifest(dir, progress, [&used, &dir](const std::string& name) {
      return used.contains((dir / name).lexically_normal().string());
    }));
  }
  return result;
}

std::unique_ptr<model_weights> model_weights::load(config::model_config config, checkpoint files,
                                                   const weight_selection& selection, weight_residency residency,
                                                   const progress_fn& progress) {
  std::set<std::string> used;
  return assemble(std::move(config), std::move(files), selection, residency, progress, used);
}

std::unique_ptr<model_weights> model_weights::assemble(config::model_config config, checkpoint files,
                                                       const weight_selection& selection,
                                                       weight_residency residency, const progress_fn& progress,
                                                       std::set<std::string>& used_files) {
  std::unique_ptr<model_weights> result(new model_weights());
  result->config_ = std::move(config);
  const config::model_config& c = result->config_;
  result->selection_ = selection;
  if (result->selection_.layer_end < 0) result->selection_.layer_end = c.num_hidden_layers;
  const weight_selection& sel = result->selection_;
  if (sel.layer_begin < 0 || sel.layer_begin > sel.layer_end || sel.layer_end > c.num_hidden_layers)
    shoal::fail(errc::invalid_argument, "layer range [{}, {}) is outside the model's {} layers",
                sel.layer_begin, sel.layer_end, c.num_hidden_layers);

  result->storage_ = std::make_unique<storage>();
  result->storage_->files = std::move(files);
  loader l(result->storage_->files, *result->storage_, residency, c.quantization.has_value());

  const std::int64_t hidden = c.hidden_size;
  if (sel.embedding)
    result->embedding_ = l.matrix("model.embed_tokens.weight", c.vocab_size, hidden, false);
  else
    l.skip("model.embed_tokens.weight");
  if (sel.head) {
    result->final_norm_ = l.vector("model.norm.weight", hidden);
    result->lm_head_ = c.tie_word_embeddings
                           ? l.matrix("model.embed_tokens.weight", c.vocab_size, hidden, false)
                           : l.matrix("lm_head.weight", c.vocab_size, hidden, false);
  } else {
    l.skip("model.norm.weight");
    l.skip("lm_head.weight");
  }

  const std::int64_t heads = c.num_attention_heads;
  result->layers_.resize(c.num_hidden_layers);
  // About eight lines per load, always including the first and the last layer, dense or MoE.
  const std::int64_t report_every = std::max<std::int64_t>(1, c.num_hidden_layers / 8);
  auto report_layer = [&](std::int64_t i) {
    if (!progress || residency != weight_residency::copy) return;
    if (i != 0 && (i + 1) % report_every != 0 && i + 1 != c.num_hidden_layers) return;
    progress(fmt::format("loaded layer {}/{} ({:.2f} GB in memory)", i + 1, c.num_hidden_layers,
                         static_cast<double>(l.resident_bytes()) / 1e9));
  };
  for (std::int64_t i = 0; i < c.num_hidden_layers; ++i) {
    const std::string p = fmt::format("model.layers.{}.", i);
    layer_weights& layer = result->layers_[i];
    layer.moe = c.is_moe_layer(i);
    const bool in_range = i >= sel.layer_begin && i < sel.layer_end;
    const bool dense_held = in_range && sel.attention;
    const std::vector<std::string> attention_names = {
        "input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_a_proj.weight",
        "self_attn.q_a_layernorm.weight", "self_attn.q_b_proj.weight", "self_attn.q_proj.weight",
        "self_attn.kv_a_proj_with_mqa.weight", "self_attn.kv_a_layernorm.weight",
        "self_attn.kv_b_proj.weight", "self_attn.o_proj.weight"};
    if (dense_held) {
      layer.input_norm = l.vector(p + "input_layernorm.weight", hidden);
      layer.post_attention_norm = l.vector(p + "post_attention_layernorm.weight", hidden);
      if (c.q_lora_rank > 0) {
        layer.q_a = l.matrix(p + "self_attn.q_a_proj.weight", c.q_lora_rank, hidden, true);
        layer.q_a_norm = l.vector(p + "self_attn.q_a_layernorm.weight", c.q_lora_rank);
        layer.q_b = l.matrix(p + "self_attn.q_b_proj.weight", heads * c.qk_head_dim(), c.q_lora_rank, true);
      } else {
        layer.q_b = l.matrix(p + "self_attn.q_proj.weight", heads * c.qk_head_dim(), hidden, true);
      }
      layer.kv_a = l.matrix(p + "self_attn.kv_a_proj_with_mqa.weight", c.latent_dim(), hidden, true);
      layer.kv_a_norm = l.vector(p + "self_attn.kv_a_layernorm.weight", c.kv_lora_rank);
      layer.kv_b = l.matrix(p + "self_attn.kv_b_proj.weight",
                            heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank, true);
      layer.o = l.matrix(p + "self_attn.o_proj.weight", hidden, heads * c.v_head_dim, true);
    } else {
      for (const auto& n : attention_names) l.skip(p + n);
    }
    if (!layer.moe) {
      layer.dense = load_mlp(l, p + "mlp.", hidden, c.intermediate_size, dense_held);
      report_layer(i);
      continue;
    }
    if (dense_held) {
      layer.router = l.matrix(p + "mlp.gate.weight", c.n_routed_experts, hidden, false);
      layer.router_bias = l.vector(p + "mlp.gate.e_score_correction_bias", c.n_routed_experts);
    } else {
      l.skip(p + "mlp.gate.weight");
      l.skip(p + "mlp.gate.e_score_correction_bias");
    }
    layer.shared = load_mlp(l, p + "mlp.shared_experts.", hidden,
                            c.n_shared_experts * c.moe_intermediate_size,
                            dense_held && c.n_shared_experts > 0);
    layer.experts.resize(c.n_routed_experts);
    for (std::int64_t e = 0; e < c.n_routed_experts; ++e) {
      const bool held = in_range && (!sel.expert_filter || sel.expert_filter(i, e));
      layer.experts[e] = load_mlp(l, fmt::format("{}mlp.experts.{}.", p, e), hidden,
                                  c.moe_intermediate_size, held);
    }
    report_layer(i);
  }
  l.check_no_unexpected(c);
  used_files = l.used_files();
  result->resident_bytes_ = l.resident_bytes();
  return result;
}

}  // namespace shoal::runtime
