// tokenize, detokenize and bench-tokenizer: the checkpoint's tokenizer from the command line.

#include "commands.hpp"

#include "shoal/base/error.hpp"
#include "shoal/runtime/tokenizer.hpp"

#include <CLI/CLI.hpp>
#include <fmt/core.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <ctime>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

namespace shoal::tools {
namespace {

using clock_type = std::chrono::steady_clock;

nlohmann::json parse_line(const std::string& line, std::size_t number) {
  try {
    return nlohmann::json::parse(line);
  } catch (const nlohmann::json::exception& e) {
    shoal::fail(errc::invalid_argument, "stdin line {}: not JSON ({})", number, e.what());
  }
}

void add_tokenize(CLI::App& app) {
  struct options {
    std::string dir;
    bool bos = false;
  };
  auto o = std::make_shared<options>();
  auto* cmd = app.add_subcommand("tokenize", "Token ids of text: one JSON string per stdin line -> {\"ids\": [...]} per line");
  cmd->add_option("--model", o->dir, "Checkpoint directory with tokenizer.json")->required();
  cmd->add_flag("--bos", o->bos, "Start each sequence with the BOS token");
  cmd->callback([o] {
    const auto tok = runtime::tokenizer::load(o->dir);
    std::vector<runtime::token_id> ids;
    std::string line;
    for (std::size_t number = 1; std::getline(std::cin, line); ++number) {
      const auto value = parse_line(line, number);
      if (!value.is_string())
        shoal::fail(errc::invalid_argument, "stdin line {}: expected a JSON string such as \"Hello\", got {}", number,
                    value.type_name());
      ids.clear();
      if (o->bos && tok.bos_id()) ids.push_back(*tok.bos_id());
      try {
        tok.encode_into(value.get_ref<const std::string&>(), ids);
      } catch (const shoal::error& e) {
        shoal::fail(e.code(), "stdin line {}: {}", number, e.what());
      }
      fmt::print("{}\n", nlohmann::json{{"ids", ids}}.dump());
      std::fflush(stdout);  // answer each line at once when driven through a pipe
    }
  });
}

void add_detokenize(CLI::App& app) {
  struct options {
    std::string dir;
    bool skip_special = false;
  };
  auto o = std::make_shared<options>();
  auto* cmd = app.add_subcommand("detokenize",
                                 "Text of token ids: one {\"ids\": [...]} or [...] per stdin line -> a JSON string per line");
  cmd->add_option("--model", o->dir, "Checkpoint directory with tokenizer.json")->required();
  cmd->add_flag("--skip-special", o->skip_special, "Leave out special tokens (BOS, EOS, padding)");
  cmd->callback([o] {
    const auto tok = runtime::tokenizer::load(o->dir);
    std::string line;
    for (std::size_t number = 1; std::getline(std::cin, line); ++number) {
      auto value = parse_line(line, number);
      if (value.is_object() && value.contains("ids")) value = value["ids"];
      std::vector<runtime::token_id> ids;
      try {
        ids = value.get<std::vector<runtime::token_id>>();
      } catch (const nlohmann::json::exception&) {
        shoal::fail(errc::invalid_argument, "stdin line {}: expected {{\"ids\": [...]}} or a JSON array of token ids", number);
      }
      for (const auto id : ids)
        if (id < 0 || id >= tok.id_limit())
          shoal::fail(errc::invalid_argument, "stdin line {}: token id {} is not in the tokenizer (ids are 0..{})", number, id,
                      tok.id_limit() - 1);
      fmt::print("{}\n", nlohmann::json(tok.decode(ids, o->skip_special)).dump());
      std::fflush(stdout);
    }
  });
}

// A reproducible mixed corpus when no files are given: English-like prose, C++-like code and
// Chinese, drawn word by word from the vocabulary's own entries with a Zipf law over their
// ids (BPE ids follow merge order, which roughly follows frequency), so that the piece cache
// sees a natural-language-like spread of words rather than one repeated paragraph.
double thread_cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}

std::string synthetic_corpus(const runtime::tokenizer& tok, std::size_t bytes, std::uint64_t seed) {
  std::vector<std::string> english, chinese;
  for (runtime::token_id id = 0; id < tok.id_limit(); ++id) {
    const auto b = tok.token_bytes(id);
    if (b.size() >= 3 && b[0] == ' ' && std::all_of(b.begin() + 1, b.end(), [](char c) { return std::isalpha(static_cast<unsigned char>(c)); }))
      english.emplace_back(b);
    if (b.size() >= 6 && b.size() % 3 == 0 &&
        std::all_of(b.begin(), b.end(), [](char c) { return static_cast<unsigned char>(c) >= 0x80; }) &&
        static_cast<unsigned char>(b[0]) >= 0xE4 && static_cast<unsigned char>(b[0]) <= 0xE9)
      chinese.emplace_back(b);
  }
  const std::vector<std::string> code_words = {"int", "return", "const", "auto", "std::vector<float>", "for", "if", "else",
                                               "size_t", "nullptr", "template", "typename", "namespace", "static_cast<int>"};
  const std::vector<std::string> code_punct = {"(", ")", " {\n", "}\n", ";\n", " = ", " + ", "[i]", ", ", " < ", "++", "->", "::"};
  const std::vector<std::string> ids = {"i", "n", "count", "buffer_", "value", "x0", "result", "data", "k2"};
  const std::vector<std::string> zh_punct = {"，", "。", "、", "：", "“", "”", "（", "）"};
  std::mt19937_64 rng(seed);
  auto pick = [&](const std::vector<std::string>& v) -> const std::string& { return v[rng() % v.size()]; };
  // Zipf(1) over ranks 1..n by inverting the continuous approximation: rank = n^u.
  auto zipf = [&](const std::vector<std::string>& v) -> const std::string& {
    const double u = static_cast<double>(rng() >> 11) * 0x1.0p-53;
    const auto rank = static_cast<std::size_t>(std::pow(static_cast<double>(v.size()), u));
    return v[std::min(rank, v.size()) - 1];
  };
  std::string out;
  out.reserve(bytes + 256);
  while (out.size() < bytes) {
    switch (rng() % 3) {
      case 0:  // a sentence
        for (int w = 0, n = 6 + static_cast<int>(rng() % 14); w < n; ++w) out += zipf(english);
        out += rng() % 4 == 0 ? ", " + std::to_string(rng() % 2000) + " of them.\n" : ".\n";
        break;
      case 1:  // a line of code
        out += std::string(2 * (rng() % 4), ' ');
        for (int w = 0, n = 3 + static_cast<int>(rng() % 6); w < n; ++w) {
          out += rng() % 2 ? pick(code_words) : pick(ids);
          out += pick(code_punct);
        }
        out += "\n";
        break;
      default:  // a Chinese sentence
        for (int w = 0, n = 5 + static_cast<int>(rng() % 12); w < n; ++w) {
          out += zipf(chinese);
          if (rng() % 5 == 0) out += pick(zh_punct);
        }
        out += "。\n";
        break;
    }
  }
  return out;
}

void add_bench_tokenizer(CLI::App& app) {
  struct options {
    std::string dir;
    std::vector<std::string> inputs;
    double megabytes = 16;
    std::uint64_t seed = 1;
    bool json = false;
  };
  auto o = std::make_shared<options>();
  auto* cmd = app.add_subcommand("bench-tokenizer", "Encoding speed of the checkpoint's tokenizer on one core");
  cmd->add_option("--model", o->dir, "Checkpoint directory with tokenizer.json")->required();
  cmd->add_option("--input", o->inputs, "Text files to encode (default: a synthetic English/code/Chinese mix)");
  cmd->add_option("--mb", o->megabytes, "Size of the synthetic mix in MB")->capture_default_str()->check(CLI::Range(0.001, 4096.0));
  cmd->add_option("--seed", o->seed, "Seed of the synthetic mix")->capture_default_str();
  cmd->add_flag("--json", o->json, "Print the figures as one JSON object");
  cmd->callback([o] {
    auto start = clock_type::now();
    const auto tok = runtime::tokenizer::load(o->dir);
    const double load_s = std::chrono::duration<double>(clock_type::now() - start).count();
    std::string text;
    std::string source;
    if (o->inputs.empty()) {
      text = synthetic_corpus(tok, static_cast<std::size_t>(o->megabytes * 1e6), o->seed);
      source = fmt::format("synthetic English/code/Chinese mix, seed {}", o->seed);
    } else {
      for (const auto& path : o->inputs) {
        std::ifstream in(path, std::ios::binary);
        if (!in) shoal::fail(errc::not_found, "--input {}: cannot open", path);
        std::ostringstream buffer;
        buffer << in.rdbuf();
        text += buffer.str();
      }
      source = fmt::format("{} file(s)", o->inputs.size());
    }
    // Encode line by line, like many independent requests, so the figure includes the
    // per-call costs; the first pass starts with an empty piece cache, the second is warm.
    std::vector<std::string_view> lines;
    for (std::size_t at = 0; at < text.size();) {
      const auto end = std::min(text.size(), text.find('\n', at) == std::string::npos ? text.size() : text.find('\n', at) + 1);
      lines.push_back(std::string_view(text).substr(at, end - at));
      at = end;
    }
    std::vector<runtime::token_id> ids;
    struct timing {
      double wall_s, cpu_s;
      std::size_t tokens;
    };
    auto pass = [&] {
      std::size_t tokens = 0;
      const double cpu0 = thread_cpu_seconds();
      const auto t0 = clock_type::now();
      for (const auto line : lines) {
        ids.clear();
        tok.encode_into(line, ids);
        tokens += ids.size();
      }
      return timing{std::chrono::duration<double>(clock_type::now() - t0).count(), thread_cpu_seconds() - cpu0, tokens};
    };
    const auto cold = pass();
    const auto warm = pass();
    const double cold_s = cold.wall_s, warm_s = warm.wall_s;
    const auto tokens = cold.tokens, tokens2 = warm.tokens;
    SHOAL_REQUIRE(tokens == tokens2, "encoding changed between passes ({} vs {} tokens)", tokens, tokens2);
    const double mb = static_cast<double>(text.size()) / 1e6;
    if (o->json) {
      fmt::print("{}\n", nlohmann::json{{"bytes", text.size()}, {"tokens", tokens}, {"lines", lines.size()},
                                        {"load_seconds", load_s}, {"cold_mb_per_s", mb / cold_s},
                                        {"cold_tokens_per_s", static_cast<double>(tokens) / cold_s},
                                        {"warm_mb_per_s", mb / warm_s},
                                        {"warm_tokens_per_s", static_cast<double>(tokens) / warm_s},
                                        {"cold_cpu_mb_per_s", mb / cold.cpu_s},
                                        {"warm_cpu_mb_per_s", mb / warm.cpu_s}}
                             .dump());
      return;
    }
    fmt::print("tokenizer loaded in {:.2f} s\n", load_s);
    fmt::print("input: {} ({:.1f} MB, {} lines, {} tokens, {:.2f} bytes/token)\n", source, mb, lines.size(), tokens,
               static_cast<double>(text.size()) / static_cast<double>(tokens));
    // Per CPU second as well as per wall second: on a shared machine the wall figure also
    // counts the time other processes held the core.
    fmt::print("cold cache: {:.1f} MB/s, {:.2f} M tokens/s wall; {:.1f} MB/s, {:.2f} M tokens/s per CPU second (1 thread)\n",
               mb / cold_s, static_cast<double>(tokens) / cold_s / 1e6, mb / cold.cpu_s,
               static_cast<double>(tokens) / cold.cpu_s / 1e6);
    fmt::print("warm cache: {:.1f} MB/s, {:.2f} M tokens/s wall; {:.1f} MB/s, {:.2f} M tokens/s per CPU second (1 thread)\n",
               mb / warm_s, static_cast<double>(tokens) / warm_s / 1e6, mb / warm.cpu_s,
               static_cast<double>(tokens) / warm.cpu_s / 1e6);
  });
}

}  // namespace

void add_text_commands(CLI::App& app) {
  add_tokenize(app);
  add_detokenize(app);
  add_bench_tokenizer(app);
}

}  // namespace shoal::tools
