#include "shoal/runtime/chat_template.hpp"

#include "shoal/base/error.hpp"
#include "shoal/runtime/tokenizer.hpp"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

using namespace shoal;
using namespace shoal::runtime;
namespace fs = std::filesystem;

namespace {

const fs::path kData = fs::path(SHOAL_TEST_DATA_DIR) / "tokenizer";
// Debian's interpreter with python3-jinja2; a python3 earlier on PATH may lack Jinja2.
constexpr const char* kPython = "/usr/bin/python3";

struct chat_case {
  std::vector<chat_message> messages;
  bool add_generation_prompt = true;
};

chat_message msg(std::string role, std::string content) { return {std::move(role), std::move(content), {}}; }
chat_message calls(std::vector<chat_tool_call> tool_calls) { return {"assistant", std::nullopt, std::move(tool_calls)}; }
chat_tool_call call(std::string name, std::string arguments) { return {"function", std::move(name), std::move(arguments)}; }

nlohmann::json to_json(const chat_case& c) {
  nlohmann::json messages = nlohmann::json::array();
  for (const auto& m : c.messages) {
    nlohmann::json j{{"role", m.role}, {"content", m.content ? nlohmann::json(*m.content) : nlohmann::json(nullptr)}};
    if (!m.tool_calls.empty()) {
      j["tool_calls"] = nlohmann::json::array();
      for (const auto& t : m.tool_calls)
        j["tool_calls"].push_back({{"type", t.type}, {"function", {{"name", t.name}, {"arguments", t.arguments}}}});
    }
    messages.push_back(std::move(j));
  }
  return {{"messages", messages}, {"add_generation_prompt", c.add_generation_prompt}};
}

std::vector<std::string> render_with_jinja(const std::vector<chat_case>& cases,
                                           const fs::path& config = kData / "tokenizer_config.json") {
  const auto dir = fs::temp_directory_path() / ("shoal-chat-" + std::to_string(std::random_device{}()));
  fs::create_directories(dir);
  nlohmann::json all = nlohmann::json::array();
  for (const auto& c : cases) all.push_back(to_json(c));
  std::ofstream(dir / "cases.json") << all.dump();
  // Not __FILE__: ccache with CCACHE_BASEDIR makes it relative to the build directory.
  const std::string script = fs::path(SHOAL_TEST_DATA_DIR).parent_path() / "runtime" / "render_chat_template.py";
  const std::string command = std::string(kPython) + " " + script + " " + config.string() + " " + (dir / "cases.json").string() + " > " + (dir / "out.json").string();
  const int rc = std::system(command.c_str());
  INFO("command: " << command << " (needs Debian's python3-jinja2, see tools/setup/install-deps.sh)");
  REQUIRE(rc == 0);
  std::ifstream in(dir / "out.json");
  const auto rendered = nlohmann::json::parse(in).get<std::vector<std::string>>();
  fs::remove_all(dir);
  return rendered;
}

std::vector<chat_case> handwritten_cases() {
  const auto weather = call("get_weather", R"({"city": "Paris", "unit": "celsius"})");
  const auto time = call("get_time", R"({"tz": "Europe/Paris"})");
  return {
      {{msg("user", "Hello!")}, true},
      {{msg("user", "Hello!")}, false},
      {{}, true},
      {{msg("system", "You are terse.")}, true},
      {{msg("system", "You are terse."), msg("user", "What is 2+2?")}, true},
      {{msg("system", "First."), msg("system", "Second."), msg("user", "hi")}, true},
      {{msg("user", "hi"), msg("system", "late system prompt"), msg("assistant", "hello")}, false},
      {{msg("user", "Hi"), msg("assistant", "Hello! How can I help?"), msg("user", "Tell me a joke."),
        msg("assistant", "Why did the chicken cross the road?"), msg("user", "Why?")},
       true},
      {{msg("user", "Weather in Paris?"), calls({weather}), msg("tool", R"({"temp": 21})"),
        msg("assistant", "It is 21 °C in Paris."), msg("user", "Thanks")},
       true},
      {{msg("user", "Weather and time?"), calls({weather, time}), msg("tool", R"({"temp": 21})"),
        msg("tool", R"({"time": "12:00"})"), msg("assistant", "21 °C, noon.")},
       true},
      {{msg("user", "Three calls"), calls({weather, time, weather}), msg("tool", "a"), msg("tool", "b"), msg("tool", "c")}, true},
      {{msg("user", "Weather?"), calls({weather}), msg("tool", "sunny")}, true},
      {{msg("user", "Weather?"), calls({weather}), msg("tool", "sunny")}, false},
      {{msg("user", "a"), calls({weather}), msg("tool", "x"), msg("assistant", "b"), msg("user", "again"), calls({time}),
        msg("tool", "y"), msg("assistant", "c")},
       true},
      {{msg("user", "empty answer"), msg("assistant", "")}, true},
      {{msg("user", "no calls"), calls({})}, true},
      {{msg("developer", "ignored role"), msg("user", "hi")}, true},
      {{msg("user", "中文：你好，世界！😀 <｜User｜> </think> \n\n trailing  ")}, true},
      {{msg("user", "think"), msg("assistant", "<think>\nreasoning\n</think>\n\nanswer")}, true},
  };
}

std::vector<chat_case> random_cases(int count) {
  std::mt19937 rng(1234);
  const std::vector<std::string> texts = {"hi", "Hello, world!", "", "line\nbreak", "中文", "😀", "{\"a\": 1}",
                                          "  spaced  ", "<｜Assistant｜>", "```json\n{}\n```"};
  auto text = [&] { return texts[rng() % texts.size()]; };
  std::vector<chat_case> cases;
  for (int i = 0; i < count; ++i) {
    chat_case c;
    c.add_generation_prompt = rng() % 2 == 0;
    const int n = static_cast<int>(rng() % 9);
    for (int k = 0; k < n; ++k) {
      switch (rng() % 5) {
        case 0: c.messages.push_back(msg("system", text())); break;
        case 1: c.messages.push_back(msg("user", text())); break;
        case 2: c.messages.push_back(msg("assistant", text())); break;
        case 3: {
          std::vector<chat_tool_call> tc;
          for (int t = 0, m = 1 + static_cast<int>(rng() % 3); t < m; ++t) tc.push_back(call("f" + std::to_string(t), text()));
          c.messages.push_back(calls(tc));
          break;
        }
        default: c.messages.push_back(msg("tool", text())); break;
      }
    }
    cases.push_back(std::move(c));
  }
  return cases;
}

}  // namespace

TEST_CASE("chat template: renders exactly like Jinja2 on every test conversation", "[chat]") {
  const auto tok = tokenizer::load(kData);
  const auto tmpl = chat_template::for_tokenizer(tok);
  CHECK(tmpl.kind() == chat_template_kind::deepseek_v3);
  auto cases = handwritten_cases();
  const auto extra = random_cases(300);
  cases.insert(cases.end(), extra.begin(), extra.end());
  const auto want = render_with_jinja(cases);
  REQUIRE(want.size() == cases.size());
  int mismatches = 0;
  for (std::size_t i = 0; i < cases.size(); ++i) {
    const auto got = tmpl.render(cases[i].messages, cases[i].add_generation_prompt);
    if (got != want[i]) {
      ++mismatches;
      UNSCOPED_INFO("case " << i << " " << to_json(cases[i]).dump() << "\n got: " << nlohmann::json(got).dump()
                            << "\nwant: " << nlohmann::json(want[i]).dump());
    }
  }
  CHECK(mismatches == 0);
}

TEST_CASE("chat template: the prompt starts with BOS and ends with the assistant opener", "[chat]") {
  const auto tok = tokenizer::load(kData);
  const auto tmpl = chat_template::for_tokenizer(tok);
  const std::vector<chat_message> conversation = {msg("user", "Hello")};
  const auto ids = tok.encode(tmpl.render(conversation, true));
  REQUIRE(ids.size() >= 3);
  CHECK(ids.front() == *tok.bos_id());
  CHECK(ids[1] == *tok.find_token("<｜User｜>"));
  CHECK(ids.back() == *tok.find_token("<｜Assistant｜>"));
}

TEST_CASE("chat template: unknown templates and invalid messages are refused", "[chat]") {
  const auto tok = tokenizer::load(kData);
  try {
    (void)chat_template::from_source(tok.chat_template_source() + " ", tok.bos_token());
    FAIL("an altered template was accepted");
  } catch (const shoal::error& e) {
    CHECK(e.code() == errc::failed_precondition);
    CHECK_THAT(e.what(), Catch::Contains("chat_template"));
  }
  CHECK_THROWS_AS(chat_template::from_source("", tok.bos_token()), shoal::error);
  const auto tmpl = chat_template::for_tokenizer(tok);
  const std::vector<chat_message> bad = {{"user", std::nullopt, {}}};
  CHECK_THROWS_AS(tmpl.render(bad, true), shoal::error);
}

TEST_CASE("chat template: OpenAI-style JSON messages parse into what the template renders", "[chat]") {
  const auto messages = parse_chat_messages(R"({"messages": [
      {"role": "system", "content": "sys"},
      {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url"}, {"type": "text", "text": "b"}]},
      {"role": "assistant", "content": null, "tool_calls": [
          {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}},
          {"type": "function", "function": {"name": "g", "arguments": {"y": 2}}}]},
      {"role": "tool", "tool_call_id": "call_1", "content": "out"}]})");
  REQUIRE(messages.size() == 4);
  CHECK(messages[0].role == "system");
  CHECK(messages[1].content == "ab");
  CHECK_FALSE(messages[2].content.has_value());
  REQUIRE(messages[2].tool_calls.size() == 2);
  CHECK(messages[2].tool_calls[0].name == "f");
  CHECK(messages[2].tool_calls[0].arguments == R"({"x": 1})");
  CHECK(messages[2].tool_calls[1].arguments == R"({"y":2})");
  CHECK(messages[3].content == "out");
  // The parsed conversation renders like Jinja renders the same JSON.
  const chat_case c{messages, true};
  const auto want = render_with_jinja({c});
  const auto tok = tokenizer::load(kData);
  CHECK(chat_template::for_tokenizer(tok).render(messages, true) == want.at(0));
  for (const auto* bad : {"not json", "{}", R"([{"content": "no role"}])", R"([{"role": "user", "content": 5}])",
                          R"([{"role": "assistant", "tool_calls": [{"type": "function"}]}])"}) {
    INFO(bad);
    CHECK_THROWS_AS(parse_chat_messages(bad), shoal::error);
  }
}

TEST_CASE("chat template: the DeepSeek-R1 variant renders exactly like Jinja2", "[chat]") {
  const auto tok = tokenizer::load(kData);
  const auto r1_source = chat_template::known_source(chat_template_kind::deepseek_r1);
  CHECK(r1_source != tok.chat_template_source());
  const auto tmpl = chat_template::from_source(r1_source, tok.bos_token());
  CHECK(tmpl.kind() == chat_template_kind::deepseek_r1);
  // An R1 checkpoint's tokenizer_config.json: the same file with R1's template.
  auto config = nlohmann::json::parse(std::ifstream(kData / "tokenizer_config.json"));
  config["chat_template"] = r1_source;
  const auto dir = fs::temp_directory_path() / ("shoal-r1-" + std::to_string(std::random_device{}()));
  fs::create_directories(dir);
  std::ofstream(dir / "tokenizer_config.json") << config.dump();
  auto cases = handwritten_cases();
  cases.push_back({{msg("user", "q"), msg("assistant", "<think>a</think>b</think>final"), msg("user", "again")}, true});
  cases.push_back({{msg("user", "q"), msg("assistant", "no reasoning"), msg("user", "again")}, false});
  const auto extra = random_cases(100);
  cases.insert(cases.end(), extra.begin(), extra.end());
  const auto want = render_with_jinja(cases, dir / "tokenizer_config.json");
  fs::remove_all(dir);
  REQUIRE(want.size() == cases.size());
  int mismatches = 0;
  for (std::size_t i = 0; i < cases.size(); ++i) {
    const auto got = tmpl.render(cases[i].messages, cases[i].add_generation_prompt);
    if (got != want[i]) {
      ++mismatches;
      UNSCOPED_INFO("case " << i << " " << to_json(cases[i]).dump() << "\n got: " << nlohmann::json(got).dump()
                            << "\nwant: " << nlohmann::json(want[i]).dump());
    }
  }
  CHECK(mismatches == 0);
  const std::vector<chat_message> hello = {msg("user", "Hello")};
  CHECK(tmpl.render(hello, true).ends_with("<｜Assistant｜><think>\n"));
}
