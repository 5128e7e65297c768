#include "shoal/runtime/make_model.hpp"

#include "shoal/base/error.hpp"
#include "shoal/kernels/dtype.hpp"
#include "shoal/runtime/safetensors.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <memory>
#include <thread>

namespace shoal::runtime {
namespace {

using kernels::dtype;

// splitmix64: tiny, fast, and identical on every platform (std distributions are not).
struct random_stream {
  std::uint64_t state;
  std::uint64_t next() {
    std::uint64_t z = (state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  // Uniform in [-1, 1).
  float symmetric() { return static_cast<float>(static_cast<double>(next() >> 11) * 0x1p-52 - 1.0); }
};

std::uint64_t hash_name(std::string_view name, std::uint64_t seed) {
  std::uint64_t h = 1469598103934665603ull ^ seed;
  for (char ch : name) h = (h ^ static_cast<unsigned char>(ch)) * 1099511628211ull;
  return h;
}

// How to fill one tensor: uniform around `center` with standard deviation `stddev`.
struct fill_spec {
  float center = 0.0f;
  float stddev = 1.0f;
};

std::vector<float> random_values(std::string_view name, std::int64_t count, fill_spec spec,
                                 std::uint64_t seed) {
  std::vector<float> values(static_cast<std::size_t>(count));
  const float half_width = spec.stddev * std::sqrt(3.0f);  // uniform(-a, a) has stddev a/sqrt(3)
  // Independent streams per 1M-element chunk, so large tensors fill on all cores.
  constexpr std::int64_t kChunk = 1 << 20;
  const std::int64_t chunks = (count + kChunk - 1) / kChunk;
  const unsigned threads = std::max(1u, std::min<unsigned>(std::thread::hardware_concurrency(), static_cast<unsigned>(chunks)));
  std::vector<std::thread> pool;
  for (unsigned t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      for (std::int64_t c = t; c < chunks; c += threads) {
        random_stream rng{hash_name(name, seed) + static_cast<std::uint64_t>(c) * 0x632be59bd9b4e019ull};
        const std::int64_t end = std::min(count, (c + 1) * kChunk);
        for (std::int64_t i = c * kChunk; i < end; ++i) values[i] = spec.center + half_width * rng.symmetric();
      }
    });
  for (auto& th : pool) th.join();
  return values;
}

tensor_blob bf16_blob(std::string name, std::vector<std::int64_t> shape, const std::vector<float>& values) {
  tensor_blob blob{std::move(name), dtype::bf16, std::move(shape), {}};
  blob.bytes.resize(values.size() * 2);
  for (std::size_t i = 0; i < values.size(); ++i) {
    const std::uint16_t bits = kernels::f32_to_bf16(values[i]);
    std::memcpy(blob.bytes.data() + 2 * i, &bits, 2);
  }
  return blob;
}

tensor_blob f32_blob(std::string name, std::vector<std::int64_t> shape, const std::vector<float>& values) {
  tensor_blob blob{std::move(name), dtype::f32, std::move(shape), {}};
  blob.bytes.resize(values.size() * 4);
  std::memcpy(blob.bytes.data(), values.data(), blob.bytes.size());
  return blob;
}

// DeepSeek's recipe: scale_inv = amax(|block|) / 448, q = e4m3(w / scale_inv), from BF16 values.
void fp8_blobs(const std::string& name, std::int64_t rows, std::int64_t cols, std::vector<float> values,
               std::vector<tensor_blob>& out) {
  for (auto& v : values) v = kernels::bf16_to_f32(kernels::f32_to_bf16(v));
  const std::int64_t block_rows = (rows + 127) / 128, block_cols = (cols + 127) / 128;
  std::vector<float> scales(static_cast<std::size_t>(block_rows * block_cols));
  tensor_blob q{name, dtype::f8_e4m3, {rows, cols}, {}};
  q.bytes.resize(static_cast<std::size_t>(rows * cols));
  for (std::int64_t br = 0; br < block_rows; ++br)
    for (std::int64_t bc = 0; bc < block_cols; ++bc) {
      float amax = 0.0f;
      for (std::int64_t r = br * 128; r < std::min(rows, (br + 1) * 128); ++r)
        for (std::int64_t c = bc * 128; c < std::min(cols, (bc + 1) * 128); ++c)
          amax = std::max(amax, std::fabs(values[r * cols + c]));
      const float scale = amax > 0.0f ? amax / 448.0f : 1.0f;
      scales[br * block_cols + bc] = scale;
      for (std::int64_t r = br * 128; r < std::min(rows, (br + 1) * 128); ++r)
        for (std::int64_t c = bc * 128; c < std::min(cols, (bc + 1) * 128); ++c)
          q.bytes[r * cols + c] = static_cast<std::byte>(kernels::f32_to_fp8_e4m3(values[r * cols + c] / scale));
    }
  out.push_back(std::move(q));
  out.push_back(f32_blob(name + "_scale_inv", {block_rows, block_cols}, scales));
}

class shard_builder {
 public:
  shard_builder(const config::model_config& c, std::uint64_t seed) : c_(c), seed_(seed) {}

  void projection(const std::string& name, std::int64_t rows, std::int64_t cols) {
    auto values = random_values(name, rows * cols, {0.0f, 1.0f / std::sqrt(static_cast<float>(cols))}, seed_);
    if (c_.quantization)
      fp8_blobs(name, rows, cols, std::move(values), blobs_);
    else
      blobs_.push_back(bf16_blob(name, {rows, cols}, values));
  }
  void dense(const std::string& name, std::vector<std::int64_t> shape, fill_spec spec) {
    std::int64_t count = 1;
    for (auto d : shape) count *= d;
    blobs_.push_back(bf16_blob(name, std::move(shape), random_values(name, count, spec, seed_)));
  }
  void bias(const std::string& name, std::int64_t size) {
    blobs_.push_back(f32_blob(name, {size}, random_values(name, size, {0.2f, 0.05f}, seed_)));
  }
  std::vector<tensor_blob> take() { return std::move(blobs_); }

 private:
  const config::model_config& c_;
  std::uint64_t seed_;
  std::vector<tensor_blob> blobs_;
};

void add_mlp(shard_builder& b, const std::string& prefix, std::int64_t hidden, std::int64_t inter) {
  b.projection(prefix + "gate_proj.weight", inter, hidden);
  b.projection(prefix + "up_proj.weight", inter, hidden);
  b.projection(prefix + "down_proj.weight", hidden, inter);
}

void add_layer(shard_builder& b, const config::model_config& c, std::int64_t i) {
  const std::string p = fmt::format("model.layers.{}.", i);
  const std::int64_t h = c.hidden_size, heads = c.num_attention_heads;
  const fill_spec norm{1.0f, 0.1f};
  b.dense(p + "input_layernorm.weight", {h}, norm);
  b.dense(p + "post_attention_layernorm.weight", {h}, norm);
  if (c.q_lora_rank > 0) {
    b.projection(p + "self_attn.q_a_proj.weight", c.q_lora_rank, h);
    b.dense(p + "self_attn.q_a_layernorm.weight", {c.q_lora_rank}, norm);
    b.projection(p + "self_attn.q_b_proj.weight", heads * c.qk_head_dim(), c.q_lora_rank);
  } else {
    b.projection(p + "self_attn.q_proj.weight", heads * c.qk_head_dim(), h);
  }
  b.projection(p + "self_attn.kv_a_proj_with_mqa.weight", c.latent_dim(), h);
  b.dense(p + "self_attn.kv_a_layernorm.weight", {c.kv_lora_rank}, norm);
  b.projection(p + "self_attn.kv_b_proj.weight", heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank);
  b.projection(p + "self_attn.o_proj.weight", h, heads * c.v_head_dim);
  if (!c.is_moe_layer(i)) {
    add_mlp(b, p + "mlp.", h, c.intermediate_size);
    return;
  }
  b.dense(p + "mlp.gate.weight", {c.n_routed_experts, h}, {0.0f, 1.0f / std::sqrt(static_cast<float>(h))});
  b.bias(p + "mlp.gate.e_score_correction_bias", c.n_routed_experts);
  if (c.n_shared_experts > 0)
    add_mlp(b, p + "mlp.shared_experts.", h, c.n_shared_experts * c.moe_intermediate_size);
  for (std::int64_t e = 0; e < c.n_routed_experts; ++e)
    add_mlp(b, fmt::format("{}mlp.experts.{}.", p, e), h, c.moe_intermediate_size);
}

}  // namespace

std::vector<std::string> model_preset_names() { return {"tiny", "bench-small"}; }

config::model_config model_preset(std::string_view name, bool fp8) {
  config::model_config c;
  c.vocab_size = 129280;  // the DeepSeek-V3 tokenizer's id space
  c.bos_token_id = 0;
  c.eos_token_id = 1;
  c.rms_norm_eps = 1e-6;
  c.rope_theta = 10000.0;
  c.norm_topk_prob = true;
  if (name == "tiny") {
    c.hidden_size = 128;
    c.intermediate_size = 320;
    c.moe_intermediate_size = 64;
    c.num_hidden_layers = 4;
    c.first_k_dense_replace = 1;
    c.num_attention_heads = 4;
    c.q_lora_rank = 64;
    c.kv_lora_rank = 64;
    c.qk_nope_head_dim = 32;
    c.qk_rope_head_dim = 16;
    c.v_head_dim = 32;
    c.n_routed_experts = 16;
    c.n_shared_experts = 1;
    c.num_experts_per_tok = 4;
    c.n_group = 4;
    c.topk_group = 2;
    c.routed_scaling_factor = 2.5;
    c.max_position_embeddings = 4096;
  } else if (name == "bench-small") {
    c.hidden_size = 2048;
    c.intermediate_size = 5632;
    c.moe_intermediate_size = 768;
    c.num_hidden_layers = 8;
    c.first_k_dense_replace = 1;
    c.num_attention_heads = 16;
    c.q_lora_rank = 768;
    c.kv_lora_rank = 512;
    c.qk_nope_head_dim = 128;
    c.qk_rope_head_dim = 64;
    c.v_head_dim = 128;
    c.n_routed_experts = 64;
    c.n_shared_experts = 1;
    c.num_experts_per_tok = 6;
    c.n_group = 8;
    c.topk_group = 4;
    c.routed_scaling_factor = 2.5;
    c.max_position_embeddings = 4096;
  } else {
    shoal::fail(errc::invalid_argument, "unknown model preset '{}' (known: {})", name,
                fmt::join(model_preset_names(), ", "));
  }
  if (fp8) c.quantization = config::fp8_quantization{};
  return c;
}

void write_random_model(const config::model_config& c, const std::filesystem::path& out_dir,
                        std::uint64_t seed, const std::function<void(const std::string&)>& progress) {
  std::error_code ec;
  std::filesystem::create_directories(out_dir, ec);
  if (ec) shoal::fail(errc::invalid_argument, "{}: cannot create the output directory: {}", out_dir.string(), ec.message());
  {
    std::ofstream out(out_dir / "config.json");
    out << config::model_config_to_json(c);
    if (!out) shoal::fail(errc::unavailable, "{}: cannot write config.json", out_dir.string());
  }
  // Shard by layer groups: the first shard also holds the embedding, the last the head.
  constexpr std::int64_t layers_per_shard = 2;
  const std::int64_t shards = 1 + (c.num_hidden_layers + layers_per_shard - 1) / layers_per_shard;
  nlohmann::json weight_map = nlohmann::json::object();
  std::uint64_t total_bytes = 0;
  for (std::int64_t s = 0; s < shards; ++s) {
    shard_builder b(c, seed);
    const fill_spec embedding{0.0f, 1.0f};
    if (s == 0) {
      b.dense("model.embed_tokens.weight", {c.vocab_size, c.hidden_size}, embedding);
      b.dense("model.norm.weight", {c.hidden_size}, {1.0f, 0.1f});
      b.dense("lm_head.weight", {c.vocab_size, c.hidden_size},
              {0.0f, 1.5f / std::sqrt(static_cast<float>(c.hidden_size))});
    } else {
      const std::int64_t first = (s - 1) * layers_per_shard;
      for (std::int64_t i = first; i < std::min(c.num_hidden_layers, first + layers_per_shard); ++i)
        add_layer(b, c, i);
    }
    auto blobs = b.take();
    const std::string file = fmt::format("model-{:05d}-of-{:05d}.safetensors", s + 1, shards);
    std::vector<const tensor_blob*> pointers;
    std::uint64_t bytes = 0;
    for (const auto& blob : blobs) {
      pointers.push_back(&blob);
      weight_map[blob.name] = file;
      bytes += blob.bytes.size();
    }
    write_safetensors(out_dir / file, pointers);
    total_bytes += bytes;
    if (progress)
      progress(fmt::format("wrote {} ({} tensors, {:.1f} MB)", file, blobs.size(), static_cast<double>(bytes) / 1e6));
  }
  nlohmann::json index = {{"metadata", {{"total_size", total_bytes}}}, {"weight_map", weight_map}};
  std::ofstream out(out_dir / "model.safetensors.index.json");
  out << index.dump(2) << "\n";
}

}  // namespace shoal::runtime
