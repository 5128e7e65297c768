// Chaos under `shoal serve --cluster`: five node processes of the tiny model (2 pipeline
// stages, 3 expert nodes; the first stage node is the head, the second its standby) serve 50
// concurrent greedy streaming completions while, at seeded random moments, an expert node, a
// stage node and the head are killed with SIGKILL and a seeded node is frozen with SIGSTOP.
// Each fault comes once the cluster serves again after the previous one. Every stream must
// end with exactly the text of a run without faults. Prints, per fault, the detection time
// (the fault to the launcher's "declared dead" / "took over" line), the time to serving again,
// and the longest pause a stream saw, and the latency the faults added per request.

#include "free_port.hpp"
#include "node_pid.hpp"
#include "e2e_helpers.hpp"
#include "serve_process.hpp"
#include "tiny_cluster.hpp"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <atomic>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <memory>
#include <mutex>
#include <map>
#include <optional>
#include <random>
#include <set>
#include <sstream>
#include <thread>

namespace fs = std::filesystem;
using json = nlohmann::json;
using namespace std::chrono_literals;
using namespace shoal::gateway::testing;
using clock_type = std::chrono::steady_clock;

namespace {

const fs::path kWork = SHOAL_GATEWAY_WORK_DIR;
constexpr int kStreams = 50;
constexpr int kMaxTokens = 96;

// A cluster config of the tiny model: the nodes (ports reserved for this process), head
// stage0 with standby stage1, stages on stage0 and stage1, expert groups as given (YAML
// lines), `extra` keys first. Returns each node's port.
std::map<std::string, std::uint16_t> write_config(const fs::path& path, const std::vector<std::string>& nodes,
                                                  const std::string& experts, const std::string& extra = {}) {
  const auto model = tiny_model();
  std::map<std::string, std::uint16_t> ports;
  std::ofstream out(path);
  out << "model: " << model.string() << "\nthreads: 1\nready_timeout_s: 120\n" << extra << "nodes:\n";
  for (const auto& n : nodes) {
    ports[n] = shoal::testing::free_port();
    out << "  - {name: " << n << ", host: 127.0.0.1, port: " << ports[n] << "}\n";
  }
  out << "head: stage0\nstandby: stage1\nplan:\n  stages:\n    - {node: stage0, layers: 0-1}\n"
         "    - {node: stage1, layers: 2-3}\n  experts:\n"
      << experts;
  return ports;
}

fs::path chaos_config() {
  const auto p = kWork / "chaos.yaml";
  // Every node is killed several times within a minute: a restart budget and a backoff
  // window sized for that (the defaults would, rightly, give up on such a node).
  write_config(p, {"stage0", "stage1", "experts0", "experts1", "experts2"},
               "    - {node: experts0, experts: 0-5}\n    - {node: experts1, experts: 6-10}\n"
               "    - {node: experts2, experts: 11-15}\n",
               "restart_limit: 50\nrestart_window_s: 5\n");
  return p;
}

// One streamed completion on its own thread: its text, finish reason, errors, and when each
// event arrived.
struct stream {
  std::string prompt;
  std::thread thread;
  std::string text, finish, error;
  bool done = false;
  clock_type::time_point started, ended;
  std::mutex mutex;
  std::vector<clock_type::time_point> arrivals;  // one per data event with text

  stream(std::uint16_t port, std::string p) : prompt(std::move(p)) {
    thread = std::thread([this, port] { go(port); });
  }
  ~stream() {
    if (thread.joinable()) thread.join();
  }

  void go(std::uint16_t port) {
    const json body{{"model", "tiny"}, {"prompt", prompt}, {"max_tokens", kMaxTokens}, {"temperature", 0},
                    {"stream", true}};
    started = clock_type::now();
    try {
      raw_connection c(port);
      c.send(post("/v1/completions", body.dump()));
      std::size_t seen = 0;
      const auto limit = started + 300s;
      while (clock_type::now() < limit) {
        if (!c.fill(100ms)) continue;
        const auto& in = c.received();
        std::size_t n = 0;
        for (std::size_t at = 0; (at = in.find("\"text\":", at)) != std::string::npos; ++at) ++n;
        if (n > seen) {
          std::lock_guard lock(mutex);
          arrivals.insert(arrivals.end(), n - seen, clock_type::now());
          seen = n;
        }
        if (in.find("data: [DONE]") != std::string::npos || c.closed_within(0ms)) break;
      }
      ended = clock_type::now();
      const auto answer = parse_sse(c.read_response(5s).body);
      text = answer.content;
      finish = answer.finish;
      done = answer.done;
      if (answer.error) error = "an error event in the stream";
    } catch (const std::exception& e) {
      error = e.what();
    }
  }
  // The gap between the last event before `t` and the first one after it (how long this
  // stream waited across `t`), or nothing if it was not streaming at `t`.
  std::optional<double> pause_across(clock_type::time_point t) {
    std::lock_guard lock(mutex);
    const auto after = std::upper_bound(arrivals.begin(), arrivals.end(), t);
    if (after == arrivals.begin() || after == arrivals.end()) return std::nullopt;
    return std::chrono::duration<double>(*after - t).count();
  }
};

std::vector<std::string> prompts() {
  std::vector<std::string> out;
  for (int i = 0; i < kStreams; ++i) out.push_back("Chaos story " + std::to_string(i) + ": once upon a time");
  return out;
}

// Lines of the gateway's log with the time this test first saw them.
class log_watch {
 public:
  explicit log_watch(const serve_process& s) : server_(s), thread_([this] { loop(); }) {}
  ~log_watch() {
    stop_ = true;
    thread_.join();
  }
  // When the first line containing `needle` seen after `since` appeared, or nothing.
  std::optional<clock_type::time_point> first(const std::string& needle, clock_type::time_point since) {
    std::lock_guard lock(mutex_);
    for (const auto& [t, line] : lines_)
      if (t >= since && line.find(needle) != std::string::npos) return t;
    return std::nullopt;
  }
  // The node in charge: the last one that took over as head, or `first`.
  std::string head(const std::string& first) {
    std::lock_guard lock(mutex_);
    std::string out = first;
    const std::string marker = "[serve] node ";
    for (const auto& [t, line] : lines_)
      if (line.starts_with(marker) && line.find(" took over as head from ") != std::string::npos)
        out = line.substr(marker.size(), line.find(' ', marker.size()) - marker.size());
    return out;
  }
  std::size_t count(const std::string& needle) {
    std::lock_guard lock(mutex_);
    return static_cast<std::size_t>(std::count_if(lines_.begin(), lines_.end(), [&](const auto& l) {
      return l.second.find(needle) != std::string::npos;
    }));
  }

 private:
  void loop() {
    std::size_t offset = 0;
    while (!stop_) {
      const auto text = server_.log();
      const auto now = clock_type::now();
      {
        std::lock_guard lock(mutex_);
        for (auto end = text.find('\n', offset); end != std::string::npos; end = text.find('\n', offset)) {
          lines_.emplace_back(now, text.substr(offset, end - offset));
          offset = end + 1;
        }
      }
      std::this_thread::sleep_for(10ms);
    }
  }
  const serve_process& server_;
  std::mutex mutex_;
  std::vector<std::pair<clock_type::time_point, std::string>> lines_;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

double seconds(clock_type::duration d) { return std::chrono::duration<double>(d).count(); }

bool ready(const serve_process& s) { return run("curl -sS -m 10 -w ' %{http_code}' " + s.url() + "/ready", 15).out.ends_with(" 200"); }

}  // namespace

TEST_CASE("chaos: 50 greedy streams lose nothing across SIGKILL of an expert node, a stage node and the head, and a "
          "SIGSTOP, for 5 seeds",
          "[gateway][e2e][cluster][chaos]") {
  serve_process server("serve-chaos", {"serve", "--cluster", chaos_config().string(), "--transports", "tcp", "--port",
                                       "0", "--name", "tiny", "--drain-seconds", "5"});
  log_watch log(server);
  const auto texts = prompts();

  // The run without faults.
  std::vector<std::string> expected;
  double undisturbed_mean = 0;
  {
    std::vector<std::unique_ptr<stream>> streams;
    for (const auto& p : texts) streams.push_back(std::make_unique<stream>(server.port(), p));
    for (auto& s : streams) {
      s->thread.join();
      INFO(s->prompt << ": " << s->error);
      REQUIRE(s->error.empty());
      REQUIRE(s->done);
      expected.push_back(s->text);
      undisturbed_mean += seconds(s->ended - s->started) / kStreams;
    }
  }

  int head_faults = 0;
  for (unsigned seed = 1; seed <= 5; ++seed) {
    CAPTURE(seed);
    std::mt19937 rng(seed);
    std::vector<std::string> kinds{"expert", "stage", "head"};
    std::shuffle(kinds.begin(), kinds.end(), rng);
    const std::vector<std::string> frozen_kinds{"expert", "stage", "head"};
    kinds.push_back("freeze " + frozen_kinds[rng() % 3]);

    std::vector<std::unique_ptr<stream>> streams;
    for (const auto& p : texts) streams.push_back(std::make_unique<stream>(server.port(), p));
    auto streaming = [&] {
      std::size_t n = 0;
      for (auto& s : streams) {
        std::lock_guard lock(s->mutex);
        n += s->arrivals.empty() ? 0 : 1;
      }
      return n;
    };
    const auto begun = clock_type::now();
    while (streaming() < kStreams / 2 && clock_type::now() - begun < 60s) std::this_thread::sleep_for(5ms);

    struct fault {
      std::string what, node;
      bool freeze;
      clock_type::time_point at;
      std::optional<clock_type::time_point> detected, served;
    };
    std::vector<fault> faults;
    for (const auto& kind : kinds) {
      std::this_thread::sleep_for(std::chrono::milliseconds(100 + rng() % 900));
      const bool freeze = kind.starts_with("freeze");
      const auto what = freeze ? kind.substr(7) : kind;
      const auto head = log.head("stage0");
      const auto other_stage = head == "stage0" ? "stage1" : "stage0";
      const std::string node = what == "expert" ? "experts" + std::to_string(rng() % 3) : what == "stage" ? other_stage : head;
      // The whole cluster serves before each fault (a node may still be restarting after a
      // slow machine made the head declare it dead).
      const auto wait_from = clock_type::now();
      pid_t pid = -1;
      while ((pid = shoal::testing::node_pid(server.pid(), node)) <= 0 && clock_type::now() - wait_from < 60s)
        std::this_thread::sleep_for(50ms);
      while (!ready(server) && clock_type::now() - wait_from < 60s) std::this_thread::sleep_for(50ms);
      REQUIRE(pid > 0);
      const auto recoveries = log.count("serves again");
      const auto at = clock_type::now();
      REQUIRE(::kill(pid, freeze ? SIGSTOP : SIGKILL) == 0);
      if (what == "head") ++head_faults;  // the standby takes over; the old head comes back as standby
      while (log.count("serves again") == recoveries && clock_type::now() - at < 90s) std::this_thread::sleep_for(10ms);
      const auto served = log.first("serves again", at);
      INFO(server.log());
      REQUIRE(served);
      const auto detected = what == "head" ? log.first("took over as head from " + node, at)
                                           : log.first("node " + node + " was declared dead", at);
      faults.push_back({what, node, freeze, at, detected, served});
      if (freeze) ::kill(pid, SIGCONT);  // killed by the launcher by now; harmless if not
    }

    double mean = 0;
    for (std::size_t i = 0; i < streams.size(); ++i) {
      auto& s = *streams[i];
      s.thread.join();
      CAPTURE(i, s.error);
      CHECK(s.error.empty());
      CHECK(s.done);
      CHECK(s.text == expected[i]);
      mean += seconds(s.ended - s.started) / kStreams;
    }
    for (const auto& f : faults) {
      double pause = 0;
      for (auto& s : streams)
        if (const auto p = s->pause_across(f.at)) pause = std::max(pause, *p);
      WARN("seed " << seed << ": " << (f.freeze ? "SIGSTOP" : "SIGKILL") << " of " << f.node << " (" << f.what
                   << "): detected after " << (f.detected ? seconds(*f.detected - f.at) : -1.0)
                   << " s, serving again after " << seconds(*f.served - f.at)
                   << " s, next token of the stream that waited longest after " << pause << " s");
    }
    WARN("seed " << seed << ": mean request time " << mean << " s against " << undisturbed_mean
                 << " s undisturbed (added " << mean - undisturbed_mean << " s per request)");
    // The next seed starts on a whole cluster.
    const auto wait_from = clock_type::now();
    while (!ready(server) && clock_type::now() - wait_from < 60s) std::this_thread::sleep_for(100ms);
    REQUIRE(ready(server));
  }
  // The gateway moved its streams once per head that died or froze (a missed ping on a slow
  // machine may add a move to the same head).
  CHECK(metric(server, "shoal_cluster_head_failovers_total") >= head_faults);
  CHECK(server.terminate(30s) == 0);
}

namespace {

// `shoal node --config CONFIG --name NAME` started by hand (as systemd would on a machine of
// its own: nobody kills it when the head declares it dead), its output in a log file.
class hand_started_node {
 public:
  hand_started_node(const fs::path& config, const std::string& name) : log_(kWork / ("hand-" + name + ".log")) {
    fs::remove(log_);
    pid_ = ::fork();
    if (pid_ == 0) {
      const int fd = ::open(log_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      ::dup2(fd, 1);
      ::dup2(fd, 2);
      std::vector<std::string> args{SHOAL_BINARY, "node", "--config", config.string(), "--name", name, "--transports", "tcp"};
      std::vector<char*> argv;
      for (auto& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      ::execv(SHOAL_BINARY, argv.data());
      ::_exit(127);
    }
  }
  ~hand_started_node() {
    if (pid_ > 0) {
      ::kill(pid_, SIGCONT);
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
  }
  pid_t pid() const { return pid_; }
  std::string log() const { return slurp(log_); }
  // Waits up to `limit` for `needle` in its output.
  bool says(const std::string& needle, std::chrono::seconds limit) const {
    const auto end = clock_type::now() + limit;
    while (clock_type::now() < end) {
      if (log().find(needle) != std::string::npos) return true;
      std::this_thread::sleep_for(50ms);
    }
    return false;
  }
  // Its exit status once it exited within `limit`, or -1.
  int exit_within(std::chrono::seconds limit) {
    const auto end = clock_type::now() + limit;
    while (clock_type::now() < end) {
      int status = 0;
      if (::waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      }
      std::this_thread::sleep_for(50ms);
    }
    return -1;
  }

 private:
  fs::path log_;
  pid_t pid_ = -1;
};

}  // namespace

TEST_CASE("a head frozen until its standby took over learns so from its nodes when it wakes, and stops",
          "[gateway][e2e][cluster][chaos]") {
  const auto config = kWork / "hand.yaml";
  write_config(config, {"stage0", "stage1", "experts0"}, "    - {node: experts0, experts: 0-15}\n");
  hand_started_node head(config, "stage0"), standby(config, "stage1"), experts(config, "experts0");
  INFO(head.log() << standby.log() << experts.log());
  REQUIRE(head.says("\"ready\":true", 120s));

  REQUIRE(::kill(head.pid(), SIGSTOP) == 0);
  REQUIRE(standby.says("\"event\":\"head_takeover\"", 30s));
  REQUIRE(experts.says("joined the new head stage1", 30s));
  // The new head waits for the old head's stage; the frozen process wakes up meanwhile.
  REQUIRE(::kill(head.pid(), SIGCONT) == 0);
  const auto woke = clock_type::now();
  const int status = head.exit_within(30s);
  INFO(head.log());
  CHECK(status == 0);
  CHECK(head.log().find("another head took over while this one was frozen or cut off") != std::string::npos);
  WARN("the woken head stopped " << seconds(clock_type::now() - woke) << " s after SIGCONT");
  // Started again (as a supervisor would), it joins the new head as its standby, and the
  // cluster serves: the standby's ready answer comes from a head that heals.
  hand_started_node again(config, "stage0");
  CHECK(again.says("\"event\":\"standby\"", 60s));
  CHECK(standby.says("\"event\":\"recovered\"", 120s));
}

TEST_CASE("a standby that takes over keeps the placement the operator changed", "[gateway][e2e][cluster][chaos]") {
  const auto config = kWork / "moved.yaml";
  const auto token = kWork / "admin.token";
  std::ofstream(token) << "an-admin-token-of-some-length\n";
  auto ports = write_config(config, {"stage0", "stage1", "experts0", "experts1"},
                            "    - {node: experts0, experts: 0-7}\n    - {node: experts1, experts: 8-15}\n",
                            "admin_token_file: " + token.string() + "\n");
  auto admin = [&](const std::string& node, const std::string& args) {
    return run(std::string(SHOAL_BINARY) + " admin " + args + " --cluster 127.0.0.1:" + std::to_string(ports[node]) +
                   " --token-file " + token.string() + " --json",
               120);
  };
  // Where each routed expert is served, from a head's status.
  auto placement = [&](const std::string& node) {
    const auto r = run(std::string(SHOAL_BINARY) + " admin status --json --cluster 127.0.0.1:" + std::to_string(ports[node]), 60);
    INFO(r.out);
    REQUIRE(r.exit_code == 0);
    std::map<std::int64_t, std::set<std::string>> where;
    const auto status = json::parse(r.out.substr(r.out.find('{')));
    for (const auto& group : status["experts"])
      for (const auto& e : group["experts"]) where[e.get<std::int64_t>()].insert(group["node"].get<std::string>());
    return std::pair{where, status};
  };
  auto generate = [&](const std::string& node) {
    const auto r = run(std::string(SHOAL_BINARY) + " generate --quiet --cluster 127.0.0.1:" + std::to_string(ports[node]) +
                           " --tokens 1,2,3,4 --max-new-tokens 8",
                       120);
    INFO(r.out);
    CHECK(r.exit_code == 0);
    return r.out.substr(0, r.out.find("[generate]"));  // the token ids, not the progress line
  };
  std::optional<hand_started_node> head(std::in_place, config, "stage0");
  hand_started_node standby(config, "stage1"), experts0(config, "experts0"), experts1(config, "experts1");
  INFO(head->log() << standby.log());
  REQUIRE(head->says("\"ready\":true", 120s));

  const auto moved = admin("stage0", "move-expert 3 --to experts1");
  INFO(moved.out);
  REQUIRE(moved.exit_code == 0);
  const auto drained = admin("stage0", "drain experts0");
  INFO(drained.out);
  REQUIRE(drained.exit_code == 0);
  const auto [before, before_status] = placement("stage0");
  CHECK(before.at(3) == std::set<std::string>{"experts1"});
  CHECK(before.at(0) == std::set<std::string>{"experts1"});  // the drain moved the rest of experts0 too
  const auto answer = generate("stage0");
  std::this_thread::sleep_for(1500ms);  // a few heartbeats carry the placement to the standby

  REQUIRE(::kill(head->pid(), SIGKILL) == 0);
  head.reset();
  REQUIRE(standby.says("\"event\":\"head_takeover\"", 30s));
  hand_started_node again(config, "stage0");  // restarted, it joins stage1 as its standby
  REQUIRE(standby.says("\"event\":\"recovered\"", 120s));
  const auto [after, after_status] = placement("stage1");
  CHECK(after == before);
  CHECK(after_status["drained"] == json::array({"experts0"}));
  CHECK(generate("stage1") == answer);  // and it serves, with the same greedy answer
}

TEST_CASE("while neither head answers, requests fail after --no-head-seconds instead of waiting; a head back serves",
          "[gateway][e2e][cluster][chaos]") {
  const auto config = kWork / "headless.yaml";
  auto ports = write_config(config, {"stage0", "stage1", "experts0"}, "    - {node: experts0, experts: 0-15}\n");
  hand_started_node head(config, "stage0"), standby(config, "stage1"), experts(config, "experts0");
  INFO(head.log() << standby.log() << experts.log());
  REQUIRE(head.says("\"ready\":true", 120s));
  serve_process server("serve-headless",
                       {"serve", "--cluster",
                        "127.0.0.1:" + std::to_string(ports["stage0"]) + ",127.0.0.1:" + std::to_string(ports["stage1"]),
                        "--model", tiny_model().string(), "--port", "0", "--no-head-seconds", "2"});
  INFO(server.log());
  const auto complete = [&](int limit_s) {
    return run("curl -sS -m " + std::to_string(limit_s) + " -w ' %{http_code}' -H 'Content-Type: application/json' -d " +
                   "'{\"model\":\"tiny\",\"prompt\":\"a b c\",\"max_tokens\":8,\"temperature\":0}' " + server.url() +
                   "/v1/completions",
               limit_s + 10);
  };
  REQUIRE(complete(60).out.ends_with(" 200"));

  // Frozen, both keep their connections open and answer nothing.
  REQUIRE(::kill(head.pid(), SIGSTOP) == 0);
  REQUIRE(::kill(standby.pid(), SIGSTOP) == 0);
  const auto frozen = clock_type::now();
  const auto failed = complete(120);
  const double waited = seconds(clock_type::now() - frozen);
  INFO(failed.out);
  CHECK(failed.out.ends_with(" 503"));
  CHECK(failed.out.find("no head of the cluster answered") != std::string::npos);
  WARN("the request failed " << waited << " s after both heads froze (--no-head-seconds 2)");
  // Detection (3 s without a ping answer), then probes of both heads until the limit.
  CHECK(waited < 60);
  const auto refused = complete(60);  // and the next one without a wait of its own for the limit
  CHECK(refused.out.ends_with(" 503"));

  REQUIRE(::kill(head.pid(), SIGCONT) == 0);
  REQUIRE(::kill(standby.pid(), SIGCONT) == 0);
  const auto back = clock_type::now() + 120s;
  std::string answer;
  while (clock_type::now() < back) {
    answer = complete(60).out;
    if (answer.ends_with(" 200")) break;
    std::this_thread::sleep_for(1s);
  }
  INFO(answer);
  CHECK(answer.ends_with(" 200"));
}
