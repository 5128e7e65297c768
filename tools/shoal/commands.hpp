#pragma once
// Each group of subcommands registers itself on the top-level CLI.

#include "shoal/actors/client.hpp"
#include "shoal/runtime/sampling.hpp"

#include <cstdint>
#include <memory>
#include <optional>
#include <utility>
#include <string>
#include <vector>

namespace CLI {
class App;
}

namespace shoal::runtime {
struct weights_key;
}

namespace shoal::tools {

/// make-model, eval, generate.
void add_model_commands(CLI::App& app);

/// bench: CPU model speed against the measured memory roofline.
void add_bench_command(CLI::App& app);

/// tokenize, detokenize, bench-tokenizer: the checkpoint's tokenizer.
void add_text_commands(CLI::App& app);

/// node, launch: run a cluster config as processes.
void add_cluster_commands(CLI::App& app);

/// serve, bench-serve: the OpenAI-compatible HTTP server and a load generator for it.
void add_serve_commands(CLI::App& app);

/// keys new, verify: API keys for serve, the checkpoint's SHA-256 manifest.
void add_security_commands(CLI::App& app);

/// admin: the operator's console; `admin plan` plans expert placement offline from a loads
/// file. Subcommands that talk to a running cluster are added to the same group.
void add_admin_commands(CLI::App& app);

/// plan: whether a model fits a set of GPU nodes, the layout and memory of each GPU, and
/// optionally a cluster config for it.
void add_plan_command(CLI::App& app);

/// HOST:PORT of a running cluster's head node, or nothing when `spec` is not one (a file of
/// that name is a config, not an address).
std::optional<std::pair<std::string, std::uint16_t>> head_address(const std::string& spec);
/// HOST:PORT[,HOST:PORT]: a running cluster's head and its standby; nothing when `spec` is not that.
std::optional<std::vector<head_endpoint>> head_addresses(const std::string& spec);

/// Adds `--key-file` to a command that loads a checkpoint's weights.
void add_weights_key_option(CLI::App& cmd, std::string& file);

/// The key of weights encrypted with `encrypt-weights`: that of `file` when given, else of the
/// file $SHOAL_WEIGHTS_KEY_FILE names, else none (null). A key is only ever read from a file.
std::shared_ptr<const runtime::weights_key> weights_key_from(const std::string& file);

/// The path of the weights key file `weights_key_from` would read ("" for none), to hand to
/// node processes.
std::string weights_key_path(const std::string& file);

/// Adds `--join-secret-file` to a command that connects to a running cluster by HOST:PORT.
void add_join_secret_option(CLI::App& cmd, std::string& file);

/// The join secret to connect to a running cluster with: that of `file` when given, else of
/// the file $SHOAL_JOIN_SECRET_FILE names, else none ("").
std::string join_secret_from(const std::string& file);

/// `bench --cluster CONFIG`: decode on one process vs. the config's nodes started on this
/// machine, same run, and what each network leg of a step costs.
struct bench_cluster_options {
  std::string config;
  std::string transports;
  int prompt_tokens = 16;
  int decode_tokens = 32;
  bool json = false;
  std::string key_file;  ///< Weights key file ("" : $SHOAL_WEIGHTS_KEY_FILE or none).
};
void bench_cluster(const bench_cluster_options& options);

/// `generate --cluster HOST:PORT --tokens IDS`: generation on a running cluster, greedy or
/// sampled as `sampling` says (already validated; the same choices as in one process for the
/// same seed).
void generate_on_cluster(const std::string& address, const std::string& tokens, int max_new_tokens,
                         const runtime::sampling_params& sampling, bool json, const std::string& join_secret);

}  // namespace shoal::tools
