// shoal serve on a checkpoint whose tokenizer_config.json carries DeepSeek-R1's published
// template (the one whose prompt ends with `<think>\n`): chats over HTTP count exactly the
// tokens of the prompt Jinja2 renders, and the output is read as starting inside the reasoning.
// Runs through tests/runtime/skip_without_jinja2.sh: skipped where Debian's Jinja2 is missing.

#include "serve_process.hpp"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>

namespace fs = std::filesystem;
using json = nlohmann::json;
using namespace shoal::gateway::testing;

namespace {

const fs::path kWork = SHOAL_GATEWAY_WORK_DIR;
const fs::path kTemplate = fs::path(SHOAL_TEST_DATA_DIR) / "chat_templates" / "deepseek-r1-think.jinja";
const fs::path kRenderScript = fs::path(SHOAL_TEST_DATA_DIR).parent_path() / "runtime" / "render_chat_template.py";

// The tiny model with R1's template in place of V3's.
fs::path r1_model() {
  static const fs::path dir = [] {
    const auto d = kWork / "tiny-r1";
    fs::remove_all(d);
    const auto made = run(std::string(SHOAL_BINARY) + " make-model --preset tiny --out " + d.string(), 300);
    INFO(made.out);
    REQUIRE(made.exit_code == 0);
    auto config = json::parse(std::ifstream(d / "tokenizer_config.json"));
    config["chat_template"] = slurp(kTemplate);
    std::ofstream(d / "tokenizer_config.json") << config.dump(2);
    return d;
  }();
  return dir;
}

serve_process& server() {
  static serve_process p("serve-r1", {"serve", "--model", r1_model().string(), "--port", "0", "--threads", "2",
                                      "--cache-mb", "64", "--drain-seconds", "5"});
  return p;
}

// The number of tokens of the prompt Jinja2 renders for `messages`, as the tokenizer encodes it.
std::int64_t jinja2_prompt_tokens(const json& messages) {
  const auto cases = kWork / "r1-cases.json";
  std::ofstream(cases) << json::array({{{"messages", messages}, {"add_generation_prompt", true}}}).dump();
  const auto rendered = run("/usr/bin/python3 " + kRenderScript.string() + " " + kTemplate.string() +
                            " '<｜begin▁of▁sentence｜>' '<｜end▁of▁sentence｜>' " + cases.string());
  INFO(rendered.out);
  REQUIRE(rendered.exit_code == 0);
  const auto text = json::parse(rendered.out).at(0).at("text").get<std::string>();
  CHECK(text.ends_with("<｜Assistant｜><think>\n"));
  const auto line = kWork / "r1-prompt.jsonl";
  std::ofstream(line) << json(text).dump() << "\n";
  const auto ids = run(std::string(SHOAL_BINARY) + " tokenize --model " + r1_model().string() + " < " + line.string());
  INFO(ids.out);
  REQUIRE(ids.exit_code == 0);
  return static_cast<std::int64_t>(json::parse(ids.out)["ids"].size());
}

}  // namespace

TEST_CASE("a checkpoint with DeepSeek-R1's published template chats over HTTP", "[gateway][e2e][jinja]") {
  auto& s = server();
  const json messages = json::array({
      {{"role", "system"}, {"content", "You are terse."}},
      {{"role", "user"}, {"content", "你好 👋 What is 2+2?"}},
      {{"role", "assistant"}, {"content", "<think>\nEasy.\n</think>\n\n4."}},
      {{"role", "user"}, {"content", "And 3+3?"}},
  });
  const auto body = kWork / "r1-body.json";
  std::ofstream(body) << json{{"messages", messages}, {"max_tokens", 6}, {"temperature", 0}}.dump();
  const auto r = run("curl -sS -m 60 " + s.url() + "/v1/chat/completions -H 'Content-Type: application/json' -d @" +
                     body.string());
  INFO(r.out);
  REQUIRE(r.exit_code == 0);
  const auto j = json::parse(r.out);
  REQUIRE(j.contains("usage"));
  CHECK(j["usage"]["prompt_tokens"].get<std::int64_t>() == jinja2_prompt_tokens(messages));
  // The prompt opened <think>: without a </think> in the output, all of it is reasoning.
  const auto& m = j["choices"][0]["message"];
  const std::string reasoning = m["reasoning_content"].is_string() ? m["reasoning_content"].get<std::string>() : "";
  if (reasoning.find("</think>") == std::string::npos && m["content"].get<std::string>().find("</think>") == std::string::npos)
    CHECK(m["content"] == "");

  // chat_template_kwargs are accepted (R1's template ignores them) and must be an object.
  std::ofstream(body) << json{{"messages", messages}, {"max_tokens", 2}, {"chat_template_kwargs", {{"thinking", true}}}}.dump();
  const auto kw = run("curl -sS -m 60 " + s.url() + "/v1/chat/completions -H 'Content-Type: application/json' -d @" +
                      body.string());
  INFO(kw.out);
  CHECK(json::parse(kw.out)["usage"]["prompt_tokens"] == j["usage"]["prompt_tokens"]);
  std::ofstream(body) << json{{"messages", messages}, {"chat_template_kwargs", 1}}.dump();
  const auto bad = run("curl -sS -m 60 -w ' %{http_code}' " + s.url() +
                       "/v1/chat/completions -H 'Content-Type: application/json' -d @" + body.string());
  CHECK(bad.out.ends_with(" 400"));
  CHECK(bad.out.find("chat_template_kwargs") != std::string::npos);
}

TEST_CASE("a template that cannot be parsed is reported at start-up; completions still work", "[gateway][e2e][jinja]") {
  const auto dir = kWork / "tiny-broken";
  fs::remove_all(dir);
  fs::copy(r1_model(), dir, fs::copy_options::recursive);
  auto config = json::parse(std::ifstream(dir / "tokenizer_config.json"));
  config["chat_template"] = "{% for message in messages %}\n{{ message['content'] }}\n{% endif %}";
  std::ofstream(dir / "tokenizer_config.json") << config.dump(2);
  serve_process s("serve-broken", {"serve", "--model", dir.string(), "--port", "0", "--threads", "2", "--cache-mb", "64",
                                   "--drain-seconds", "1"});
  INFO(s.log());
  CHECK(s.log().find("chat requests will be refused") != std::string::npos);
  CHECK(s.log().find("Unterminated for (line 1, column 1)") != std::string::npos);
  const auto chat = run("curl -sS -m 60 -w ' %{http_code}' " + s.url() +
                        "/v1/chat/completions -d '{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}'");
  CHECK(chat.out.ends_with(" 400"));
  CHECK(chat.out.find("chat_template") != std::string::npos);
  const auto completion = run("curl -sS -m 60 -o /dev/null -w '%{http_code}' " + s.url() +
                              "/v1/completions -d '{\"prompt\": \"hi\", \"max_tokens\": 2}'");
  CHECK(completion.out == "200");
}
