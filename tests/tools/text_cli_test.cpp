// Drives `shoal` with text the way a user does: a fresh tiny model, then tokenize,
// detokenize and generate with --chat / --prompt.

#include "run_shoal.hpp"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

using shoal::test::result;
using shoal::test::run;

std::string quote(const std::string& s) {
  std::string out = "'";
  for (const char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

struct tiny_model {
  fs::path dir = fs::temp_directory_path() / ("shoal-text-cli-" + std::to_string(::getpid()));
  tiny_model() {
    const auto made = run("make-model --preset tiny --out " + dir.string());
    INFO(made.err);
    REQUIRE(made.exit_code == 0);
  }
  ~tiny_model() { fs::remove_all(dir); }
  std::string model() const { return " --model " + dir.string() + " "; }
};

const tiny_model& tiny() {
  static const tiny_model m;
  return m;
}

std::vector<json> vectors() {
  std::ifstream in(std::string(SHOAL_TEST_DATA_DIR) + "/tokenizer/vectors.jsonl");
  std::vector<json> rows;
  for (std::string line; std::getline(in, line);)
    if (!line.empty()) rows.push_back(json::parse(line));
  return rows;
}

std::vector<json> json_lines(const std::string& out) {
  std::vector<json> lines;
  std::istringstream in(out);
  for (std::string line; std::getline(in, line);) lines.push_back(json::parse(line));
  return lines;
}

}  // namespace

TEST_CASE("make-model writes the tokenizer; tokenize and detokenize match the reference vectors", "[cli][text]") {
  REQUIRE(fs::exists(tiny().dir / "tokenizer.json"));
  REQUIRE(fs::exists(tiny().dir / "tokenizer_config.json"));
  const auto rows = vectors();
  std::string texts, ids;
  for (const auto& row : rows) {
    texts += row["text"].dump() + "\n";
    ids += json{{"ids", row["ids"]}}.dump() + "\n";
  }
  const auto tokenized = run("tokenize" + tiny().model(), texts);
  INFO(tokenized.err);
  REQUIRE(tokenized.exit_code == 0);
  const auto encoded = json_lines(tokenized.out);
  REQUIRE(encoded.size() == rows.size());
  for (std::size_t i = 0; i < rows.size(); ++i) CHECK(encoded[i]["ids"] == rows[i]["ids"]);

  const auto detokenized = run("detokenize" + tiny().model(), ids);
  REQUIRE(detokenized.exit_code == 0);
  const auto decoded = json_lines(detokenized.out);
  REQUIRE(decoded.size() == rows.size());
  for (std::size_t i = 0; i < rows.size(); ++i) CHECK(decoded[i] == rows[i]["decoded"]);

  const auto bos = run("tokenize --bos" + tiny().model(), "\"Hello\"\n");
  CHECK(json::parse(bos.out)["ids"] == json::array({0, 19923}));
  const auto bad = run("tokenize" + tiny().model(), "\"ok\"\nnot json\n");
  CHECK(bad.exit_code == 2);
  CHECK_THAT(bad.err, Catch::Contains("line 2"));
}

TEST_CASE("generate --chat streams text that equals the final result", "[cli][text]") {
  const auto args = "generate" + tiny().model() + "--chat Hello --max-new-tokens 8 --quiet";
  const auto final = run(args + " --json");
  INFO(final.err);
  REQUIRE(final.exit_code == 0);
  const auto result = json::parse(final.out);
  // <｜begin▁of▁sentence｜><｜User｜>Hello<｜Assistant｜>
  CHECK(result["usage"]["prompt_tokens"] == 4);
  CHECK(result["usage"]["completion_tokens"].get<int>() <= 8);
  CHECK(result["tokens"].size() == result["usage"]["completion_tokens"].get<std::size_t>());
  CHECK((result["finish_reason"] == "length" || result["finish_reason"] == "stop"));
  CHECK(result.contains("content"));
  CHECK(result.contains("reasoning_content"));
  const auto text = result["text"].get<std::string>();
  CHECK(!text.empty());
  const auto again = run(args + " --json");
  CHECK(json::parse(again.out)["text"] == text);  // greedy by default: deterministic

  const auto streamed = run(args);
  REQUIRE(streamed.exit_code == 0);
  CHECK(streamed.out == result["content"].get<std::string>() + "\n");

  // A stop string taken from the middle of that text cuts the output just before it.
  std::size_t at = 1;
  while (at + 2 <= text.size() && !(std::isalpha(static_cast<unsigned char>(text[at])) &&
                                    std::isalpha(static_cast<unsigned char>(text[at + 1]))))
    ++at;
  REQUIRE(at + 2 <= text.size());
  const auto stop = text.substr(at, 2);
  const auto stopped = json::parse(run(args + " --json --stop " + quote(stop)).out);
  CHECK(stopped["text"] == text.substr(0, text.find(stop)));
  CHECK(stopped["finish_reason"] == "stop");
  CHECK(stopped["stop"] == stop);
}

TEST_CASE("generate --messages takes an OpenAI-style conversation with tool use", "[cli][text]") {
  const std::string conversation = R"([{"role": "system", "content": "Use tools."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": null, "tool_calls": [{"type": "function",
      "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
    {"role": "tool", "content": "{\"temp\": 21}"},
    {"role": "assistant", "content": "21 degrees."},
    {"role": "user", "content": "Thanks!"}])";
  const auto r = run("generate" + tiny().model() + "--messages - --max-new-tokens 4 --json --quiet", conversation);
  INFO(r.err);
  REQUIRE(r.exit_code == 0);
  // The same conversation through tokenize: the rendered prompt's length is the prompt size.
  const std::string rendered =
      "<｜begin▁of▁sentence｜>Use tools.<｜User｜>Weather in Paris?<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>"
      "function<｜tool▁sep｜>get_weather\n```json\n{\"city\": \"Paris\"}\n```<｜tool▁call▁end｜>"
      "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>{\"temp\": 21}<｜tool▁output▁end｜><｜tool▁outputs▁end｜>"
      "21 degrees.<｜end▁of▁sentence｜><｜User｜>Thanks!<｜Assistant｜>";
  const auto ids = json::parse(run("tokenize" + tiny().model(), json(rendered).dump() + "\n").out)["ids"];
  CHECK(json::parse(r.out)["usage"]["prompt_tokens"] == ids.size());
  const auto bad = run("generate" + tiny().model() + "--messages - --quiet", "[{\"content\": 1}]");
  CHECK(bad.exit_code == 2);
  CHECK_THAT(bad.err, Catch::Contains("chat message 0"));
}

TEST_CASE("generate --prompt samples reproducibly with a seed", "[cli][text]") {
  const auto args = "generate" + tiny().model() + "--prompt " + quote("Once upon a time, 中文") +
                    " --max-new-tokens 12 --temperature 0.9 --top-p 0.95 --top-k 100 --min-p 0.01 "
                    "--repetition-penalty 1.1 --frequency-penalty 0.2 --presence-penalty 0.1 --json --quiet";
  const auto a = run(args + " --seed 7");
  INFO(a.err);
  REQUIRE(a.exit_code == 0);
  const auto b = run(args + " --seed 7");
  const auto c = run(args + " --seed 8");
  CHECK(json::parse(a.out)["tokens"] == json::parse(b.out)["tokens"]);
  CHECK(json::parse(a.out)["tokens"] != json::parse(c.out)["tokens"]);
  CHECK(json::parse(a.out)["seed"] == 7);
  CHECK(json::parse(a.out)["usage"]["prompt_tokens"].get<int>() > 3);  // BOS + the text
  CHECK_FALSE(json::parse(a.out).contains("reasoning_content"));
}

TEST_CASE("generate --tokens keeps printing token ids", "[cli][text]") {
  const auto r = run("generate" + tiny().model() + "--tokens 0,17,5 --max-new-tokens 5 --json --quiet");
  REQUIRE(r.exit_code == 0);
  CHECK(json::parse(r.out)["tokens"].size() == 5);
}

TEST_CASE("text commands fail clearly without a usable tokenizer or template", "[cli][text]") {
  const fs::path copy = tiny().dir.string() + "-copy";
  fs::remove_all(copy);
  fs::copy(tiny().dir, copy);
  auto config = json::parse(std::ifstream(copy / "tokenizer_config.json"));
  // Any template is rendered; one that cannot be parsed is refused, naming its line.
  config["chat_template"] = "{{ messages[0]['content'] }}";
  std::ofstream(copy / "tokenizer_config.json") << config.dump();
  CHECK(run("generate --model " + copy.string() + " --chat hi --max-new-tokens 2 --quiet").exit_code == 0);
  config["chat_template"] = "{% for m in messages %}\n{{ m['content'] }}";
  std::ofstream(copy / "tokenizer_config.json") << config.dump();
  const auto broken = run("generate --model " + copy.string() + " --chat hi --max-new-tokens 2 --quiet");
  CHECK(broken.exit_code == 2);
  CHECK_THAT(broken.err, Catch::Contains("chat_template") && Catch::Contains("line 1"));
  // A plain prompt does not need the template.
  CHECK(run("generate --model " + copy.string() + " --prompt hi --max-new-tokens 2 --quiet").exit_code == 0);
  fs::remove(copy / "tokenizer.json");
  const auto missing = run("generate --model " + copy.string() + " --prompt hi --quiet");
  CHECK(missing.exit_code == 2);
  CHECK_THAT(missing.err, Catch::Contains("tokenizer.json"));
  fs::remove_all(copy);
  CHECK(run("generate" + tiny().model() + "--tokens 1 --prompt hi").exit_code == 2);
  CHECK(run("generate" + tiny().model() + "--quiet").exit_code == 2);
  CHECK(run("generate" + tiny().model() + "--prompt hi --top-p 0").exit_code == 2);
}
