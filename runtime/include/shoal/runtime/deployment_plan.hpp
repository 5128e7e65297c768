#pragma once
/// \file
/// Deployment planning, before any hardware is bought or booked: whether a model fits a set of
/// GPU nodes, how its layers and routed experts would be spread over them, what each GPU's
/// memory goes to, and how many tokens the latent cache then holds. Pure arithmetic over the
/// model's config and its checkpoint's tensor sizes (real ones, or those a checkpoint of the
/// published shapes has), so it runs anywhere and is checked against hand computation.

#include "shoal/config/model_config.hpp"

#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

namespace shoal::runtime {

/// One tensor of a checkpoint, as far as planning is concerned.
struct planned_tensor {
  std::string name;             ///< Checkpoint name, e.g. `model.layers.3.mlp.experts.7.up_proj.weight`.
  std::uint64_t bytes = 0;      ///< Bytes it takes (in memory as on disk: weights stay in their dtype).
  std::uint64_t elements = 0;   ///< Values it holds.
  /// An FP8 block scale (`*_scale_inv`): bytes that hold no parameters.
  bool scale = false;
};

/// DeepSeek-V3's published architecture (also R1's): 61 layers (3 dense), hidden 7168, MLA
/// with q_lora 1536 and kv_lora 512 + rope 64, 256 routed experts top-8 in 8 groups plus one
/// shared expert, YaRN to 163840 positions, one MTP layer; `fp8` adds the 128x128 block
/// quantization its checkpoints are published with.
config::model_config deepseek_v3_config(bool fp8);

/// The tensors a checkpoint of `config` holds, with the dtypes DeepSeek's checkpoints use:
/// projections FP8 E4M3 with an F32 scale per 128x128 block when `config.quantization` is
/// set, else BF16; embedding, head, norms and router gates BF16; the gate's score-correction
/// bias F32. The main layers only (MTP layers are not served).
std::vector<planned_tensor> tensors_of_config(const config::model_config& config);

/// The tensors of a real checkpoint directory, from its safetensors headers (nothing else is read).
std::vector<planned_tensor> tensors_of_checkpoint(const std::filesystem::path& dir);

/// What is asked of a deployment.
struct deployment_request {
  config::model_config model;           ///< The architecture.
  std::vector<planned_tensor> tensors;  ///< Its checkpoint's tensors.
  int nodes = 1;                        ///< Machines (one Shoal node process each).
  int gpus_per_node = 8;                ///< GPUs per machine.
  std::uint64_t gpu_memory_bytes = 0;   ///< Memory of one GPU.
  std::int64_t context = 32768;         ///< Tokens (prompt + output) of one sequence.
  std::int64_t concurrency = 64;        ///< Sequences of `context` tokens cached at once.
  std::int64_t block_tokens = 32;       ///< Positions per cache block.
  /// Token budget of one step (decode tokens plus prompt chunks); 0: max(256, concurrency).
  std::int64_t step_tokens = 0;
};

/// Where one GPU's memory goes.
struct gpu_plan {
  int node = 0;                    ///< Node index.
  int gpu = 0;                     ///< Device index on the node (`cuda:N`).
  std::int64_t layer_begin = 0;    ///< First decoder layer whose attention, dense MLP, shared
                                   ///< expert and router gate it holds.
  std::int64_t layer_end = 0;      ///< One past the last (== layer_begin: none).
  std::int64_t expert_begin = 0;   ///< First routed expert id it holds, in every MoE layer.
  std::int64_t expert_end = 0;     ///< One past the last.
  bool embedding = false;          ///< Holds `model.embed_tokens` (the pipeline's start).
  bool head = false;               ///< Holds `model.norm` and `lm_head` (the pipeline's end).
  std::uint64_t weight_bytes = 0;       ///< Its tensors.
  std::uint64_t activation_bytes = 0;   ///< Workspace of one step.
  std::uint64_t headroom_bytes = 0;     ///< Left for the CUDA context, libraries, fragmentation.
  std::uint64_t cache_bytes = 0;        ///< Latent cache of its layers (the cluster's block count).
  /// Memory neither planned nor usable by the cache (blocks are the same count on every GPU,
  /// so GPUs with fewer layers or lighter weights keep some); negative when over capacity.
  std::int64_t unused_bytes = 0;
};

/// The answer.
struct deployment_plan {
  std::uint64_t parameters = 0;         ///< Parameters of the served layers, embedding and head.
  std::uint64_t weight_bytes = 0;       ///< Bytes of the tensors served (scales included).
  std::uint64_t skipped_bytes = 0;      ///< Checkpoint bytes not served (MTP layers).
  std::int64_t moe_layers = 0;          ///< Layers with routed experts.
  int expert_parallelism = 0;           ///< GPUs the routed experts are spread over.
  std::int64_t cache_bytes_per_token = 0;  ///< Latent cache of one token over every layer.
  std::string cache_dtype;              ///< What the cache stores its values as ("f32").
  std::int64_t activation_bytes_per_token = 0;  ///< Step workspace per token of the step.
  std::int64_t step_tokens = 0;         ///< The step's token budget planned for.
  std::int64_t cache_blocks = 0;        ///< Blocks every stage holds (0: the weights do not fit).
  std::int64_t cache_tokens = 0;        ///< Positions the cache holds: cache_blocks x block_tokens.
  std::int64_t needed_tokens = 0;       ///< context x concurrency.
  std::int64_t sequences_at_context = 0;  ///< Sequences of `context` tokens the cache holds.
  bool weights_fit = false;             ///< Weights, activations and headroom fit on every GPU.
  bool fits = false;                    ///< That, and the cache holds `concurrency` x `context`.
  std::string verdict;                  ///< One sentence: fits, or what is short and by how much.
  std::vector<gpu_plan> gpus;           ///< Node-major, `nodes x gpus_per_node` entries.
};

/// Plans `request`: layers split as evenly as possible over every GPU in pipeline order (node
/// by node; GPUs that also hold the embedding or the head get fewer when the split is uneven),
/// routed experts split contiguously over every GPU (the same ids in every MoE layer, as
/// Shoal's expert groups hold them), the rest of each GPU's memory after weights, step
/// workspace and headroom (1 GiB + 5%) given to the latent cache, whose block count is the
/// same in every stage. Throws `invalid_argument` for a request that cannot be planned (no
/// GPUs, more nodes than layers, a context beyond the model's positions).
deployment_plan plan_deployment(const deployment_request& request);

/// The plan as JSON: `fits`, `weights_fit`, `verdict`, the model and cache figures, `stages`
/// (layer ranges per node) and `gpus` (the memory breakdown of each).
std::string deployment_plan_to_json(const deployment_request& request, const deployment_plan& plan);

/// The plan as a table for people.
std::string deployment_plan_to_text(const deployment_request& request, const deployment_plan& plan);

/// How the nodes of a written cluster config are named and reached.
struct cluster_config_naming {
  std::string model_path;                    ///< `model:` of the config.
  std::string name_template = "node{i}";     ///< Node names; `{i}` is the node index.
  std::string host_template = "{name}";      ///< Hosts; `{i}` index, `{name}` the node's name.
  int port = 7610;                           ///< Port of every node (incremented per node when
                                             ///< the hosts do not differ).
  std::string admin_token_file;              ///< `admin_token_file:` when not empty.
  /// With two nodes or more, the second is the `standby:` head, so that the head's death
  /// costs a takeover of seconds instead of the cluster.
  bool standby = true;
};

/// A cluster config (YAML, `shoal node --config` / `shoal launch`) for the plan: one node per
/// machine with its GPUs as devices, one pipeline stage per node, one expert group per GPU,
/// and the cache block count. Throws `failed_precondition` when the weights do not fit.
std::string deployment_cluster_yaml(const deployment_request& request, const deployment_plan& plan,
                                    const cluster_config_naming& naming);

/// Parses a memory size with its unit: `80GiB`, `141GB`, `512MiB`, `1.5TiB` (B, kB/KB, MB,
/// GB, TB decimal; KiB, MiB, GiB, TiB binary; case-insensitive). Throws `invalid_argument`
/// naming `what` for a missing or unknown unit.
std::uint64_t parse_memory_size(std::string_view text, std::string_view what);

}  // namespace shoal::runtime
