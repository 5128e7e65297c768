#include "shoal/runtime/deployment_plan.hpp"

#include "shoal/base/error.hpp"
#include "shoal/runtime/model.hpp"
#include "shoal/runtime/safetensors.hpp"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <limits>
#include <optional>

namespace shoal::runtime {
namespace {

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;
// What the planner leaves on every GPU beyond weights, cache and step workspace: the CUDA
// context and library workspaces (cuBLAS, NCCL/UCX buffers) take on the order of 1 GiB, and a
// caching allocator loses a few percent to fragmentation.
constexpr std::uint64_t kHeadroomFixed = 1ull << 30;
constexpr std::uint64_t kHeadroomDivisor = 20;  // 5%

// Sizes for people: GiB, or MiB below one GiB (small test models).
std::string gib(double bytes) {
  if (std::fabs(bytes) < kGiB) return fmt::format("{:.1f} MiB", bytes / (1024.0 * 1024.0));
  return fmt::format("{:.1f} GiB", bytes / kGiB);
}

// Sizes of `count` things split into `parts` contiguous pieces as evenly as possible. When
// the split is uneven, the larger pieces go to the middle first, then to the ends that are
// not spared: the first and last GPUs of a pipeline also hold the embedding and the head.
std::vector<std::int64_t> balanced_split(std::int64_t count, std::int64_t parts, bool spare_first, bool spare_last) {
  std::vector<std::int64_t> sizes(static_cast<std::size_t>(parts), count / parts);
  std::vector<std::int64_t> order;
  for (std::int64_t i = 1; i + 1 < parts; ++i) order.push_back(i);
  if (parts == 1) {
    order.push_back(0);
  } else {
    if (!spare_first) order.push_back(0);
    if (!spare_last) order.push_back(parts - 1);
    if (spare_last) order.push_back(parts - 1);
    if (spare_first) order.push_back(0);
  }
  for (std::int64_t k = 0, extra = count % parts; k < extra; ++k) ++sizes[static_cast<std::size_t>(order[static_cast<std::size_t>(k)])];
  return sizes;
}

// Layer index of a `model.layers.N.` name, and the routed expert id when it is one.
struct tensor_place {
  enum kind { layer, expert, embedding, head, other } where = other;
  std::int64_t layer_index = -1;
  std::int64_t expert_id = -1;
};

tensor_place place_of(std::string_view name) {
  constexpr std::string_view layers = "model.layers.";
  if (name.starts_with("model.embed_tokens.")) return {tensor_place::embedding};
  if (name.starts_with("model.norm.") || name.starts_with("lm_head.")) return {tensor_place::head};
  if (!name.starts_with(layers)) return {};
  name.remove_prefix(layers.size());
  std::int64_t layer = 0;
  const auto [end, ec] = std::from_chars(name.data(), name.data() + name.size(), layer);
  if (ec != std::errc() || end == name.data() + name.size() || *end != '.') return {};
  const std::string_view rest(end, static_cast<std::size_t>(name.data() + name.size() - end));
  constexpr std::string_view experts = ".mlp.experts.";
  if (rest.starts_with(experts)) {
    std::int64_t id = 0;
    const auto tail = rest.substr(experts.size());
    const auto [e_end, e_ec] = std::from_chars(tail.data(), tail.data() + tail.size(), id);
    if (e_ec == std::errc() && e_end != tail.data()) return {tensor_place::expert, layer, id};
  }
  return {tensor_place::layer, layer, -1};
}

std::uint64_t ceil_div(std::uint64_t a, std::uint64_t b) { return (a + b - 1) / b; }

// Step workspace per token of the step, in f32 values: the widest a layer gets. Attention
// scores are not counted: they are computed per head and block, never for a whole context.
std::int64_t activation_values_per_token(const config::model_config& c) {
  const std::int64_t heads = c.num_attention_heads;
  const std::int64_t attention = 4 * c.hidden_size             // residual, normed input, attention and MLP outputs
                                 + c.q_lora_rank                // q_a
                                 + heads * c.qk_head_dim()      // q
                                 + c.latent_dim()               // kv_a: the latent and the rope key
                                 + heads * c.latent_dim()       // q absorbed into the latent space
                                 + heads * c.kv_lora_rank       // attention output in the latent space
                                 + heads * c.v_head_dim;        // per-head values
  const std::int64_t dense = 2 * c.intermediate_size;           // gate and up
  const std::int64_t moe = c.n_routed_experts == 0
                               ? 0
                               : c.num_experts_per_tok * (2 * c.hidden_size + 3 * c.moe_intermediate_size) +
                                     3 * c.n_shared_experts * c.moe_intermediate_size;
  return attention + std::max(dense, moe);
}

std::string range_text(std::int64_t begin, std::int64_t end) {
  if (end <= begin) return "-";
  return end - begin == 1 ? fmt::format("{}", begin) : fmt::format("{}-{}", begin, end - 1);
}

// `{i}` and `{name}` in a naming template; anything else in braces is the user's mistake.
std::string expand(const std::string& pattern, std::string_view what, int index, const std::string& name) {
  try {
    return fmt::format(fmt::runtime(pattern), fmt::arg("i", index), fmt::arg("name", name));
  } catch (const fmt::format_error& e) {
    fail(errc::invalid_argument, "{} '{}' is not a template with {{i}} (node index) or {{name}}: {}", what, pattern,
         e.what());
  }
}

// The layers node `n` holds, [begin, end) over its GPUs in order; (-1, -1) when none.
std::pair<std::int64_t, std::int64_t> layers_of_node(const deployment_plan& plan, int n) {
  std::int64_t begin = -1, end = -1;
  for (const auto& gp : plan.gpus)
    if (gp.node == n && gp.layer_end > gp.layer_begin) {
      if (begin < 0) begin = gp.layer_begin;
      end = gp.layer_end;
    }
  return {begin, end};
}

}  // namespace

config::model_config deepseek_v3_config(bool fp8) {
  config::model_config c;
  c.vocab_size = 129280;
  c.hidden_size = 7168;
  c.intermediate_size = 18432;
  c.moe_intermediate_size = 2048;
  c.num_hidden_layers = 61;
  c.num_nextn_predict_layers = 1;
  c.num_attention_heads = 128;
  c.q_lora_rank = 1536;
  c.kv_lora_rank = 512;
  c.qk_nope_head_dim = 128;
  c.qk_rope_head_dim = 64;
  c.v_head_dim = 128;
  c.n_routed_experts = 256;
  c.n_shared_experts = 1;
  c.num_experts_per_tok = 8;
  c.n_group = 8;
  c.topk_group = 4;
  c.first_k_dense_replace = 3;
  c.moe_layer_freq = 1;
  c.max_position_embeddings = 163840;
  c.rope_theta = 10000.0;
  c.rms_norm_eps = 1e-6;
  c.routed_scaling_factor = 2.5;
  c.norm_topk_prob = true;
  c.bos_token_id = 0;
  c.eos_token_id = 1;
  c.rope_scaling = config::yarn_scaling{.factor = 40.0, .original_max_position = 4096, .beta_fast = 32.0,
                                        .beta_slow = 1.0, .mscale = 1.0, .mscale_all_dim = 1.0};
  if (fp8) c.quantization = config::fp8_quantization{};
  return c;
}

std::vector<planned_tensor> tensors_of_config(const config::model_config& c) {
  std::vector<planned_tensor> out;
  auto bf16 = [&](std::string name, std::uint64_t elements) {
    out.push_back({std::move(name), 2 * elements, elements, false});
  };
  auto f32 = [&](std::string name, std::uint64_t elements) { out.push_back({std::move(name), 4 * elements, elements, false}); };
  auto projection = [&](const std::string& name, std::int64_t rows, std::int64_t cols) {
    const auto elements = static_cast<std::uint64_t>(rows) * static_cast<std::uint64_t>(cols);
    if (!c.quantization) return bf16(name, elements);
    out.push_back({name, elements, elements, false});
    const auto blocks = ceil_div(static_cast<std::uint64_t>(rows), static_cast<std::uint64_t>(c.quantization->block_rows)) *
                        ceil_div(static_cast<std::uint64_t>(cols), static_cast<std::uint64_t>(c.quantization->block_cols));
    out.push_back({name + "_scale_inv", 4 * blocks, blocks, true});
  };
  auto mlp = [&](const std::string& prefix, std::int64_t inter) {
    projection(prefix + "gate_proj.weight", inter, c.hidden_size);
    projection(prefix + "up_proj.weight", inter, c.hidden_size);
    projection(prefix + "down_proj.weight", c.hidden_size, inter);
  };
  const auto h = static_cast<std::uint64_t>(c.hidden_size);
  bf16("model.embed_tokens.weight", static_cast<std::uint64_t>(c.vocab_size) * h);
  for (std::int64_t i = 0; i < c.num_hidden_layers; ++i) {
    const std::string p = fmt::format("model.layers.{}.", i);
    const std::int64_t heads = c.num_attention_heads;
    bf16(p + "input_layernorm.weight", h);
    bf16(p + "post_attention_layernorm.weight", h);
    if (c.q_lora_rank > 0) {
      projection(p + "self_attn.q_a_proj.weight", c.q_lora_rank, c.hidden_size);
      bf16(p + "self_attn.q_a_layernorm.weight", static_cast<std::uint64_t>(c.q_lora_rank));
      projection(p + "self_attn.q_b_proj.weight", heads * c.qk_head_dim(), c.q_lora_rank);
    } else {
      projection(p + "self_attn.q_proj.weight", heads * c.qk_head_dim(), c.hidden_size);
    }
    projection(p + "self_attn.kv_a_proj_with_mqa.weight", c.latent_dim(), c.hidden_size);
    bf16(p + "self_attn.kv_a_layernorm.weight", static_cast<std::uint64_t>(c.kv_lora_rank));
    projection(p + "self_attn.kv_b_proj.weight", heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank);
    projection(p + "self_attn.o_proj.weight", c.hidden_size, heads * c.v_head_dim);
    if (!c.is_moe_layer(i)) {
      mlp(p + "mlp.", c.intermediate_size);
      continue;
    }
    bf16(p + "mlp.gate.weight", static_cast<std::uint64_t>(c.n_routed_experts) * h);
    f32(p + "mlp.gate.e_score_correction_bias", static_cast<std::uint64_t>(c.n_routed_experts));
    if (c.n_shared_experts > 0) mlp(p + "mlp.shared_experts.", c.n_shared_experts * c.moe_intermediate_size);
    for (std::int64_t e = 0; e < c.n_routed_experts; ++e) mlp(fmt::format("{}mlp.experts.{}.", p, e), c.moe_intermediate_size);
  }
  bf16("model.norm.weight", h);
  bf16("lm_head.weight", static_cast<std::uint64_t>(c.vocab_size) * h);
  return out;
}

std::vector<planned_tensor> tensors_of_checkpoint(const std::filesystem::path& dir) {
  const auto ckpt = checkpoint::open(dir);
  std::vector<planned_tensor> out;
  for (const auto& file : ckpt.files())
    for (const auto& [name, entry] : file->entries())
      out.push_back({name, entry.end - entry.begin, entry.elements(), name.ends_with("_scale_inv")});
  return out;
}

deployment_plan plan_deployment(const deployment_request& r) {
  const auto& c = r.model;
  if (r.nodes < 1 || r.gpus_per_node < 1)
    fail(errc::invalid_argument, "a deployment needs at least one node and one GPU per node (got {} x {})", r.nodes,
         r.gpus_per_node);
  if (r.nodes > c.num_hidden_layers)
    fail(errc::invalid_argument, "{} nodes for {} layers: every node holds a pipeline stage of at least one layer",
         r.nodes, c.num_hidden_layers);
  if (r.gpu_memory_bytes == 0) fail(errc::invalid_argument, "the GPU memory must be given");
  if (r.context < 1 || r.concurrency < 1 || r.block_tokens < 1)
    fail(errc::invalid_argument, "context ({}), concurrency ({}) and block tokens ({}) must be positive", r.context,
         r.concurrency, r.block_tokens);
  if (r.context > c.max_position_embeddings)
    fail(errc::invalid_argument, "a context of {} tokens is beyond the model's {} positions (max_position_embeddings)",
         r.context, c.max_position_embeddings);

  deployment_plan plan;
  const int total_gpus = r.nodes * r.gpus_per_node;
  plan.expert_parallelism = c.n_routed_experts > 0 ? static_cast<int>(std::min<std::int64_t>(total_gpus, c.n_routed_experts)) : 0;
  for (std::int64_t l = 0; l < c.num_hidden_layers; ++l) plan.moe_layers += c.is_moe_layer(l) ? 1 : 0;

  // Layers: split over nodes (every node gets a stage), then over each node's GPUs.
  const auto node_layers = balanced_split(c.num_hidden_layers, r.nodes, true, true);
  std::int64_t layer = 0;
  for (int n = 0; n < r.nodes; ++n) {
    const auto gpu_layers =
        balanced_split(node_layers[static_cast<std::size_t>(n)], r.gpus_per_node, n == 0, n == r.nodes - 1);
    for (int g = 0; g < r.gpus_per_node; ++g) {
      gpu_plan gp;
      gp.node = n;
      gp.gpu = g;
      gp.layer_begin = layer;
      layer += gpu_layers[static_cast<std::size_t>(g)];
      gp.layer_end = layer;
      plan.gpus.push_back(gp);
    }
  }
  plan.gpus.front().embedding = true;
  plan.gpus.back().head = true;
  for (int i = 0; i < plan.expert_parallelism; ++i) {
    auto& gp = plan.gpus[static_cast<std::size_t>(i)];
    gp.expert_begin = c.n_routed_experts * i / plan.expert_parallelism;
    gp.expert_end = c.n_routed_experts * (i + 1) / plan.expert_parallelism;
  }
  // With more GPUs than experts the leftover GPUs hold none; spread the holders evenly instead
  // of packing them on the first nodes.
  if (plan.expert_parallelism < total_gpus) {
    std::vector<std::pair<std::int64_t, std::int64_t>> ranges;
    for (const auto& gp : plan.gpus) ranges.emplace_back(gp.expert_begin, gp.expert_end);
    for (auto& gp : plan.gpus) gp.expert_begin = gp.expert_end = 0;
    for (int i = 0; i < plan.expert_parallelism; ++i) {
      auto& gp = plan.gpus[static_cast<std::size_t>(static_cast<std::int64_t>(i) * total_gpus / plan.expert_parallelism)];
      std::tie(gp.expert_begin, gp.expert_end) = ranges[static_cast<std::size_t>(i)];
    }
  }

  auto gpu_of_layer = [&](std::int64_t l) -> gpu_plan& {
    for (auto& gp : plan.gpus)
      if (l >= gp.layer_begin && l < gp.layer_end) return gp;
    SHOAL_REQUIRE(false, "layer {} is on no GPU", l);
    return plan.gpus.front();
  };
  auto gpu_of_expert = [&](std::int64_t e) -> gpu_plan* {
    for (auto& gp : plan.gpus)
      if (e >= gp.expert_begin && e < gp.expert_end) return &gp;
    return nullptr;
  };
  for (const auto& t : r.tensors) {
    const auto place = place_of(t.name);
    gpu_plan* holder = nullptr;
    switch (place.where) {
      case tensor_place::embedding: holder = &plan.gpus.front(); break;
      case tensor_place::head: holder = &plan.gpus.back(); break;
      case tensor_place::layer:
        if (place.layer_index < c.num_hidden_layers) holder = &gpu_of_layer(place.layer_index);
        break;
      case tensor_place::expert:
        if (place.layer_index < c.num_hidden_layers) holder = gpu_of_expert(place.expert_id);
        break;
      case tensor_place::other: break;
    }
    if (!holder) {
      plan.skipped_bytes += t.bytes;
      continue;
    }
    holder->weight_bytes += t.bytes;
    plan.weight_bytes += t.bytes;
    if (!t.scale) plan.parameters += t.elements;
  }

  plan.step_tokens = r.step_tokens > 0 ? r.step_tokens : std::max<std::int64_t>(256, r.concurrency);
  plan.activation_bytes_per_token = activation_values_per_token(c) * static_cast<std::int64_t>(sizeof(float));
  plan.cache_bytes_per_token = kv_block_pool::block_bytes(c, 1, c.num_hidden_layers);
  plan.cache_dtype = "f32";
  plan.needed_tokens = r.context * r.concurrency;

  // Every stage holds the same number of blocks (the router hands out one block table per
  // sequence), so the GPU with the least room per block of its layers sets the count.
  std::optional<std::int64_t> blocks;
  plan.weights_fit = true;
  const gpu_plan* worst = nullptr;
  std::int64_t worst_room = std::numeric_limits<std::int64_t>::max();
  std::vector<std::int64_t> room(plan.gpus.size());
  for (std::size_t i = 0; i < plan.gpus.size(); ++i) {
    auto& gp = plan.gpus[i];
    const bool computes = gp.layer_end > gp.layer_begin || gp.expert_end > gp.expert_begin;
    gp.activation_bytes = computes ? static_cast<std::uint64_t>(plan.step_tokens * plan.activation_bytes_per_token) : 0;
    if (gp.head) gp.activation_bytes += static_cast<std::uint64_t>(plan.step_tokens * c.vocab_size) * sizeof(float);
    gp.headroom_bytes = kHeadroomFixed + r.gpu_memory_bytes / kHeadroomDivisor;
    room[i] = static_cast<std::int64_t>(r.gpu_memory_bytes) -
              static_cast<std::int64_t>(gp.weight_bytes + gp.activation_bytes + gp.headroom_bytes);
    if (room[i] < worst_room) {
      worst_room = room[i];
      worst = &gp;
    }
    if (room[i] < 0) plan.weights_fit = false;
    const auto layers = gp.layer_end - gp.layer_begin;
    if (layers > 0 && room[i] >= 0) {
      const auto per_block = kv_block_pool::block_bytes(c, r.block_tokens, layers);
      blocks = std::min(blocks.value_or(std::numeric_limits<std::int64_t>::max()), room[i] / per_block);
    }
  }
  plan.cache_blocks = plan.weights_fit ? blocks.value_or(0) : 0;
  if (plan.cache_blocks < 2) {
    plan.weights_fit = false;
    plan.cache_blocks = 0;
  }
  plan.cache_tokens = plan.cache_blocks * r.block_tokens;
  const auto blocks_per_sequence = (r.context + r.block_tokens - 1) / r.block_tokens;
  plan.sequences_at_context = plan.cache_blocks / blocks_per_sequence;
  for (std::size_t i = 0; i < plan.gpus.size(); ++i) {
    auto& gp = plan.gpus[i];
    const auto layers = gp.layer_end - gp.layer_begin;
    gp.cache_bytes = layers > 0 ? static_cast<std::uint64_t>(plan.cache_blocks * kv_block_pool::block_bytes(c, r.block_tokens, layers)) : 0;
    gp.unused_bytes = room[i] - static_cast<std::int64_t>(gp.cache_bytes);
  }
  plan.fits = plan.weights_fit && plan.sequences_at_context >= r.concurrency;

  const auto total_memory = static_cast<double>(r.gpu_memory_bytes) * total_gpus;
  if (!plan.weights_fit && worst_room < 0) {
    plan.verdict = fmt::format(
        "does not fit: GPU {} of node {} needs {} of weights, {} of step workspace and {} of headroom, {} more than "
        "its {} ({} of weights in all on {} of GPU memory)",
        worst->gpu, worst->node, gib(static_cast<double>(worst->weight_bytes)),
        gib(static_cast<double>(worst->activation_bytes)), gib(static_cast<double>(worst->headroom_bytes)),
        gib(static_cast<double>(-worst_room)), gib(static_cast<double>(r.gpu_memory_bytes)),
        gib(static_cast<double>(plan.weight_bytes)), gib(total_memory));
  } else if (!plan.weights_fit) {
    plan.verdict = fmt::format(
        "does not fit: after weights, step workspace and headroom every stage has room for only {} cache block(s) "
        "of {} tokens; at least 2 are needed",
        blocks.value_or(0), r.block_tokens);
  } else if (!plan.fits) {
    plan.verdict = fmt::format(
        "does not fit: the weights fit, but the latent cache holds {} tokens, {} sequences of {} tokens, not the {} "
        "asked for",
        plan.cache_tokens, plan.sequences_at_context, r.context, r.concurrency);
  } else {
    plan.verdict = fmt::format("fits: the latent cache holds {} tokens, {} sequences of {} tokens ({} asked for)",
                               plan.cache_tokens, plan.sequences_at_context, r.context, r.concurrency);
  }
  return plan;
}

std::string deployment_plan_to_json(const deployment_request& r, const deployment_plan& plan) {
  using nlohmann::json;
  json stages = json::array();
  for (int n = 0; n < r.nodes; ++n) {
    const auto [begin, end] = layers_of_node(plan, n);
    stages.push_back({{"node", n}, {"layers", range_text(begin, end)}, {"layer_begin", begin}, {"layer_end", end}});
  }
  json gpus = json::array();
  for (const auto& gp : plan.gpus)
    gpus.push_back({{"node", gp.node},
                    {"gpu", gp.gpu},
                    {"layers", range_text(gp.layer_begin, gp.layer_end)},
                    {"experts", range_text(gp.expert_begin, gp.expert_end)},
                    {"routed_experts", gp.expert_end - gp.expert_begin},
                    {"embedding", gp.embedding},
                    {"head", gp.head},
                    {"weight_bytes", gp.weight_bytes},
                    {"latent_cache_bytes", gp.cache_bytes},
                    {"activation_bytes", gp.activation_bytes},
                    {"headroom_bytes", gp.headroom_bytes},
                    {"unused_bytes", gp.unused_bytes}});
  const auto& c = r.model;
  json out = {
      {"fits", plan.fits},
      {"weights_fit", plan.weights_fit},
      {"verdict", plan.verdict},
      {"model",
       {{"parameters", plan.parameters},
        {"weight_bytes", plan.weight_bytes},
        {"skipped_bytes", plan.skipped_bytes},
        {"weights", c.quantization ? "fp8" : "bf16"},
        {"layers", c.num_hidden_layers},
        {"moe_layers", plan.moe_layers},
        {"routed_experts", c.n_routed_experts},
        {"experts_per_token", c.num_experts_per_tok}}},
      {"hardware", {{"nodes", r.nodes}, {"gpus_per_node", r.gpus_per_node}, {"gpu_memory_bytes", r.gpu_memory_bytes}}},
      {"expert_parallelism", plan.expert_parallelism},
      {"pipeline_stages", r.nodes},
      {"stages", stages},
      {"cache",
       {{"dtype", plan.cache_dtype},
        {"values_per_token_per_layer", c.latent_dim()},
        {"bytes_per_token", plan.cache_bytes_per_token},
        {"block_tokens", r.block_tokens},
        {"blocks", plan.cache_blocks},
        {"tokens", plan.cache_tokens},
        {"context", r.context},
        {"concurrency", r.concurrency},
        {"needed_tokens", plan.needed_tokens},
        {"sequences_at_context", plan.sequences_at_context}}},
      {"activations", {{"step_tokens", plan.step_tokens}, {"bytes_per_token", plan.activation_bytes_per_token}}},
      {"gpus", gpus}};
  return out.dump(2);
}

std::string deployment_plan_to_text(const deployment_request& r, const deployment_plan& plan) {
  const auto& c = r.model;
  std::string out = fmt::format(
      "model: {} parameters, {} of {} weights ({} layers, {} with {} routed experts top-{})\n"
      "hardware: {} node{} x {} GPUs of {} = {}\n"
      "plan: {} pipeline stage{} (one per node), routed experts over {} GPUs ({} per GPU in every MoE layer)\n"
      "latent cache: {} values per token per layer in {}, {:.1f} KiB per token; step of {} tokens\n\n",
      plan.parameters >= 1'000'000'000 ? fmt::format("{:.1f} B", static_cast<double>(plan.parameters) / 1e9)
                                        : fmt::format("{:.1f} M", static_cast<double>(plan.parameters) / 1e6),
      gib(static_cast<double>(plan.weight_bytes)),
      c.quantization ? "FP8" : "BF16", c.num_hidden_layers, plan.moe_layers, c.n_routed_experts, c.num_experts_per_tok,
      r.nodes, r.nodes == 1 ? "" : "s", r.gpus_per_node, gib(static_cast<double>(r.gpu_memory_bytes)),
      gib(static_cast<double>(r.gpu_memory_bytes) * r.nodes * r.gpus_per_node), r.nodes, r.nodes == 1 ? "" : "s",
      plan.expert_parallelism,
      plan.expert_parallelism > 0 ? fmt::format("{:.3g}", static_cast<double>(c.n_routed_experts) / plan.expert_parallelism)
                                  : std::string("0"),
      c.latent_dim(), plan.cache_dtype, static_cast<double>(plan.cache_bytes_per_token) / 1024.0, plan.step_tokens);
  out += fmt::format("| {:<9} | {:<9} | {:<7} | {:>9} | {:>12} | {:>11} | {:>9} | {:>9} |\n", "node/gpu", "layers",
                     "experts", "weights", "latent cache", "activations", "headroom", "unused");
  out += "|-----------|-----------|---------|-----------|--------------|-------------|-----------|-----------|\n";
  auto cell = [](double bytes) { return gib(bytes); };
  for (const auto& gp : plan.gpus) {
    std::string layers = range_text(gp.layer_begin, gp.layer_end);
    if (gp.embedding) layers += "+e";
    if (gp.head) layers += "+h";
    out += fmt::format("| {:<9} | {:<9} | {:<7} | {:>9} | {:>12} | {:>11} | {:>9} | {:>9} |\n",
                       fmt::format("{}/{}", gp.node, gp.gpu), layers, range_text(gp.expert_begin, gp.expert_end),
                       cell(static_cast<double>(gp.weight_bytes)), cell(static_cast<double>(gp.cache_bytes)),
                       cell(static_cast<double>(gp.activation_bytes)), cell(static_cast<double>(gp.headroom_bytes)),
                       cell(static_cast<double>(gp.unused_bytes)));
  }
  out += fmt::format("\n(+e: also the embedding, +h: also the final norm and lm_head)\n{}\n", plan.verdict);
  return out;
}

std::string deployment_cluster_yaml(const deployment_request& r, const deployment_plan& plan,
                                    const cluster_config_naming& naming) {
  if (!plan.weights_fit)
    fail(errc::failed_precondition, "no cluster config for a plan that does not fit ({})", plan.verdict);
  std::vector<std::string> names, hosts;
  for (int n = 0; n < r.nodes; ++n) {
    names.push_back(expand(naming.name_template, "the node name template", n, ""));
    hosts.push_back(expand(naming.host_template, "the host template", n, names.back()));
  }
  const bool same_host = std::adjacent_find(hosts.begin(), hosts.end(), std::not_equal_to<>()) == hosts.end();
  std::string y = fmt::format(
      "# {} nodes x {} GPUs of {:.1f} GiB: {}\n"
      "model: {}\n"
      "max_batch: {}\n"
      "max_batch_tokens: {}\n"
      "block_tokens: {}\n"
      "cache_blocks: {}      # {} tokens, {} sequences of {}\n",
      r.nodes, r.gpus_per_node, static_cast<double>(r.gpu_memory_bytes) / kGiB, plan.verdict, naming.model_path,
      r.concurrency, plan.step_tokens, r.block_tokens, plan.cache_blocks, plan.cache_tokens, plan.sequences_at_context,
      r.context);
  if (!naming.admin_token_file.empty()) y += fmt::format("admin_token_file: {}\n", naming.admin_token_file);
  y += "nodes:\n";
  for (int n = 0; n < r.nodes; ++n) {
    std::string devices;
    for (int g = 0; g < r.gpus_per_node; ++g) devices += fmt::format("{}cuda:{}", g == 0 ? "" : ", ", g);
    y += fmt::format("  - name: {}\n    host: {}\n    port: {}\n    devices: [{}]\n    memory_gb: {:.1f}\n",
                     names[static_cast<std::size_t>(n)], hosts[static_cast<std::size_t>(n)],
                     naming.port + (same_host && r.nodes > 1 ? n : 0), devices,
                     static_cast<double>(r.gpu_memory_bytes) * r.gpus_per_node / 1e9);
  }
  y += fmt::format("head: {}\n", names.front());
  if (naming.standby && r.nodes > 1)
    y += fmt::format("standby: {}            # takes over supervisor and router if the head dies\n", names[1]);
  y += "plan:\n  stages:\n";
  for (int n = 0; n < r.nodes; ++n) {
    const auto [begin, end] = layers_of_node(plan, n);
    y += fmt::format("    - {{node: {}, layers: {}}}\n", names[static_cast<std::size_t>(n)], range_text(begin, end));
  }
  if (plan.expert_parallelism > 0) {
    y += "  experts:            # one expert group per GPU\n";
    for (const auto& gp : plan.gpus)
      if (gp.expert_end > gp.expert_begin)
        y += fmt::format("    - {{node: {}, experts: {}}}   # cuda:{}\n", names[static_cast<std::size_t>(gp.node)],
                         range_text(gp.expert_begin, gp.expert_end), gp.gpu);
  }
  return y;
}

std::uint64_t parse_memory_size(std::string_view text, std::string_view what) {
  const auto original = text;
  while (!text.empty() && std::isspace(static_cast<unsigned char>(text.back()))) text.remove_suffix(1);
  std::size_t digits = 0;
  while (digits < text.size() && (std::isdigit(static_cast<unsigned char>(text[digits])) || text[digits] == '.')) ++digits;
  double number = 0;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + digits, number);
  if (digits == 0 || ec != std::errc() || end != text.data() + digits || !std::isfinite(number) || number <= 0)
    fail(errc::invalid_argument, "{} '{}' is not a memory size like 80GiB or 141GB", what, original);
  auto unit_view = text.substr(digits);
  while (!unit_view.empty() && unit_view.front() == ' ') unit_view.remove_prefix(1);
  std::string unit(unit_view);
  for (auto& ch : unit) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  static const std::pair<const char*, double> kUnits[] = {
      {"b", 1.0},          {"kb", 1e3},           {"mb", 1e6},           {"gb", 1e9},
      {"tb", 1e12},        {"kib", 1024.0},       {"mib", 1048576.0},    {"gib", kGiB},
      {"tib", kGiB * 1024}};
  for (const auto& [name, factor] : kUnits)
    if (unit == name) {
      const double bytes = number * factor;
      if (bytes >= 1.8e19) fail(errc::invalid_argument, "{} '{}' is too large", what, original);
      return static_cast<std::uint64_t>(std::llround(bytes));
    }
  fail(errc::invalid_argument, "{} '{}': {} (use B, kB, MB, GB, TB or KiB, MiB, GiB, TiB, e.g. 80GiB)", what,
       original, unit.empty() ? "the unit is missing" : fmt::format("unknown unit '{}'", std::string(unit_view)));
}

}  // namespace shoal::runtime
