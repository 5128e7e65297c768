// shoal serve as a user runs it: a real process on the tiny model on a loopback port, driven
// by curl, the official OpenAI Node SDK and shoal bench-serve, then stopped with SIGTERM.

#include "raw_http.hpp"
#include "serve_process.hpp"
#include "skip.hpp"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <regex>
#include <sstream>
#include <thread>

namespace fs = std::filesystem;
using json = nlohmann::json;
using namespace std::chrono_literals;
using namespace shoal::gateway::testing;

namespace {

const std::vector<std::string> kServeArgs = {"serve", "--port", "0", "--threads", "2", "--cache-mb", "64", "--drain-seconds", "20"};

// The tiny model is created in the build tree, not in the user's cache.
std::map<std::string, std::string> serve_env() {
  return {{"XDG_CACHE_HOME", (fs::path(SHOAL_GATEWAY_WORK_DIR) / "cache").string()}};
}

// Shared by the cases that leave it serving; each reads what it counts as a difference, so
// that they pass in any order.
serve_process& server() {
  static serve_process p("serve", kServeArgs, serve_env());
  return p;
}

const std::string kChatsAnswered = R"(shoal_http_requests_total{route="/v1/chat/completions",status="200"})";

std::string chat_body(bool stream, int max_tokens) {
  return json{{"model", "shoal-tiny"},
              {"messages", {{{"role", "user"}, {"content", "Hello! How are you?"}}}},
              {"max_tokens", max_tokens},
              {"temperature", 0},
              {"stream", stream}}
      .dump();
}

}  // namespace

TEST_CASE("curl gets a chat answer, whole and streamed", "[gateway][e2e]") {
  auto& s = server();
  const double chats_before = metric(s, kChatsAnswered);
  const auto file = fs::path(SHOAL_GATEWAY_WORK_DIR) / "body.json";
  std::ofstream(file) << chat_body(false, 8);
  const auto r = run("curl -sS -m 60 " + s.url() + "/v1/chat/completions -H 'Content-Type: application/json' -d @" + file.string());
  REQUIRE(r.exit_code == 0);
  INFO(r.out);
  const auto j = json::parse(r.out);
  CHECK(j["object"] == "chat.completion");
  CHECK(j["choices"][0]["message"]["content"].is_string());
  const auto completion_tokens = j["usage"]["completion_tokens"].get<int>();
  CHECK(completion_tokens >= 1);
  CHECK(completion_tokens <= 8);
  CHECK((j["choices"][0]["finish_reason"] == "stop" || j["choices"][0]["finish_reason"] == "length"));

  std::ofstream(file) << chat_body(true, 8);
  const auto st = run("curl -sS -N -m 60 " + s.url() + "/v1/chat/completions -H 'Content-Type: application/json' -d @" + file.string());
  REQUIRE(st.exit_code == 0);
  INFO(st.out);
  CHECK(st.out.starts_with("data: {"));
  CHECK(st.out.ends_with("data: [DONE]\n\n"));
  int events = 0;
  std::string finish;
  std::istringstream lines(st.out);
  for (std::string line; std::getline(lines, line);) {
    if (line.empty() || line == "data: [DONE]") continue;
    REQUIRE(line.rfind("data: ", 0) == 0);
    const auto chunk = json::parse(line.substr(6));
    ++events;
    if (!chunk["choices"][0]["finish_reason"].is_null()) finish = chunk["choices"][0]["finish_reason"];
  }
  CHECK(events >= 2);
  CHECK((finish == "stop" || finish == "length"));

  const auto health = run("curl -sS -m 10 -o /dev/null -w '%{http_code}' " + s.url() + "/ready");
  CHECK(health.out == "200");
  CHECK(metric(s, kChatsAnswered) == chats_before + 2);
  const auto metrics = run("curl -sS -m 10 " + s.url() + "/metrics");
  CHECK(metrics.out.find("shoal_expert_routed_tokens_total{layer=") != std::string::npos);
  const auto bad = run("curl -sS -m 10 -w ' %{http_code}' " + s.url() + "/v1/chat/completions -d '{\"messages\": 3}'");
  CHECK(bad.out.ends_with(" 400"));
  CHECK(bad.out.find("\"param\":\"messages\"") != std::string::npos);

  // The request log keeps paths, not query strings (which may carry a credential).
  const auto queried = run("curl -sS -m 10 -o /dev/null -w '%{http_code}' '" + s.url() + "/v1/models?api_key=sk-query-secret-123'");
  CHECK(queried.out == "200");
  std::string log;
  for (int i = 0; i < 50 && log.find("GET /v1/models?... 200") == std::string::npos; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    log = s.log();
  }
  CHECK(log.find("GET /v1/models?... 200") != std::string::npos);
  CHECK(log.find("sk-query-secret-123") == std::string::npos);
}

TEST_CASE("the official OpenAI Node SDK, streaming and not", "[gateway][e2e][node]") {
  // Runs as a CTest entry of its own (gateway_openai_sdk_test) with its own server and model
  // cache, so that it can report Skipped without hiding the other cases.
  const fs::path work = fs::path(SHOAL_GATEWAY_WORK_DIR) / "node";
  fs::create_directories(work);
  if (run("sh -c 'command -v node && command -v npm'", 10).exit_code != 0) {
    shoal::testing::skip("node and npm are not installed (tools/test.sh installs them)");
    return;
  }
  for (const char* f : {"package.json", "package-lock.json", "openai_client.mjs"})
    fs::copy_file(fs::path(SHOAL_GATEWAY_NODE_DIR) / f, work / f, fs::copy_options::overwrite_existing);
  // The SDK comes from the npm registry (the version pinned in package-lock.json); a machine
  // that cannot reach it, and has no copy in npm's cache, cannot run this test.
  const std::string npm_ci = "npm ci --no-audit --no-fund --prefix " + work.string();
  const auto ping = run("npm ping --fetch-retries=0 --fetch-timeout=10000", 30);
  const auto install = run(npm_ci + (ping.exit_code == 0 ? "" : " --offline"), 300);
  if (ping.exit_code != 0 && install.exit_code != 0) {
    std::string why = ping.out.substr(0, ping.out.find('\n', ping.out.find("error")));
    why = why.substr(why.rfind('\n') + 1);
    shoal::testing::skip("the npm registry cannot be reached to install the openai package, and npm's cache has no "
                         "copy (" + why + ")");
    return;
  }
  INFO(install.out);
  REQUIRE(install.exit_code == 0);
  static serve_process s("serve-sdk", {"serve", "--port", "0", "--threads", "2", "--cache-mb", "64"},
                         {{"XDG_CACHE_HOME", (work / "cache").string()}});
  const auto r = run("node " + (work / "openai_client.mjs").string() + " " + s.url() + "/v1 shoal-tiny", 120);
  INFO(r.out);
  REQUIRE(r.exit_code == 0);
  CHECK(r.out.find("\"ok\":true") != std::string::npos);
}

TEST_CASE("200 requests from 32 concurrent streaming clients: no failures, memory flat", "[gateway][e2e][load]") {
  auto& s = server();
  const std::string bench = std::string(SHOAL_BINARY) + " bench-serve --url " + s.url() +
                            " --concurrency 32 --requests 200 --max-tokens 8 --system-words 0 --json";
  const auto warm = run(bench, 240);
  INFO(warm.out);
  REQUIRE(warm.exit_code == 0);
  const auto rss_before = rss_kb(s.pid());
  const auto r = run(bench, 240);
  INFO(r.out);
  REQUIRE(r.exit_code == 0);
  const auto rss_after = rss_kb(s.pid());
  const auto j = json::parse(r.out.substr(r.out.find('{')));
  const auto& run0 = j["runs"][0];
  CHECK(run0["succeeded"] == 200);
  CHECK(run0["failed"] == 0);
  CHECK(run0["generated_tokens"] == 200 * 8);
  // After the warm-up run the second run grows the RSS by tens of kilobytes; a leak of 10 kB
  // per request (2 MB over 200) fails.
  INFO("RSS before " << rss_before << " kB, after " << rss_after << " kB");
  REQUIRE(rss_before > 0);
  CHECK(rss_after - rss_before < 2048);
  const auto ready = run("curl -sS -m 10 -o /dev/null -w '%{http_code}' " + s.url() + "/ready");
  CHECK(ready.out == "200");
}

TEST_CASE("SIGTERM finishes the request in flight and stops cleanly", "[gateway][e2e]") {
  serve_process s("serve-sigterm", kServeArgs, serve_env());
  raw_connection c(s.port());
  c.send(post("/v1/chat/completions", chat_body(true, 48)));
  REQUIRE(c.fill(30s));  // streaming has begun
  const auto code = s.terminate(60s);
  const auto r = c.read_response(5s);
  INFO(s.log());
  CHECK(code == 0);
  CHECK(r.complete);
  CHECK(r.body.ends_with("data: [DONE]\n\n"));
  CHECK(s.log().find("[serve] stopped") != std::string::npos);
}
