#include "shoal/runtime/chat_template.hpp"

#include "shoal/base/error.hpp"
#include "shoal/runtime/reasoning.hpp"
#include "shoal/runtime/tokenizer.hpp"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <thread>

using namespace shoal;
using namespace shoal::runtime;
namespace fs = std::filesystem;

namespace {

const fs::path kTokenizer = fs::path(SHOAL_TEST_DATA_DIR) / "tokenizer";
const fs::path kTemplates = fs::path(SHOAL_TEST_DATA_DIR) / "chat_templates";
// Debian's interpreter with python3-jinja2; a python3 earlier on PATH may lack Jinja2. The
// [jinja] tests run through tests/runtime/skip_without_jinja2.sh, which reports them skipped
// to ctest when it is missing; run directly, they fail instead.
constexpr const char* kPython = "/usr/bin/python3";
constexpr const char* kBos = "<｜begin▁of▁sentence｜>";
constexpr const char* kEos = "<｜end▁of▁sentence｜>";

std::string read_file(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

// Every published template collected in tests/data/chat_templates (see SOURCES.md there).
std::vector<fs::path> template_files() {
  std::vector<fs::path> files;
  for (const auto& e : fs::directory_iterator(kTemplates))
    if (e.path().extension() == ".jinja") files.push_back(e.path());
  std::sort(files.begin(), files.end());
  return files;
}

struct chat_case {
  std::vector<chat_message> messages;
  bool add_generation_prompt = true;
  std::string kwargs_json = {};  // chat_template_kwargs
  std::string tools_json = {};
};

chat_message msg(std::string role, std::string content) { return {std::move(role), std::move(content)}; }
chat_message calls(std::vector<chat_tool_call> tool_calls, std::optional<std::string> text = std::nullopt) {
  return {"assistant", std::move(text), std::move(tool_calls)};
}
chat_tool_call call(std::string name, std::string arguments) { return {"function", std::move(name), std::move(arguments)}; }
chat_message tool(std::string content, std::string id) {
  chat_message m = msg("tool", std::move(content));
  m.tool_call_id = std::move(id);
  return m;
}
chat_message reasoned(std::string reasoning, std::string content) {
  chat_message m = msg("assistant", std::move(content));
  m.reasoning_content = std::move(reasoning);
  return m;
}

// The conversation as an OpenAI client sends it (what Hugging Face's template sees).
nlohmann::json to_json(const chat_case& c) {
  nlohmann::json messages = nlohmann::json::array();
  for (const auto& m : c.messages) {
    nlohmann::json j{{"role", m.role}, {"content", m.content ? nlohmann::json(*m.content) : nlohmann::json(nullptr)}};
    if (m.reasoning_content) j["reasoning_content"] = *m.reasoning_content;
    if (!m.tool_calls.empty()) {
      j["tool_calls"] = nlohmann::json::array();
      for (const auto& t : m.tool_calls) {
        nlohmann::json tc = nlohmann::json::object();
        if (!t.id.empty()) tc["id"] = t.id;
        tc["type"] = t.type;
        tc["function"] = {{"name", t.name}, {"arguments", t.arguments}};
        j["tool_calls"].push_back(std::move(tc));
      }
    }
    if (!m.tool_call_id.empty()) j["tool_call_id"] = m.tool_call_id;
    messages.push_back(std::move(j));
  }
  nlohmann::json j{{"messages", messages}, {"add_generation_prompt", c.add_generation_prompt}};
  if (!c.kwargs_json.empty()) j["kwargs"] = nlohmann::json::parse(c.kwargs_json);
  if (!c.tools_json.empty()) j["tools"] = nlohmann::json::parse(c.tools_json);
  return j;
}

chat_render_options options_of(const chat_case& c) {
  return {c.add_generation_prompt, c.tools_json, c.kwargs_json};
}

// Jinja2's rendering of each case: {"text": ...} or {"error": ...}.
std::vector<nlohmann::json> render_with_jinja(const fs::path& template_path, const std::vector<chat_case>& cases) {
  const auto dir = fs::temp_directory_path() / ("shoal-chat-" + std::to_string(std::random_device{}()));
  fs::create_directories(dir);
  nlohmann::json all = nlohmann::json::array();
  for (const auto& c : cases) all.push_back(to_json(c));
  std::ofstream(dir / "cases.json") << all.dump();
  const std::string script = fs::path(SHOAL_TEST_DATA_DIR).parent_path() / "runtime" / "render_chat_template.py";
  const std::string command = std::string(kPython) + " " + script + " '" + template_path.string() + "' '" + kBos + "' '" +
                              kEos + "' " + (dir / "cases.json").string() + " > " + (dir / "out.json").string();
  const int rc = std::system(command.c_str());
  INFO("command: " << command << " (needs Debian's python3-jinja2, see tools/setup/install-deps.sh)");
  REQUIRE(rc == 0);
  std::ifstream in(dir / "out.json");
  const auto rendered = nlohmann::json::parse(in).get<std::vector<nlohmann::json>>();
  fs::remove_all(dir);
  REQUIRE(rendered.size() == cases.size());
  return rendered;
}

const std::string kTools = R"([{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
  "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}])";

std::vector<chat_case> handwritten_cases() {
  const auto weather = call("get_weather", R"({"city": "Paris", "unit": "celsius"})");
  const auto time = call("get_time", R"({"tz": "Europe/Paris"})");
  auto with_id = [](chat_tool_call c, std::string id) {
    c.id = std::move(id);
    return c;
  };
  std::vector<chat_case> cases = {
      {{msg("user", "Hello!")}},
      {{}},
      {{msg("system", "You are terse.")}},
      {{msg("system", "You are terse."), msg("user", "What is 2+2?")}},
      {{msg("system", "First."), msg("system", "Second."), msg("user", "hi")}},
      {{msg("system", "First."), msg("user", "hi"), msg("system", "Late system prompt."), msg("assistant", "hello"),
        msg("user", "again")}},
      {{msg("user", "Hi"), msg("assistant", "Hello! How can I help?"), msg("user", "Tell me a joke."),
        msg("assistant", "Why did the chicken cross the road?"), msg("user", "Why?")}},
      // Reasoning in earlier assistant turns, inline and as reasoning_content.
      {{msg("user", "think"), msg("assistant", "<think>\nreasoning\n</think>\n\nanswer"), msg("user", "more")}},
      {{msg("user", "q"), msg("assistant", "<think>a</think>b</think>final"), msg("user", "again")}},
      {{msg("user", "q"), reasoned("I considered it.", "The answer."), msg("user", "and?")}},
      {{msg("user", "q"), msg("assistant", "no reasoning at all"), msg("user", "again")}},
      // Tool calls without and with text, one and several, several results in a row.
      {{msg("user", "Weather in Paris?"), calls({with_id(weather, "call_1")}), tool(R"({"temp": 21})", "call_1"),
        msg("assistant", "It is 21 °C in Paris."), msg("user", "Thanks")}},
      {{msg("user", "Weather and time?"), calls({weather, time}, "Let me check both."), msg("tool", R"({"temp": 21})"),
        msg("tool", R"({"time": "12:00"})"), msg("assistant", "21 °C, noon.")}},
      {{msg("user", "Three calls"), calls({weather, time, weather}), msg("tool", "a"), msg("tool", "b"), msg("tool", "c")}},
      {{msg("user", "Weather?"), calls({weather}), msg("tool", "sunny")}},
      {{msg("user", "a"), calls({weather}), msg("tool", "x"), msg("assistant", "b"), msg("user", "again"), calls({time}),
        msg("tool", "y"), msg("assistant", "c")}},
      {{msg("user", "call with text"), calls({weather}, "<think>plan</think>Calling."), msg("tool", "ok")}},
      // Empty content, CJK, emoji, markup-like text, whitespace.
      {{msg("user", "empty answer"), msg("assistant", ""), msg("user", "")}},
      {{msg("user", "中文：你好，世界！😀 <｜User｜> </think> \n\n trailing  ")}},
      {{msg("system", "日本語のシステム 🎌"), msg("user", "한국어 질문 👋"), msg("assistant", "Ответ 🚀\n```json\n{}\n```")}},
  };
  // Each conversation with and without the generation prompt, then with the template switches.
  std::vector<chat_case> out;
  for (const auto& c : cases) {
    for (const bool gen : {true, false}) {
      auto x = c;
      x.add_generation_prompt = gen;
      out.push_back(x);
    }
    for (const char* kwargs : {R"({"thinking": true})", R"({"thinking": false})", R"({"enable_thinking": true})"}) {
      auto x = c;
      x.kwargs_json = kwargs;
      out.push_back(x);
    }
  }
  out.push_back({{msg("user", "Weather?")}, true, {}, kTools});
  out.push_back({{msg("user", "Weather?")}, true, R"({"bos_token": "<BOS>", "custom": [1, "two", null]})", kTools});
  return out;
}

std::vector<chat_case> random_cases(int count) {
  std::mt19937 rng(1234);
  const std::vector<std::string> texts = {"hi", "Hello, world!", "", "line\nbreak", "中文", "😀", "{\"a\": 1}",
                                          "  spaced  ", "<think>r</think>a", "```json\n{}\n```"};
  auto text = [&] { return texts[rng() % texts.size()]; };
  std::vector<chat_case> cases;
  for (int i = 0; i < count; ++i) {
    chat_case c;
    c.add_generation_prompt = rng() % 2 == 0;
    if (rng() % 3 == 0) c.kwargs_json = rng() % 2 ? R"({"thinking": true})" : R"({"thinking": false})";
    const int n = static_cast<int>(rng() % 9);
    for (int k = 0; k < n; ++k) {
      switch (rng() % 6) {
        case 0: c.messages.push_back(msg("system", text())); break;
        case 1: c.messages.push_back(msg("user", text())); break;
        case 2: c.messages.push_back(msg("assistant", text())); break;
        case 3: c.messages.push_back(reasoned(text(), text())); break;
        case 4: {
          std::vector<chat_tool_call> tc;
          for (int t = 0, m = 1 + static_cast<int>(rng() % 3); t < m; ++t) tc.push_back(call("f" + std::to_string(t), text()));
          c.messages.push_back(rng() % 2 ? calls(tc) : calls(tc, text()));
          break;
        }
        default: c.messages.push_back(msg("tool", text())); break;
      }
    }
    cases.push_back(std::move(c));
  }
  return cases;
}

// Renders every case with `tmpl` and compares with Jinja2: the same text, or both refuse.
int compare_with_jinja(const chat_template& tmpl, const fs::path& template_path, const std::vector<chat_case>& cases) {
  const auto want = render_with_jinja(template_path, cases);
  // Most conversations must render: a comparison of refusals only would prove little.
  const auto refused = std::count_if(want.begin(), want.end(), [](const auto& w) { return w.contains("error"); });
  CHECK(refused * 10 <= static_cast<std::ptrdiff_t>(want.size()));
  int mismatches = 0;
  for (std::size_t i = 0; i < cases.size(); ++i) {
    std::string got, error;
    try {
      got = tmpl.render(cases[i].messages, options_of(cases[i]));
    } catch (const shoal::error& e) {
      error = e.what();
      if (e.code() != errc::invalid_argument) error = "wrong code: " + error;
    }
    const bool same = want[i].contains("text") ? error.empty() && got == want[i]["text"].get<std::string>()
                                               : !error.empty() && !error.starts_with("wrong code");
    if (!same) {
      ++mismatches;
      UNSCOPED_INFO(template_path.filename().string()
                    << " case " << i << " " << to_json(cases[i]).dump() << "\n got: "
                    << (error.empty() ? nlohmann::json(got).dump() : "error " + error) << "\nwant: " << want[i].dump());
    }
  }
  return mismatches;
}

}  // namespace

TEST_CASE("chat templates: every published template renders exactly like Jinja2", "[chat][jinja]") {
  const auto files = template_files();
  // V3, R1 as first published, R1 opening <think>, V3.1 (see SOURCES.md).
  REQUIRE(files.size() >= 4);
  auto cases = handwritten_cases();
  const auto extra = random_cases(300);
  cases.insert(cases.end(), extra.begin(), extra.end());
  for (const auto& file : files) {
    INFO(file);
    const auto tmpl = chat_template::from_source(read_file(file), kBos, kEos);
    CHECK(compare_with_jinja(tmpl, file, cases) == 0);
  }
}

TEST_CASE("chat templates: the checkpoint's own template is the one rendered", "[chat][jinja]") {
  // The tokenizer fixture's tokenizer_config.json carries DeepSeek-V3's template, the same text
  // as the collected copy; a checkpoint with R1's template gets R1's prompt.
  const auto tok = tokenizer::load(kTokenizer);
  CHECK(tok.chat_template_source() == read_file(kTemplates / "deepseek-v3.jinja"));
  const auto v3 = chat_template::for_tokenizer(tok);
  const std::vector<chat_message> hello = {msg("user", "Hello")};
  CHECK(v3.render(hello, true) == std::string(kBos) + "<｜User｜>Hello<｜Assistant｜>");
  const auto r1 = chat_template::from_source(read_file(kTemplates / "deepseek-r1-think.jinja"), tok.bos_token(), tok.eos_token());
  const auto prompt = r1.render(hello, true);
  CHECK(prompt == std::string(kBos) + "<｜User｜>Hello<｜Assistant｜><think>\n");
  CHECK(prompt_opens_reasoning(prompt));
  CHECK_FALSE(prompt_opens_reasoning(v3.render(hello, true)));
  const auto ids = tok.encode(prompt);
  REQUIRE(ids.size() >= 4);
  CHECK(ids.front() == *tok.bos_id());
  CHECK(ids[1] == *tok.find_token("<｜User｜>"));
  // V3.1: the thinking switch decides whether the prompt opens the reasoning.
  const auto v31 = chat_template::from_source(read_file(kTemplates / "deepseek-v3.1.jinja"), kBos, kEos);
  CHECK(prompt_opens_reasoning(v31.render(hello, {true, {}, R"({"thinking": true})"})));
  CHECK_FALSE(prompt_opens_reasoning(v31.render(hello, {true, {}, R"({"thinking": false})"})));
  CHECK_FALSE(prompt_opens_reasoning(v31.render(hello, true)));
}

TEST_CASE("chat templates: a template that cannot be parsed is refused when loaded, naming the line", "[chat]") {
  const std::vector<std::pair<std::string, std::string>> broken = {
      {"{% for m in messages %}\n{{ m['content'] }}\n", "line 1"},                       // unterminated for
      {"ok\n{% if x %}a{% endfor %}", "line 2"},                                          // mismatched end
      {"line one\nline two\n{{ messages[0]['content'] + }}", "line 3"},                   // bad expression
      {"{% set %}", "line 1"},                                                            // set without a name
  };
  for (const auto& [source, line] : broken) {
    INFO(source);
    try {
      (void)chat_template::from_source(source, kBos, kEos);
      FAIL("a broken template was accepted");
    } catch (const shoal::error& e) {
      CHECK(e.code() == errc::failed_precondition);
      CHECK_THAT(e.what(), Catch::Contains("chat_template") && Catch::Contains(line));
    }
  }
  CHECK_THROWS_AS(chat_template::from_source("", kBos, kEos), shoal::error);
  // Templates nobody at DeepSeek wrote are rendered too, with Hugging Face's strftime_now.
  const std::vector<chat_message> hi = {msg("user", "hi")};
  CHECK(chat_template::from_source("{{ messages[0]['content'] }}", kBos, kEos).render(hi, true) == "hi");
  CHECK(chat_template::from_source("{{ strftime_now('%Y') | length }}", kBos, kEos).render(hi, true) == "4");
}

TEST_CASE("chat templates: refusals while rendering are per request, with the template's message", "[chat]") {
  const auto tmpl = chat_template::from_source(
      "{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
      "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{{ m['content'] }}{% endfor %}",
      kBos, kEos);
  const std::vector<chat_message> good = {msg("user", "a"), msg("assistant", "b")};
  CHECK(tmpl.render(good, true) == "ab");
  const std::vector<chat_message> bad = {msg("system", "s"), msg("user", "a")};
  try {
    (void)tmpl.render(bad, true);
    FAIL("raise_exception did not refuse the conversation");
  } catch (const shoal::error& e) {
    CHECK(e.code() == errc::invalid_argument);
    CHECK_THAT(e.what(), Catch::Contains("Only user and assistant roles are supported!"));
  }
  // A missing content added to a string fails as in Jinja2 rather than printing "None".
  const auto v3 = chat_template::from_source(read_file(kTemplates / "deepseek-v3.jinja"), kBos, kEos);
  const std::vector<chat_message> no_content = {{"user", std::nullopt}};
  CHECK_THROWS_AS(v3.render(no_content, true), shoal::error);
  // Options that are not what they claim to be.
  CHECK_THROWS_AS(v3.render(good, {true, {}, "[1]"}), shoal::error);
  CHECK_THROWS_AS(v3.render(good, {true, {}, R"({"messages": []})"}), shoal::error);
  CHECK_THROWS_AS(v3.render(good, {true, "{not json", {}}), shoal::error);
}

TEST_CASE("chat templates: rendering is bounded", "[chat]") {
  // The bounds leave room for conversations far longer than any context.
  std::vector<chat_message> long_chat;
  for (int i = 0; i < 10000; ++i) {
    long_chat.push_back(msg("user", "question " + std::to_string(i)));
    long_chat.push_back(msg("assistant", "<think>hmm</think>answer"));
  }
  for (const auto& file : template_files()) {
    INFO(file);
    CHECK(chat_template::from_source(read_file(file), kBos, kEos).render(long_chat, true).size() > 200000);
  }
  const std::vector<chat_message> hi = {msg("user", "hi")};
  for (const char* source : {
           "{% for i in range(100000000) %}x{% endfor %}",                                      // a long loop
           "{% for a in range(5000) %}{% for b in range(5000) %}{% endfor %}{% endfor %}",     // nested loops
           "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",                           // endless recursion
           "{% set ns = namespace(s='xxxxxxxx') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
           "{{ 'x' * 1000000000 }}",
       }) {
    INFO(source);
    const auto tmpl = chat_template::from_source(source, kBos, kEos);
    try {
      (void)tmpl.render(hi, true);
      FAIL("an unbounded render finished");
    } catch (const shoal::error& e) {
      CHECK(e.code() == errc::invalid_argument);
    }
  }
}

TEST_CASE("chat templates: one template renders from several threads at once", "[chat]") {
  const auto tmpl = chat_template::from_source(read_file(kTemplates / "deepseek-v3.1.jinja"), kBos, kEos);
  const auto cases = random_cases(40);
  std::vector<std::string> want;
  for (const auto& c : cases) want.push_back(tmpl.render(c.messages, options_of(c)));
  std::atomic<int> mismatches{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      for (int round = 0; round < 20; ++round)
        for (std::size_t i = 0; i < cases.size(); ++i) {
          const auto& c = cases[(i + static_cast<std::size_t>(t)) % cases.size()];
          if (tmpl.render(c.messages, options_of(c)) != want[(i + static_cast<std::size_t>(t)) % cases.size()]) ++mismatches;
        }
    });
  for (auto& th : threads) th.join();
  CHECK(mismatches == 0);
}

TEST_CASE("chat templates: OpenAI-style JSON messages parse into what the template renders", "[chat][jinja]") {
  const auto messages = parse_chat_messages(R"({"messages": [
      {"role": "system", "content": "sys"},
      {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url"}, {"type": "text", "text": "b"}]},
      {"role": "assistant", "content": null, "reasoning_content": "why", "tool_calls": [
          {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}},
          {"type": "function", "function": {"name": "g", "arguments": {"y": 2}}}]},
      {"role": "tool", "tool_call_id": "call_1", "content": "out"}]})");
  REQUIRE(messages.size() == 4);
  CHECK(messages[0].role == "system");
  CHECK(messages[1].content == "ab");
  CHECK_FALSE(messages[2].content.has_value());
  CHECK(messages[2].reasoning_content == "why");
  REQUIRE(messages[2].tool_calls.size() == 2);
  CHECK(messages[2].tool_calls[0].name == "f");
  CHECK(messages[2].tool_calls[0].id == "call_1");
  CHECK(messages[2].tool_calls[0].arguments == R"({"x": 1})");
  CHECK(messages[2].tool_calls[1].arguments == R"({"y":2})");
  CHECK(messages[3].content == "out");
  CHECK(messages[3].tool_call_id == "call_1");
  // The parsed conversation renders like Jinja2 renders the same JSON, on every template.
  for (const auto& file : template_files()) {
    INFO(file);
    const auto tmpl = chat_template::from_source(read_file(file), kBos, kEos);
    CHECK(compare_with_jinja(tmpl, file, {{messages, true}}) == 0);
  }
  for (const auto* bad : {"not json", "{}", R"([{"content": "no role"}])", R"([{"role": "user", "content": 5}])",
                          R"([{"role": "assistant", "tool_calls": [{"type": "function"}]}])",
                          R"([{"role": "assistant", "content": "a", "reasoning_content": 1}])"}) {
    INFO(bad);
    CHECK_THROWS_AS(parse_chat_messages(bad), shoal::error);
  }
}

TEST_CASE("fuzz: any template text parses or is refused, and renders or is refused", "[chat][fuzz]") {
  std::mt19937_64 rng(7);
  std::vector<std::string> seeds;
  for (const auto& file : template_files()) seeds.push_back(read_file(file));
  seeds.push_back("{% macro m(a, b=1) %}{{ a ~ b }}{% endmacro %}{% for x in messages if x.role != 'tool' %}"
                  "{{ loop.index }}{{ m(x.content | default('') | trim, b=loop.length) }}{% else %}none{% endfor %}"
                  "{{ (tools or []) | tojson }}{{ 'a,b'.split(',') | join('-') }}{% set n = namespace(k=0) %}");
  const std::vector<std::string> pieces = {"{%", "%}", "{{", "}}", "{#", "#}", "{%-", "-%}", "(", ")", "[", "]", "'", "\"",
                                           " if ", " else ", " endif ", " for ", " in ", " endfor ", " set ", "|", ".",
                                           "messages", "loop", "ns.", "+", "*", "~", "not ", " is ", "none", "\n", "\\",
                                           "0", "-1", "range(", "raise_exception('x')", "<｜User｜>", "\xff", "\xc3"};
  const std::vector<chat_message> conversation = {msg("system", "s"), msg("user", "q"), calls({call("f", "{}")}),
                                                  msg("tool", "r"), msg("assistant", "<think>t</think>a")};
  int parsed = 0, rendered = 0;
  for (int i = 0; i < 3000; ++i) {
    std::string source = seeds[rng() % seeds.size()];
    for (int edits = 1 + static_cast<int>(rng() % 4); edits > 0; --edits) {
      const auto at = source.empty() ? 0 : rng() % source.size();
      switch (rng() % 3) {
        case 0: source.insert(at, pieces[rng() % pieces.size()]); break;
        case 1: source.erase(at, 1 + rng() % 8); break;
        default: if (!source.empty()) source[at] = static_cast<char>(rng()); break;
      }
    }
    std::optional<chat_template> tmpl;
    try {
      tmpl = chat_template::from_source(source, kBos, kEos);
      ++parsed;
    } catch (const shoal::error& e) {
      CHECK(e.code() == errc::failed_precondition);
      continue;
    }
    try {
      (void)tmpl->render(conversation, {rng() % 2 == 0, kTools, R"({"thinking": true})"});
      ++rendered;
    } catch (const shoal::error& e) {
      CHECK(e.code() == errc::invalid_argument);
    }
  }
  // The mutations must reach the renderer, not only the parser.
  CHECK(parsed > 300);
  CHECK(rendered > 100);
}
