#pragma once
// `shoal serve` as a real process for end-to-end tests, and the small shell helpers they
// share. SHOAL_BINARY and SHOAL_GATEWAY_WORK_DIR (a scratch directory) come from CMake.

#include <atomic>
#include <catch2/catch.hpp>

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace shoal::gateway::testing {

inline std::string slurp(const std::filesystem::path& p) {
  std::ifstream in(p);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

struct command_result {
  int exit_code = -1;
  std::string out;
};

// Runs a shell command with a time limit; stdout and stderr captured together.
inline command_result run(const std::string& command, int timeout_s = 120) {
  std::filesystem::create_directories(SHOAL_GATEWAY_WORK_DIR);
  // One file per call: tests run commands from several threads at once.
  static std::atomic<unsigned> calls{0};
  const auto out = std::filesystem::path(SHOAL_GATEWAY_WORK_DIR) /
                   ("cmd-" + std::to_string(::getpid()) + "-" + std::to_string(calls++) + ".out");
  const std::string full = "timeout " + std::to_string(timeout_s) + " " + command + " > " + out.string() + " 2>&1";
  const int status = std::system(full.c_str());
  command_result r;
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  r.out = slurp(out);
  std::filesystem::remove(out);
  return r;
}

inline long rss_kb(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("VmRSS:", 0) == 0) return std::stol(line.substr(6));
  return -1;
}

// `shoal ARGS...` started in the background, its output in WORK_DIR/NAME.log; the
// constructor returns once it printed where it listens and that it is ready.
class serve_process {
 public:
  // `own_group`: the process leads a process group of its own (as a shell's foreground job
  // does), so that `kill(-pid(), ...)` plays a terminal's Ctrl-C without reaching the test.
  serve_process(const std::string& name, std::vector<std::string> args,
                std::map<std::string, std::string> env = {}, std::chrono::seconds start_limit = std::chrono::seconds(240),
                bool own_group = false) {
    using namespace std::chrono_literals;
    std::filesystem::create_directories(SHOAL_GATEWAY_WORK_DIR);
    log_ = std::filesystem::path(SHOAL_GATEWAY_WORK_DIR) / (name + ".log");
    // A previous run's log would announce a server that is gone.
    std::filesystem::remove(log_);
    args.insert(args.begin(), SHOAL_BINARY);
    pid_ = ::fork();
    if (pid_ == 0) {
      if (own_group) ::setpgid(0, 0);
      for (const auto& [k, v] : env) ::setenv(k.c_str(), v.c_str(), 1);
      const int fd = ::open(log_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      ::dup2(fd, 1);
      ::dup2(fd, 2);
      std::vector<char*> argv;
      for (auto& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      ::execv(SHOAL_BINARY, argv.data());
      ::_exit(127);
    }
    const std::regex listening("listening on https?://127\\.0\\.0\\.1:([0-9]+)");
    const auto end = std::chrono::steady_clock::now() + start_limit;
    while (std::chrono::steady_clock::now() < end) {
      std::smatch m;
      const auto text = std::filesystem::exists(log_) ? slurp(log_) : std::string();
      if (port_ == 0 && std::regex_search(text, m, listening)) port_ = static_cast<std::uint16_t>(std::stoi(m[1]));
      if (port_ != 0 && text.find("ready in") != std::string::npos) return;
      int status = 0;
      if (::waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        FAIL("shoal " << name << " exited during start-up:\n" << text);
      }
      std::this_thread::sleep_for(100ms);
    }
    FAIL("shoal " << name << " did not get ready in " << start_limit.count() << " s:\n" << slurp(log_));
  }
  ~serve_process() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
  }
  serve_process(const serve_process&) = delete;
  serve_process& operator=(const serve_process&) = delete;

  std::uint16_t port() const { return port_; }
  pid_t pid() const { return pid_; }
  std::string url() const { return "http://127.0.0.1:" + std::to_string(port_); }
  std::string log() const { return slurp(log_); }
  // SIGTERM; the exit status, or -1 if it did not stop within `timeout`.
  int terminate(std::chrono::seconds timeout) {
    ::kill(pid_, SIGTERM);
    return wait_exit(timeout);
  }
  // Waits for the process to exit (after a signal sent with `pid()`); the exit status, or -1
  // if it did not stop within `timeout`.
  int wait_exit(std::chrono::seconds timeout) {
    const auto end = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < end) {
      int status = 0;
      if (::waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return -1;
  }

 private:
  std::filesystem::path log_;
  pid_t pid_ = -1;
  std::uint16_t port_ = 0;
};

// One series of a server's /metrics text, summed over its labels.
inline double metric(const serve_process& s, const std::string& name) {
  const auto r = run("curl -sS -m 10 " + s.url() + "/metrics", 15);
  double total = 0;
  std::istringstream lines(r.out);
  for (std::string line; std::getline(lines, line);)
    if (line.starts_with(name + " ") || line.starts_with(name + "{")) total += std::stod(line.substr(line.rfind(' ') + 1));
  return total;
}

}  // namespace shoal::gateway::testing
