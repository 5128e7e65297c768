// shoal plan: whether a model fits a set of GPU nodes and how it would be laid out on them,
// before the hardware is there (runtime/deployment_plan.hpp does the arithmetic).

#include "commands.hpp"

#include "shoal/base/error.hpp"
#include "shoal/runtime/deployment_plan.hpp"

#include <CLI/CLI.hpp>
#include <fmt/core.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>

namespace shoal::tools {
namespace {

struct plan_options {
  std::string model;
  std::string preset;
  int nodes = 1;
  int gpus_per_node = 8;
  std::string gpu_memory;
  std::string dtype;
  std::int64_t context = 32768;
  std::int64_t concurrency = 64;
  std::int64_t block_tokens = 32;
  std::int64_t step_tokens = 0;
  bool json = false;
  std::string write_config;
  std::string config_model;
  std::string node_name = "node{i}";
  std::string node_host = "{name}";
  int port = 7610;
  std::string admin_token_file;
  bool no_standby = false;
};

void run_plan(const plan_options& o) {
  runtime::deployment_request request;
  std::string model_path = o.config_model;
  if (!o.model.empty()) {
    if (!o.dtype.empty())
      fail(errc::invalid_argument, "--dtype applies to --preset; the weights of --model {} are what its files hold", o.model);
    request.model = config::load_model_config(o.model);
    request.tensors = runtime::tensors_of_checkpoint(o.model);
    if (model_path.empty()) model_path = std::filesystem::absolute(o.model).lexically_normal().string();
  } else {
    if (o.preset != "deepseek-v3") fail(errc::invalid_argument, "unknown --preset '{}' (known: deepseek-v3)", o.preset);
    request.model = runtime::deepseek_v3_config(o.dtype != "bf16");
    request.tensors = runtime::tensors_of_config(request.model);
    if (model_path.empty()) model_path = "/models/DeepSeek-V3";
  }
  request.nodes = o.nodes;
  request.gpus_per_node = o.gpus_per_node;
  request.gpu_memory_bytes = runtime::parse_memory_size(o.gpu_memory, "--gpu-mem");
  request.context = o.context;
  request.concurrency = o.concurrency;
  request.block_tokens = o.block_tokens;
  request.step_tokens = o.step_tokens;
  const auto plan = runtime::plan_deployment(request);

  if (!o.write_config.empty()) {
    runtime::cluster_config_naming naming{.model_path = model_path, .name_template = o.node_name,
                                          .host_template = o.node_host, .port = o.port,
                                          .admin_token_file = o.admin_token_file, .standby = !o.no_standby};
    const auto yaml = runtime::deployment_cluster_yaml(request, plan, naming);
    std::ofstream out(o.write_config);
    out << yaml;
    if (!out.flush()) fail(errc::invalid_argument, "--write-config {}: cannot write the file", o.write_config);
    std::fprintf(stderr, "wrote %s\n", o.write_config.c_str());
  }
  if (o.json)
    fmt::print("{}\n", runtime::deployment_plan_to_json(request, plan));
  else
    fmt::print("{}", runtime::deployment_plan_to_text(request, plan));
  std::fflush(stdout);
}

}  // namespace

void add_plan_command(CLI::App& app) {
  auto o = std::make_shared<plan_options>();
  auto* cmd = app.add_subcommand(
      "plan", "Whether a model fits N nodes of G GPUs, and how: pipeline stages, experts per GPU, each GPU's memory "
              "(weights, latent cache, step workspace, headroom) and the tokens the cache holds");
  auto* model = cmd->add_option("--model", o->model, "Checkpoint directory (config.json and safetensors headers are read)");
  auto* preset = cmd->add_option("--preset", o->preset, "Published shapes instead of a checkpoint: deepseek-v3");
  model->excludes(preset);
  preset->excludes(model);
  cmd->add_option("--nodes", o->nodes, "Machines (one Shoal node each)")->required()->check(CLI::Range(1, 4096));
  cmd->add_option("--gpus-per-node", o->gpus_per_node, "GPUs per machine")->required()->check(CLI::Range(1, 64));
  cmd->add_option("--gpu-mem", o->gpu_memory, "Memory of one GPU with its unit: 80GiB, 141GB")->required();
  cmd->add_option("--dtype", o->dtype, "Weights of --preset: fp8 (as published, the default) or bf16")
      ->check(CLI::IsMember({"fp8", "bf16"}));
  cmd->add_option("--context", o->context, "Tokens of one sequence (prompt and output)")
      ->capture_default_str()->check(CLI::Range(std::int64_t{1}, std::int64_t{1} << 24));
  cmd->add_option("--concurrency", o->concurrency, "Sequences of --context tokens the cache must hold at once")
      ->capture_default_str()->check(CLI::Range(std::int64_t{1}, std::int64_t{1} << 20));
  cmd->add_option("--block-tokens", o->block_tokens, "Positions per cache block")
      ->capture_default_str()->check(CLI::Range(1, 4096));
  cmd->add_option("--step-tokens", o->step_tokens, "Token budget of one step (default: max(256, concurrency))")
      ->check(CLI::Range(std::int64_t{1}, std::int64_t{1} << 20));
  cmd->add_flag("--json", o->json, "Print the plan as JSON (`fits`, `verdict`, `stages`, `gpus`, `cache`)");
  cmd->add_option("--write-config", o->write_config,
                  "Also write a cluster config (YAML) for the plan to this file (only when the weights fit)");
  cmd->add_option("--config-model", o->config_model,
                  "Checkpoint path the written config names (default: --model, or /models/DeepSeek-V3)");
  cmd->add_option("--node-name", o->node_name, "Node names of the written config; {i} is the node index")->capture_default_str();
  cmd->add_option("--node-host", o->node_host, "Hosts of the written config; {i} index, {name} the node's name")
      ->capture_default_str();
  cmd->add_option("--port", o->port, "Port of every node (one each, counting up, when the hosts are the same)")
      ->capture_default_str()->check(CLI::Range(1, 65535));
  cmd->add_option("--admin-token-file", o->admin_token_file, "admin_token_file of the written config");
  cmd->add_flag("--no-standby", o->no_standby,
                "Leave the written config without a standby head (by default the second node is the standby)");
  cmd->callback([o, model, preset] {
    if (model->count() == 0 && preset->count() == 0)
      fail(errc::invalid_argument, "give --model DIR or --preset deepseek-v3");
    run_plan(*o);
  });
}

}  // namespace shoal::tools
