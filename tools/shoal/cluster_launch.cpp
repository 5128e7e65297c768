#include "cluster_launch.hpp"

#include "shoal/base/error.hpp"

#include <fmt/core.h>

#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <thread>

#include <poll.h>
#include <pthread.h>
#include <sys/wait.h>
#include <unistd.h>

namespace shoal::tools {
namespace {

using clock_type = std::chrono::steady_clock;

bool is_local_host(const std::string& host) {
  if (host == "localhost" || host.rfind("127.", 0) == 0 || host == "::1") return true;
  char name[256] = {};
  return ::gethostname(name, sizeof(name) - 1) == 0 && host == name;
}

int exit_code(int status) { return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status); }

}  // namespace

launched_cluster::launched_cluster(const config::cluster_config& cluster, settings s) : prefix_(s.log_prefix) {
  const auto self_exe = std::filesystem::read_symlink("/proc/self/exe").string();
  int head_out = -1;
  try {
    for (const auto& node : cluster.nodes) {
      std::vector<std::string> args;
      if (is_local_host(node.host))
        args = {self_exe};
      else  // the same command over ssh; the config path and the binary must exist there
        args = {"ssh", "-o", "BatchMode=yes", node.host, "shoal"};
      for (const auto& a : std::vector<std::string>{"node", "--config", s.config_path, "--name", node.name})
        args.push_back(a);
      args.insert(args.end(), s.node_arguments.begin(), s.node_arguments.end());
      const bool head = node.name == cluster.head;
      int pipe_fds[2] = {-1, -1};
      if (head && ::pipe(pipe_fds) != 0) shoal::fail(errc::unavailable, "pipe: {}", std::strerror(errno));
      const pid_t pid = ::fork();
      if (pid < 0) shoal::fail(errc::unavailable, "fork: {}", std::strerror(errno));
      if (pid == 0) {
        sigset_t none;
        sigemptyset(&none);
        pthread_sigmask(SIG_SETMASK, &none, nullptr);
        if (head) {
          ::dup2(pipe_fds[1], STDOUT_FILENO);
          ::close(pipe_fds[0]);
          ::close(pipe_fds[1]);
        }
        std::vector<char*> argv;
        for (auto& a : args) argv.push_back(a.data());
        argv.push_back(nullptr);
        ::execvp(argv[0], argv.data());
        std::fprintf(stderr, "shoal: cannot run %s: %s\n", argv[0], std::strerror(errno));
        ::_exit(127);
      }
      child c{node.name, pid, -1};
      if (head) {
        ::close(pipe_fds[1]);
        c.out = head_out = pipe_fds[0];
        host_ = node.host;
        port_ = node.port;
      }
      children_.push_back(c);
    }
    fmt::print(stderr, "{} started {} nodes; waiting up to {} s for the cluster\n", prefix_, children_.size(),
               s.ready_timeout.count());
    // The head's ready line, a node dying, an interruption, or the deadline, whichever first.
    const auto deadline = clock_type::now() + s.ready_timeout + std::chrono::seconds(5);
    std::string line;
    while (true) {
      if (auto dead = exited_node())
        shoal::fail(errc::unavailable, "node {} exited (status {}) before the cluster was ready; see its messages above",
                    dead->first, dead->second);
      if (s.interrupted && s.interrupted()) shoal::fail(errc::cancelled, "interrupted before the cluster was ready");
      if (clock_type::now() > deadline)
        shoal::fail(errc::deadline_exceeded,
                    "the cluster was not ready within {} s (waited for the head node {}'s ready line)",
                    s.ready_timeout.count(), cluster.head);
      pollfd p{head_out, POLLIN, 0};
      if (::poll(&p, 1, 100) > 0) {
        char buffer[4096];
        const auto n = ::read(head_out, buffer, sizeof(buffer));
        if (n > 0) line.append(buffer, static_cast<std::size_t>(n));
        // Libraries may log to stdout too (UCX does): pass such lines on, wait for ours.
        bool ready = false;
        for (auto end = line.find('\n'); end != std::string::npos; end = line.find('\n')) {
          auto one = line.substr(0, end);
          line.erase(0, end + 1);
          if (one.starts_with("{") && one.find("\"ready\":true") != std::string::npos) {
            ready_line_ = std::move(one);
            ready = true;
            break;
          }
          fmt::print(stderr, "{} head node {}: {}\n", prefix_, cluster.head, one);
        }
        if (ready) break;
      }
    }
  } catch (...) {
    stop();
    throw;
  }
}

launched_cluster::~launched_cluster() { stop(); }

std::optional<std::pair<std::string, int>> launched_cluster::exited_node() {
  for (auto& c : children_) {
    int status = 0;
    if (c.pid > 0 && ::waitpid(c.pid, &status, WNOHANG) == c.pid) {
      c.pid = -1;
      return std::pair{c.node, exit_code(status)};
    }
  }
  return std::nullopt;
}

void launched_cluster::stop() {
  for (auto& c : children_)
    if (c.pid > 0) ::kill(c.pid, SIGTERM);
  const auto deadline = clock_type::now() + std::chrono::seconds(10);
  for (auto& c : children_) {
    while (c.pid > 0) {
      if (::waitpid(c.pid, nullptr, WNOHANG) == c.pid) {
        c.pid = -1;
      } else if (clock_type::now() > deadline) {
        fmt::print(stderr, "{} node {} did not stop within 10 s: killing it\n", prefix_, c.node);
        ::kill(c.pid, SIGKILL);
        ::waitpid(c.pid, nullptr, 0);
        c.pid = -1;
      } else {
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
      }
    }
    if (c.out >= 0) ::close(c.out);
    c.out = -1;
  }
}

}  // namespace shoal::tools
