// Stopping `shoal serve` the way operators and supervisors do: SIGTERM and SIGINT drain (new
// requests get 503 while the stream in flight finishes), a second signal stops at once, and a
// drain that runs out cancels what is left and says so; and a client that stops reading its
// stream is cut off at the write-queue bound; requests beyond the admission limit get 429.
// Each case starts its own real server on the tiny model and talks HTTP to it over loopback.

#include "e2e_helpers.hpp"
#include "node_pid.hpp"
#include "raw_http.hpp"
#include "serve_process.hpp"
#include "tiny_cluster.hpp"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <csignal>
#include <sstream>
#include <filesystem>
#include <string>
#include <vector>

namespace fs = std::filesystem;
using json = nlohmann::json;
using namespace std::chrono_literals;
using namespace shoal::gateway::testing;
using clock_type = std::chrono::steady_clock;

namespace {

std::vector<std::string> serve_model(const std::string& drain_seconds) {
  return {"serve", "--model", tiny_model().string(), "--port", "0", "--threads", "1", "--cache-mb", "64",
          "--name", "tiny", "--drain-seconds", drain_seconds};
}

std::vector<std::string> serve_cluster(const std::string& drain_seconds) {
  return {"serve", "--cluster", tiny_cluster_config().string(), "--transports", "tcp", "--port", "0",
          "--name", "tiny", "--drain-seconds", drain_seconds};
}

std::string chat(int max_tokens, bool stream) {
  json body{{"model", "tiny"},
            {"messages", {{{"role", "user"}, {"content", "Tell me about the sea."}}}},
            {"temperature", 0},
            {"max_tokens", max_tokens},
            {"ignore_eos", true},
            {"stream", stream}};
  if (stream) body["stream_options"] = {{"include_usage", true}};
  return post("/v1/chat/completions", body.dump());
}

// A streamed request that has produced a few tokens: in flight when the signal comes.
void start_stream(raw_connection& c, int max_tokens) {
  c.send(chat(max_tokens, true));
  REQUIRE(receive_until(c, [](const std::string& in) { return count_of(in, "\"content\":") >= 3; }));
}

bool has_done(raw_connection& c) {
  return receive_until(c, [](const std::string& in) { return in.find("[DONE]") != std::string::npos; }, 20ms);
}

// 503 with OpenAI's error object, Retry-After, and a closed connection.
void check_draining_refusal(const raw_response& r) {
  INFO("during the drain: " << r.status << " " << r.body);
  REQUIRE(r.complete);
  CHECK(r.status == 503);
  CHECK(r.headers.count("retry-after") == 1);
  CHECK(r.headers.count("connection") == 1);
  if (r.headers.count("connection")) CHECK(r.headers.at("connection") == "close");
  const auto j = json::parse(r.body, nullptr, false);
  REQUIRE(j.is_object());
  CHECK(j["error"]["type"] == "server_error");
  CHECK(j["error"]["code"] == "unavailable");
  CHECK(j["error"]["message"] == "the server is shutting down");
}

std::vector<pid_t> node_pids(const serve_process& s) {
  std::vector<pid_t> pids;
  for (const char* n : {"stage0", "stage1", "experts0", "experts1"}) pids.push_back(shoal::testing::node_pid(s.pid(), n));
  return pids;
}

}  // namespace

TEST_CASE("SIGTERM and SIGINT drain: new requests get 503 with Retry-After, the stream in flight completes",
          "[gateway][e2e][signals]") {
  for (const int sig : {SIGTERM, SIGINT}) {
    const std::string name = sig == SIGTERM ? "SIGTERM" : "SIGINT";
    DYNAMIC_SECTION(name) {
      serve_process s("signals-drain-" + name, serve_model("30"));
      raw_connection in_flight(s.port());
      // Seconds of decoding on the tiny model: the refusals below come while it runs.
      start_stream(in_flight, 1500);
      REQUIRE(::kill(s.pid(), sig) == 0);
      REQUIRE(eventually([&] { return s.log().find(name + " received: draining") != std::string::npos; }, 5s));
      // The log line comes just before the server starts draining; /ready tells when it has.
      REQUIRE(eventually([&] { return request(s.port(), get("/ready")).status == 503; }, 5s));
      // New connections are accepted, and every kind of generation request is refused.
      check_draining_refusal(request(s.port(), chat(4, false)));
      check_draining_refusal(request(s.port(), chat(4, true)));
      check_draining_refusal(
          request(s.port(), post("/v1/completions", R"({"model":"tiny","prompt":"The sea","max_tokens":4})")));
      CHECK(request(s.port(), get("/ready")).status == 503);
      CHECK(request(s.port(), get("/health")).status == 200);
      // The refusals came while the stream was still running; it then runs to its end.
      CHECK_FALSE(has_done(in_flight));
      check_runs_to_length(in_flight, 1500);
      const int code = s.wait_exit(60s);
      const auto log = s.log();
      INFO(log);
      CHECK(code == 0);
      CHECK(log.find("[serve] stopped") != std::string::npos);
      CHECK(log.find("drain ran out") == std::string::npos);
      CHECK(count_of(log, "POST /v1/chat/completions 503") == 2);
      CHECK(count_of(log, "POST /v1/completions 503") == 1);
      // Once drained the port is closed.
      CHECK_THROWS(raw_connection(s.port()));
    }
  }
}

TEST_CASE("a second signal during the drain stops at once, exit 128 + its number", "[gateway][e2e][signals]") {
  SECTION("serve --model: SIGTERM, then SIGINT: exit 130") {
    serve_process s("signals-twice-model", serve_model("60"));
    raw_connection in_flight(s.port());
    start_stream(in_flight, 3000);
    REQUIRE(::kill(s.pid(), SIGTERM) == 0);
    REQUIRE(eventually([&] { return s.log().find("SIGTERM received: draining") != std::string::npos; }, 5s));
    const auto second = clock_type::now();
    REQUIRE(::kill(s.pid(), SIGINT) == 0);
    const int code = s.wait_exit(10s);
    const auto took = clock_type::now() - second;
    INFO(s.log());
    CHECK(code == 130);
    CHECK(took < 3s);
    CHECK(s.log().find("SIGINT received while draining: stopping now, 1 requests cut off") != std::string::npos);
    // The stream is cut, not finished.
    CHECK(in_flight.closed_within(5s));
    CHECK(in_flight.received().find("[DONE]") == std::string::npos);
  }
  SECTION("serve --cluster: SIGTERM twice: exit 143, every node process gone") {
    serve_process s("signals-twice-cluster", serve_cluster("60"));
    const auto nodes = node_pids(s);
    for (const auto pid : nodes) REQUIRE(pid > 0);
    raw_connection in_flight(s.port());
    start_stream(in_flight, 3000);
    REQUIRE(::kill(s.pid(), SIGTERM) == 0);
    REQUIRE(eventually([&] { return s.log().find("SIGTERM received: draining") != std::string::npos; }, 5s));
    const auto second = clock_type::now();
    REQUIRE(::kill(s.pid(), SIGTERM) == 0);
    const int code = s.wait_exit(10s);
    const auto took = clock_type::now() - second;
    INFO(s.log());
    CHECK(code == 143);
    CHECK(took < 3s);
    CHECK(s.log().find("SIGTERM received while draining: stopping now") != std::string::npos);
    // Killed and reaped by the gateway before it exited: no node outlives it.
    for (const auto pid : nodes) CHECK(::kill(pid, 0) != 0);
    CHECK(in_flight.closed_within(5s));
    CHECK(in_flight.received().find("[DONE]") == std::string::npos);
  }
}

TEST_CASE("Ctrl-C in a terminal drains serve --cluster: its nodes are not signalled, the stream completes",
          "[gateway][e2e][signals]") {
  // SIGINT to the whole process group, as a terminal sends it to its foreground job.
  serve_process s("signals-ctrl-c-cluster", serve_cluster("60"), {}, std::chrono::seconds(240), true);
  const auto nodes = node_pids(s);
  for (const auto pid : nodes) REQUIRE(pid > 0);
  raw_connection in_flight(s.port());
  start_stream(in_flight, 300);
  REQUIRE(::kill(-s.pid(), SIGINT) == 0);
  REQUIRE(eventually([&] { return s.log().find("SIGINT received: draining") != std::string::npos; }, 5s));
  check_runs_to_length(in_flight, 300);
  const int code = s.wait_exit(60s);
  INFO(s.log());
  CHECK(code == 0);
  CHECK(s.log().find("[serve] stopped") != std::string::npos);
  for (const auto pid : nodes) CHECK(::kill(pid, 0) != 0);
}

TEST_CASE("the drain deadline runs out with a stream open: it is cancelled, the server says so and exits 0",
          "[gateway][e2e][signals]") {
  serve_process s("signals-drain-expiry", serve_model("1"));
  raw_connection in_flight(s.port());
  start_stream(in_flight, 3000);
  const auto signalled = clock_type::now();
  REQUIRE(::kill(s.pid(), SIGTERM) == 0);
  const int code = s.wait_exit(30s);
  const auto took = clock_type::now() - signalled;
  const auto log = s.log();
  INFO(log);
  CHECK(code == 0);
  CHECK(took >= 1s);  // the drain was given its second
  CHECK(log.find("the drain ran out after 1 s (--drain-seconds): cancelled 1 requests still in flight") !=
        std::string::npos);
  CHECK(log.find("[serve] stopped") != std::string::npos);
  // The client learns that its stream was cut: an error event, then the end of the stream.
  const auto r = in_flight.read_response(10s);
  INFO(r.body.substr(r.body.size() > 2000 ? r.body.size() - 2000 : 0));
  CHECK(r.complete);
  const auto a = parse_sse(r.body);
  CHECK(a.error);
  CHECK(a.done);
  CHECK(a.finish.empty());
}

namespace {

// The /metrics value of `series` (name with labels), or -1 when absent.
double metric(std::uint16_t port, const std::string& series) {
  const auto r = request(port, get("/metrics"), 10s);
  std::istringstream lines(r.body);
  for (std::string line; std::getline(lines, line);)
    if (line.rfind(series + " ", 0) == 0) return std::stod(line.substr(series.size() + 1));
  return -1;
}

// A client socket with a receive buffer of a few kilobytes (set before connecting, so that the
// window it offers stays that small) that sends its request and then never reads.
class stalled_reader {
 public:
  stalled_reader(std::uint16_t port, const std::string& request) {
    fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    REQUIRE(fd_ >= 0);
    const int small = 4096;
    REQUIRE(::setsockopt(fd_, SOL_SOCKET, SO_RCVBUF, &small, sizeof small) == 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(port);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    REQUIRE(::connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
    REQUIRE(::send(fd_, request.data(), request.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(request.size()));
  }
  ~stalled_reader() { ::close(fd_); }
  stalled_reader(const stalled_reader&) = delete;
  stalled_reader& operator=(const stalled_reader&) = delete;

  // Reads everything now, up to `limit`: true when the server has closed the connection.
  bool closed_by_server(std::chrono::milliseconds limit) {
    const auto end = clock_type::now() + limit;
    char buffer[65536];
    while (clock_type::now() < end) {
      pollfd p{fd_, POLLIN, 0};
      if (::poll(&p, 1, 100) <= 0) continue;
      const auto n = ::recv(fd_, buffer, sizeof buffer, 0);
      if (n <= 0) return true;  // EOF, or a reset
      received_ += static_cast<std::size_t>(n);
    }
    return false;
  }
  std::size_t received() const { return received_; }

 private:
  int fd_ = -1;
  std::size_t received_ = 0;
};

}  // namespace

TEST_CASE("a client that never reads its stream is cut off at the write-queue bound, its request cancelled",
          "[gateway][e2e][slow-client]") {
  auto args = serve_model("30");
  for (const char* a : {"--max-write-queue-kb", "64"}) args.push_back(a);
  serve_process s("lifecycle-slow-client", args);
  REQUIRE(metric(s.port(), "shoal_http_slow_client_disconnects_total") == 0);
  // 8 choices of up to 3000 tokens: megabytes of events unless the server stops early.
  json body{{"model", "tiny"},
            {"messages", {{{"role", "user"}, {"content", "Tell me about the sea."}}}},
            {"max_tokens", 3000},
            {"ignore_eos", true},
            {"n", 8},
            {"stream", true}};
  stalled_reader client(s.port(), post("/v1/chat/completions", body.dump()));
  const auto started = clock_type::now();
  const bool cut = eventually([&] { return metric(s.port(), "shoal_http_slow_client_disconnects_total") == 1; }, 60s);
  const auto log = s.log();
  INFO(log);
  REQUIRE(cut);
  INFO("cut off after " << std::chrono::duration<double>(clock_type::now() - started).count() << " s");
  CHECK(log.find("read too slowly") != std::string::npos);
  // Cancelled in the engine, not merely unread: nothing in flight, nothing running, and no
  // more tokens generated.
  CHECK(eventually([&] {
    return metric(s.port(), "shoal_requests_in_flight") == 0 && metric(s.port(), "shoal_running_sequences") == 0;
  }));
  const auto generated = metric(s.port(), "shoal_engine_generated_tokens_total");
  CHECK(generated < 8 * 3000);
  std::this_thread::sleep_for(500ms);
  CHECK(metric(s.port(), "shoal_engine_generated_tokens_total") == generated);
  CHECK(eventually([&] { return s.log().find("POST /v1/chat/completions 499") != std::string::npos; }));
  // The connection is closed: what the kernel still held arrives, then the end.
  CHECK(client.closed_by_server(10s));
  CHECK(client.received() > 0);
  // Everyone else is still served.
  const auto r = request(s.port(), chat(4, false), 60s);
  CHECK(r.status == 200);
  CHECK(s.terminate(30s) == 0);
}

TEST_CASE("requests beyond --max-running plus --max-waiting get 429 with Retry-After; the server carries on",
          "[gateway][e2e][refusals]") {
  auto args = serve_model("5");
  args.insert(args.end(), {"--max-running", "1", "--max-waiting", "1"});
  serve_process s("serve-429", args);
  raw_connection decoding(s.port()), waiting(s.port());
  start_stream(decoding, 3000);
  waiting.send(chat(3000, true));
  REQUIRE(eventually([&] { return metric(s.port(), "shoal_requests_in_flight") == 2; }, 10s));
  const auto refused = request(s.port(), chat(4, false), 10s);
  INFO(refused.status << " " << refused.body);
  CHECK(refused.status == 429);
  CHECK(refused.headers.count("retry-after") == 1);
  const auto j = json::parse(refused.body, nullptr, false);
  REQUIRE(j.is_object());
  CHECK(j["error"]["type"] == "rate_limit_error");
  CHECK(j["error"]["code"] == "rate_limit_exceeded");
  CHECK_THAT(j["error"]["message"].get<std::string>(), Catch::Contains("serving 2 requests"));
  // Once the two leave, the next request is served.
  decoding.close();
  waiting.close();
  REQUIRE(eventually([&] { return metric(s.port(), "shoal_requests_in_flight") == 0; }, 10s));
  CHECK(request(s.port(), chat(4, false), 60s).status == 200);
  CHECK(s.terminate(30s) == 0);
}
