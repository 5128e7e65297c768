// The deployment planner against figures computed by hand from DeepSeek-V3's published shapes.

#include "shoal/runtime/deployment_plan.hpp"

#include "shoal/base/error.hpp"
#include "shoal/config/cluster_config.hpp"
#include "shoal/runtime/model.hpp"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <map>
#include <set>
#include <string>

using namespace shoal;
using runtime::deployment_request;

namespace {

constexpr std::uint64_t kGiB = 1ull << 30;

// DeepSeek-V3's shapes, written out again here so that the planner is checked against
// arithmetic it does not share.
constexpr std::uint64_t kVocab = 129280, kHidden = 7168, kInter = 18432, kMoeInter = 2048, kHeads = 128;
constexpr std::uint64_t kQLora = 1536, kKvLora = 512, kNope = 128, kRope = 64, kV = 128, kExperts = 256;

struct shape {
  std::uint64_t rows, cols;
};
const shape kAttention[] = {{kQLora, kHidden},
                            {kHeads * (kNope + kRope), kQLora},
                            {kKvLora + kRope, kHidden},
                            {kHeads * (kNope + kV), kKvLora},
                            {kHidden, kHeads * kV}};
const shape kExpert[] = {{kMoeInter, kHidden}, {kMoeInter, kHidden}, {kHidden, kMoeInter}};
const shape kDense[] = {{kInter, kHidden}, {kInter, kHidden}, {kHidden, kInter}};
constexpr std::uint64_t kNorms = 2 * kHidden + kQLora + kKvLora;  // input, post-attention, q_a, kv_a

template <std::size_t N>
std::uint64_t params(const shape (&list)[N]) {
  std::uint64_t n = 0;
  for (const auto& s : list) n += s.rows * s.cols;
  return n;
}
// FP8 E4M3: a byte per value and an f32 scale per 128x128 block.
template <std::size_t N>
std::uint64_t fp8_bytes(const shape (&list)[N]) {
  std::uint64_t n = 0;
  for (const auto& s : list) n += s.rows * s.cols + 4 * ((s.rows + 127) / 128) * ((s.cols + 127) / 128);
  return n;
}

deployment_request v3(bool fp8, int nodes, int gpus, std::uint64_t gpu_memory) {
  deployment_request r;
  r.model = runtime::deepseek_v3_config(fp8);
  r.tensors = runtime::tensors_of_config(r.model);
  r.nodes = nodes;
  r.gpus_per_node = gpus;
  r.gpu_memory_bytes = gpu_memory;
  return r;
}

}  // namespace

TEST_CASE("DeepSeek-V3's published shapes have 671B parameters, FP8 about a byte each", "[plan]") {
  const std::uint64_t moe_layer = params(kAttention) + kNorms + 257 * params(kExpert) + kExperts * kHidden + kExperts;
  const std::uint64_t dense_layer = params(kAttention) + kNorms + params(kDense);
  const std::uint64_t total = 3 * dense_layer + 58 * moe_layer + 2 * kVocab * kHidden + kHidden;
  REQUIRE(total == 671'026'419'200ull);

  // The preset is a config Shoal's own config.json validation accepts.
  for (const bool quantized : {true, false}) {
    const auto parsed = config::parse_model_config(config::model_config_to_json(runtime::deepseek_v3_config(quantized)), "v3");
    CHECK(parsed.latent_dim() == 576);
    CHECK(parsed.quantization.has_value() == quantized);
    CHECK(parsed.rope_scaling.has_value());
  }

  const auto fp8 = runtime::plan_deployment(v3(true, 1, 8, 141'000'000'000ull));
  CHECK(fp8.parameters == total);
  CHECK(fp8.moe_layers == 58);
  // Projections FP8 with block scales; embedding, head, norms, gates BF16; gate bias F32.
  const std::uint64_t fp8_total = 3 * (fp8_bytes(kAttention) + fp8_bytes(kDense) + 2 * kNorms) +
                                  58 * (fp8_bytes(kAttention) + 257 * fp8_bytes(kExpert) + 2 * kNorms +
                                        2 * kExperts * kHidden + 4 * kExperts) +
                                  2 * (2 * kVocab * kHidden + kHidden);
  CHECK(fp8.weight_bytes == fp8_total);
  CHECK(fp8.weight_bytes == 673'150'611'808ull);
  const double per_param = static_cast<double>(fp8.weight_bytes) / static_cast<double>(fp8.parameters);
  CHECK(per_param > 1.0);
  CHECK(per_param < 1.004);  // scales are 1/4096 of a byte per value; BF16 embedding and head the rest

  const auto bf16 = runtime::plan_deployment(v3(false, 1, 8, 141'000'000'000ull));
  CHECK(bf16.parameters == total);
  CHECK(bf16.weight_bytes == 2 * total + 58 * 2 * kExperts);  // the bias alone is F32
}

TEST_CASE("V3 FP8 on one node of 8 H200 (141 GB) fits; its layers, experts and cache by hand", "[plan]") {
  const auto request = v3(true, 1, 8, 141'000'000'000ull);
  const auto plan = runtime::plan_deployment(request);
  REQUIRE(plan.gpus.size() == 8);
  CHECK(plan.expert_parallelism == 8);
  // 61 layers over 8 GPUs: 5 of 8 and 3 of 7; the ends (embedding, head) and GPU 6 get 7.
  const std::int64_t begins[] = {0, 7, 15, 23, 31, 39, 47, 54};
  for (int g = 0; g < 8; ++g) {
    const auto& gp = plan.gpus[static_cast<std::size_t>(g)];
    CHECK(gp.layer_begin == begins[g]);
    CHECK(gp.layer_end == (g == 7 ? 61 : begins[g + 1]));
    CHECK(gp.expert_begin == 32 * g);
    CHECK(gp.expert_end == 32 * (g + 1));
  }
  CHECK(plan.gpus[0].embedding);
  CHECK(plan.gpus[7].head);

  // GPU 1 holds layers 7-14 (all MoE) and experts 32-63 of all 58 MoE layers.
  const std::uint64_t moe_rest = fp8_bytes(kAttention) + fp8_bytes(kExpert) + 2 * kNorms + 2 * kExperts * kHidden + 4 * kExperts;
  const std::uint64_t gpu1_weights = 8 * moe_rest + 32 * 58 * fp8_bytes(kExpert);
  CHECK(plan.gpus[1].weight_bytes == gpu1_weights);

  // MLA caches 512 + 64 values per token and layer; Shoal stores them as f32.
  CHECK(plan.cache_bytes_per_token == 61 * 576 * 4);
  // Step workspace: 256 tokens of f32 intermediates (runtime comment lists them).
  const std::uint64_t per_token_values = 4 * kHidden + kQLora + kHeads * (kNope + kRope) + (kKvLora + kRope) +
                                         kHeads * (kKvLora + kRope) + kHeads * kKvLora + kHeads * kV +
                                         8 * (2 * kHidden + 3 * kMoeInter) + 3 * kMoeInter;
  CHECK(plan.activation_bytes_per_token == static_cast<std::int64_t>(4 * per_token_values));
  CHECK(plan.gpus[1].activation_bytes == 256 * 4 * per_token_values);
  const std::uint64_t headroom = kGiB + 7'050'000'000ull;  // 1 GiB + 5%
  CHECK(plan.gpus[1].headroom_bytes == headroom);

  // The cache: every stage holds the same block count; the GPU with the least room per block
  // of its layers decides. Recomputed here for every GPU from the plan's own weights.
  std::int64_t blocks = INT64_MAX;
  for (const auto& gp : plan.gpus) {
    const auto room = static_cast<std::int64_t>(141'000'000'000ull - gp.weight_bytes - gp.activation_bytes - headroom);
    blocks = std::min(blocks, room / ((gp.layer_end - gp.layer_begin) * 32 * 576 * 4));
  }
  CHECK(plan.cache_blocks == blocks);
  CHECK(plan.cache_tokens == blocks * 32);
  // GPU 1 on its own: (141e9 - weights - workspace - headroom) / (8 layers x 32 tokens x 2304 B).
  const auto gpu1_blocks = static_cast<std::int64_t>((141'000'000'000ull - gpu1_weights - 256 * 4 * per_token_values - headroom) /
                                                     (8ull * 32 * 576 * 4));
  CHECK(plan.cache_blocks <= gpu1_blocks);
  CHECK(plan.cache_blocks >= gpu1_blocks * 9 / 10);
  CHECK(plan.weights_fit);
  CHECK(plan.fits);
  CHECK(plan.sequences_at_context >= 64);
  CHECK_THAT(plan.verdict, Catch::StartsWith("fits"));
  for (const auto& gp : plan.gpus) {
    CHECK(gp.unused_bytes >= 0);
    CHECK(gp.weight_bytes + gp.activation_bytes + gp.headroom_bytes + gp.cache_bytes +
              static_cast<std::uint64_t>(gp.unused_bytes) ==
          141'000'000'000ull);
  }
}

TEST_CASE("V3 does not fit 8 H100 (80 GiB) in BF16, nor in FP8; it fits 2 x 8 in FP8", "[plan]") {
  const auto bf16 = runtime::plan_deployment(v3(false, 1, 8, 80 * kGiB));
  CHECK_FALSE(bf16.weights_fit);
  CHECK_FALSE(bf16.fits);
  CHECK(bf16.cache_blocks == 0);
  CHECK_THAT(bf16.verdict, Catch::StartsWith("does not fit: GPU"));
  // 1250 GiB of weights on 640 GiB: no split can help.
  CHECK(bf16.weight_bytes > 8 * 80 * kGiB);

  // 627 GiB of FP8 weights on 640 GiB leave no room for workspace and headroom.
  const auto fp8 = runtime::plan_deployment(v3(true, 1, 8, 80 * kGiB));
  CHECK(fp8.weight_bytes < 8 * 80 * kGiB);
  CHECK_FALSE(fp8.weights_fit);
  CHECK_FALSE(fp8.fits);

  const auto two = runtime::plan_deployment(v3(true, 2, 8, 80 * kGiB));
  CHECK(two.fits);
  CHECK(two.expert_parallelism == 16);
  CHECK(two.gpus[3].expert_end - two.gpus[3].expert_begin == 16);
  // Layers split by node first: 30 on the first node (it has the embedding), 31 on the second.
  CHECK(two.gpus[7].layer_end == 30);
  CHECK(two.gpus[8].layer_begin == 30);

  const auto two_bf16 = runtime::plan_deployment(v3(false, 2, 8, 80 * kGiB));
  CHECK_FALSE(two_bf16.fits);
  const auto four_bf16 = runtime::plan_deployment(v3(false, 4, 8, 80 * kGiB));
  CHECK(four_bf16.fits);
}

TEST_CASE("a cache too small for the asked concurrency is not a fit, and says so", "[plan]") {
  auto request = v3(true, 2, 8, 80 * kGiB);
  request.concurrency = 4096;
  const auto plan = runtime::plan_deployment(request);
  CHECK(plan.weights_fit);
  CHECK_FALSE(plan.fits);
  CHECK(plan.sequences_at_context < 4096);
  CHECK(plan.sequences_at_context == plan.cache_blocks / (32768 / 32));
  CHECK_THAT(plan.verdict, Catch::Contains("the weights fit, but the latent cache holds"));
}

TEST_CASE("weights that leave room for fewer than 2 cache blocks do not fit", "[plan]") {
  // One GPU whose memory leaves 1.5 blocks of 61 layers after weights, workspace and headroom.
  auto request = v3(true, 1, 1, 4096 * kGiB);
  const auto big = runtime::plan_deployment(request);
  const double block = 61.0 * 32 * 576 * 4;
  const double needed = static_cast<double>(big.gpus[0].weight_bytes + big.gpus[0].activation_bytes + kGiB) + 1.5 * block;
  request.gpu_memory_bytes = static_cast<std::uint64_t>(needed / 0.95);
  const auto plan = runtime::plan_deployment(request);
  CHECK_FALSE(plan.weights_fit);
  CHECK(plan.cache_blocks == 0);
  CHECK(plan.gpus[0].unused_bytes >= static_cast<std::int64_t>(block));
  CHECK_THAT(plan.verdict, Catch::Contains("room for only 1 cache block(s) of 32 tokens; at least 2 are needed"));
}

TEST_CASE("every layer and every routed expert is placed exactly once, every node has a stage", "[plan]") {
  for (const auto& [nodes, gpus] : std::vector<std::pair<int, int>>{{1, 1}, {1, 8}, {2, 8}, {3, 4}, {4, 8}, {61, 1}, {40, 8}}) {
    const auto plan = runtime::plan_deployment(v3(true, nodes, gpus, 80 * kGiB));
    REQUIRE(plan.gpus.size() == static_cast<std::size_t>(nodes * gpus));
    std::int64_t next_layer = 0;
    std::map<std::int64_t, int> owner;
    std::set<int> nodes_with_layers;
    std::int64_t min_layers = INT64_MAX, max_layers = 0;
    for (const auto& gp : plan.gpus) {
      CHECK(gp.layer_begin == next_layer);
      next_layer = gp.layer_end;
      if (gp.layer_end > gp.layer_begin) nodes_with_layers.insert(gp.node);
      min_layers = std::min(min_layers, gp.layer_end - gp.layer_begin);
      max_layers = std::max(max_layers, gp.layer_end - gp.layer_begin);
      for (auto e = gp.expert_begin; e < gp.expert_end; ++e) CHECK(owner.emplace(e, gp.gpu).second);
    }
    CHECK(next_layer == 61);
    CHECK(owner.size() == 256);
    CHECK(nodes_with_layers.size() == static_cast<std::size_t>(nodes));
    if (nodes * gpus <= 61) CHECK(max_layers - min_layers <= 2);
  }
  CHECK_THROWS_WITH(runtime::plan_deployment(v3(true, 62, 8, 80 * kGiB)), Catch::Contains("62 nodes for 61 layers"));
  auto long_context = v3(true, 2, 8, 80 * kGiB);
  long_context.context = 200000;
  CHECK_THROWS_WITH(runtime::plan_deployment(long_context), Catch::Contains("max_position_embeddings"));
}

TEST_CASE("the written cluster config parses with Shoal's parser and carries the plan", "[plan]") {
  const auto request = v3(true, 2, 8, 80 * kGiB);
  const auto plan = runtime::plan_deployment(request);
  runtime::cluster_config_naming naming;
  naming.model_path = "/models/DeepSeek-V3";
  naming.name_template = "shoal-node-{i}";
  naming.host_template = "{name}.shoal-node";
  naming.admin_token_file = "/etc/shoal/admin/token";
  const auto yaml = runtime::deployment_cluster_yaml(request, plan, naming);
  auto cluster = config::parse_cluster_config(yaml, "plan.yaml", "/tmp");
  config::validate_against_model(cluster, request.model);
  REQUIRE(cluster.nodes.size() == 2);
  CHECK(cluster.nodes[1].name == "shoal-node-1");
  CHECK(cluster.nodes[1].host == "shoal-node-1.shoal-node");
  CHECK(cluster.nodes[1].port == 7610);
  CHECK(cluster.nodes[0].devices.size() == 8);
  CHECK(cluster.nodes[0].devices[7] == "cuda:7");
  CHECK(cluster.nodes[0].memory_gb == Approx(8 * 80 * static_cast<double>(kGiB) / 1e9).epsilon(1e-3));
  CHECK(cluster.head == "shoal-node-0");
  CHECK(cluster.standby == "shoal-node-1");
  CHECK(cluster.model == "/models/DeepSeek-V3");
  CHECK(cluster.admin_token_file == "/etc/shoal/admin/token");
  REQUIRE(cluster.stages.size() == 2);
  CHECK(cluster.stages[0].layer_end == plan.gpus[7].layer_end);
  CHECK(cluster.stages[1].layer_end == 61);
  REQUIRE(cluster.expert_groups.size() == 16);
  CHECK(cluster.expert_groups[9].node == "shoal-node-1");
  CHECK(cluster.expert_groups[9].experts.front() == 144);
  CHECK(cluster.expert_groups[9].experts.size() == 16);
  CHECK(cluster.max_batch == 64);
  CHECK(config::cache_blocks_for(cluster, request.model) == plan.cache_blocks);

  // Nodes on one host get a port each.
  naming.host_template = "127.0.0.1";
  const auto local = config::parse_cluster_config(runtime::deployment_cluster_yaml(request, plan, naming), "l.yaml", "/tmp");
  CHECK(local.nodes[1].port == 7611);
  naming.standby = false;
  CHECK(config::parse_cluster_config(runtime::deployment_cluster_yaml(request, plan, naming), "l.yaml", "/tmp")
            .standby.empty());

  const auto too_small = runtime::plan_deployment(v3(false, 1, 8, 80 * kGiB));
  CHECK_THROWS_WITH(runtime::deployment_cluster_yaml(request, too_small, naming), Catch::Contains("does not fit"));
  naming.name_template = "node{j}";
  CHECK_THROWS_WITH(runtime::deployment_cluster_yaml(request, plan, naming), Catch::Contains("node name template"));
}

TEST_CASE("the JSON carries fits and the breakdown", "[plan]") {
  const auto request = v3(true, 1, 8, 141'000'000'000ull);
  const auto plan = runtime::plan_deployment(request);
  const auto j = nlohmann::json::parse(runtime::deployment_plan_to_json(request, plan));
  CHECK(j["fits"] == true);
  CHECK(j["model"]["parameters"] == plan.parameters);
  CHECK(j["cache"]["dtype"] == "f32");
  CHECK(j["cache"]["tokens"] == plan.cache_tokens);
  REQUIRE(j["gpus"].size() == 8);
  CHECK(j["gpus"][1]["layers"] == "7-14");
  CHECK(j["gpus"][1]["experts"] == "32-63");
  CHECK(j["gpus"][1]["weight_bytes"] == plan.gpus[1].weight_bytes);
  CHECK(j["stages"][0]["layers"] == "0-60");
  const auto text = runtime::deployment_plan_to_text(request, plan);
  CHECK_THAT(text, Catch::Contains("| 0/1       | 7-14      | 32-63   |"));
  CHECK_THAT(text, Catch::Contains("671.0 B parameters"));
}

TEST_CASE("a real checkpoint's tensors plan like the config's synthesized ones", "[plan]") {
  for (const char* name : {"tiny-a-fp8", "tiny-b-bf16"}) {
    INFO(name);
    const std::string dir = std::string(SHOAL_TEST_DATA_DIR) + "/golden/" + name + "/ckpt";
    const auto model = config::load_model_config(dir);
    const auto real = runtime::tensors_of_checkpoint(dir);
    const auto synthesized = runtime::tensors_of_config(model);
    std::map<std::string, std::uint64_t> real_bytes;
    for (const auto& t : real) real_bytes[t.name] = t.bytes;
    for (const auto& t : synthesized) {
      INFO(t.name);
      REQUIRE(real_bytes.count(t.name) == 1);
      CHECK(real_bytes[t.name] == t.bytes);
    }
    deployment_request r;
    r.model = model;
    r.tensors = real;
    r.nodes = 1;
    r.gpus_per_node = 2;
    r.gpu_memory_bytes = 4 * kGiB;
    r.context = 256;
    r.concurrency = 4;
    const auto plan = runtime::plan_deployment(r);
    std::uint64_t synthesized_total = 0;
    for (const auto& t : synthesized) synthesized_total += t.bytes;
    // What is not served (MTP layers) is counted apart.
    CHECK(plan.weight_bytes == synthesized_total);
    CHECK(plan.weight_bytes + plan.skipped_bytes == [&] {
      std::uint64_t all = 0;
      for (const auto& t : real) all += t.bytes;
      return all;
    }());
  }
}

TEST_CASE("memory sizes need a unit", "[plan]") {
  CHECK(runtime::parse_memory_size("80GiB", "--gpu-mem") == 80 * kGiB);
  CHECK(runtime::parse_memory_size("141GB", "--gpu-mem") == 141'000'000'000ull);
  CHECK(runtime::parse_memory_size("141gb", "--gpu-mem") == 141'000'000'000ull);
  CHECK(runtime::parse_memory_size("512 MiB", "--gpu-mem") == 512ull << 20);
  CHECK(runtime::parse_memory_size("1.5TiB", "--gpu-mem") == 1536 * kGiB);
  CHECK_THROWS_WITH(runtime::parse_memory_size("80", "--gpu-mem"), Catch::Contains("the unit is missing"));
  CHECK_THROWS_WITH(runtime::parse_memory_size("80GX", "--gpu-mem"), Catch::Contains("unknown unit 'GX'"));
  CHECK_THROWS_WITH(runtime::parse_memory_size("lots", "--gpu-mem"), Catch::Contains("not a memory size"));
  CHECK_THROWS_WITH(runtime::parse_memory_size("-5GB", "--gpu-mem"), Catch::Contains("not a memory size"));
  CHECK_THROWS_WITH(runtime::parse_memory_size("0GB", "--gpu-mem"), Catch::Contains("not a memory size"));
}
