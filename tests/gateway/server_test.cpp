// The HTTP server against a scripted backend: responses, SSE framing, every refusal status,
// misbehaving clients, disconnects, readiness and metrics.

#include "shoal/gateway/server.hpp"

#include "fake_backend.hpp"
#include "raw_http.hpp"
#include "shoal/runtime/embedded_tokenizer.hpp"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <fstream>
#include <random>
#include <sstream>
#include <thread>

using namespace shoal;
using namespace shoal::gateway;
using namespace shoal::gateway::testing;
using json = nlohmann::json;
using namespace std::chrono_literals;

namespace {

const runtime::tokenizer& test_tokenizer() {
  static const auto tok = runtime::tokenizer::from_json(runtime::deepseek_v3_tokenizer_json(),
                                                        runtime::deepseek_v3_tokenizer_config_json());
  return tok;
}

server_options test_options() {
  server_options o;
  o.port = 0;
  o.model_name = "test-model";
  o.max_body_bytes = 64 * 1024;
  o.read_timeout = 500ms;
  o.idle_timeout = 2s;
  o.stall_timeout = 300ms;
  o.probe_interval = 60s;
  o.probe_timeout = 300ms;
  o.experts_per_layer = 2;
  return o;
}

const std::string kChat = R"({"model":"test-model","messages":[{"role":"user","content":"Hi"}]})";

json body_json(const raw_response& r) { return json::parse(r.body); }

// Checks the OpenAI error shape and returns the error object.
json error_of(const raw_response& r) {
  const auto j = json::parse(r.body);
  REQUIRE(j.contains("error"));
  const auto& e = j["error"];
  CHECK(e["message"].is_string());
  CHECK_FALSE(e["message"].get<std::string>().empty());
  CHECK(e["type"].is_string());
  CHECK(e.contains("param"));
  CHECK(e.contains("code"));
  return e;
}

// The data payloads of an SSE body, checking each chunk holds exactly one event.
std::vector<std::string> sse_events(const raw_response& r) {
  std::vector<std::string> events;
  for (const auto& chunk : r.chunks) {
    REQUIRE(chunk.starts_with("data: "));
    REQUIRE(chunk.ends_with("\n\n"));
    REQUIRE(chunk.find("\n\n") == chunk.size() - 2);
    events.push_back(chunk.substr(6, chunk.size() - 8));
  }
  return events;
}

// The `reasoning_content` and `content` deltas of a streamed chat answer, each joined.
std::pair<std::string, std::string> streamed_reasoning_and_content(const raw_response& r) {
  std::string reasoning, content;
  for (const auto& e : sse_events(r)) {
    if (e == "[DONE]") continue;
    const auto d = json::parse(e)["choices"][0]["delta"];
    if (d.contains("reasoning_content")) reasoning += d["reasoning_content"].get<std::string>();
    if (d.contains("content")) content += d["content"].get<std::string>();
  }
  return {reasoning, content};
}

template <typename F>
bool eventually(F&& f, std::chrono::milliseconds timeout = 3s) {
  const auto end = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < end) {
    if (f()) return true;
    std::this_thread::sleep_for(5ms);
  }
  return f();
}

}  // namespace

TEST_CASE("health, models, metrics and unknown routes", "[gateway]") {
  fake_backend back;
  server srv(back, test_tokenizer(), test_options());
  const auto port = srv.port();
  auto health = request(port, get("/health"));
  CHECK(health.status == 200);
  CHECK(body_json(health)["status"] == "ok");
  auto models = request(port, get("/v1/models"));
  REQUIRE(models.status == 200);
  CHECK(body_json(models)["data"][0]["id"] == "test-model");
  auto missing = request(port, get("/v1/nothing"));
  CHECK(missing.status == 404);
  error_of(missing);
  auto method = request(port, get("/v1/chat/completions"));
  CHECK(method.status == 405);
  error_of(method);
  auto metrics = request(port, get("/metrics"));
  REQUIRE(metrics.status == 200);
  CHECK(metrics.headers["content-type"].starts_with("text/plain"));
  // The engine figures are the scripted backend's: this checks their exposition only.
  // gateway_serve_refusals_e2e_test compares a real server's figures with its own requests.
  for (const char* series : {"shoal_http_requests_total{route=\"/health\",status=\"200\"} 1",
                             "shoal_http_requests_total{route=\"other\",status=\"404\"} 1", "shoal_cache_blocks_used 7",
                             "shoal_cache_blocks_free 93", "shoal_queue_depth 0",
                             "shoal_expert_routed_tokens_total{layer=\"1\",expert=\"0\"} 3",
                             "shoal_time_to_first_token_seconds_bucket{le=\"+Inf\"} 0"})
    CHECK(metrics.body.find(series) != std::string::npos);
}

TEST_CASE("non-streaming chat and completions", "[gateway]") {
  fake_backend back;
  server srv(back, test_tokenizer(), test_options());
  auto r = request(srv.port(), post("/v1/chat/completions", R"({"model":"test-model","messages":[{"role":"system","content":"Be brief."},
      {"role":"user","content":[{"type":"text","text":"Hi"}]}],"temperature":0.5,"top_p":0.9,"seed":7,"stop":["xyz"],"max_tokens":50})"));
  REQUIRE(r.status == 200);
  CHECK(r.headers["content-type"] == "application/json");
  const auto j = body_json(r);
  CHECK(j["object"] == "chat.completion");
  CHECK(j["id"].get<std::string>().starts_with("chatcmpl-"));
  CHECK(j["model"] == "test-model");
  CHECK(j["choices"][0]["message"]["role"] == "assistant");
  CHECK(j["choices"][0]["message"]["content"] == "Hello, world!");
  CHECK(j["choices"][0]["message"]["reasoning_content"].is_null());
  CHECK(j["choices"][0]["finish_reason"] == "stop");
  const auto& u = j["usage"];
  const auto submitted = back.submitted();
  REQUIRE(submitted.size() == 1);
  const auto prompt_tokens = static_cast<std::int64_t>(submitted[0].prompt.size());
  CHECK(u["prompt_tokens"] == prompt_tokens);
  CHECK(u["completion_tokens"] == 5);
  CHECK(u["total_tokens"] == prompt_tokens + 5);
  CHECK(u["prompt_tokens_details"]["cached_tokens"] == prompt_tokens / 2);
  // The options reached the engine.
  CHECK(submitted[0].sampling.temperature == Approx(0.5));
  CHECK(submitted[0].sampling.top_p == Approx(0.9));
  CHECK(submitted[0].sampling.seed == 7u);
  CHECK(submitted[0].limits.max_tokens == 50);
  CHECK(submitted[0].limits.stop == std::vector<std::string>{"xyz"});
  REQUIRE(test_tokenizer().eos_id());
  CHECK(submitted[0].limits.stop_token_ids == std::vector<runtime::token_id>{*test_tokenizer().eos_id()});
  // The prompt went through the chat template.
  const auto text = test_tokenizer().decode(submitted[0].prompt);
  CHECK(text.find("Be brief.") != std::string::npos);
  CHECK(text.find("<｜User｜>Hi<｜Assistant｜>") != std::string::npos);

  auto length = request(srv.port(), post("/v1/chat/completions",
                                         R"({"messages":[{"role":"user","content":"Hi"}],"max_completion_tokens":2})"));
  REQUIRE(length.status == 200);
  CHECK(body_json(length)["choices"][0]["message"]["content"] == "Hello,");
  CHECK(body_json(length)["choices"][0]["finish_reason"] == "length");
  CHECK(body_json(length)["usage"]["completion_tokens"] == 2);

  auto n2 = request(srv.port(), post("/v1/chat/completions", R"({"messages":[{"role":"user","content":"Hi"}],"n":2,"seed":3})"));
  REQUIRE(n2.status == 200);
  REQUIRE(body_json(n2)["choices"].size() == 2);
  CHECK(body_json(n2)["choices"][1]["index"] == 1);
  CHECK(body_json(n2)["usage"]["completion_tokens"] == 10);
  const auto all = back.submitted();
  CHECK(all[all.size() - 2].sampling.seed != all.back().sampling.seed);

  auto completion = request(srv.port(), post("/v1/completions", R"({"model":"test-model","prompt":"Once upon"})"));
  REQUIRE(completion.status == 200);
  const auto c = body_json(completion);
  CHECK(c["object"] == "text_completion");
  CHECK(c["choices"][0]["text"] == "Hello, world!");
  CHECK(c["choices"][0]["finish_reason"] == "stop");
  auto ids = request(srv.port(), post("/v1/completions", R"({"prompt":[1,2,3],"max_tokens":1})"));
  REQUIRE(ids.status == 200);
  CHECK(back.submitted().back().prompt == std::vector<runtime::token_id>{1, 2, 3});
  CHECK(body_json(ids)["choices"][0]["text"] == "Hello");
}

TEST_CASE("streaming: one event per chunk, role first, finish_reason, usage, [DONE]", "[gateway]") {
  fake_backend back;
  server srv(back, test_tokenizer(), test_options());
  auto r = request(srv.port(), post("/v1/chat/completions",
                                    R"({"messages":[{"role":"user","content":"Hi"}],"stream":true,"stream_options":{"include_usage":true}})"));
  REQUIRE(r.status == 200);
  REQUIRE(r.complete);
  CHECK(r.headers["content-type"] == "text/event-stream");
  CHECK(r.headers["transfer-encoding"] == "chunked");
  const auto events = sse_events(r);
  REQUIRE(events.size() >= 4);
  CHECK(events.back() == "[DONE]");
  std::string content;
  int finishes = 0;
  for (std::size_t i = 0; i + 1 < events.size(); ++i) {
    const auto j = json::parse(events[i]);
    CHECK(j["object"] == "chat.completion.chunk");
    if (i + 2 == events.size()) {  // the usage chunk
      CHECK(j["choices"].empty());
      CHECK(j["usage"]["completion_tokens"] == 5);
      continue;
    }
    const auto& choice = j["choices"][0];
    if (i == 0) CHECK(choice["delta"]["role"] == "assistant");
    if (i > 0) CHECK_FALSE(choice["delta"].contains("role"));
    if (choice["delta"].contains("content")) content += choice["delta"]["content"].get<std::string>();
    if (!choice["finish_reason"].is_null()) {
      ++finishes;
      CHECK(choice["finish_reason"] == "stop");
    }
  }
  CHECK(content == "Hello, world!");
  CHECK(finishes == 1);

  auto plain = request(srv.port(), post("/v1/completions", R"({"prompt":"Once","stream":true})"));
  REQUIRE(plain.complete);
  const auto pe = sse_events(plain);
  REQUIRE(pe.back() == "[DONE]");
  std::string text;
  for (std::size_t i = 0; i + 1 < pe.size(); ++i) {
    const auto j = json::parse(pe[i]);
    CHECK(j["object"] == "text_completion");
    CHECK_FALSE(j.contains("usage"));  // not asked for
    text += j["choices"][0]["text"].get<std::string>();
  }
  CHECK(text == "Hello, world!");
}

TEST_CASE("R1 reasoning goes to reasoning_content, streamed and not", "[gateway]") {
  fake_options fo;
  fo.pieces = {"<think>", "\nLet me", " think.", "\n</think>", "\n\nThe answer", " is 4."};
  fake_backend back(fo);
  server srv(back, test_tokenizer(), test_options());
  auto r = request(srv.port(), post("/v1/chat/completions", kChat));
  REQUIRE(r.status == 200);
  const auto m = body_json(r)["choices"][0]["message"];
  CHECK(m["reasoning_content"] == "Let me think.");
  CHECK(m["content"] == "The answer is 4.");
  auto s = request(srv.port(), post("/v1/chat/completions", R"({"messages":[{"role":"user","content":"Hi"}],"stream":true})"));
  REQUIRE(s.complete);
  const auto [reasoning, content] = streamed_reasoning_and_content(s);
  CHECK(reasoning == "Let me think.");
  CHECK(content == "The answer is 4.");
}

// The embedded tokenizer with another chat_template, as a checkpoint carrying it would load.
runtime::tokenizer tokenizer_with_template(const std::string& template_file) {
  std::ifstream in(std::string(SHOAL_TEST_DATA_DIR) + "/chat_templates/" + template_file);
  std::stringstream text;
  text << in.rdbuf();
  auto config = json::parse(runtime::deepseek_v3_tokenizer_config_json());
  config["chat_template"] = text.str();
  return runtime::tokenizer::from_json(runtime::deepseek_v3_tokenizer_json(), config.dump());
}

TEST_CASE("a template whose prompt opens <think>: the output starts inside the reasoning", "[gateway]") {
  const auto tok = tokenizer_with_template("deepseek-r1-think.jinja");
  fake_options fo;
  fo.pieces = {"\nLet me", " think.", "\n</think>", "\n\nThe answer", " is 4."};  // no <think>: the prompt had it
  fake_backend back(fo);
  server srv(back, tok, test_options());
  auto r = request(srv.port(), post("/v1/chat/completions", kChat));
  REQUIRE(r.status == 200);
  const auto j = body_json(r);
  CHECK(j["choices"][0]["message"]["reasoning_content"] == "Let me think.");
  CHECK(j["choices"][0]["message"]["content"] == "The answer is 4.");
  const auto submitted = back.submitted();
  REQUIRE(submitted.size() == 1);
  CHECK(tok.decode(submitted[0].prompt, false) == "<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜><think>\n");
  CHECK(j["usage"]["prompt_tokens"] == static_cast<std::int64_t>(submitted[0].prompt.size()));
  auto s = request(srv.port(), post("/v1/chat/completions", R"({"messages":[{"role":"user","content":"Hi"}],"stream":true})"));
  REQUIRE(s.complete);
  const auto [reasoning, content] = streamed_reasoning_and_content(s);
  CHECK(reasoning == "Let me think.");
  CHECK(content == "The answer is 4.");
}

TEST_CASE("chat_template_kwargs reach the template; its refusals are 400s", "[gateway]") {
  const auto tok = tokenizer_with_template("deepseek-v3.1.jinja");
  fake_options fo;
  fo.pieces = {"Plan.", "</think>", "Done."};
  fake_backend back(fo);
  server srv(back, tok, test_options());
  // V3.1 with thinking: the prompt opens <think> and the output is reasoning until </think>.
  auto on = request(srv.port(), post("/v1/chat/completions",
      R"({"messages":[{"role":"user","content":"Hi"}],"chat_template_kwargs":{"thinking":true}})"));
  REQUIRE(on.status == 200);
  CHECK(body_json(on)["choices"][0]["message"]["reasoning_content"] == "Plan.");
  CHECK(body_json(on)["choices"][0]["message"]["content"] == "Done.");
  // Without: the prompt closes the reasoning, and the output is all content.
  auto off = request(srv.port(), post("/v1/chat/completions", kChat));
  REQUIRE(off.status == 200);
  CHECK(body_json(off)["choices"][0]["message"]["reasoning_content"].is_null());
  const auto submitted = back.submitted();
  REQUIRE(submitted.size() == 2);
  CHECK(tok.decode(submitted[0].prompt, false).ends_with("<｜Assistant｜><think>"));
  CHECK(tok.decode(submitted[1].prompt, false).ends_with("<｜Assistant｜></think>"));
  // Earlier reasoning sent back as reasoning_content is accepted.
  auto history = request(srv.port(), post("/v1/chat/completions", R"({"messages":[{"role":"user","content":"Hi"},
      {"role":"assistant","content":"Hello","reasoning_content":"greet"},{"role":"user","content":"Bye"}]})"));
  CHECK(history.status == 200);
  auto bad = request(srv.port(), post("/v1/chat/completions",
      R"({"messages":[{"role":"user","content":"Hi"}],"chat_template_kwargs":[true]})"));
  CHECK(bad.status == 400);
  CHECK(error_of(bad)["param"] == "chat_template_kwargs");
  auto reserved = request(srv.port(), post("/v1/chat/completions",
      R"({"messages":[{"role":"user","content":"Hi"}],"chat_template_kwargs":{"messages":[]}})"));
  CHECK(reserved.status == 400);
  // A template that refuses a conversation answers that request with 400 and its message.
  auto config = json::parse(runtime::deepseek_v3_tokenizer_config_json());
  config["chat_template"] = "{% if messages | length > 1 %}{{ raise_exception('one message only') }}{% endif %}"
                            "{{ messages[0]['content'] }}";
  const auto strict = runtime::tokenizer::from_json(runtime::deepseek_v3_tokenizer_json(), config.dump());
  fake_backend back2;
  server srv2(back2, strict, test_options());
  auto refused = request(srv2.port(), post("/v1/chat/completions",
      R"({"messages":[{"role":"user","content":"a"},{"role":"user","content":"b"}]})"));
  CHECK(refused.status == 400);
  CHECK_THAT(error_of(refused)["message"].get<std::string>(), Catch::Contains("one message only"));
  CHECK(request(srv2.port(), post("/v1/chat/completions", kChat)).status == 200);
}

TEST_CASE("bad requests get the right status and an OpenAI error; the server carries on", "[gateway]") {
  fake_options fo;
  fo.context = 64;
  fake_backend back(fo);
  server srv(back, test_tokenizer(), test_options());
  const auto port = srv.port();
  struct bad_case {
    std::string body;
    int status;
    std::string param;
    std::string code;
  };
  const std::string long_prompt = R"({"messages":[{"role":"user","content":")" + std::string(400, 'x') + " " +
                                  std::string(2000, ' ') + std::string(300, 'y') + R"( a b c d e f g h i j k l m n o p q r s t u v w x y z a b c d e f g h i j k l m n o p q r s t u v w x y z"}]})";
  const std::vector<bad_case> cases = {
      {"{not json", 400, "", ""},
      {"[1,2]", 400, "", ""},
      {R"({"messages":"hi"})", 400, "messages", ""},
      {R"({"messages":[]})", 400, "messages", ""},
      {R"({"messages":[{"role":"wizard","content":"x"}]})", 400, "messages[0].role", ""},
      {R"({"messages":[{"role":"user"}]})", 400, "messages[0].content", ""},
      {R"({"messages":[{"role":"user","content":"x"}],"temperature":"hot"})", 400, "temperature", ""},
      {R"({"messages":[{"role":"user","content":"x"}],"temperature":3})", 400, "temperature", ""},
      {R"({"messages":[{"role":"user","content":"x"}],"top_p":0})", 400, "top_p", ""},
      {R"({"messages":[{"role":"user","content":"x"}],"max_tokens":0})", 400, "max_tokens", ""},
      {R"({"messages":[{"role":"user","content":"x"}],"max_tokens":1.5})", 400, "max_tokens", ""},
      {R"({"messages":[{"role":"user","content":"x"}],"n":100})", 400, "n", ""},
      {R"({"messages":[{"role":"user","content":"x"}],"stop":["a","b","c","d","e"]})", 400, "stop", ""},
      {R"({"messages":[{"role":"user","content":"x"}],"stop":[""]})", 400, "stop", ""},
      {R"({"messages":[{"role":"user","content":"x"}],"seed":"x"})", 400, "seed", ""},
      {R"({"messages":[{"role":"user","content":"x"}],"stream":"yes"})", 400, "stream", ""},
      {R"({"messages":[{"role":"user","content":"x"}],"logprobs":true})", 400, "logprobs", ""},
      {R"({"model":"gpt-4","messages":[{"role":"user","content":"x"}]})", 404, "model", "model_not_found"},
      {R"({"model":7,"messages":[{"role":"user","content":"x"}]})", 400, "model", ""},
      {long_prompt, 400, "messages", "context_length_exceeded"},
      {R"({"messages":[{"role":"user","content":"x"}],"max_tokens":63})", 400, "max_tokens", "context_length_exceeded"},
  };
  for (const auto& c : cases) {
    INFO(c.body.substr(0, 120));
    auto r = request(port, post("/v1/chat/completions", c.body));
    CHECK(r.status == c.status);
    const auto e = error_of(r);
    if (!c.param.empty()) CHECK(e["param"] == c.param);
    if (!c.code.empty()) CHECK(e["code"] == c.code);
  }
  auto bad_ids = request(port, post("/v1/completions", R"({"prompt":[1, 99999999]})"));
  CHECK(bad_ids.status == 400);
  auto no_prompt = request(port, post("/v1/completions", R"({"model":"test-model"})"));
  CHECK(no_prompt.status == 400);
  CHECK(error_of(no_prompt)["param"] == "prompt");
  CHECK(back.submitted().empty());
  auto ok = request(port, post("/v1/chat/completions", kChat));
  CHECK(ok.status == 200);
}

TEST_CASE("oversized bodies get 413, slow requests 408, idle connections are closed", "[gateway]") {
  fake_backend back;
  server srv(back, test_tokenizer(), test_options());
  const auto port = srv.port();
  {
    // Declared too large: refused before the body is read.
    raw_connection c(port);
    c.send("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n{\"messages\":");
    auto r = c.read_response();
    CHECK(r.status == 413);
    CHECK(error_of(r)["code"] == "request_too_large");
    CHECK(c.closed_within(3s));
  }
  {
    // Actually sent: the answer still arrives intact.
    auto r = request(port, post("/v1/chat/completions", std::string(100 * 1024, ' ')));
    CHECK(r.status == 413);
  }
  {
    raw_connection c(port);
    c.send("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Le");  // and then nothing
    const auto start = std::chrono::steady_clock::now();
    auto r = c.read_response(5s);
    CHECK(r.status == 408);
    CHECK(std::chrono::steady_clock::now() - start < 3s);
    error_of(r);
  }
  {
    raw_connection c(port);
    c.send(post("/v1/chat/completions", kChat).substr(0, 150));  // body cut short, connection half-closed
    c.shutdown_write();
    CHECK(c.closed_within(3s));
  }
  {
    raw_connection c(port);  // connects and says nothing
    CHECK(c.closed_within(3s));
  }
  {
    raw_connection c(port);
    c.send("GET /health HTTX/9.9\r\n\r\n");
    CHECK(c.read_response().status == 400);
  }
  CHECK(request(port, post("/v1/chat/completions", kChat)).status == 200);
}

TEST_CASE("keep-alive and pipelined requests are answered in order", "[gateway]") {
  fake_backend back;
  server srv(back, test_tokenizer(), test_options());
  raw_connection c(srv.port());
  c.send(post("/v1/chat/completions", kChat) + get("/health") +
         post("/v1/completions", R"({"prompt":"x","max_tokens":1})"));
  auto a = c.read_response();
  auto b = c.read_response();
  auto d = c.read_response();
  REQUIRE(a.status == 200);
  CHECK(body_json(a)["object"] == "chat.completion");
  CHECK(body_json(b)["status"] == "ok");
  CHECK(body_json(d)["choices"][0]["text"] == "Hello");
  c.send(get("/health"));
  CHECK(c.read_response().status == 200);
}

TEST_CASE("a client that disconnects has its request cancelled", "[gateway]") {
  fake_options fo;
  fo.pieces.assign(2000, "tok ");
  fo.interval = 5ms;
  fake_backend back(fo);
  server srv(back, test_tokenizer(), test_options());
  {
    raw_connection c(srv.port());
    c.send(post("/v1/chat/completions", R"({"messages":[{"role":"user","content":"Hi"}],"stream":true,"max_tokens":1500})"));
    REQUIRE(c.fill(3s));  // the stream has started
  }
  CHECK(eventually([&] { return back.cancelled().size() == 1; }));
  {
    raw_connection c(srv.port());
    c.send(post("/v1/chat/completions", R"({"messages":[{"role":"user","content":"Hi"}],"max_tokens":1500})"));
    REQUIRE(eventually([&] { return back.active() == 1; }));
  }  // closed while the answer is being generated: nothing was written yet
  CHECK(eventually([&] { return back.cancelled().size() == 2; }));
  CHECK(eventually([&] { return back.active() == 0 && srv.in_flight() == 0; }));
  auto metrics = request(srv.port(), get("/metrics"));
  CHECK(metrics.body.find("status=\"499\"} 2") != std::string::npos);
}

TEST_CASE("a client that stops reading is dropped after the write timeout and its request cancelled", "[gateway]") {
  fake_options fo;
  // 64 MB over at least 10 s: more than the socket buffers hold (loopback buffers can reach
  // tens of MB), and generation is still going when the write stalls, so there is a request
  // left to cancel.
  fo.pieces.assign(1000, std::string(64 * 1024, 'z'));
  fo.interval = 10ms;
  fake_backend back(fo);
  auto o = test_options();
  o.write_timeout = 300ms;
  server srv(back, test_tokenizer(), o);
  raw_connection c(srv.port());
  c.send(post("/v1/chat/completions", R"({"messages":[{"role":"user","content":"Hi"}],"stream":true,"max_tokens":2000})"));
  // Never read: the server's writes stall, and the watchdog gives up on the client.
  CHECK(eventually([&] { return back.cancelled().size() == 1; }, 20s));
  CHECK(eventually([&] { return srv.in_flight() == 0; }));
  CHECK(request(srv.port(), get("/health")).status == 200);
}

TEST_CASE("too much queued gets 429 and the rest carries on", "[gateway]") {
  fake_options fo;
  fo.hang = true;
  fo.max_waiting = 1;
  fake_backend back(fo);
  server srv(back, test_tokenizer(), test_options());
  raw_connection first(srv.port());
  first.send(post("/v1/chat/completions", R"({"messages":[{"role":"user","content":"Hi"}],"stream":true})"));
  REQUIRE(eventually([&] { return back.active() == 1; }));
  auto r = request(srv.port(), post("/v1/chat/completions", kChat));
  CHECK(r.status == 429);
  CHECK(r.headers.count("retry-after") == 1);
  CHECK(error_of(r)["code"] == "rate_limit_exceeded");
  auto n3 = request(srv.port(), post("/v1/chat/completions", R"({"messages":[{"role":"user","content":"Hi"}],"n":3})"));
  CHECK(n3.status == 429);  // the first choice fits, the second does not: all are given up
  CHECK(request(srv.port(), get("/health")).status == 200);
  first.close();
  CHECK(eventually([&] { return back.active() == 0 && srv.in_flight() == 0; }));
}

TEST_CASE("/ready: 200 while progressing, 503 within seconds when the engine hangs", "[gateway]") {
  SECTION("busy engine that stops stepping") {
    fake_options fo;
    fo.hang = true;
    fake_backend back(fo);
    server srv(back, test_tokenizer(), test_options());
    raw_connection c(srv.port());
    c.send(post("/v1/chat/completions", R"({"messages":[{"role":"user","content":"Hi"}],"stream":true})"));
    REQUIRE(eventually([&] { return back.active() == 1; }));
    const auto start = std::chrono::steady_clock::now();
    CHECK(eventually([&] { return request(srv.port(), get("/ready")).status == 503; }, 3s));
    CHECK(std::chrono::steady_clock::now() - start < 2s);
    auto r = request(srv.port(), get("/ready"));
    CHECK(error_of(r)["message"].get<std::string>().find("no step") != std::string::npos);
    CHECK(request(srv.port(), get("/health")).status == 200);  // alive, not ready
  }
  SECTION("idle engine whose one-token probe never finishes") {
    fake_options fo;
    fo.hang = true;
    fake_backend back(fo);
    auto o = test_options();
    o.probe_interval = 0ms;
    server srv(back, test_tokenizer(), o);
    auto r = request(srv.port(), get("/ready"));
    CHECK(r.status == 503);
    CHECK(error_of(r)["message"].get<std::string>().find("probe") != std::string::npos);
  }
  SECTION("healthy engine, idle and busy") {
    fake_options fo;
    fo.interval = 20ms;
    fo.pieces.assign(50, "x");
    fake_backend back(fo);
    auto o = test_options();
    o.probe_interval = 0ms;
    server srv(back, test_tokenizer(), o);
    CHECK(request(srv.port(), get("/ready")).status == 200);  // the probe completes
    raw_connection c(srv.port());
    c.send(post("/v1/chat/completions", R"({"messages":[{"role":"user","content":"Hi"}],"stream":true})"));
    REQUIRE(eventually([&] { return back.active() >= 1; }));
    for (int i = 0; i < 5; ++i) {
      CHECK(request(srv.port(), get("/ready")).status == 200);
      std::this_thread::sleep_for(100ms);
    }
    CHECK(c.read_response().complete);
  }
}

TEST_CASE("metrics count requests, tokens and latencies", "[gateway]") {
  fake_backend back;
  server srv(back, test_tokenizer(), test_options());
  for (int i = 0; i < 3; ++i) REQUIRE(request(srv.port(), post("/v1/chat/completions", kChat)).status == 200);
  REQUIRE(request(srv.port(), post("/v1/chat/completions", "{")).status == 400);
  const auto m = request(srv.port(), get("/metrics")).body;
  CHECK(m.find("shoal_http_requests_total{route=\"/v1/chat/completions\",status=\"200\"} 3") != std::string::npos);
  CHECK(m.find("shoal_http_requests_total{route=\"/v1/chat/completions\",status=\"400\"} 1") != std::string::npos);
  CHECK(m.find("shoal_request_generated_tokens_total 15") != std::string::npos);
  CHECK(m.find("shoal_time_to_first_token_seconds_count 3") != std::string::npos);
  CHECK(m.find("shoal_time_per_output_token_seconds_count 3") != std::string::npos);
}

TEST_CASE("shutdown lets requests in flight finish, answers new ones 503, then stops listening", "[gateway]") {
  fake_options fo;
  fo.pieces.assign(400, "x");
  fo.interval = 5ms;
  fake_backend back(fo);
  server srv(back, test_tokenizer(), test_options());
  const auto port = srv.port();
  raw_connection c(port);
  c.send(post("/v1/chat/completions", R"({"messages":[{"role":"user","content":"Hi"}],"stream":true})"));
  REQUIRE(eventually([&] { return back.active() == 1; }));
  std::int64_t cancelled = -1;
  std::thread stopper([&] { cancelled = srv.shutdown(5s); });
  // The stream takes about two seconds more: the drain is under way.
  REQUIRE(eventually([&] { return request(port, get("/ready")).status == 503; }));
  const auto refused = request(port, post("/v1/chat/completions", kChat));
  CHECK(refused.status == 503);
  CHECK(refused.headers.count("retry-after") == 1);
  CHECK(refused.headers.at("connection") == "close");
  CHECK(error_of(refused)["code"] == "unavailable");
  CHECK(back.active() == 1);
  auto r = c.read_response();
  stopper.join();
  CHECK(r.complete);
  CHECK(sse_events(r).back() == "[DONE]");
  CHECK(back.cancelled().empty());
  CHECK(back.submitted().size() == 1);  // the refused request never reached the backend
  CHECK(cancelled == 0);
  CHECK_THROWS(raw_connection(port));
}

TEST_CASE("a connection that is new or half-way through a request when the drain starts gets 503, not a reset",
          "[gateway]") {
  fake_options fo;
  fo.pieces.assign(400, "x");
  fo.interval = 5ms;
  fake_backend back(fo);
  server srv(back, test_tokenizer(), test_options());
  const auto port = srv.port();
  raw_connection streaming(port);
  streaming.send(post("/v1/chat/completions", R"({"messages":[{"role":"user","content":"Hi"}],"stream":true})"));
  REQUIRE(eventually([&] { return back.active() == 1; }));
  const auto whole = post("/v1/chat/completions", kChat);
  raw_connection fresh(port);  // connected, nothing sent yet
  raw_connection half(port);
  half.send(whole.substr(0, 20));
  std::this_thread::sleep_for(100ms);  // both accepted and reading
  std::thread stopper([&] { (void)srv.shutdown(5s); });
  REQUIRE(eventually([&] { return request(port, get("/ready")).status == 503; }));
  fresh.send(whole);
  half.send(whole.substr(20));
  for (auto* c : {&fresh, &half}) {
    const auto r = c->read_response();
    CHECK(r.status == 503);
    if (r.complete) CHECK(error_of(r)["code"] == "unavailable");
  }
  const auto r = streaming.read_response();
  stopper.join();
  CHECK(r.complete);
  CHECK(back.submitted().size() == 1);
}

TEST_CASE("shutdown cancels what is still running when the grace period runs out and says how many", "[gateway]") {
  fake_options fo;
  fo.pieces.assign(100000, "x");
  fo.interval = 5ms;
  fake_backend back(fo);
  server srv(back, test_tokenizer(), test_options());
  raw_connection c(srv.port());
  c.send(post("/v1/chat/completions", R"({"messages":[{"role":"user","content":"Hi"}],"stream":true})"));
  REQUIRE(eventually([&] { return back.active() == 1; }));
  CHECK(srv.shutdown(200ms) == 1);
  CHECK(back.cancelled().size() == 1);
  CHECK(srv.shutdown(0ms) == 0);
}

TEST_CASE("random and mutated HTTP requests never hurt the server", "[gateway][fuzz]") {
  fake_backend back;
  auto o = test_options();
  o.read_timeout = 200ms;
  server srv(back, test_tokenizer(), o);
  const auto port = srv.port();
  std::mt19937 rng(1234);
  const std::vector<std::string> seeds = {post("/v1/chat/completions", kChat), post("/v1/completions", R"({"prompt":"x"})"),
                                          get("/metrics"), get("/ready"), get("/v1/models")};
  const std::string alphabet = "{}[]\":,0123456789.-eE truefalsnul\\\r\n:/HTTP GETPOST";
  for (int i = 0; i < 150; ++i) {
    std::string req = seeds[rng() % seeds.size()];
    const int edits = 1 + static_cast<int>(rng() % 8);
    for (int e = 0; e < edits && !req.empty(); ++e) {
      const auto pos = rng() % req.size();
      switch (rng() % 4) {
        case 0: req[pos] = alphabet[rng() % alphabet.size()]; break;
        case 1: req.erase(pos, 1 + rng() % 10); break;
        case 2: req.insert(pos, std::string(1 + rng() % 5, alphabet[rng() % alphabet.size()])); break;
        default: req[pos] = static_cast<char>(rng()); break;
      }
    }
    raw_connection c(port);
    c.send(req);
    c.shutdown_write();
    const auto r = c.read_response(3s);
    // Either a well-formed answer or a closed connection; never a hang.
    INFO("request " << i << ": " << req);
    if (r.status != 0) {
      CHECK(r.status >= 200);
      CHECK(r.status < 600);
      CHECK(r.status != 500);
    } else {
      CHECK(c.closed_within(0ms));  // no answer: the server closed the connection, it did not leave it hanging
    }
  }
  CHECK(request(port, post("/v1/chat/completions", kChat)).status == 200);
  CHECK(eventually([&] { return srv.in_flight() == 0; }));
}
