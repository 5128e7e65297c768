#include "audit_log.hpp"

#include "shoal/base/error.hpp"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <ctime>
#include <filesystem>

namespace shoal::gateway {
namespace {

// Owner-only: with --audit-prompts the log holds prompts.
int open_append(const std::string& path) {
  return ::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
}

// All of `data`, or false.
bool write_all(int fd, std::string_view data) {
  while (!data.empty()) {
    const auto n = ::write(fd, data.data(), data.size());
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    data.remove_prefix(static_cast<std::size_t>(n));
  }
  return true;
}

}  // namespace

audit_log::audit_log(const security_settings& s)
    : path_(s.audit_log_file),
      max_bytes_(std::max<std::uint64_t>(s.audit_log_max_bytes, 4096)),
      keep_(std::max(s.audit_log_keep, 1)),
      prompts_(s.audit_prompts),
      capacity_(std::max<std::size_t>(s.audit_queue_lines, 1)) {
  fd_ = open_append(path_);
  if (fd_ < 0) shoal::fail(errc::invalid_argument, "--audit-log {}: cannot be opened for appending", path_);
  // Only a regular file is rotated (never a device or a pipe someone pointed the log at).
  std::error_code ec;
  rotatable_ = std::filesystem::is_regular_file(path_, ec);
  size_ = rotatable_ ? std::filesystem::file_size(path_, ec) : 0;
  if (ec) size_ = 0;
  writer_ = std::thread([this] { run(); });
}

audit_log::~audit_log() {
  {
    std::lock_guard lock(mutex_);
    stop_ = true;
  }
  wake_.notify_one();
  writer_.join();
  if (fd_ >= 0) ::close(fd_);
}

void audit_log::push(const audit_record& r) noexcept {
  try {
    nlohmann::json j;
    const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(r.time.time_since_epoch()).count();
    const std::time_t seconds = static_cast<std::time_t>(ms / 1000);
    std::tm utc{};
    gmtime_r(&seconds, &utc);
    j["time"] = fmt::format("{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z", utc.tm_year + 1900, utc.tm_mon + 1, utc.tm_mday,
                            utc.tm_hour, utc.tm_min, utc.tm_sec, ms % 1000);
    j["principal"] = r.principal.empty() ? nlohmann::json() : nlohmann::json(r.principal);
    j["auth"] = r.auth_method.empty() ? nlohmann::json() : nlohmann::json(r.auth_method);
    j["client"] = r.client;
    j["method"] = r.method;
    j["route"] = r.route;
    j["model"] = r.model.empty() ? nlohmann::json() : nlohmann::json(r.model);
    j["status"] = r.status;
    j["latency_ms"] = std::round(r.latency_ms * 1000) / 1000;
    if (r.prompt_tokens >= 0) j["prompt_tokens"] = r.prompt_tokens;
    if (r.completion_tokens >= 0) j["completion_tokens"] = r.completion_tokens;
    if (prompts_ && r.prompt) j["prompt"] = nlohmann::json::parse(*r.prompt, nullptr, false);
    // Invalid UTF-8 from a client is replaced, never allowed to break the line.
    auto line = j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
    line.push_back('\n');
    {
      std::lock_guard lock(mutex_);
      if (queue_.size() >= capacity_) {
        dropped_.fetch_add(1);
        return;
      }
      queue_.push_back(std::move(line));
    }
    wake_.notify_one();
  } catch (...) {
    dropped_.fetch_add(1);
  }
}

void audit_log::run() {
  std::deque<std::string> batch;
  for (;;) {
    {
      std::unique_lock lock(mutex_);
      wake_.wait(lock, [this] { return stop_ || !queue_.empty(); });
      if (queue_.empty() && stop_) return;
      batch.swap(queue_);
    }
    // One write per run of lines that fits before the next rotation.
    std::string chunk;
    std::uint64_t lines = 0;
    auto flush = [&] {
      if (lines == 0) return;
      if (fd_ >= 0 && write_all(fd_, chunk)) {
        size_ += chunk.size();
        written_.fetch_add(lines);
      } else {
        dropped_.fetch_add(lines);
      }
      chunk.clear();
      lines = 0;
    };
    for (const auto& line : batch) {
      if (rotatable_ && size_ + chunk.size() > 0 && size_ + chunk.size() + line.size() > max_bytes_) {
        flush();
        if (size_ > 0) rotate();
      }
      chunk += line;
      ++lines;
    }
    flush();
    batch.clear();
  }
}

// FILE -> FILE.1 -> FILE.2 ... -> FILE.keep, the oldest removed.
void audit_log::rotate() {
  if (fd_ >= 0) ::close(fd_);
  std::error_code ec;
  std::filesystem::remove(fmt::format("{}.{}", path_, keep_), ec);
  for (int k = keep_ - 1; k >= 1; --k)
    std::filesystem::rename(fmt::format("{}.{}", path_, k), fmt::format("{}.{}", path_, k + 1), ec);
  std::filesystem::rename(path_, path_ + ".1", ec);
  fd_ = open_append(path_);
  size_ = 0;
}

}  // namespace shoal::gateway
