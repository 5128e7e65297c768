#include "cluster_launch.hpp"

#include "shoal/actors/client.hpp"
#include "shoal/base/error.hpp"

#include <fmt/core.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstring>

#include <poll.h>
#include <sys/prctl.h>
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

std::string describe_exit(int code) {
  return code > 128 ? fmt::format("signal {}", code - 128) : fmt::format("status {}", code);
}

}  // namespace

void launched_cluster::spawn(child& c) {
  int pipe_fds[2] = {-1, -1};
  if (c.watched && ::pipe(pipe_fds) != 0) shoal::fail(errc::unavailable, "pipe: {}", std::strerror(errno));
  const pid_t parent = ::getpid();
  const pid_t pid = ::fork();
  if (pid < 0) shoal::fail(errc::unavailable, "fork: {}", std::strerror(errno));
  if (pid == 0) {
    sigset_t none;
    sigemptyset(&none);
    pthread_sigmask(SIG_SETMASK, &none, nullptr);
    // A process group of its own: Ctrl-C in a terminal signals the whole foreground group, and
    // the nodes must outlive the launcher's drain (it stops them itself, after it). In exchange
    // they are told when the launcher dies (of the thread that started them: the main thread,
    // or the watcher for restarts, both live until the nodes are stopped).
    ::setpgid(0, 0);
    ::prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (::getppid() != parent) ::_exit(1);  // the launcher died before prctl
    if (c.watched) {
      ::dup2(pipe_fds[1], STDOUT_FILENO);
      ::close(pipe_fds[0]);
      ::close(pipe_fds[1]);
    }
    std::vector<char*> argv;
    for (auto& a : c.args) argv.push_back(a.data());
    argv.push_back(nullptr);
    ::execvp(argv[0], argv.data());
    std::fprintf(stderr, "shoal: cannot run %s: %s\n", argv[0], std::strerror(errno));
    ::_exit(127);
  }
  c.pid = pid;
  if (c.watched) {
    ::close(pipe_fds[1]);
    if (c.out >= 0) ::close(c.out);  // a restarted node: the old process's pipe
    c.out = pipe_fds[0];
    c.buffer.clear();
  }
}

launched_cluster::launched_cluster(const config::cluster_config& cluster, settings s)
    : settings_(std::move(s)), prefix_(settings_.log_prefix) {
  const auto self_exe = std::filesystem::read_symlink("/proc/self/exe").string();
  // A bad secret file stops the launch before any node starts (nodes on other hosts read their
  // own copy at the same path).
  if (!cluster.join_secret_file.empty() &&
      std::any_of(cluster.nodes.begin(), cluster.nodes.end(), [](const auto& n) { return is_local_host(n.host); }))
    (void)read_join_secret(cluster.join_secret_file);
  int head_out = -1;
  standby_ = !cluster.standby.empty();
  for (const auto* name : {&cluster.head, &cluster.standby})
    if (const auto* spec = cluster.find_node(*name)) heads_.emplace_back(spec->host, spec->port);
  try {
    for (const auto& node : cluster.nodes) {
      child c;
      c.node = node.name;
      c.head = node.name == cluster.head;
      c.watched = c.head || node.name == cluster.standby;
      if (is_local_host(node.host))
        c.args = {self_exe};
      else  // the same command over ssh; the config path and the binary must exist there
        c.args = {"ssh", "-o", "BatchMode=yes", node.host, "shoal"};
      for (const auto& a : std::vector<std::string>{"node", "--config", settings_.config_path, "--name", node.name})
        c.args.push_back(a);
      c.args.insert(c.args.end(), settings_.node_arguments.begin(), settings_.node_arguments.end());
      children_.push_back(std::move(c));
      spawn(children_.back());
      if (children_.back().head) {
        head_out = children_.back().out;
        host_ = node.host;
        port_ = node.port;
      }
    }
    fmt::print(stderr, "{} started {} nodes; waiting up to {} s for the cluster\n", prefix_, children_.size(),
               settings_.ready_timeout.count());
    // The head's ready line, a node dying, an interruption, or the deadline, whichever first.
    const auto deadline = clock_type::now() + settings_.ready_timeout + std::chrono::seconds(5);
    std::string& line = std::find_if(children_.begin(), children_.end(), [](const child& c) { return c.head; })->buffer;
    while (true) {
      if (auto dead = exited_node())
        shoal::fail(errc::unavailable, "node {} exited (status {}) before the cluster was ready; see its messages above",
                    dead->first, dead->second);
      if (settings_.interrupted && settings_.interrupted())
        shoal::fail(errc::cancelled, "interrupted before the cluster was ready");
      if (clock_type::now() > deadline)
        shoal::fail(errc::deadline_exceeded,
                    "the cluster was not ready within {} s (waited for the head node {}'s ready line)",
                    settings_.ready_timeout.count(), cluster.head);
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
          on_head_line(one, cluster.head);
        }
        if (ready) break;
      }
    }
  } catch (...) {
    stop();
    throw;
  }
  watcher_ = std::thread([this] { watch(); });
}

launched_cluster::~launched_cluster() { stop(); }

// A line of a head's (or standby's) stdout: a membership event, or a library's message to
// pass on.
void launched_cluster::on_head_line(const std::string& line, const std::string& from) {
  nlohmann::json event;
  if (line.starts_with("{")) event = nlohmann::json::parse(line, nullptr, false);
  if (!event.is_object() || !event.contains("event")) {
    fmt::print(stderr, "{} node {}: {}\n", prefix_, from, line);
    return;
  }
  const auto kind = event.value("event", "");
  const auto node = event.value("node", "");
  if (kind == "node_down") {
    fmt::print(stderr, "{} node {} was declared dead: {}\n", prefix_, node, event.value("reason", ""));
    // A frozen process still holds its port and could wake up under the old placement:
    // end it, so that the watcher restarts it like any exited node.
    std::lock_guard lock(mutex_);
    for (auto& c : children_)
      if (c.node == node && c.node != from && c.pid > 0 && (standby_ || !c.head)) {
        fmt::print(stderr, "{} killing node {} (pid {})\n", prefix_, node, c.pid);
        ::kill(c.pid, SIGKILL);
      }
  } else if (kind == "head_takeover") {
    fmt::print(stderr, "{} node {} took over as head from {} (placement epoch {})\n", prefix_, node,
               event.value("from", ""), event.value("epoch", 0));
  } else if (kind == "superseded") {
    fmt::print(stderr, "{} node {} was replaced as head while it was frozen or cut off ({}); it stops\n", prefix_, from,
               event.value("reason", ""));
  } else if (kind == "standby") {
    fmt::print(stderr, "{} node {} found {} in charge and joined it as its standby\n", prefix_, node,
               event.value("head", ""));
  } else if (kind == "node_rejoined") {
    fmt::print(stderr, "{} node {} rejoined (pid {}); loading its part of the placement\n", prefix_, node,
               event.value("pid", 0));
  } else if (kind == "recovered") {
    fmt::print(stderr, "{} the cluster serves again (placement epoch {})\n", prefix_, event.value("epoch", 0));
  } else if (kind == "placement") {
    fmt::print(stderr, "{} the cluster serves on a new placement (epoch {}: {} stages, {} expert actors)\n", prefix_,
               event.value("epoch", 0), event.value("stages", 0), event.value("expert_actors", 0));
  } else if (kind == "expert_moved") {
    fmt::print(stderr, "{} expert {} now serves from {}; its old copies are retired\n", prefix_, event.value("expert", -1),
               event.value("to", ""));
  } else if (kind == "retired") {
    fmt::print(stderr, "{} actor {} on {} unloaded (nothing routes to it any more)\n", prefix_, event.value("actor", 0),
               node);
  } else if (kind == "replaced") {
    fmt::print(stderr, "{} {} moves from {} to {} ({})\n", prefix_, event.value("what", ""), event.value("from", ""),
               event.value("to", ""), event.value("cause", ""));
  } else if (kind == "admin") {
    // The audit trail of operators' commands (the token is never part of it).
    fmt::print(stderr, "{} admin {} {}: {}\n", prefix_, event.value("command", ""),
               event.contains("args") ? event["args"].dump() : std::string("[]"), event.value("result", ""));
  }
}

void launched_cluster::watch() {
  while (!stopping_) {
    // The stdout of the head and the standby (whichever is in charge prints the events).
    std::vector<pollfd> fds;
    std::vector<std::size_t> owners;
    {
      std::lock_guard lock(mutex_);
      for (std::size_t i = 0; i < children_.size(); ++i)
        if (children_[i].out >= 0) {
          fds.push_back({children_[i].out, POLLIN, 0});
          owners.push_back(i);
        }
    }
    if (fds.empty() || ::poll(fds.data(), fds.size(), 100) <= 0) {
      if (fds.empty()) std::this_thread::sleep_for(std::chrono::milliseconds(100));
    } else {
      for (std::size_t k = 0; k < fds.size(); ++k) {
        if (!(fds[k].revents & (POLLIN | POLLHUP))) continue;
        auto& c = children_[owners[k]];
        char buffer[4096];
        const auto n = ::read(fds[k].fd, buffer, sizeof(buffer));
        if (n > 0) {
          c.buffer.append(buffer, static_cast<std::size_t>(n));
          for (auto end = c.buffer.find('\n'); end != std::string::npos; end = c.buffer.find('\n')) {
            const auto one = c.buffer.substr(0, end);
            c.buffer.erase(0, end + 1);
            on_head_line(one, c.node);
          }
        } else if (n == 0) {
          std::lock_guard lock(mutex_);  // the process closed its stdout (it exited)
          ::close(c.out);
          c.out = -1;
        }
      }
    }
    std::lock_guard lock(mutex_);
    if (stopping_) break;  // `kill_now` from another thread: start nothing again
    const auto now = clock_type::now();
    // The head first: without a standby, once it is gone the others stop by themselves and
    // are not restarted.
    std::stable_partition(children_.begin(), children_.end(), [](const child& c) { return c.head; });
    for (auto& c : children_) {
      if (head_gone_) break;
      int status = 0;
      if (c.pid > 0 && ::waitpid(c.pid, &status, WNOHANG) == c.pid) {
        c.pid = -1;
        const int code = exit_code(status);
        if (c.head && !standby_) {
          head_exit_ = std::pair{c.node, code};
          head_gone_ = true;
          continue;
        }
        std::erase_if(c.recent, [&](auto t) { return now - t > settings_.restart_window; });
        if (static_cast<int>(c.recent.size()) >= settings_.restart_limit) {
          c.given_up = true;
          fmt::print(stderr,
                     "{} node {} exited ({}) and was restarted {} times within {} s already: not restarting it; "
                     "the cluster stays degraded until it is back\n",
                     prefix_, c.node, describe_exit(code), c.recent.size(), settings_.restart_window.count());
          continue;
        }
        const auto backoff = std::chrono::milliseconds(500 << std::min<std::size_t>(c.recent.size(), 4));
        c.restart_pending = true;
        c.restart_at = now + backoff;
        fmt::print(stderr, "{} node {} exited ({}); restarting it in {:.1f} s (restart {} of at most {} in {} s)\n",
                   prefix_, c.node, describe_exit(code), backoff.count() / 1000.0, c.recent.size() + 1,
                   settings_.restart_limit, settings_.restart_window.count());
      }
      if (c.restart_pending && now >= c.restart_at) {
        c.restart_pending = false;
        c.recent.push_back(now);
        ++c.restarts;
        try {
          spawn(c);
          fmt::print(stderr, "{} node {} started again (pid {})\n", prefix_, c.node, c.pid);
        } catch (const shoal::error& e) {
          fmt::print(stderr, "{} node {} could not be started again: {}\n", prefix_, c.node, e.what());
        }
      }
    }
  }
}

std::optional<std::pair<std::string, int>> launched_cluster::exited_node() {
  if (watcher_.joinable()) {
    std::lock_guard lock(mutex_);
    return std::exchange(head_exit_, std::nullopt);
  }
  for (auto& c : children_) {
    int status = 0;
    if (c.pid > 0 && ::waitpid(c.pid, &status, WNOHANG) == c.pid) {
      c.pid = -1;
      return std::pair{c.node, exit_code(status)};
    }
  }
  return std::nullopt;
}

std::map<std::string, int> launched_cluster::restarts() const {
  std::lock_guard lock(mutex_);
  std::map<std::string, int> out;
  for (const auto& c : children_) out[c.node] = c.restarts;
  return out;
}

void launched_cluster::kill_now() {
  stopping_ = true;
  std::lock_guard lock(mutex_);
  for (auto& c : children_) {
    c.restart_pending = false;
    if (c.pid > 0) ::kill(c.pid, SIGKILL);
  }
  for (auto& c : children_)
    if (c.pid > 0) {
      ::waitpid(c.pid, nullptr, 0);
      c.pid = -1;
    }
}

void launched_cluster::stop() {
  stopping_ = true;
  if (watcher_.joinable()) watcher_.join();
  std::lock_guard lock(mutex_);
  for (auto& c : children_) {
    c.restart_pending = false;
    if (c.pid > 0) ::kill(c.pid, SIGTERM);
  }
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
