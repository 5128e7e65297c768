// make-model, eval and generate: the single-process model from the command line.

#include "commands.hpp"

#include "shoal/base/error.hpp"
#include "shoal/kernels/thread_pool.hpp"
#include "shoal/runtime/make_model.hpp"
#include "shoal/runtime/model.hpp"
#include "shoal/runtime/weights.hpp"

#include <CLI/CLI.hpp>
#include <fmt/core.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

namespace shoal::tools {
namespace {

using clock_type = std::chrono::steady_clock;

double seconds_since(clock_type::time_point start) {
  return std::chrono::duration<double>(clock_type::now() - start).count();
}

std::vector<std::int32_t> parse_token_list(const std::string& text) {
  std::vector<std::int32_t> tokens;
  std::size_t pos = 0;
  while (pos <= text.size()) {
    const std::size_t comma = text.find(',', pos);
    const std::string item = text.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
    try {
      std::size_t used = 0;
      const long long value = std::stoll(item, &used);
      if (used != item.size() || value < 0 || value > INT32_MAX) throw std::invalid_argument(item);
      tokens.push_back(static_cast<std::int32_t>(value));
    } catch (const std::exception&) {
      shoal::fail(errc::invalid_argument, "--tokens: '{}' is not a token id (expected e.g. 0,17,5)", item);
    }
    if (comma == std::string::npos) break;
    pos = comma + 1;
  }
  if (tokens.empty()) shoal::fail(errc::invalid_argument, "--tokens: no token ids given");
  return tokens;
}

struct model_options {
  std::string dir;
  int threads = 0;
  bool reference = false;
  bool mapped = false;
  bool quiet = false;
};

void add_model_options(CLI::App* cmd, model_options& o) {
  cmd->add_option("--model", o.dir, "Checkpoint directory (config.json + safetensors)")->required();
  cmd->add_option("--threads", o.threads, "Worker threads (0: one per core)");
  cmd->add_flag("--reference", o.reference, "Use the plain reference kernels (slow; for checking)");
  cmd->add_flag("--mmap", o.mapped, "Leave weights memory-mapped instead of copying them into memory");
  cmd->add_flag("--quiet", o.quiet, "No progress output on stderr");
}

struct loaded_model {
  std::unique_ptr<runtime::model_weights> weights;
  std::unique_ptr<kernels::thread_pool> pool;
  std::unique_ptr<runtime::model> net;
};

loaded_model load(const model_options& o) {
  const auto start = clock_type::now();
  auto progress = [&](const std::string& line) {
    if (!o.quiet) fmt::print(stderr, "[load] {}\n", line);
  };
  loaded_model m;
  m.weights = runtime::model_weights::load(o.dir, {},
                                           o.mapped ? runtime::weight_residency::mapped : runtime::weight_residency::copy,
                                           progress);
  for (const auto& key : m.weights->config().ignored_keys)
    progress(fmt::format("config.json: key '{}' is not used by Shoal", key));
  m.pool = std::make_unique<kernels::thread_pool>(o.threads);
  m.net = std::make_unique<runtime::model>(*m.weights, *m.pool,
                                           o.reference ? runtime::kernel_mode::reference : runtime::kernel_mode::optimized);
  progress(fmt::format("model ready in {:.2f} s ({} layers, {:.1f} MB of weights in memory, {} threads)",
                       seconds_since(start), m.weights->config().num_hidden_layers,
                       static_cast<double>(m.weights->resident_bytes()) / 1e6, m.pool->size()));
  return m;
}

void add_make_model(CLI::App& app) {
  struct options {
    std::string preset = "tiny";
    std::string out;
    bool fp8 = false;
    std::uint64_t seed = 0;
  };
  auto o = std::make_shared<options>();
  auto* cmd = app.add_subcommand("make-model", "Write a deterministic random DeepSeek-V3 checkpoint");
  cmd->add_option("--preset", o->preset, "tiny | bench-small")->capture_default_str();
  cmd->add_option("--out", o->out, "Output directory")->required();
  cmd->add_flag("--fp8", o->fp8, "Block-quantize projections to FP8 E4M3 with 128x128 scales");
  cmd->add_option("--seed", o->seed, "Random seed")->capture_default_str();
  cmd->callback([o] {
    const auto start = clock_type::now();
    const auto config = runtime::model_preset(o->preset, o->fp8);
    runtime::write_random_model(config, o->out, o->seed,
                                [](const std::string& line) { fmt::print(stderr, "[make-model] {}\n", line); });
    fmt::print(stderr, "[make-model] {} model written to {} in {:.1f} s\n", o->preset, o->out, seconds_since(start));
  });
}

void add_eval(CLI::App& app) {
  struct options {
    model_options model;
    std::string tokens;
    bool all_positions = false;
    bool json = false;
  };
  auto o = std::make_shared<options>();
  auto* cmd = app.add_subcommand("eval", "Print the logits of a token sequence");
  add_model_options(cmd, o->model);
  cmd->add_option("--tokens", o->tokens, "Comma-separated token ids, e.g. 0,17,5")->required();
  cmd->add_flag("--all-positions", o->all_positions, "Logits for every position, not only the last");
  cmd->add_flag("--json", o->json, "Print {\"logits\": [[...], ...]}");
  cmd->callback([o] {
    const auto tokens = parse_token_list(o->tokens);
    auto m = load(o->model);
    runtime::latent_cache cache(m.net->config(), static_cast<std::int64_t>(tokens.size()));
    const runtime::sequence_step step{&cache, tokens};
    const auto start = clock_type::now();
    const auto logits = m.net->forward(std::span(&step, 1), o->all_positions);
    const double elapsed = seconds_since(start);
    const auto vocab = m.net->config().vocab_size;
    const auto rows = static_cast<std::int64_t>(logits.size()) / vocab;
    if (!o->model.quiet)
      fmt::print(stderr, "[eval] {} tokens in {:.3f} s ({:.1f} tokens/s)\n", tokens.size(), elapsed,
                 static_cast<double>(tokens.size()) / elapsed);
    if (o->json) {
      nlohmann::json out;
      auto& rows_json = out["logits"] = nlohmann::json::array();
      for (std::int64_t r = 0; r < rows; ++r)
        rows_json.push_back(std::vector<float>(logits.begin() + r * vocab, logits.begin() + (r + 1) * vocab));
      fmt::print("{}\n", out.dump());
    } else {
      for (std::int64_t r = 0; r < rows; ++r) {
        const std::span<const float> row(logits.data() + r * vocab, vocab);
        const auto best = runtime::argmax(row);
        fmt::print("position {}: argmax {} (logit {:.6f})\n",
                   o->all_positions ? r : static_cast<std::int64_t>(tokens.size()) - 1, best, row[best]);
      }
    }
  });
}

void add_generate(CLI::App& app) {
  struct options {
    model_options model;
    std::string tokens;
    int max_new_tokens = 16;
    double temperature = 0.0;
    bool json = false;
  };
  auto o = std::make_shared<options>();
  auto* cmd = app.add_subcommand("generate", "Continue a token sequence (greedy, with the latent KV cache)");
  add_model_options(cmd, o->model);
  cmd->add_option("--tokens", o->tokens, "Comma-separated prompt token ids")->required();
  cmd->add_option("--max-new-tokens", o->max_new_tokens, "Tokens to generate")->capture_default_str()->check(CLI::Range(1, 1 << 20));
  cmd->add_option("--temperature", o->temperature, "0: greedy")->capture_default_str()->check(CLI::Range(0.0, 100.0));
  cmd->add_flag("--json", o->json, "Print {\"tokens\": [...]}");
  cmd->callback([o] {
    if (o->temperature != 0.0)
      shoal::fail(errc::invalid_argument, "--temperature {}: token-id generation is greedy only; use 0", o->temperature);
    const auto prompt = parse_token_list(o->tokens);
    auto m = load(o->model);
    const auto& config = m.net->config();
    const std::int64_t capacity = static_cast<std::int64_t>(prompt.size()) + o->max_new_tokens;
    if (capacity > config.max_position_embeddings)
      shoal::fail(errc::invalid_argument, "prompt ({}) + --max-new-tokens ({}) exceeds the model's context of {}",
                  prompt.size(), o->max_new_tokens, config.max_position_embeddings);
    runtime::latent_cache cache(config, capacity);
    std::vector<std::int32_t> generated;
    auto start = clock_type::now();
    runtime::sequence_step step{&cache, prompt};
    auto logits = m.net->forward(std::span(&step, 1));
    const double prefill_seconds = seconds_since(start);
    generated.push_back(runtime::argmax(logits));
    start = clock_type::now();
    while (static_cast<int>(generated.size()) < o->max_new_tokens) {
      step.tokens = std::span(&generated.back(), 1);
      logits = m.net->forward(std::span(&step, 1));
      generated.push_back(runtime::argmax(logits));
    }
    const double decode_seconds = seconds_since(start);
    if (!o->model.quiet) {
      fmt::print(stderr, "[generate] prefill {} tokens in {:.3f} s ({:.1f} tokens/s)\n", prompt.size(),
                 prefill_seconds, static_cast<double>(prompt.size()) / prefill_seconds);
      if (generated.size() > 1)
        fmt::print(stderr, "[generate] decoded {} tokens in {:.3f} s ({:.1f} tokens/s)\n", generated.size() - 1,
                   decode_seconds, static_cast<double>(generated.size() - 1) / decode_seconds);
    }
    if (o->json)
      fmt::print("{}\n", nlohmann::json{{"tokens", generated}}.dump());
    else
      fmt::print("{}\n", fmt::join(generated, ","));
  });
}

}  // namespace

void add_model_commands(CLI::App& app) {
  add_make_model(app);
  add_eval(app);
  add_generate(app);
}

}  // namespace shoal::tools
