// transport_bench: bandwidth (1 MiB tensors) and small-message latency of shoal::transport::node
// next to ucx_perftest on the same UCX transports, in the same run, printed as a table of
// ratios. Both sides run as two processes on loopback: this process and a reflector child
// (itself, re-executed with --reflect) for Shoal; ucx_perftest server and client for UCX.
//
//   transport_bench [--transports LIST]... [--size BYTES] [--bw-iters N] [--lat-iters N]
//                   [--window N] [--repeat N] [--spin-us US] [--yield|--no-yield]
//                   [--eager-max BYTES]

#include "shoal/transport/node.hpp"

#include <fmt/core.h>

#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

extern char** environ;

namespace tp = shoal::transport;
using namespace std::chrono_literals;
using bench_clock = std::chrono::steady_clock;

namespace {

struct settings {
  std::vector<std::string> transports;
  std::size_t size = 1u << 20;
  int bw_iters = 2000;
  int lat_iters = 20000;
  int window = 16;
  int repeat = 3;
  // The node's defaults, i.e. what the actors get; --spin-us / --no-yield to explore.
  std::chrono::microseconds spin = tp::node_options{}.spin;
  bool spin_yield = tp::node_options{}.spin_yield;
  std::size_t eager_max = tp::node_options{}.eager_bulk_max;
};

// The child: connects back and answers every message with a small envelope (an echo for pings,
// an acknowledgement for tensors), until the parent disconnects.
int reflect(std::uint16_t port, const std::string& transports,
            std::chrono::microseconds spin, bool spin_yield, std::size_t eager_max) {
  std::atomic<bool> done{false};
  tp::node* self = nullptr;
  tp::node_callbacks callbacks;
  callbacks.on_message = [&](tp::peer_id peer, tp::incoming_message in) {
    tp::outgoing_message out;
    out.envelope().setRequestId(in.envelope().getRequestId());
    out.envelope().getBody().initHeartbeat();
    self->send(peer, std::move(out));
  };
  callbacks.on_peer_closed = [&](tp::peer_id) { done = true; };
  callbacks.on_peer_failed = [&](tp::peer_id, const shoal::error&) { done = true; };
  tp::node_options options;
  options.name = "reflector";
  options.spin = spin;
  options.spin_yield = spin_yield;
  options.eager_bulk_max = eager_max;
  options.listen_host.clear();
  options.transports = transports;
  tp::node node(options, callbacks);
  self = &node;
  node.connect("127.0.0.1", port);
  auto deadline = bench_clock::now() + 10min;
  while (!done && bench_clock::now() < deadline) std::this_thread::sleep_for(5ms);
  return 0;
}

pid_t spawn(const std::vector<std::string>& args, const char* stdout_path = nullptr) {
  std::vector<char*> argv;
  for (auto& arg : args) argv.push_back(const_cast<char*>(arg.c_str()));
  argv.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  if (stdout_path != nullptr) {
    posix_spawn_file_actions_addopen(&actions, 1, stdout_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    posix_spawn_file_actions_adddup2(&actions, 1, 2);
  }
  pid_t pid = 0;
  int rc = posix_spawnp(&pid, argv[0], &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  if (rc != 0) shoal::fail(shoal::errc::unavailable, "cannot start {}: {}", args[0], strerror(rc));
  return pid;
}

int wait_child(pid_t pid, std::chrono::seconds timeout) {
  auto deadline = bench_clock::now() + timeout;
  int status = 0;
  while (bench_clock::now() < deadline) {
    if (waitpid(pid, &status, WNOHANG) == pid) return status;
    std::this_thread::sleep_for(10ms);
  }
  kill(pid, SIGKILL);
  waitpid(pid, &status, 0);
  return status;
}

std::uint16_t free_port() {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address));
  socklen_t length = sizeof(address);
  getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length);
  close(fd);
  return ntohs(address.sin_port);
}

struct result {
  double bandwidth_mib_s = 0;  // MiB/s, as ucx_perftest's "MB/s".
  double latency_us = 0;       // One way, half a round trip.
};

// Shoal: ping-pong for latency, a window of acknowledged tensors for bandwidth. The sends are
// issued from the node's callback (as an actor runtime would), so only the two progress
// threads spin, as in ucx_perftest.
result run_shoal(const settings& s, const std::string& transports, const std::string& self_exe) {
  std::mutex mutex;
  std::condition_variable cv;
  std::optional<tp::peer_id> peer;
  enum class phase { idle, ping, stream } mode = phase::idle;
  std::atomic<int> replies{0};
  int target = 0;
  int sent = 0;
  bool finished = false;
  tp::node* self = nullptr;
  auto tensor = std::make_shared<tp::byte_buffer>(s.size);
  std::memset(tensor->data(), 0x5a, s.size);

  auto send_ping = [&](tp::peer_id to, int id) {
    tp::outgoing_message msg;
    msg.envelope().setRequestId(static_cast<std::uint64_t>(id));
    msg.envelope().getBody().initHeartbeat().setSequence(static_cast<std::uint64_t>(id));
    self->send(to, std::move(msg));
  };
  auto send_tensor = [&](tp::peer_id to, int id) {
    tp::outgoing_message msg;
    msg.envelope().setRequestId(static_cast<std::uint64_t>(id));
    auto activations = msg.envelope().getBody().initActivations();
    msg.attach_tensor(activations.initHidden(), tp::bulk_view{tensor->data(), tensor->size(), tensor},
                      tp::schema::DType::U8, {s.size});
    self->send(to, std::move(msg));
  };

  tp::node_callbacks callbacks;
  callbacks.on_peer_connected = [&](tp::peer_id id, const std::string&) {
    std::lock_guard lock(mutex);
    peer = id;
    cv.notify_all();
  };
  callbacks.on_message = [&](tp::peer_id from, tp::incoming_message) {
    int done = replies.fetch_add(1) + 1;
    if (done >= target) {
      std::lock_guard lock(mutex);
      finished = true;
      cv.notify_all();
      return;
    }
    if (mode == phase::ping) {
      send_ping(from, done);
    } else if (mode == phase::stream && sent < target) {
      send_tensor(from, sent++);
    }
  };
  tp::node_options options;
  options.name = "bench";
  options.transports = transports;
  options.spin = s.spin;
  options.spin_yield = s.spin_yield;
  options.eager_bulk_max = s.eager_max;
  tp::node node(options, callbacks);
  self = &node;
  pid_t child = spawn({self_exe, "--reflect", std::to_string(node.port()), "--transports",
                       transports, "--spin-us", std::to_string(s.spin.count()),
                       s.spin_yield ? "--yield" : "--no-yield", "--eager-max", std::to_string(s.eager_max)});
  {
    std::unique_lock lock(mutex);
    if (!cv.wait_for(lock, 20s, [&] { return peer.has_value(); }))
      shoal::fail(shoal::errc::unavailable, "the reflector did not connect within 20 s");
  }
  tp::peer_id to = *peer;

  auto run_phase = [&](phase p, int count) {
    {
      std::lock_guard lock(mutex);
      finished = false;
      replies = 0;
      target = count;
      mode = p;
    }
    auto start = bench_clock::now();
    if (p == phase::ping) {
      send_ping(to, 0);
    } else {
      // The callback may already be sending as acks come in; `sent` is shared with it, so the
      // initial window goes out under the same discipline: the callback only sends once the
      // first ack arrives, after this loop is done.
      int initial = std::min(s.window, count);
      sent = initial;
      for (int i = 0; i < initial; ++i) send_tensor(to, i);
    }
    std::unique_lock lock(mutex);
    if (!cv.wait_for(lock, 120s, [&] { return finished; }))
      shoal::fail(shoal::errc::deadline_exceeded, "benchmark phase did not finish in 120 s");
    return std::chrono::duration<double>(bench_clock::now() - start).count();
  };

  result r;
  run_phase(phase::ping, std::max(100, s.lat_iters / 10));  // Warm-up.
  double seconds = run_phase(phase::ping, s.lat_iters);
  r.latency_us = seconds / s.lat_iters / 2 * 1e6;
  run_phase(phase::stream, std::max(s.window, s.bw_iters / 10));
  seconds = run_phase(phase::stream, s.bw_iters);
  r.bandwidth_mib_s = static_cast<double>(s.size) * s.bw_iters / seconds / (1 << 20);
  node.disconnect(to);
  wait_child(child, 10s);
  node.stop();
  return r;
}

// Runs one ucx_perftest test (server and client on loopback) and returns its "Final:" row.
std::vector<double> run_perftest(const std::string& transports, const std::string& test,
                                 std::size_t size, int iters, int warmup) {
  setenv("UCX_TLS", transports.c_str(), 1);
  std::string port = std::to_string(free_port());
  std::string server_log = fmt::format("/tmp/transport_bench_perftest_server.{}.log", getpid());
  std::string client_log = fmt::format("/tmp/transport_bench_perftest_client.{}.log", getpid());
  pid_t server = spawn({"ucx_perftest", "-p", port}, server_log.c_str());
  std::this_thread::sleep_for(500ms);  // Let the server bind before the client connects.
  pid_t client = spawn({"ucx_perftest", "127.0.0.1", "-p", port, "-t", test, "-s",
                        std::to_string(size), "-n", std::to_string(iters), "-w",
                        std::to_string(warmup)},
                       client_log.c_str());
  int status = wait_child(client, 120s);
  wait_child(server, 10s);
  unsetenv("UCX_TLS");
  FILE* file = std::fopen(client_log.c_str(), "r");
  std::vector<double> row;
  if (file != nullptr) {
    char line[512];
    while (std::fgets(line, sizeof(line), file) != nullptr) {
      if (std::strncmp(line, "Final:", 6) != 0) continue;
      std::istringstream in(line + 6);
      double value;
      row.clear();
      while (in >> value) row.push_back(value);
    }
    std::fclose(file);
  }
  std::remove(client_log.c_str());
  std::remove(server_log.c_str());
  // Columns: iterations, latency 50%, average, overall (usec), bandwidth average, overall
  // (MB/s), message rate average, overall.
  if (row.size() < 6 || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
    shoal::fail(shoal::errc::unavailable, "ucx_perftest -t {} with UCX_TLS={} failed", test,
                transports);
  return row;
}

std::string self_path() {
  char buffer[4096];
  ssize_t n = readlink("/proc/self/exe", buffer, sizeof(buffer) - 1);
  if (n <= 0) shoal::fail(shoal::errc::internal, "cannot find /proc/self/exe");
  return std::string(buffer, static_cast<std::size_t>(n));
}

}  // namespace

int main(int argc, char** argv) {
  settings s;
  std::optional<std::uint16_t> reflect_port;
  std::string reflect_transports;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        fmt::print(stderr, "transport_bench: {} needs a value\n", arg);
        std::exit(2);
      }
      return argv[++i];
    };
    if (arg == "--transports") s.transports.push_back(next());
    else if (arg == "--size") s.size = std::stoull(next());
    else if (arg == "--bw-iters") s.bw_iters = std::stoi(next());
    else if (arg == "--lat-iters") s.lat_iters = std::stoi(next());
    else if (arg == "--window") s.window = std::stoi(next());
    else if (arg == "--repeat") s.repeat = std::max(1, std::stoi(next()));
    else if (arg == "--yield") s.spin_yield = true;
    else if (arg == "--no-yield") s.spin_yield = false;
    else if (arg == "--spin-us") s.spin = std::chrono::microseconds(std::stoll(next()));
    else if (arg == "--eager-max") s.eager_max = std::stoull(next());
    else if (arg == "--reflect") reflect_port = static_cast<std::uint16_t>(std::stoi(next()));
    else {
      fmt::print(stderr,
                 "usage: transport_bench [--transports UCX_TLS]... [--size BYTES] [--bw-iters N]"
                 " [--lat-iters N] [--window N] [--repeat N] [--spin-us US] [--yield|--no-yield]"
                 " [--eager-max BYTES]\n");
      return 2;
    }
  }
  try {
    if (reflect_port)
      return reflect(*reflect_port, s.transports.empty() ? "" : s.transports[0], s.spin,
                     s.spin_yield, s.eager_max);
    if (s.transports.empty()) s.transports = {"tcp", "sm,self,tcp"};
    std::string exe = self_path();
    // Small messages: ucx_perftest moves this many bytes, about the size of a Shoal control
    // envelope with its wire header.
    const std::size_t small = 128;
    fmt::print("| UCX_TLS | metric | shoal::transport | ucx_perftest | ratio |\n");
    fmt::print("|---|---|---:|---:|---:|\n");
    for (const auto& transports : s.transports) {
      // Interleaved repetitions, best of each: on a shared machine, noise only ever slows a
      // run down, so the best run is the closest to what the software can do.
      result ours;
      ours.latency_us = 1e30;
      double their_bw = 0, their_lat = 1e30;
      for (int r = 0; r < s.repeat; ++r) {
        result run = run_shoal(s, transports, exe);
        ours.bandwidth_mib_s = std::max(ours.bandwidth_mib_s, run.bandwidth_mib_s);
        ours.latency_us = std::min(ours.latency_us, run.latency_us);
        auto bw = run_perftest(transports, "ucp_am_bw", s.size, s.bw_iters, s.bw_iters / 10);
        auto lat = run_perftest(transports, "ucp_am_lat", small, s.lat_iters, s.lat_iters / 10);
        their_bw = std::max(their_bw, bw[5]);
        their_lat = std::min(their_lat, lat[3]);
      }
      fmt::print("| {} | bandwidth, {} B messages (MiB/s, higher is better) | {:.0f} | {:.0f} | "
                 "{:.2f} |\n",
                 transports, s.size, ours.bandwidth_mib_s, their_bw,
                 ours.bandwidth_mib_s / their_bw);
      fmt::print("| {} | latency, small message one way (us, lower is better) | {:.2f} | {:.2f} | "
                 "{:.2f} |\n",
                 transports, ours.latency_us, their_lat, ours.latency_us / their_lat);
      std::fflush(stdout);
    }
  } catch (const std::exception& e) {
    fmt::print(stderr, "transport_bench: error: {}\n", e.what());
    return 1;
  }
  return 0;
}
