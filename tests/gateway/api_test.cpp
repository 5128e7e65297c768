// The request parser: accepted forms, refusals with their fields, and a bounded fuzz loop.

#include "shoal/gateway/api.hpp"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <random>

using namespace shoal::gateway;

TEST_CASE("requests in the forms OpenAI clients send them", "[gateway][api]") {
  const auto r = parse_request(R"({"model":"m","messages":[{"role":"developer","content":"s"},
      {"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]},
      {"role":"assistant","content":null,"tool_calls":[{"id":"1","type":"function","function":{"name":"f","arguments":"{}"}}]},
      {"role":"tool","content":"r"}],"stream":true,"stream_options":{"include_usage":true},"max_tokens":5,
      "max_completion_tokens":7,"stop":"x","temperature":null,"top_p":0.5,"seed":-1,"n":2,"presence_penalty":1,"tools":[]})",
                               endpoint::chat, "m");
  REQUIRE(r.messages.size() == 4);
  CHECK(r.messages[0].role == "system");
  CHECK(r.messages[1].content == "ab");
  CHECK_FALSE(r.messages[2].content);
  REQUIRE(r.messages[2].tool_calls.size() == 1);
  CHECK(r.messages[2].tool_calls[0].name == "f");
  CHECK(r.stream);
  CHECK(r.include_usage);
  CHECK(r.max_tokens == 7);
  CHECK(r.stop == std::vector<std::string>{"x"});
  CHECK(r.sampling.temperature == 1.0f);  // null: the default
  CHECK(r.sampling.top_p == 0.5f);
  CHECK(r.sampling.seed == ~std::uint64_t{0});
  CHECK(r.n == 2);
  CHECK(r.sampling.presence_penalty == 1.0f);
  const auto c = parse_request(R"({"prompt":["one"]})", endpoint::completion, "m");
  CHECK(c.prompt == "one");
  CHECK(c.model.empty());
}

TEST_CASE("chat template inputs: kwargs, earlier reasoning, tool call ids", "[gateway][api]") {
  const auto r = parse_request(R"({"messages":[{"role":"user","content":"q"},
      {"role":"assistant","content":null,"reasoning_content":"why","tool_calls":[{"id":"call_1","type":"function",
        "function":{"name":"f","arguments":"{}"}}]},
      {"role":"tool","tool_call_id":"call_1","content":"r"}],"chat_template_kwargs":{"thinking":true,"x":[1]}})",
                               endpoint::chat, "m");
  REQUIRE(r.messages.size() == 3);
  CHECK(r.messages[1].reasoning_content == "why");
  CHECK(r.messages[1].tool_calls.at(0).id == "call_1");
  CHECK(r.messages[2].tool_call_id == "call_1");
  CHECK(nlohmann::json::parse(r.chat_template_kwargs) == nlohmann::json{{"thinking", true}, {"x", {1}}});
  CHECK(parse_request(R"({"messages":[{"role":"user","content":"q"}],"chat_template_kwargs":null})", endpoint::chat, "m")
            .chat_template_kwargs.empty());
  for (const char* bad : {R"({"messages":[{"role":"user","content":"q"}],"chat_template_kwargs":"thinking"})",
                          R"({"messages":[{"role":"assistant","content":"a","reasoning_content":3}]})",
                          R"({"messages":[{"role":"tool","content":"a","tool_call_id":{}}]})"}) {
    INFO(bad);
    CHECK_THROWS_AS(parse_request(bad, endpoint::chat, "m"), api_error);
  }
}

TEST_CASE("error bodies have OpenAI's shape", "[gateway][api]") {
  try {
    parse_request(R"({"model":"other","messages":[]})", endpoint::chat, "m");
    FAIL("accepted an unknown model");
  } catch (const api_error& e) {
    CHECK(e.status() == 404);
    const auto j = nlohmann::json::parse(error_body(e));
    CHECK(j["error"]["type"] == "invalid_request_error");
    CHECK(j["error"]["param"] == "model");
    CHECK(j["error"]["code"] == "model_not_found");
    CHECK(j["error"]["message"].get<std::string>().find("other") != std::string::npos);
  }
  try {
    parse_request(R"({"messages":[{"role":"user","content":"x"}],"top_k":"5"})", endpoint::chat, "m");
    FAIL("accepted a string top_k");
  } catch (const api_error& e) {
    CHECK(e.status() == 400);
    CHECK(nlohmann::json::parse(error_body(e))["error"]["code"].is_null());
  }
}

TEST_CASE("fuzz: any bytes give a request or an api_error, nothing else", "[gateway][api][fuzz]") {
  std::mt19937_64 rng(42);
  const std::vector<std::string> seeds = {
      R"({"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":0.7,"stop":["a"],"max_tokens":9,"n":2})",
      R"({"messages":[{"role":"assistant","content":null,"tool_calls":[{"function":{"name":"f","arguments":"{}"}}]}]})",
      R"({"prompt":[1,2,3],"stream":true,"stream_options":{"include_usage":true},"seed":18446744073709551615})",
      R"({"prompt":"x","top_p":1e-300,"top_k":-1,"min_p":0.5,"frequency_penalty":-2})"};
  const std::string alphabet = "{}[]\":,0123456789.-+eE \\u00ff truefalsenull\x01\xc3\xa9\xff";
  int accepted = 0, refused = 0;
  for (int i = 0; i < 20000; ++i) {
    std::string body;
    if (i % 10 == 0) {
      body.resize(rng() % 64);
      for (auto& ch : body) ch = static_cast<char>(rng());
    } else {
      body = seeds[rng() % seeds.size()];
      const int edits = 1 + static_cast<int>(rng() % 6);
      for (int e = 0; e < edits && !body.empty(); ++e) {
        const auto pos = rng() % body.size();
        switch (rng() % 3) {
          case 0: body[pos] = alphabet[rng() % alphabet.size()]; break;
          case 1: body.erase(pos, 1 + rng() % 8); break;
          default: body.insert(pos, 1, alphabet[rng() % alphabet.size()]); break;
        }
      }
    }
    const auto kind = (rng() & 1) ? endpoint::chat : endpoint::completion;
    try {
      const auto r = parse_request(body, kind, "m");
      ++accepted;
      CHECK(r.n >= 1);
      CHECK(r.n <= kMaxChoices);
      CHECK(r.stop.size() <= 4);
      if (r.max_tokens) CHECK(*r.max_tokens >= 1);
      CHECK(r.sampling.temperature >= 0.0f);
      CHECK(r.sampling.top_p > 0.0f);
      if (kind == endpoint::chat) CHECK_FALSE(r.messages.empty());
    } catch (const api_error& e) {
      ++refused;
      CHECK((e.status() == 400 || e.status() == 404));
      CHECK_NOTHROW(nlohmann::json::parse(error_body(e)));
    }
  }
  // The mutations must exercise both outcomes, or the loop tests nothing.
  CHECK(accepted > 100);
  CHECK(refused > 1000);
}
