// make-model, eval and generate: the single-process model from the command line.

#include "commands.hpp"

#include "shoal/base/error.hpp"
#include "shoal/config/cluster_config.hpp"
#include "shoal/config/model_config.hpp"
#include "shoal/gateway/backend.hpp"
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
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <fstream>
#include <iostream>
#include <sstream>
#include <memory>
#include <mutex>
#include <random>
#include <span>
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

// The prompt of --prompt, --chat or --messages as token ids, and the text they encode.
struct text_prompt {
  std::vector<runtime::token_id> ids;
  std::string text;
};

text_prompt build_text_prompt(const generate_options& o, bool chat, const runtime::tokenizer& tok) {
  text_prompt p;
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
    p.text = runtime::chat_template::for_tokenizer(tok).render(messages, /*add_generation_prompt=*/true);
  } else {
    p.text = o.prompt;
    if (tok.add_bos_token() && tok.bos_id()) p.ids.push_back(*tok.bos_id());
  }
  tok.encode_into(p.text, p.ids);
  if (p.ids.empty()) shoal::fail(errc::invalid_argument, "the prompt is empty");
  return p;
}

// How many tokens to generate after `prompt_tokens`: --max-new-tokens (256 by default) within
// the model's context, after checking that the tokenizer's ids fit the model's vocabulary.
std::int64_t completion_budget(const generate_options& o, const config::model_config& config,
                               std::span<const runtime::token_id> prompt) {
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
  return max_new_tokens;
}

// Generated text as it comes: the answer on stdout; with --chat, R1-style reasoning on stderr
// (dimmed on a terminal) so that stdout carries only the answer. With --json nothing is
// printed until the end.
class text_printer {
 public:
  text_printer(const generate_options& o, bool chat, const std::string& prompt_text)
      : o_(o), chat_(chat), reasoning_parser_(runtime::prompt_opens_reasoning(prompt_text)),
        dim_(isatty(fileno(stderr)) != 0) {}

  void push(const std::string& text) {
    if (text.empty()) return;
    show(chat_ ? reasoning_parser_.push(text) : runtime::reasoning_split{{}, text});
  }
  void finish() {
    if (chat_) show(reasoning_parser_.finish());
  }
  const std::string& content() const { return content_; }
  const std::string& reasoning() const { return reasoning_; }

 private:
  void show(const runtime::reasoning_split& part) {
    content_ += part.content;
    reasoning_ += part.reasoning;
    if (o_.json) return;
    if (!part.reasoning.empty() && !o_.hide_reasoning) {
      fmt::print(stderr, "{}{}{}", dim_ ? "\x1b[2m" : "", part.reasoning, dim_ ? "\x1b[0m" : "");
      std::fflush(stderr);
      reasoning_shown_ = true;
    }
    if (!part.content.empty()) {
      if (reasoning_shown_ && !o_.hide_reasoning) {
        fmt::print(stderr, "\n");  // the answer starts below the reasoning
        reasoning_shown_ = false;
      }
      fmt::print("{}", part.content);
      std::fflush(stdout);
    }
  }

  const generate_options& o_;
  bool chat_;
  runtime::reasoning_parser reasoning_parser_;
  bool dim_;
  bool reasoning_shown_ = false;
  std::string content_, reasoning_;
};

// What a text generation ended with, printed the same way wherever it ran.
struct text_result {
  std::string text;
  std::vector<runtime::token_id> tokens;
  runtime::finish_reason reason = runtime::finish_reason::none;
  std::string matched_stop;
  std::int64_t prompt_tokens = 0;
  std::uint64_t seed = 0;
  double prefill_seconds = 0;  // on a cluster: until the first token arrived
  double decode_seconds = 0;
};

void print_text_result(const generate_options& o, bool chat, const text_printer& out, const text_result& r) {
  if (o.json) {
    nlohmann::json j{{"text", r.text},
                     {"finish_reason", runtime::finish_reason_name(r.reason)},
                     {"tokens", r.tokens},
                     {"usage", {{"prompt_tokens", r.prompt_tokens}, {"completion_tokens", r.tokens.size()}}},
                     {"seed", r.seed}};
    if (chat) {
      j["content"] = out.content();
      j["reasoning_content"] = out.reasoning().empty() ? nlohmann::json(nullptr) : nlohmann::json(out.reasoning());
    }
    if (!r.matched_stop.empty()) j["stop"] = r.matched_stop;
    fmt::print("{}\n", j.dump());
  } else {
    fmt::print("\n");
  }
  if (!o.model.quiet)
    fmt::print(stderr, "[generate] prompt {} tokens in {:.3f} s; {} tokens in {:.3f} s ({:.1f} tokens/s); finish: {}; seed {}\n",
               r.prompt_tokens, r.prefill_seconds, r.tokens.size(), r.decode_seconds,
               static_cast<double>(r.tokens.size()) / r.decode_seconds, runtime::finish_reason_name(r.reason), r.seed);
}

// Text in, text out, streamed as it is produced, by the model in this process.
void generate_text(const generate_options& o, bool chat) {
  const auto tok = runtime::tokenizer::load(o.model.dir);  // before the weights: fail fast
  const auto prompt = build_text_prompt(o, chat, tok);
  auto m = load(o.model);
  const auto& config = m.net->config();
  const auto max_new_tokens = completion_budget(o, config, prompt.ids);
  const auto prompt_tokens = static_cast<std::int64_t>(prompt.ids.size());

  runtime::sampler sampler(o.sampling, prompt.ids, std::min<std::int64_t>(tok.id_limit(), config.vocab_size));
  runtime::completion_limits limits;
  limits.max_tokens = max_new_tokens;
  limits.stop = o.stop;
  if (!o.ignore_eos && tok.eos_id()) limits.stop_token_ids.push_back(*tok.eos_id());
  runtime::completion_stream stream(tok, limits);
  text_printer out(o, chat, prompt.text);

  runtime::latent_cache cache(config, prompt_tokens + max_new_tokens);
  auto start = clock_type::now();
  runtime::sequence_step step{&cache, prompt.ids};
  auto logits = m.net->forward(std::span(&step, 1));
  const double prefill_seconds = seconds_since(start);
  start = clock_type::now();
  for (;;) {
    const runtime::token_id next = sampler.sample(logits);
    out.push(stream.push(next));
    if (stream.finished()) break;
    step.tokens = std::span(&next, 1);
    logits = m.net->forward(std::span(&step, 1));
  }
  out.finish();
  print_text_result(o, chat, out,
                    {.text = stream.text(), .tokens = {stream.tokens().begin(), stream.tokens().end()},
                     .reason = stream.reason(), .matched_stop = stream.matched_stop(), .prompt_tokens = prompt_tokens,
                     .seed = sampler.seed(), .prefill_seconds = prefill_seconds, .decode_seconds = seconds_since(start)});
}

// Text in, text out, computed by a running cluster (its head at `address`): the prompt is
// built and the tokens turned into text here, from the checkpoint's tokenizer and config in
// --model, as `shoal serve --cluster` does; sampling runs on the cluster's last stage with
// the same seed-determined choices as in one process.
void generate_text_on_cluster(const generate_options& o, bool chat, const std::string& address,
                              const std::string& join_secret) {
  const auto head = config::parse_host_port(address);
  if (!head) shoal::fail(errc::invalid_argument, "--cluster '{}': expected HOST:PORT, e.g. 127.0.0.1:7610", address);
  const auto tok = runtime::tokenizer::load(o.model.dir);
  const auto prompt = build_text_prompt(o, chat, tok);
  const auto config = config::load_model_config(o.model.dir);
  const auto max_new_tokens = completion_budget(o, config, prompt.ids);

  runtime::generation_request request;
  request.prompt = prompt.ids;
  request.sampling = o.sampling;
  // A seed chosen here when none is given, so that the answer can be reproduced with it.
  if (!request.sampling.seed) request.sampling.seed = std::random_device{}();
  request.limits.max_tokens = max_new_tokens;
  request.limits.stop = o.stop;
  if (!o.ignore_eos && tok.eos_id()) request.limits.stop_token_ids.push_back(*tok.eos_id());
  std::mutex mutex;
  std::condition_variable arrived;
  std::deque<runtime::generation_event> events;
  request.on_event = [&](const runtime::generation_event& e) {
    {
      std::lock_guard lock(mutex);
      events.push_back(e);
    }
    arrived.notify_one();
  };

  auto client = client::connect(head->first, head->second, std::chrono::seconds(10), join_secret);
  auto backend = gateway::make_cluster_backend(*client, tok, config.max_position_embeddings, 1);
  text_printer out(o, chat, prompt.text);
  text_result result;
  result.prompt_tokens = static_cast<std::int64_t>(prompt.ids.size());
  result.seed = *request.sampling.seed;
  const auto start = clock_type::now();
  std::optional<clock_type::time_point> first_token;
  backend->submit(std::move(request));
  for (bool finished = false; !finished;) {
    runtime::generation_event e;
    {
      std::unique_lock lock(mutex);
      if (!arrived.wait_for(lock, std::chrono::seconds(120), [&] { return !events.empty(); }))
        shoal::fail(errc::deadline_exceeded, "no tokens from the cluster at {} for 120 s ({} tokens so far)", address,
                    result.tokens.size());
      e = std::move(events.front());
      events.pop_front();
    }
    if (e.error) throw shoal::error(*e.error, e.error_message);
    if (!e.tokens.empty() && !first_token) first_token = clock_type::now();
    result.tokens.insert(result.tokens.end(), e.tokens.begin(), e.tokens.end());
    result.text += e.text;
    out.push(e.text);
    if (e.finished) {
      result.reason = e.reason;
      result.matched_stop = e.matched_stop;
      finished = true;
    }
  }
  out.finish();
  const auto end = clock_type::now();
  result.prefill_seconds = std::chrono::duration<double>(first_token.value_or(end) - start).count();
  result.decode_seconds = std::chrono::duration<double>(end - first_token.value_or(start)).count();
  print_text_result(o, chat, out, result);
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
  cmd->add_option("--cluster", *cluster,
                  "HOST:PORT of a running cluster's head (shoal launch prints it): generate there; text prompts "
                  "also need --model DIR for the checkpoint's tokenizer and config.json");
  auto join_secret_file = std::make_shared<std::string>();
  add_join_secret_option(*cmd, *join_secret_file);
  cmd->get_option("--model")->required(false);  // not needed with --cluster; checked below
  cmd->callback([o, tokens, prompt, chat, messages, seed, cluster, join_secret_file] {
    if (seed->count() > 0) o->sampling.seed = o->seed;
    runtime::validate(o->sampling);
    if (!cluster->empty()) {
      if (tokens->count() > 0) {
        if (!o->stop.empty())
          shoal::fail(errc::invalid_argument, "--stop needs text: use --prompt or --chat instead of --tokens");
        return generate_on_cluster(*cluster, o->tokens, o->max_new_tokens, o->sampling, o->json,
                                   join_secret_from(*join_secret_file));
      }
      if (prompt->count() == 0 && chat->count() == 0 && messages->count() == 0)
        shoal::fail(errc::invalid_argument,
                    "generate needs a prompt: --tokens IDS, --prompt TEXT, --chat MESSAGE or --messages FILE");
      if (o->model.dir.empty())
        shoal::fail(errc::invalid_argument,
                    "--cluster with a text prompt needs --model DIR (the checkpoint's tokenizer and config.json)");
      return generate_text_on_cluster(*o, /*chat=*/prompt->count() == 0, *cluster, join_secret_from(*join_secret_file));
    }
    if (o->model.dir.empty()) shoal::fail(errc::invalid_argument, "--model is required (or --cluster HOST:PORT)");
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
