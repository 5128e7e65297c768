// The HTTP refusals and lifecycle of server_test.cpp, against the real thing: a `shoal serve
// --model DIR` process and a `shoal serve --cluster CONFIG` gateway with its 4 node processes
// (2 pipeline stages, 2 expert nodes) of the tiny model. Every check runs against both server
// kinds through one helper; every refusal is followed by a request that must be served; and
// /metrics is compared with the counts this test itself produced.
//
// Not here: a deadline expiring mid-generation. The API has no per-request timeout option
// (the engine deadline is the server's fixed `server_options::request_deadline`, 600 s, with
// no flag), so there is nothing a client can set to expire.

#include "e2e_helpers.hpp"
#include "raw_http.hpp"
#include "serve_process.hpp"
#include "tiny_cluster.hpp"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <csignal>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <sstream>
#include <thread>

namespace fs = std::filesystem;
using json = nlohmann::json;
using namespace std::chrono_literals;
using namespace shoal::gateway::testing;

namespace {

// One process of each kind for the whole run; the last case stops both.
serve_process& embedded() {
  static serve_process p("refusals-embedded", {"serve", "--model", tiny_model().string(), "--port", "0", "--threads",
                                               "1", "--cache-mb", "64", "--name", "tiny", "--drain-seconds", "30"});
  return p;
}

serve_process& clustered() {
  static serve_process p("refusals-cluster", {"serve", "--cluster", tiny_cluster_config().string(), "--transports", "tcp",
                                              "--port", "0", "--name", "tiny", "--drain-seconds", "30"});
  return p;
}

struct server_kind {
  const char* name;
  std::function<serve_process&()> get;
  bool cluster;
};

const std::vector<server_kind>& kinds() {
  static const std::vector<server_kind> k{{"serve --model", embedded, false}, {"serve --cluster", clustered, true}};
  return k;
}

json chat_body(const json& extra = json::object()) {
  json body{{"model", "tiny"},
            {"messages", {{{"role", "user"}, {"content", "Tell me about the sea."}}}},
            {"temperature", 0},
            {"max_tokens", 2}};
  body.update(extra);
  return body;
}

raw_response post_json(const serve_process& s, std::string_view path, const json& body,
                       std::chrono::milliseconds timeout = 60s) {
  return request(s.port(), post(path, body.dump()), timeout);
}

json body_json(const raw_response& r) {
  INFO("status " << r.status << ", body: " << r.body);
  REQUIRE(r.complete);
  const auto j = json::parse(r.body, nullptr, false);
  REQUIRE(!j.is_discarded());
  return j;
}

// A refusal: the status and OpenAI's error object naming `param` (empty: null) and `code`.
void check_refused(const raw_response& r, int status, const std::string& param, const std::string& code = {}) {
  INFO("status " << r.status << ", body: " << r.body);
  CHECK(r.status == status);
  const auto j = body_json(r);
  REQUIRE(j.contains("error"));
  const auto& e = j["error"];
  CHECK(e["message"].is_string());
  CHECK(e["type"] == "invalid_request_error");
  if (param.empty())
    CHECK(e["param"].is_null());
  else
    CHECK(e["param"] == param);
  if (!code.empty()) CHECK(e["code"] == code);
}

// After every refusal: the server still answers a valid request.
void check_serving(const serve_process& s) {
  const auto r = post_json(s, "/v1/chat/completions", chat_body());
  INFO("after a refusal: status " << r.status << ", body: " << r.body);
  REQUIRE(r.status == 200);
  const auto j = body_json(r);
  CHECK(j["choices"][0]["message"]["content"].is_string());
  CHECK(j["usage"]["completion_tokens"] == 2);
}

// The /metrics text as series (name with labels) -> value.
using metrics_map = std::map<std::string, double>;

metrics_map scrape(const serve_process& s) {
  const auto r = request(s.port(), get("/metrics"), 10s);
  INFO(r.body);
  REQUIRE(r.status == 200);
  metrics_map m;
  std::istringstream lines(r.body);
  for (std::string line; std::getline(lines, line);) {
    if (line.empty() || line[0] == '#') continue;
    const auto space = line.rfind(' ');
    m[line.substr(0, space)] = std::stod(line.substr(space + 1));
  }
  return m;
}

// The queue, cache and prefill gauges come from the head node's status, which the gateway
// asks for at most every 250 ms (cluster_backend.cpp, kStatusAge); wait that out for values
// that include everything finished so far. Across processes, routed-token counts reach the
// head with the nodes' heartbeat answers (every 500 ms by default): wait longer there.
metrics_map settled_scrape(const serve_process& s, std::chrono::milliseconds settle = 300ms) {
  std::this_thread::sleep_for(settle);
  return scrape(s);
}

double at(const metrics_map& m, const std::string& series) {
  const auto it = m.find(series);
  return it == m.end() ? 0.0 : it->second;
}

std::string requests_series(const std::string& route, int status) {
  return "shoal_http_requests_total{route=\"" + route + "\",status=\"" + std::to_string(status) + "\"}";
}

// ---- the checks, one function each, run against both server kinds ----

void check_context_and_field_refusals(const serve_process& s) {
  // A prompt longer than the context (4096 tokens for the tiny model on either server).
  std::string words;
  for (int i = 0; i < 5000; ++i) words += "word ";
  check_refused(post_json(s, "/v1/chat/completions", chat_body({{"messages", {{{"role", "user"}, {"content", words}}}}})),
                400, "messages", "context_length_exceeded");
  check_serving(s);
  check_refused(post_json(s, "/v1/completions", json{{"prompt", std::vector<int>(4096, 100)}, {"max_tokens", 1}}), 400,
                "prompt", "context_length_exceeded");
  check_serving(s);

  // max_tokens beyond what the context leaves, or outside its range.
  check_refused(post_json(s, "/v1/chat/completions", chat_body({{"max_tokens", 4096}})), 400, "max_tokens",
                "context_length_exceeded");
  check_serving(s);
  check_refused(post_json(s, "/v1/chat/completions", chat_body({{"max_completion_tokens", 100000}})), 400, "max_tokens",
                "context_length_exceeded");
  check_serving(s);
  check_refused(post_json(s, "/v1/chat/completions", chat_body({{"max_tokens", 0}})), 400, "max_tokens");
  check_serving(s);
  check_refused(post_json(s, "/v1/chat/completions", chat_body({{"max_tokens", std::int64_t{1} << 40}})), 400,
                "max_tokens");
  check_serving(s);

  // Options this server cannot honour are refused, not ignored.
  const json tool{{"type", "function"},
                  {"function", {{"name", "get_weather"}, {"parameters", {{"type", "object"}}}}}};
  check_refused(post_json(s, "/v1/chat/completions", chat_body({{"tools", json::array({tool})}})), 400, "tools");
  check_serving(s);
  check_refused(post_json(s, "/v1/chat/completions", chat_body({{"logprobs", true}})), 400, "logprobs");
  check_serving(s);
  check_refused(post_json(s, "/v1/chat/completions", chat_body({{"logprobs", false}, {"top_logprobs", 2}})), 400,
                "logprobs");
  check_serving(s);
  const json completion{{"model", "tiny"}, {"prompt", "The sea is"}, {"max_tokens", 2}, {"temperature", 0}};
  auto with = [&](const json& extra) {
    auto b = completion;
    b.update(extra);
    return b;
  };
  check_refused(post_json(s, "/v1/completions", with({{"echo", true}})), 400, "echo");
  check_serving(s);
  check_refused(post_json(s, "/v1/completions", with({{"suffix", " and so on."}})), 400, "suffix");
  check_serving(s);
  check_refused(post_json(s, "/v1/completions", with({{"logprobs", 3}})), 400, "logprobs");
  check_serving(s);
  check_refused(post_json(s, "/v1/completions", with({{"best_of", 2}})), 400, "best_of");
  check_serving(s);
  // What these options look like when a client sends its defaults: accepted.
  const auto defaults = post_json(s, "/v1/chat/completions", chat_body({{"tools", json::array()}, {"logprobs", false}}));
  CHECK(defaults.status == 200);
  const auto plain = post_json(s, "/v1/completions", with({{"echo", false}, {"suffix", nullptr}, {"best_of", 1}}));
  CHECK(plain.status == 200);
  CHECK(body_json(plain)["usage"]["completion_tokens"] == 2);
}

void check_body_limits_and_chunked_bodies(const serve_process& s) {
  // The default limit is 1 MiB: a body of exactly that is served, one byte more is 413.
  auto padded = [](std::size_t size) {
    auto body = chat_body().dump();
    body.resize(size, ' ');  // JSON allows trailing whitespace
    return body;
  };
  constexpr std::size_t kLimit = 1 << 20;
  const auto fits = request(s.port(), post("/v1/chat/completions", padded(kLimit)), 60s);
  CHECK(fits.status == 200);
  {
    raw_connection c(s.port());
    c.send(post("/v1/chat/completions", padded(kLimit + 1)));
    const auto r = c.read_response(10s);
    check_refused(r, 413, "", "request_too_large");
    CHECK(r.headers.at("connection") == "close");
    CHECK(c.closed_within(5s));
  }
  check_serving(s);
  {
    // Declared too large: refused before the body arrives.
    raw_connection c(s.port());
    c.send("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n{\"messages\":");
    check_refused(c.read_response(10s), 413, "", "request_too_large");
  }
  check_serving(s);

  // Transfer-Encoding: chunked request bodies: the same answer as with Content-Length.
  const auto body = chat_body({{"max_tokens", 8}}).dump();
  const auto whole = body_json(post_json(s, "/v1/chat/completions", json::parse(body)));
  auto chunked = [](const std::string& data, std::size_t piece) {
    std::string out =
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
    for (std::size_t i = 0; i < data.size(); i += piece) {
      const auto part = data.substr(i, piece);
      std::ostringstream size;
      size << std::hex << part.size();
      out += size.str() + "\r\n" + part + "\r\n";
    }
    return out + "0\r\n\r\n";
  };
  {
    raw_connection c(s.port());
    const auto raw = chunked(body, 7);
    // Sent in pieces with pauses, as a client streaming its upload would.
    const auto third = raw.size() / 3;
    c.send(raw.substr(0, third));
    std::this_thread::sleep_for(50ms);
    c.send(raw.substr(third, third));
    std::this_thread::sleep_for(50ms);
    c.send(raw.substr(2 * third));
    const auto r = c.read_response(60s);
    REQUIRE(r.status == 200);
    const auto j = body_json(r);
    CHECK(j["choices"][0]["message"]["content"] == whole["choices"][0]["message"]["content"]);
    CHECK(j["usage"] == whole["usage"]);
    // Keep-alive: the next request on the same connection is served.
    c.send(post("/v1/chat/completions", body));
    CHECK(c.read_response(60s).status == 200);
  }
  {
    // The body limit holds for chunked bodies too, whatever the chunk sizes.
    raw_connection c(s.port());
    c.send(chunked(padded(kLimit + 4096), 64 * 1024));
    check_refused(c.read_response(10s), 413, "", "request_too_large");
  }
  check_serving(s);
}

// Opens a connection that sends half a request and then nothing; `check` is called after the
// read timeout (10 s, fixed) and expects a 408.
struct half_request {
  raw_connection c;
  std::chrono::steady_clock::time_point sent;
  explicit half_request(const serve_process& s, const std::string& part) : c(s.port()) {
    c.send(part);
    sent = std::chrono::steady_clock::now();
  }
  void check() {
    const auto r = c.read_response(20s);
    const auto took = std::chrono::duration<double>(std::chrono::steady_clock::now() - sent).count();
    INFO("answered after " << took << " s");
    check_refused(r, 408, "", "request_timeout");
    CHECK(took > 9.0);
    CHECK(took < 15.0);
    CHECK(c.closed_within(5s));
  }
};

void check_stop_strings(const serve_process& s) {
  const auto full = body_json(post_json(s, "/v1/chat/completions", chat_body({{"max_tokens", 24}})));
  const auto text = full["choices"][0]["message"]["content"].get<std::string>();
  REQUIRE(text.size() > 8);
  const auto stop = middle_character(text);
  const auto expected = text.substr(0, text.find(stop));
  CAPTURE(text, stop);

  const auto cut = body_json(post_json(s, "/v1/chat/completions", chat_body({{"max_tokens", 24}, {"stop", {"\x01", stop}}})));
  CHECK(cut["choices"][0]["message"]["content"] == expected);
  CHECK(cut["choices"][0]["finish_reason"] == "stop");
  CHECK(cut["usage"]["completion_tokens"].get<int>() <= full["usage"]["completion_tokens"].get<int>());

  const auto streamed = post_json(s, "/v1/chat/completions",
                                  chat_body({{"max_tokens", 24}, {"stop", stop}, {"stream", true},
                                             {"stream_options", {{"include_usage", true}}}}));
  REQUIRE(streamed.status == 200);
  const auto a = parse_sse(streamed.body);
  CHECK(a.done);
  CHECK_FALSE(a.error);
  CHECK(a.content == expected);
  CHECK(a.finish == "stop");
  CHECK(a.usage["completion_tokens"] == cut["usage"]["completion_tokens"]);
  check_serving(s);
}

// A client that goes away while its request decodes: streamed (the write fails) or not
// (nothing written yet; the read the server keeps posted notices).
void check_disconnect_cancels(const serve_process& s, bool stream) {
  const auto before = settled_scrape(s);
  REQUIRE(at(before, "shoal_running_sequences") == 0);
  const auto used_before = at(before, "shoal_cache_blocks_used");
  const auto logged_before = count_of(s.log(), "POST /v1/chat/completions 499");
  {
    raw_connection c(s.port());
    // Thousands of tokens (tens of seconds on either server) unless it is cancelled.
    c.send(post("/v1/chat/completions",
                chat_body({{"max_tokens", 3000}, {"ignore_eos", true}, {"stream", stream}}).dump()));
    if (stream) REQUIRE(receive_until(c, [](const std::string& in) { return count_of(in, "\"content\":") >= 6; }));
    // Decoding: one running sequence holding cache blocks (once the status is fresh).
    metrics_map decoding;
    CHECK(eventually([&] {
      decoding = scrape(s);
      return at(decoding, "shoal_running_sequences") == 1 && at(decoding, "shoal_cache_blocks_used") > used_before;
    }, 3s));
    CHECK(at(decoding, "shoal_requests_in_flight") == 1);
    // Still generating: no end of stream, no response at all when not streamed.
    const std::string end_mark = stream ? "[DONE]" : "HTTP/1.1";
    CHECK_FALSE(receive_until(c, [&end_mark](const std::string& in) { return in.find(end_mark) != std::string::npos; }, 10ms));
  }  // the client goes away mid-generation
  metrics_map after;
  // The router's scheduler holds the request no more: cancelled, not merely unread.
  const bool freed = eventually([&] {
    after = scrape(s);
    return at(after, "shoal_requests_in_flight") == 0 && at(after, "shoal_running_sequences") == 0 &&
           at(after, "shoal_queue_depth") == 0;
  });
  INFO("in flight " << at(after, "shoal_requests_in_flight") << ", running " << at(after, "shoal_running_sequences")
                    << ", queued " << at(after, "shoal_queue_depth"));
  CHECK(freed);
  // The sequence's blocks are released: what stays used is what the prefix cache keeps.
  CHECK(eventually([&] {
    after = scrape(s);
    return at(after, "shoal_cache_blocks_used") == at(after, "shoal_prefix_cache_blocks");
  }));
  CHECK(at(after, "shoal_cache_blocks_free") == at(after, "shoal_cache_blocks_total") - at(after, "shoal_cache_blocks_used"));
  CHECK(at(after, requests_series("/v1/chat/completions", 499)) == at(before, requests_series("/v1/chat/completions", 499)) + 1);
  CHECK(count_of(s.log(), "POST /v1/chat/completions 499") == logged_before + 1);
  // Far fewer than the 3000 tokens asked for reached the gateway, and no more arrive.
  const auto generated = at(after, "shoal_engine_generated_tokens_total") - at(before, "shoal_engine_generated_tokens_total");
  CHECK(generated < 1500);
  std::this_thread::sleep_for(300ms);
  CHECK(at(scrape(s), "shoal_engine_generated_tokens_total") == at(after, "shoal_engine_generated_tokens_total"));
  check_serving(s);
}

// The routed-token layout of the tiny model, from its config.json.
struct moe_layout {
  std::int64_t layers = 0, experts = 0, top_k = 0, first_dense = 0;
};

moe_layout layout() {
  std::ifstream in(tiny_model() / "config.json");
  const auto c = json::parse(in);
  return {c["num_hidden_layers"], c["n_routed_experts"], c["num_experts_per_tok"], c.value("first_k_dense_replace", 0)};
}

void check_metrics_match(const serve_process& s, bool cluster) {
  const auto settle = cluster ? 1200ms : 300ms;
  const auto before = settled_scrape(s, settle);
  std::map<std::string, double> expected_requests;  // series -> increase
  expected_requests[requests_series("/metrics", 200)] += 1;  // `before` itself is counted once answered
  std::int64_t prompt = 0, cached = 0, completion = 0, routed = 0;  // routed: tokens through each MoE layer
  auto tally = [&](const json& usage) {
    const auto p = usage["prompt_tokens"].get<std::int64_t>();
    const auto c = usage["prompt_tokens_details"]["cached_tokens"].get<std::int64_t>();
    const auto g = usage["completion_tokens"].get<std::int64_t>();
    prompt += p;
    cached += c;
    completion += g;
    // Prefill computes the prompt tokens not served from the cache; each decode step feeds
    // back one sampled token, the last one sampled is never fed.
    routed += p - c + std::max<std::int64_t>(g - 1, 0);
  };

  // A long system prompt, twice: the second time its blocks come from the prefix cache.
  std::string system;
  for (int i = 0; i < 60; ++i) system += "Sailor " + std::to_string(i) + ". ";
  const auto long_chat = chat_body({{"max_tokens", 12},
                                    {"messages",
                                     {{{"role", "system"}, {"content", system}},
                                      {{"role", "user"}, {"content", "Tell me about the sea."}}}}});
  for (int i = 0; i < 2; ++i) {
    const auto r = post_json(s, "/v1/chat/completions", long_chat);
    REQUIRE(r.status == 200);
    tally(body_json(r)["usage"]);
    expected_requests[requests_series("/v1/chat/completions", 200)] += 1;
  }
  const auto streamed = post_json(s, "/v1/chat/completions",
                                  chat_body({{"max_tokens", 7}, {"stream", true}, {"stream_options", {{"include_usage", true}}}}));
  REQUIRE(streamed.status == 200);
  const auto a = parse_sse(streamed.body);
  REQUIRE(a.usage.is_object());
  tally(a.usage);
  expected_requests[requests_series("/v1/chat/completions", 200)] += 1;
  const auto completed = post_json(s, "/v1/completions", json{{"prompt", "The sea is"}, {"max_tokens", 5}, {"temperature", 0}});
  REQUIRE(completed.status == 200);
  tally(body_json(completed)["usage"]);
  expected_requests[requests_series("/v1/completions", 200)] += 1;
  // Refusals and the other routes, each counted under its route and status.
  CHECK(request(s.port(), post("/v1/chat/completions", R"({"messages": 3})")).status == 400);
  expected_requests[requests_series("/v1/chat/completions", 400)] += 1;
  CHECK(post_json(s, "/v1/chat/completions", chat_body({{"model", "no-such-model"}})).status == 404);
  expected_requests[requests_series("/v1/chat/completions", 404)] += 1;
  CHECK(request(s.port(), get("/v1/chat/completions")).status == 405);
  expected_requests[requests_series("/v1/chat/completions", 405)] += 1;
  CHECK(request(s.port(), get("/v1/models")).status == 200);
  expected_requests[requests_series("/v1/models", 200)] += 1;
  CHECK(request(s.port(), get("/health")).status == 200);
  expected_requests[requests_series("/health", 200)] += 1;
  CHECK(request(s.port(), get("/no/such/route")).status == 404);
  expected_requests[requests_series("other", 404)] += 1;

  const auto after = settled_scrape(s, settle);
  // Requests by route and status: exactly those made here, and nothing else moved.
  for (const auto& [series, value] : after) {
    if (!series.starts_with("shoal_http_requests_total{")) continue;
    CAPTURE(series);
    CHECK(value - at(before, series) == expected_requests[series]);
  }
  for (const auto& [series, increase] : expected_requests) {
    CAPTURE(series);
    CHECK(after.count(series) == 1);
  }
  // Tokens, as the usage fields the client received add up.
  CHECK(prompt > 0);
  CHECK(completion > 0);
  auto increase = [&](const std::string& series) { return at(after, series) - at(before, series); };
  CHECK(increase("shoal_request_prompt_tokens_total") == prompt);
  CHECK(increase("shoal_request_generated_tokens_total") == completion);
  CHECK(increase("shoal_request_cached_prompt_tokens_total") == cached);
  CHECK(increase("shoal_engine_prompt_tokens_total") == prompt);
  CHECK(increase("shoal_engine_generated_tokens_total") == completion);
  // The prefix cache served the repeated system prompt; the rest was computed.
  const auto engine_cached = static_cast<std::int64_t>(increase("shoal_engine_cached_prompt_tokens_total"));
  CHECK(engine_cached > 0);
  CHECK(increase("shoal_engine_prefilled_tokens_total") + static_cast<double>(engine_cached) == prompt);
  // usage.prompt_tokens_details.cached_tokens reports what the router's prefix cache served.
  CHECK(cached == engine_cached);
  CHECK(increase("shoal_time_to_first_token_seconds_count") == 4);
  // Idle again: nothing queued or running, only the prefix cache holds blocks.
  CHECK(at(after, "shoal_requests_in_flight") == 0);
  CHECK(at(after, "shoal_queue_depth") == 0);
  CHECK(at(after, "shoal_running_sequences") == 0);
  CHECK(at(after, "shoal_cache_blocks_total") == at(before, "shoal_cache_blocks_total"));
  CHECK(at(after, "shoal_cache_blocks_total") > 0);
  CHECK(at(after, "shoal_cache_blocks_used") == at(after, "shoal_prefix_cache_blocks"));
  CHECK(at(after, "shoal_cache_blocks_free") == at(after, "shoal_cache_blocks_total") - at(after, "shoal_cache_blocks_used"));
  CHECK(at(after, "shoal_prefix_cache_blocks") > 0);  // the system prompt's blocks are kept

  // Routed tokens: each token through an MoE layer goes to top_k experts.
  const auto moe = layout();
  std::size_t expert_series = 0;
  for (const auto& [series, value] : after)
    if (series.starts_with("shoal_expert_routed_tokens_total{")) ++expert_series;
  // Both server kinds: `serve --cluster` sums what the nodes report with their heartbeats.
  CHECK(expert_series == static_cast<std::size_t>(moe.layers * moe.experts));
  for (std::int64_t layer = 0; layer < moe.layers; ++layer) {
    double sum = 0;
    for (std::int64_t e = 0; e < moe.experts; ++e) {
      const auto series = "shoal_expert_routed_tokens_total{layer=\"" + std::to_string(layer) + "\",expert=\"" +
                          std::to_string(e) + "\"}";
      REQUIRE(after.count(series) == 1);
      sum += increase(series);
    }
    const auto through = routed;
    CAPTURE(layer, through, moe.top_k);
    if (layer < moe.first_dense)
      CHECK(sum == 0);  // a dense layer routes nothing
    else
      CHECK(sum == static_cast<double>(through * moe.top_k));
  }
  // The expert nodes' measured imbalance: both computed rows over the window, one at least
  // as much as the mean (an embedded server's one stage holds every expert: no expert nodes).
  if (cluster) {
    CHECK(at(after, "shoal_cluster_expert_node_imbalance") >= 1.0);
    CHECK(at(after, "shoal_cluster_expert_node_imbalance") <= 2.0);
  } else {
    CHECK(at(after, "shoal_cluster_expert_node_imbalance") == 0);
  }
}

// Draining: once the signal is taken, new connections are still accepted and every new
// generation request is answered 503 (OpenAI's error object, `Retry-After`), idle keep-alive
// connections are closed, and the request in flight streams on to its end.
void check_drain(serve_process& s) {
  // A long streamed request in flight, and an idle keep-alive connection.
  raw_connection in_flight(s.port());
  in_flight.send(post("/v1/chat/completions",
                      chat_body({{"max_tokens", 400}, {"ignore_eos", true}, {"stream", true},
                                 {"stream_options", {{"include_usage", true}}}})
                          .dump()));
  REQUIRE(receive_until(in_flight, [](const std::string& in) { return count_of(in, "\"content\":") >= 3; }));
  raw_connection idle(s.port());
  idle.send(get("/health"));
  REQUIRE(idle.read_response().status == 200);

  REQUIRE(::kill(s.pid(), SIGTERM) == 0);
  REQUIRE(eventually([&] { return s.log().find("SIGTERM received: draining") != std::string::npos; }, 5s));
  // The log line comes just before the server starts draining; /ready tells when it has.
  REQUIRE(eventually([&] { return request(s.port(), get("/ready")).status == 503; }, 5s));
  const auto refused = post_json(s, "/v1/chat/completions", chat_body(), 10s);
  INFO("during the drain: " << refused.status << " " << refused.body);
  CHECK(refused.status == 503);
  CHECK(refused.headers.count("retry-after") == 1);
  const auto e = body_json(refused);
  CHECK(e["error"]["type"] == "server_error");
  CHECK(e["error"]["code"] == "unavailable");
  CHECK(idle.closed_within(5s));
  // ...while the request in flight is still streaming, and then completes.
  CHECK_FALSE(receive_until(in_flight, [](const std::string& in) { return in.find("[DONE]") != std::string::npos; }, 20ms));
  check_runs_to_length(in_flight, 400);
  INFO(s.log());
  CHECK(s.wait_exit(60s) == 0);
  CHECK(s.log().find("[serve] stopped") != std::string::npos);
}

}  // namespace

TEST_CASE("a half-sent request gets 408 after the read timeout; the server carries on", "[gateway][e2e][refusals]") {
  // Both servers at once: the read timeout is 10 s, fixed.
  std::vector<std::unique_ptr<half_request>> pending;
  for (const auto& k : kinds()) {
    auto& s = k.get();
    pending.push_back(std::make_unique<half_request>(s, "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Le"));
    // Headers complete, the body cut short.
    const auto whole = post("/v1/chat/completions", chat_body().dump());
    pending.push_back(std::make_unique<half_request>(s, whole.substr(0, whole.size() - 10)));
  }
  for (std::size_t i = 0; i < pending.size(); ++i) {
    CAPTURE(kinds()[i / 2].name, i % 2);
    pending[i]->check();
  }
  for (const auto& k : kinds()) {
    CAPTURE(k.name);
    check_serving(k.get());
  }
}

TEST_CASE("prompts beyond the context, max_tokens over the limit and unsupported fields are refused",
          "[gateway][e2e][refusals]") {
  for (const auto& k : kinds()) DYNAMIC_SECTION(k.name) { check_context_and_field_refusals(k.get()); }
}

TEST_CASE("the default body limit is 1 MiB (413); chunked request bodies are served", "[gateway][e2e][refusals]") {
  for (const auto& k : kinds()) DYNAMIC_SECTION(k.name) { check_body_limits_and_chunked_bodies(k.get()); }
}

TEST_CASE("stop strings end the answer where the text matches, streamed and not", "[gateway][e2e][refusals]") {
  for (const auto& k : kinds()) DYNAMIC_SECTION(k.name) { check_stop_strings(k.get()); }
}

TEST_CASE("a client that disconnects mid-decode has its request cancelled and its cache blocks freed",
          "[gateway][e2e][refusals]") {
  for (const auto& k : kinds()) {
    DYNAMIC_SECTION(k.name << ", streamed") { check_disconnect_cancels(k.get(), true); }
    DYNAMIC_SECTION(k.name << ", not streamed") { check_disconnect_cancels(k.get(), false); }
  }
}

TEST_CASE("/metrics agrees with the requests this test made", "[gateway][e2e][refusals]") {
  for (const auto& k : kinds()) DYNAMIC_SECTION(k.name) { check_metrics_match(k.get(), k.cluster); }
}

// Last: stops both servers.
TEST_CASE("SIGTERM: the request in flight completes, new requests get 503", "[gateway][e2e][refusals]") {
  for (const auto& k : kinds()) DYNAMIC_SECTION(k.name) { check_drain(k.get()); }
}
