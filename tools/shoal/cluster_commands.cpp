// node and launch: running a cluster config as processes.

#include "commands.hpp"
#include "cluster_launch.hpp"
#include "stop_signals.hpp"

#include "shoal/actors/client.hpp"
#include "shoal/actors/node_process.hpp"
#include "shoal/base/error.hpp"
#include "shoal/config/cluster_config.hpp"
#include "shoal/kernels/thread_pool.hpp"
#include "shoal/runtime/model.hpp"
#include "shoal/runtime/weights.hpp"

#include <CLI/CLI.hpp>
#include <fmt/core.h>
#include <nlohmann/json.hpp>

#include <charconv>
#include <csignal>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <fcntl.h>
#include <pthread.h>
#include <poll.h>
#include <sys/wait.h>
#include <unistd.h>

namespace shoal::tools {
namespace {

using clock_type = std::chrono::steady_clock;

struct timeout_options {
  int ready_s = 0;
  int step_s = 60;
  int expert_s = 30;
};

void add_timeout_options(CLI::App* cmd, timeout_options& t) {
  cmd->add_option("--ready-timeout", t.ready_s, "Seconds to wait for every node to join and load (0: the config's)")
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--step-timeout", t.step_s, "Seconds one pipeline step may take")->capture_default_str()->check(CLI::PositiveNumber);
  cmd->add_option("--expert-timeout", t.expert_s, "Seconds one expert round trip may take")
      ->capture_default_str()->check(CLI::PositiveNumber);
}

actors::cluster_options to_cluster_options(const timeout_options& t, const config::cluster_config& c) {
  return {.ready_timeout = std::chrono::seconds(t.ready_s > 0 ? t.ready_s : c.ready_timeout_s),
          .step_timeout = std::chrono::seconds(t.step_s), .expert_timeout = std::chrono::seconds(t.expert_s),
          .scheduler_threads = 2};
}

void add_node(CLI::App& app) {
  struct options {
    std::string config;
    std::string name;
    std::string model;
    std::string transports;
    std::string key_file;
    timeout_options timeouts;
  };
  auto o = std::make_shared<options>();
  auto* cmd = app.add_subcommand("node", "Run one node of a cluster config (until SIGINT/SIGTERM)");
  add_weights_key_option(*cmd, o->key_file);
  cmd->add_option("--config", o->config, "Cluster config (YAML)")->required();
  cmd->add_option("--name", o->name, "Which node of the config this process is")->required();
  cmd->add_option("--model", o->model, "Checkpoint directory on this machine, if not the config's");
  cmd->add_option("--transports", o->transports, "UCX transports, e.g. tcp or sm,self,tcp (default: UCX's)");
  add_timeout_options(cmd, o->timeouts);
  cmd->callback([o] {
    const auto signals = block_stop_signals();
    auto cluster = config::load_cluster_config(o->config);
    const auto timeouts = to_cluster_options(o->timeouts, cluster);
    const auto* spec = cluster.find_node(o->name);
    // Membership events go to stdout as JSON lines (the launcher restarts nodes on them) and
    // to stderr for people.
    auto on_event = [name = o->name](const std::string& event) {
      fmt::print("{}\n", event);
      std::fflush(stdout);
      fmt::print(stderr, "[node {}] {}\n", name, event);
    };
    actors::node_process node({.cluster = cluster, .node = o->name, .timeouts = timeouts,
                               .transports = o->transports, .model_override = o->model,
                               .key = weights_key_from(o->key_file), .on_event = on_event});
    fmt::print(stderr, "[node {}] listening on {}:{}{}\n", o->name, spec->host, spec->port,
               node.is_head() ? " (head: supervisor and router)" : "");
    if (node.is_head()) {
      const auto table = node.wait_ready();
      // One line on stdout that `shoal launch` (and scripts) wait for.
      fmt::print("{}\n", nlohmann::json{{"ready", true}, {"connect", fmt::format("{}:{}", spec->host, spec->port)},
                                        {"epoch", table.epoch}, {"stages", table.stages.size()},
                                        {"expert_actors", table.experts.size()}}
                             .dump());
      std::fflush(stdout);
    }
    while (true) {
      if (const int sig = wait_stop_signal(signals, std::chrono::milliseconds(200))) {
        fmt::print(stderr, "[node {}] {}: stopping\n", o->name, sig == SIGINT ? "SIGINT" : "SIGTERM");
        break;
      }
      if (!node.watch()) break;  // it said why
    }
  });
}

void add_launch(CLI::App& app) {
  struct options {
    std::string config;
    std::string transports;
    std::string key_file;
    timeout_options timeouts;
  };
  auto o = std::make_shared<options>();
  auto* cmd = app.add_subcommand("launch", "Start every node of a cluster config, wait until it serves, stop all on Ctrl-C");
  add_weights_key_option(*cmd, o->key_file);
  cmd->add_option("config", o->config, "Cluster config (YAML)")->required();
  cmd->add_option("--transports", o->transports, "UCX transports for every node, e.g. tcp");
  add_timeout_options(cmd, o->timeouts);
  cmd->callback([o] {
    const auto signals = block_stop_signals();
    auto cluster = config::load_cluster_config(o->config);
    const auto timeouts = to_cluster_options(o->timeouts, cluster);
    std::vector<std::string> extra{"--ready-timeout", std::to_string(timeouts.ready_timeout.count() / 1000),
                                   "--step-timeout", std::to_string(o->timeouts.step_s), "--expert-timeout",
                                   std::to_string(o->timeouts.expert_s)};
    // Nodes get the key file's path (never the key); read here first so that a bad one
    // stops nothing.
    if (const auto key_path = weights_key_path(o->key_file); !key_path.empty()) {
      (void)runtime::read_weights_key(key_path);
      extra.push_back("--key-file");
      extra.push_back(std::filesystem::absolute(key_path).string());
    }
    if (!o->transports.empty()) {
      extra.push_back("--transports");
      extra.push_back(o->transports);
    }
    std::optional<launched_cluster> nodes;
    try {
      nodes.emplace(cluster, launched_cluster::settings{
                                 .config_path = std::filesystem::absolute(o->config).string(),
                                 .node_arguments = extra,
                                 .ready_timeout = std::chrono::duration_cast<std::chrono::seconds>(timeouts.ready_timeout),
                                 .interrupted = [&signals] { return wait_stop_signal(signals, std::chrono::milliseconds(0)) != 0; },
                                 .log_prefix = "[launch]",
                                 .restart_limit = cluster.restart_limit,
                                 .restart_window = std::chrono::seconds(cluster.restart_window_s)});
    } catch (const shoal::error& e) {
      if (e.code() != errc::cancelled) throw;
      fmt::print(stderr, "[launch] interrupted before the cluster was ready; stopped all nodes\n");
      return;
    }
    const auto info = nlohmann::json::parse(nodes->ready_line());
    fmt::print("{}\n", info.dump());
    std::fflush(stdout);
    fmt::print(stderr,
               "[launch] cluster ready: connect with `shoal generate --cluster {0} --tokens ...` or serve it over HTTP "
               "with `shoal serve --cluster {0} --model DIR`; Ctrl-C stops all nodes\n",
               info["connect"].get<std::string>());
    std::optional<std::pair<std::string, int>> dead;
    while (true) {
      if (wait_stop_signal(signals, std::chrono::milliseconds(200))) break;
      if ((dead = nodes->exited_node())) {
        // A stop signal may reach the nodes too (a service manager that signals every process
        // of the unit): a node that stopped on it is not a failure.
        if (wait_stop_signal(signals, std::chrono::milliseconds(0))) {
          dead.reset();
          break;
        }
        fmt::print(stderr, "[launch] the head node {} exited (status {}): the cluster cannot serve without it; stopping it\n",
                   dead->first, dead->second);
        break;
      }
    }
    nodes->stop();
    fmt::print(stderr, "[launch] all nodes stopped\n");
    // Only Ctrl-C or SIGTERM is a success; a node that exited on its own is a failure.
    if (dead)
      shoal::fail(errc::unavailable, "the head node {} of {} exited (status {}); stopped the cluster", dead->first,
                  o->config, dead->second);
  });
}

}  // namespace

void bench_cluster(const bench_cluster_options& o) {
    const auto signals = block_stop_signals();
    (void)signals;
    timeout_options timeout_settings;
    auto cluster = config::load_cluster_config(o.config);
    const auto timeouts = to_cluster_options(timeout_settings, cluster);
    std::vector<std::int32_t> prompt;
    for (int i = 0; i < o.prompt_tokens; ++i) prompt.push_back((i * 37 + 11) % 1000);

    // One process, same kernels and thread count as each cluster actor.
    auto weights = runtime::model_weights::load(cluster.model, {}, runtime::weight_residency::copy, {},
                                                weights_key_from(o.key_file).get());
    const auto& model = weights->config();
    config::validate_against_model(cluster, model);
    for (auto& t : prompt) t %= static_cast<std::int32_t>(model.vocab_size);
    kernels::thread_pool pool(cluster.threads);
    runtime::model net(*weights, pool);
    runtime::latent_cache cache(model, static_cast<std::int64_t>(prompt.size()) + o.decode_tokens + 1);
    runtime::sequence_step step{&cache, prompt};
    auto logits = net.forward(std::span(&step, 1));
    std::vector<std::int32_t> single{runtime::argmax(logits)};
    const auto single_start = clock_type::now();
    for (int i = 0; i < o.decode_tokens; ++i) {
      step.tokens = std::span(&single.back(), 1);
      logits = net.forward(std::span(&step, 1));
      single.push_back(runtime::argmax(logits));
    }
    const double single_s = std::chrono::duration<double>(clock_type::now() - single_start).count();

    // The cluster, as processes on this machine.
    std::vector<std::string> extra{"--ready-timeout", std::to_string(timeouts.ready_timeout.count() / 1000)};
    if (const auto key_path = weights_key_path(o.key_file); !key_path.empty()) {
      extra.push_back("--key-file");
      extra.push_back(std::filesystem::absolute(key_path).string());
    }
    if (!o.transports.empty()) {
      extra.push_back("--transports");
      extra.push_back(o.transports);
    }
    launched_cluster nodes(cluster, {.config_path = std::filesystem::absolute(o.config).string(),
                                     .node_arguments = extra,
                                     .ready_timeout = std::chrono::duration_cast<std::chrono::seconds>(timeouts.ready_timeout),
                                     .interrupted = {},
                                     .log_prefix = "[bench]"});
    auto client = client::connect(nodes.host(), nodes.port(), std::chrono::seconds(10),
                                  cluster.join_secret_file.empty() ? std::string() : read_join_secret(cluster.join_secret_file));
    generate_options request;
    request.prompt = prompt;
    request.max_tokens = static_cast<std::uint32_t>(o.decode_tokens + 1);
    const auto id = client->submit(request);
    std::vector<std::int32_t> distributed;
    clock_type::time_point first_token;
    while (true) {
      auto chunk = client->next(id, timeouts.step_timeout);
      if (!chunk) shoal::fail(errc::deadline_exceeded, "no token from the cluster for {} s", timeouts.step_timeout.count() / 1000);
      if (chunk->finish == actors::finish_reason::error) throw shoal::error(static_cast<errc>(chunk->error_code), chunk->error);
      if (distributed.empty()) first_token = clock_type::now();
      distributed.insert(distributed.end(), chunk->tokens.begin(), chunk->tokens.end());
      if (chunk->finish != actors::finish_reason::none) break;
    }
    const double cluster_s = std::chrono::duration<double>(clock_type::now() - first_token).count();

    // Sequential network legs of one decode step: the step from the router's node through
    // every stage, the sampled tokens from the last stage straight back to the router, and one
    // dispatch/combine round per MoE layer held by a stage whose expert actors are remote
    // (groups are asked in parallel: one round).
    std::int64_t moe_layers = 0;
    for (std::int64_t l = 0; l < model.num_hidden_layers; ++l) moe_layers += model.is_moe_layer(l) ? 1 : 0;
    std::int64_t legs = cluster.expert_groups.empty() ? 0 : 2 * moe_layers;
    std::string at = cluster.head;
    for (const auto& stage : cluster.stages) {
      if (stage.node != at) ++legs;
      at = stage.node;
    }
    if (at != cluster.head) ++legs;
    const double single_step = single_s / o.decode_tokens, cluster_step = cluster_s / o.decode_tokens;
    nlohmann::json out{{"decode_tokens", o.decode_tokens},
                       {"single_process_tokens_per_s", o.decode_tokens / single_s},
                       {"cluster_tokens_per_s", o.decode_tokens / cluster_s},
                       {"single_process_step_ms", single_step * 1e3},
                       {"cluster_step_ms", cluster_step * 1e3},
                       {"messaging_ms_per_step", (cluster_step - single_step) * 1e3},
                       {"network_legs_per_step", legs},
                       {"messaging_us_per_leg", legs ? (cluster_step - single_step) * 1e6 / static_cast<double>(legs) : 0.0},
                       {"same_tokens", distributed == single},
                       {"nodes", cluster.nodes.size()}};
    if (o.json) {
      fmt::print("{}\n", out.dump());
    } else {
      fmt::print("{:<28} {:>10} {:>10}\n", "decode (batch 1)", "tokens/s", "ms/step");
      fmt::print("{:<28} {:>10.1f} {:>10.3f}\n", "one process", o.decode_tokens / single_s, single_step * 1e3);
      fmt::print("{:<28} {:>10.1f} {:>10.3f}\n", fmt::format("cluster, {} processes", cluster.nodes.size()),
                 o.decode_tokens / cluster_s, cluster_step * 1e3);
      fmt::print("cluster / one process: {:.2f}x the tokens/s\n", single_s / cluster_s);
      fmt::print("distribution: {:.3f} ms per step over {} sequential network legs, ~{:.0f} us per leg "
                 "(derived from the step times)\n",
                 (cluster_step - single_step) * 1e3, legs,
                 legs ? (cluster_step - single_step) * 1e6 / static_cast<double>(legs) : 0.0);
      fmt::print("generated tokens: {}\n", distributed == single ? "identical" : "DIFFERENT (a bug: please report it)");
    }
}

void add_weights_key_option(CLI::App& cmd, std::string& file) {
  cmd.add_option("--key-file", file,
                 "Key of weights encrypted with `shoal encrypt-weights` (64 hex characters, mode 0600; default: "
                 "$SHOAL_WEIGHTS_KEY_FILE)");
}

std::string weights_key_path(const std::string& file) {
  if (!file.empty()) return file;
  const char* env = std::getenv("SHOAL_WEIGHTS_KEY_FILE");
  return env ? std::string(env) : std::string();
}

std::shared_ptr<const runtime::weights_key> weights_key_from(const std::string& file) {
  const auto path = weights_key_path(file);
  if (path.empty()) return nullptr;
  return std::make_shared<const runtime::weights_key>(runtime::read_weights_key(path));
}

void add_join_secret_option(CLI::App& cmd, std::string& file) {
  cmd.add_option("--join-secret-file", file,
                 "The cluster's join secret file, when its config sets join_secret_file (default: "
                 "$SHOAL_JOIN_SECRET_FILE)");
}

std::string join_secret_from(const std::string& file) {
  std::string path = file;
  if (path.empty())
    if (const char* env = std::getenv("SHOAL_JOIN_SECRET_FILE")) path = env;
  return path.empty() ? std::string() : read_join_secret(path);
}

void generate_on_cluster(const std::string& address, const std::string& tokens, int max_new_tokens,
                         const runtime::sampling_params& sampling, bool json, const std::string& join_secret) {
  const auto head = config::parse_host_port(address);
  if (!head) shoal::fail(errc::invalid_argument, "--cluster '{}': expected HOST:PORT, e.g. 127.0.0.1:7610", address);
  if (tokens.empty()) shoal::fail(errc::invalid_argument, "--cluster with token ids needs --tokens IDS");
  generate_options request;
  for (std::size_t pos = 0; pos <= tokens.size();) {
    const auto comma = std::min(tokens.find(',', pos), tokens.size());
    int value = -1;
    const auto r = std::from_chars(tokens.data() + pos, tokens.data() + comma, value);
    if (r.ec != std::errc() || r.ptr != tokens.data() + comma || value < 0)
      shoal::fail(errc::invalid_argument, "--tokens: '{}' is not a token id (expected e.g. 0,17,5)",
                  tokens.substr(pos, comma - pos));
    request.prompt.push_back(value);
    pos = comma + 1;
  }
  request.max_tokens = static_cast<std::uint32_t>(max_new_tokens > 0 ? max_new_tokens : 16);
  request.sampling = to_sampling_options(sampling);
  auto client = client::connect(head->first, head->second, std::chrono::seconds(10), join_secret);
  const auto start = clock_type::now();
  const auto id = client->submit(request);
  std::vector<std::int32_t> generated;
  while (true) {
    auto chunk = client->next(id, std::chrono::seconds(120));
    if (!chunk)
      shoal::fail(errc::deadline_exceeded, "no tokens from the cluster at {} for 120 s ({} tokens so far)", address,
                  generated.size());
    if (chunk->finish == actors::finish_reason::error) throw shoal::error(static_cast<errc>(chunk->error_code), chunk->error);
    for (auto t : chunk->tokens) {
      generated.push_back(t);
      if (!json) fmt::print("{}{}", generated.size() > 1 ? "," : "", t);
    }
    std::fflush(stdout);
    if (chunk->finish != actors::finish_reason::none) break;
  }
  const double seconds = std::chrono::duration<double>(clock_type::now() - start).count();
  if (json)
    fmt::print("{}\n", nlohmann::json{{"tokens", generated}}.dump());
  else
    fmt::print("\n");
  fmt::print(stderr, "[generate] {} tokens from the cluster at {} in {:.3f} s\n", generated.size(), address, seconds);
}

void add_cluster_commands(CLI::App& app) {
  add_node(app);
  add_launch(app);
}

}  // namespace shoal::tools
