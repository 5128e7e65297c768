// deploy/prometheus against the real thing: promtool checks and unit-tests the rules, and a
// real Prometheus on loopback scrapes a real `shoal serve` (embedded tiny model) with the rules
// loaded. Every metric name the rules and the Grafana dashboard use must arrive from Shoal, and
// every dashboard query must be valid PromQL. Skipped where Prometheus is not installed.

#include "free_port.hpp"
#include "skip.hpp"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace fs = std::filesystem;
using json = nlohmann::json;
using namespace std::chrono_literals;

namespace {

const fs::path kDir = fs::path(SHOAL_SOURCE_DIR) / "deploy" / "prometheus";

std::string slurp(const fs::path& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

bool have(const std::string& tool) { return std::system(("command -v " + tool + " >/dev/null 2>&1").c_str()) == 0; }

// Exit code and output (stdout and stderr) of a shell command, killed after `timeout_s`.
std::pair<int, std::string> sh(const std::string& command, int timeout_s = 30) {
  static int calls = 0;
  const auto out = fs::temp_directory_path() / ("shoal-prom-sh-" + std::to_string(::getpid()) + "-" + std::to_string(calls++));
  const int status =
      std::system(("timeout " + std::to_string(timeout_s) + " " + command + " >" + out.string() + " 2>&1").c_str());
  auto text = slurp(out);
  fs::remove(out);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, text};
}

// A child process with its output in a file; killed (with its pid only) when it goes.
class child {
 public:
  child(std::vector<std::string> argv, const fs::path& log, std::vector<std::pair<std::string, std::string>> env = {})
      : log_(log) {
    pid_ = ::fork();
    if (pid_ == 0) {
      for (const auto& [k, v] : env) ::setenv(k.c_str(), v.c_str(), 1);
      const int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      ::dup2(fd, 1);
      ::dup2(fd, 2);
      std::vector<char*> args;
      for (auto& a : argv) args.push_back(a.data());
      args.push_back(nullptr);
      ::execvp(args[0], args.data());
      ::_exit(127);
    }
  }
  ~child() {
    if (pid_ <= 0) return;
    ::kill(pid_, SIGTERM);
    for (int i = 0; i < 50; ++i) {
      if (::waitpid(pid_, nullptr, WNOHANG) == pid_) return;
      std::this_thread::sleep_for(100ms);
    }
    ::kill(pid_, SIGKILL);
    ::waitpid(pid_, nullptr, 0);
  }
  child(const child&) = delete;
  child& operator=(const child&) = delete;
  bool running() {
    if (pid_ <= 0) return false;
    if (::waitpid(pid_, nullptr, WNOHANG) == pid_) pid_ = -1;
    return pid_ > 0;
  }
  std::string log() const { return slurp(log_); }

 private:
  fs::path log_;
  pid_t pid_ = -1;
};

// Polls `done` every 200 ms until it holds or `limit` passes.
template <typename F>
bool wait_for(std::chrono::seconds limit, F done) {
  const auto end = std::chrono::steady_clock::now() + limit;
  while (std::chrono::steady_clock::now() < end) {
    if (done()) return true;
    std::this_thread::sleep_for(200ms);
  }
  return done();
}

// Names of `shoal_*` series a text refers to.
std::set<std::string> shoal_names(const std::string& text) {
  std::set<std::string> names;
  const std::regex name("shoal_[a-z_]+");
  for (auto it = std::sregex_iterator(text.begin(), text.end(), name); it != std::sregex_iterator(); ++it)
    names.insert(it->str());
  return names;
}

struct work_dir {
  fs::path path = fs::path(SHOAL_DEPLOY_WORK_DIR) / ("prometheus-" + std::to_string(::getpid()));
  work_dir() {
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~work_dir() { fs::remove_all(path); }
};

}  // namespace

TEST_CASE("promtool accepts the rules and their unit tests pass", "[promtool]") {
  if (!have("promtool")) {
    shoal::testing::skip("promtool is not installed (Debian: the prometheus package)");
    return;
  }
  const auto [checked, check_out] = sh("promtool check rules " + (kDir / "shoal-rules.yaml").string());
  INFO(check_out);
  CHECK(checked == 0);
  CHECK_THAT(check_out, Catch::Contains("SUCCESS: 11 rules found"));
  const auto [tested, test_out] = sh("sh -c 'cd " + kDir.string() + " && promtool test rules shoal-rules.test.yaml'");
  INFO(test_out);
  CHECK(tested == 0);
  CHECK_THAT(test_out, Catch::Contains("SUCCESS"));
}

TEST_CASE("a real Prometheus scrapes shoal serve with the rules loaded", "[prometheus]") {
  if (!have("prometheus")) {
    shoal::testing::skip("prometheus is not installed (tools/setup/install-deps.sh test installs it)");
    return;
  }
  work_dir work;
  const std::string shoal = SHOAL_BINARY;

  // The gateway with keys and an audit log, so that those series exist too.
  const auto keys = work.path / "keys";
  const auto [made, key_out] = sh(shoal + " keys new --file " + keys.string() + " --name prom");
  REQUIRE(made == 0);
  const auto key = key_out.substr(key_out.find("shoal-"), 70);
  child serve({shoal, "serve", "--port", "0", "--threads", "1", "--cache-mb", "64", "--api-keys", keys.string(),
               "--audit-log", (work.path / "audit.jsonl").string()},
              work.path / "serve.log", {{"XDG_CACHE_HOME", (fs::path(SHOAL_DEPLOY_WORK_DIR) / "cache").string()}});
  std::string gateway;
  REQUIRE(wait_for(120s, [&] {
    std::smatch m;
    const auto text = serve.log();
    static const std::regex listening("listening on http://(127\\.0\\.0\\.1:[0-9]+)");
    if (std::regex_search(text, m, listening) && text.find("ready in") != std::string::npos) gateway = m[1];
    return !gateway.empty() || !serve.running();
  }));
  INFO(serve.log());
  REQUIRE(!gateway.empty());
  const auto [generated, answer] =
      sh("curl -s -m 20 http://" + gateway + "/v1/completions -H 'Authorization: Bearer " + key +
         "' -H 'Content-Type: application/json' -d '{\"prompt\": \"hi\", \"max_tokens\": 4}'");
  REQUIRE(generated == 0);
  CHECK_THAT(answer, Catch::Contains("\"completion_tokens\":4"));
  const auto [refused, refusal] = sh("curl -s -o /dev/null -w '%{http_code}' -m 5 http://" + gateway + "/v1/models");
  CHECK(refusal == "401");

  const auto port = shoal::testing::free_port();
  const auto prom = "127.0.0.1:" + std::to_string(port);
  std::ofstream(work.path / "prometheus.yml") << "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                                              << "rule_files:\n  - " << (kDir / "shoal-rules.yaml").string() << "\n"
                                              << "scrape_configs:\n  - job_name: shoal\n    static_configs:\n"
                                              << "      - targets: ['" << gateway << "']\n";
  child prometheus({"prometheus", "--config.file=" + (work.path / "prometheus.yml").string(),
                    "--storage.tsdb.path=" + (work.path / "tsdb").string(), "--web.listen-address=" + prom,
                    "--log.level=warn"},
                   work.path / "prometheus.log");
  auto api = [&](const std::string& path) {
    const auto [rc, body] = sh("curl -s -m 5 'http://" + prom + path + "'", 10);
    return rc == 0 ? body : std::string();
  };
  INFO(prometheus.log());
  REQUIRE(wait_for(30s, [&] { return api("/-/ready").find("Ready") != std::string::npos || !prometheus.running(); }));
  REQUIRE(prometheus.running());

  // Every rule evaluated without error.
  json rules;
  const bool evaluated = wait_for(30s, [&] {
    const auto body = api("/api/v1/rules");
    if (body.empty()) return false;
    rules = json::parse(body);
    int ok = 0;
    for (const auto& g : rules["data"]["groups"])
      for (const auto& r : g["rules"]) ok += r.value("health", "") == "ok" ? 1 : 0;
    return ok == 11;
  });
  INFO(rules.dump(1));
  REQUIRE(evaluated);
  REQUIRE(rules["data"]["groups"].size() == 1);
  for (const auto& r : rules["data"]["groups"][0]["rules"]) {
    INFO(r["name"]);
    CHECK(r["type"] == "alerting");
    CHECK(r.value("lastError", "").empty());
    // Nothing is wrong with a fresh server: no alert may fire or even be pending.
    CHECK(r["alerts"].empty());
  }

  // Shoal's series arrived: the scrape is up and the request above was counted.
  json up;
  REQUIRE(wait_for(30s, [&] {
    const auto body = api("/api/v1/query?query=shoal_request_generated_tokens_total");
    if (body.empty()) return false;
    up = json::parse(body);
    return up["data"]["result"].size() == 1;
  }));
  CHECK(up["data"]["result"][0]["value"][1] == "4");
  CHECK(up["data"]["result"][0]["metric"]["job"] == "shoal");

  // Every shoal_* name of the rules and the dashboard is one Shoal exports (histogram names
  // come with their _bucket series).
  std::set<std::string> exported;
  std::string names_body;
  const bool names_arrived = wait_for(15s, [&] {
    exported.clear();
    const auto body = api("/api/v1/label/__name__/values");
    names_body = body;
    if (body.empty()) return false;
    const auto names = json::parse(body);
    for (const auto& n : names["data"]) exported.insert(n.get<std::string>());
    return exported.count("shoal_http_auth_failures_total") == 1;
  });
  INFO("names: " << names_body);
  REQUIRE(names_arrived);
  const auto dashboard_text = slurp(kDir / "grafana-dashboard.json");
  auto used = shoal_names(slurp(kDir / "shoal-rules.yaml"));
  for (const auto& n : shoal_names(dashboard_text)) used.insert(n);
  CHECK(used.size() >= 25);
  for (const auto& n : used) {
    INFO(n << " is used by the rules or the dashboard but Shoal does not export it");
    CHECK(exported.count(n) == 1);
  }

  // Every dashboard query is valid PromQL (Grafana's variables filled in) and finds data.
  const auto dashboard = json::parse(dashboard_text);
  int queries = 0;
  for (const auto& panel : dashboard["panels"])
    for (const auto& target : panel["targets"]) {
      auto expr = target["expr"].get<std::string>();
      for (const auto& [var, value] : {std::pair<std::string, std::string>{"$__rate_interval", "1m"}, {"$job", "shoal"}})
        for (auto at = expr.find(var); at != std::string::npos; at = expr.find(var)) expr.replace(at, var.size(), value);
      std::ofstream(work.path / "query") << expr;
      const auto [rc, body] = sh("curl -s -m 5 http://" + prom + "/api/v1/query --data-urlencode query@" +
                                 (work.path / "query").string(), 10);
      INFO(panel["title"] << ": " << expr << " -> " << body);
      REQUIRE(rc == 0);
      const auto result = json::parse(body);
      CHECK(result["status"] == "success");
      ++queries;
    }
  CHECK(queries >= 14);
}
