// make-model, eval and generate: the single-process model from the command line.

#include "commands.hpp"

#include "shoal/base/error.hpp"
#include "shoal/kernels/thread_pool.hpp"
#include "shoal/runtime/chat_template.hpp"
#include "shoal/runtime/completion.hpp"
#include "shoal/runtime/embedded_tokenizer.hpp"
#include "shoal/runtime/make_model.hpp"
#include "shoal/runtime/model.hpp"
#include "shoal/runtime/reasoning.hpp"
#include "shoal/runtime/sampling.hpp"
#include "shoal/runtime/tokenizer.hpp"
#include "shoal/runtime/weights.hpp"

#include <CLI/CLI.hpp>
#include <fmt/core.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>
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
  std::string key_file;
  int threads = 0;
  bool reference = false;
  bool mapped = false;
  bool quiet = false;
};

void add_model_options(CLI::App* cmd, model_options& o) {
  cmd->add_option("--model", o.dir, "Checkpoint directory (config.json + safetensors)")->required();
  add_weights_key_option(*cmd, o.key_file);
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
                                           progress, weights_key_from(o.key_file).get());
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
    // The presets use DeepSeek-V3's vocabulary, so the checkpoint gets its tokenizer and text works.
    runtime::write_deepseek_v3_tokenizer(o->out);
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

struct generate_options {
  model_options model;
  std::string tokens;
  std::string prompt;
  std::string chat;
  std::string messages_file;
  std::string system;
  int max_new_tokens = 0;  // 0: the mode's default
  runtime::sampling_params sampling;
  std::uint64_t seed = 0;
  bool seeded = false;
  std::vector<std::string> stop;
  bool ignore_eos = false;
  bool hide_reasoning = false;
  bool json = false;
};

// Token ids in, token ids out: the mode golden tests use; greedy unless sampling is asked for.
void generate_tokens(const generate_options& o) {
  if (!o.stop.empty()) shoal::fail(errc::invalid_argument, "--stop needs text: use --prompt or --chat instead of --tokens");
  const auto prompt = parse_token_list(o.tokens);
  const int max_new_tokens = o.max_new_tokens > 0 ? o.max_new_tokens : 16;
  auto m = load(o.model);
  const auto& config = m.net->config();
  const std::int64_t capacity = static_cast<std::int64_t>(prompt.size()) + max_new_tokens;
  if (capacity > config.max_position_embeddings)
    shoal::fail(errc::invalid_argument, "prompt ({}) + --max-new-tokens ({}) exceeds the model's context of {}",
                prompt.size(), max_new_tokens, config.max_position_embeddings);
  runtime::sampler sampler(o.sampling, prompt);
  runtime::latent_cache cache(config, capacity);
  std::vector<std::int32_t> generated;
  auto start = clock_type::now();
  runtime::sequence_step step{&cache, prompt};
  auto logits = m.net->forward(std::span(&step, 1));
  const double prefill_seconds = seconds_since(start);
  generated.push_back(sampler.sample(logits));
  start = clock_type::now();
  while (static_cast<int>(generated.size()) < max_new_tokens) {
    step.tokens = std::span(&generated.back(), 1);
    logits = m.net->forward(std::span(&step, 1));
    generated.push_back(sampler.sample(logits));
  }
  const double decode_seconds = seconds_since(start);
  if (!o.model.quiet) {
    fmt::print(stderr, "[generate] prefill {} tokens in {:.3f} s ({:.1f} tokens/s)\n", prompt.size(),
               prefill_seconds, static_cast<double>(prompt.size()) / prefill_seconds);
    if (generated.size() > 1)
      fmt::print(stderr, "[generate] decoded {} tokens in {:.3f} s ({:.1f} tokens/s)\n", generated.size() - 1,
                 decode_seconds, static_cast<double>(generated.size() - 1) / decode_seconds);
  }
  if (o.json)
    fmt::print("{}\n", nlohmann::json{{"tokens", generated}}.dump());
  else
    fmt::print("{}\n", fmt::join(generated, ","));
}

// Text in, text out, streamed as it is produced. With --chat, R1-style reasoning goes to
// stderr (dimmed on a terminal) so that stdout carries only the answer.
void generate_text(const generate_options& o, bool chat) {
  const auto tok = runtime::tokenizer::load(o.model.dir);  // before the weights: fail fast
  std::vector<runtime::token_id> prompt;
  std::string prompt_text;
  if (chat) {
    std::vector<runtime::chat_message> messages;
    if (!o.messages_file.empty()) {
      std::ostringstream text;
      if (o.messages_file == "-") {
        text << std::cin.rdbuf();
      } else {
        std::ifstream in(o.messages_file, std::ios::binary);
        if (!in) shoal::fail(errc::not_found, "--messages {}: cannot open", o.messages_file);
        text << in.rdbuf();
      }
      messages = runtime::parse_chat_messages(text.str());
    } else {
      if (!o.system.empty()) messages.push_back({"system", o.system, {}});
      messages.push_back({"user", o.chat, {}});
    }
    prompt_text = runtime::chat_template::for_tokenizer(tok).render(messages, /*add_generation_prompt=*/true);
  } else {
    prompt_text = o.prompt;
    if (tok.add_bos_token() && tok.bos_id()) prompt.push_back(*tok.bos_id());
  }
  tok.encode_into(prompt_text, prompt);
  if (prompt.empty()) shoal::fail(errc::invalid_argument, "the prompt is empty");

  auto m = load(o.model);
  const auto& config = m.net->config();
  for (const auto id : prompt)
    if (id >= config.vocab_size)
      shoal::fail(errc::failed_precondition, "the tokenizer's id {} is outside the model's vocabulary ({} ids); "
                  "tokenizer.json does not belong to this checkpoint", id, config.vocab_size);
  const auto prompt_tokens = static_cast<std::int64_t>(prompt.size());
  if (prompt_tokens >= config.max_position_embeddings)
    shoal::fail(errc::invalid_argument, "the prompt has {} tokens; the model's context is {}", prompt_tokens,
                config.max_position_embeddings);
  std::int64_t max_new_tokens = o.max_new_tokens > 0 ? o.max_new_tokens : 256;
  if (prompt_tokens + max_new_tokens > config.max_position_embeddings) {
    max_new_tokens = config.max_position_embeddings - prompt_tokens;
    if (!o.model.quiet)
      fmt::print(stderr, "[generate] generating at most {} tokens: the model's context is {}\n", max_new_tokens,
                 config.max_position_embeddings);
  }

  runtime::sampling_params params = o.sampling;
  if (o.seeded) params.seed = o.seed;
  runtime::sampler sampler(params, prompt, std::min<std::int64_t>(tok.id_limit(), config.vocab_size));
  runtime::completion_limits limits;
  limits.max_tokens = max_new_tokens;
  limits.stop = o.stop;
  if (!o.ignore_eos && tok.eos_id()) limits.stop_token_ids.push_back(*tok.eos_id());
  runtime::completion_stream stream(tok, limits);
  const bool opened_think = runtime::prompt_opens_reasoning(prompt_text);
  runtime::reasoning_parser reasoning(opened_think);
  std::string content, reasoning_text;
  const bool dim = isatty(fileno(stderr)) != 0;
  bool reasoning_shown = false;
  auto show = [&](const runtime::reasoning_split& part) {
    content += part.content;
    reasoning_text += part.reasoning;
    if (o.json) return;
    if (!part.reasoning.empty() && !o.hide_reasoning) {
      fmt::print(stderr, "{}{}{}", dim ? "\x1b[2m" : "", part.reasoning, dim ? "\x1b[0m" : "");
      std::fflush(stderr);
      reasoning_shown = true;
    }
    if (!part.content.empty()) {
      if (reasoning_shown && !o.hide_reasoning) {
        fmt::print(stderr, "\n");  // the answer starts below the reasoning
        reasoning_shown = false;
      }
      fmt::print("{}", part.content);
      std::fflush(stdout);
    }
  };
  auto emit = [&](const std::string& text) {
    if (text.empty()) return;
    show(chat ? reasoning.push(text) : runtime::reasoning_split{{}, text});
  };

  runtime::latent_cache cache(config, prompt_tokens + max_new_tokens);
  auto start = clock_type::now();
  runtime::sequence_step step{&cache, prompt};
  auto logits = m.net->forward(std::span(&step, 1));
  const double prefill_seconds = seconds_since(start);
  start = clock_type::now();
  for (;;) {
    const runtime::token_id next = sampler.sample(logits);
    emit(stream.push(next));
    if (stream.finished()) break;
    step.tokens = std::span(&next, 1);
    logits = m.net->forward(std::span(&step, 1));
  }
  if (chat) show(reasoning.finish());
  const double decode_seconds = seconds_since(start);
  const auto completion_tokens = stream.tokens().size();

  if (o.json) {
    nlohmann::json out{{"text", stream.text()},
                       {"finish_reason", runtime::finish_reason_name(stream.reason())},
                       {"tokens", stream.tokens()},
                       {"usage", {{"prompt_tokens", prompt_tokens}, {"completion_tokens", completion_tokens}}},
                       {"seed", sampler.seed()}};
    if (chat) {
      out["content"] = content;
      out["reasoning_content"] = reasoning_text.empty() ? nlohmann::json(nullptr) : nlohmann::json(reasoning_text);
    }
    if (!stream.matched_stop().empty()) out["stop"] = stream.matched_stop();
    fmt::print("{}\n", out.dump());
  } else {
    fmt::print("\n");
  }
  if (!o.model.quiet)
    fmt::print(stderr, "[generate] prompt {} tokens in {:.3f} s; {} tokens in {:.3f} s ({:.1f} tokens/s); finish: {}; seed {}\n",
               prompt_tokens, prefill_seconds, completion_tokens, decode_seconds,
               static_cast<double>(completion_tokens) / decode_seconds, runtime::finish_reason_name(stream.reason()),
               sampler.seed());
}

void add_generate(CLI::App& app) {
  auto o = std::make_shared<generate_options>();
  auto* cmd = app.add_subcommand("generate", "Generate from token ids, a text prompt or a chat message (streamed)");
  add_model_options(cmd, o->model);
  auto* tokens = cmd->add_option("--tokens", o->tokens, "Comma-separated prompt token ids; prints token ids");
  auto* prompt = cmd->add_option("--prompt", o->prompt, "Text to continue (BOS added as tokenizer_config.json says)");
  auto* chat = cmd->add_option("--chat", o->chat, "A user message, sent through the checkpoint's chat template");
  auto* messages = cmd->add_option("--messages", o->messages_file,
                                   "A conversation as OpenAI-style JSON messages in a file ('-': stdin), through the chat template");
  tokens->excludes(prompt)->excludes(chat)->excludes(messages);
  prompt->excludes(chat)->excludes(messages);
  chat->excludes(messages);
  cmd->add_option("--system", o->system, "System message for --chat")->needs(chat);
  cmd->add_option("--max-new-tokens", o->max_new_tokens, "Tokens to generate at most (default: 16 with --tokens, 256 with text)")
      ->check(CLI::Range(1, 1 << 20));
  cmd->add_option("--temperature", o->sampling.temperature, "0: greedy")->capture_default_str()->check(CLI::Range(0.0, 100.0));
  cmd->add_option("--top-k", o->sampling.top_k, "Sample among the k most likely tokens (0: off)")->check(CLI::NonNegativeNumber);
  cmd->add_option("--top-p", o->sampling.top_p, "Nucleus sampling: smallest set with this probability (1: off)");
  cmd->add_option("--min-p", o->sampling.min_p, "Drop tokens below min-p times the most likely (0: off)");
  cmd->add_option("--repetition-penalty", o->sampling.repetition_penalty, "> 1 discourages tokens of prompt and output (1: off)");
  cmd->add_option("--frequency-penalty", o->sampling.frequency_penalty, "Per occurrence in the output, -2..2 (0: off)");
  cmd->add_option("--presence-penalty", o->sampling.presence_penalty, "Once per token present in the output, -2..2 (0: off)");
  auto* seed = cmd->add_option("--seed", o->seed, "Random seed: the same seed gives the same text (default: random)");
  cmd->add_option("--stop", o->stop, "Stop before this text (repeatable; not printed)");
  cmd->add_flag("--ignore-eos", o->ignore_eos, "Keep generating after the end-of-sentence token");
  cmd->add_flag("--hide-reasoning", o->hide_reasoning, "With --chat, do not show <think> reasoning on stderr");
  cmd->add_flag("--json", o->json,
                "Print the result at the end as JSON ({\"tokens\": [...]} with --tokens; text, content, "
                "reasoning_content, finish_reason, tokens, usage with text)");
  auto cluster = std::make_shared<std::string>();
  cmd->add_option("--cluster", *cluster, "HOST:PORT of a running cluster's head (shoal launch prints it); with --tokens");
  auto join_secret_file = std::make_shared<std::string>();
  add_join_secret_option(*cmd, *join_secret_file);
  cmd->get_option("--model")->required(false);  // not needed with --cluster; checked below
  cmd->callback([o, tokens, prompt, chat, messages, seed, cluster, join_secret_file] {
    if (!cluster->empty())
      return generate_on_cluster(*cluster, o->tokens, o->max_new_tokens, o->sampling.temperature, o->json,
                                 join_secret_from(*join_secret_file));
    if (o->model.dir.empty()) shoal::fail(errc::invalid_argument, "--model is required (or --cluster HOST:PORT)");
    o->seeded = seed->count() > 0;
    if (o->seeded) o->sampling.seed = o->seed;
    runtime::validate(o->sampling);
    if (tokens->count() > 0) return generate_tokens(*o);
    if (prompt->count() > 0) return generate_text(*o, /*chat=*/false);
    if (chat->count() > 0 || messages->count() > 0) return generate_text(*o, /*chat=*/true);
    shoal::fail(errc::invalid_argument,
                "generate needs a prompt: --tokens IDS, --prompt TEXT, --chat MESSAGE or --messages FILE");
  });
}

}  // namespace

void add_model_commands(CLI::App& app) {
  add_make_model(app);
  add_eval(app);
  add_generate(app);
}

}  // namespace shoal::tools
