#pragma once
// The audit log's writer: requests hand a line to a bounded queue and return at once; one
// thread appends the lines to the file and rotates it by size. A full queue, or a file that
// cannot be written, drops lines and counts them, never slowing a request down.

#include "shoal/gateway/security.hpp"

#include <atomic>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <string>
#include <thread>

namespace shoal::gateway {

class audit_log {
 public:
  /// Opens (appends to) `s.audit_log_file` and starts the writer; throws `shoal::error`
  /// (`invalid_argument`) when the file cannot be opened.
  explicit audit_log(const security_settings& s);
  /// Writes what is queued, then stops the writer.
  ~audit_log();
  audit_log(const audit_log&) = delete;
  audit_log& operator=(const audit_log&) = delete;

  /// Formats `r` as one JSON line and queues it; drops it when the queue is full.
  void push(const audit_record& r) noexcept;
  std::uint64_t written() const noexcept { return written_.load(); }
  std::uint64_t dropped() const noexcept { return dropped_.load(); }

 private:
  void run();
  void rotate();

  std::string path_;
  std::uint64_t max_bytes_;
  int keep_;
  bool prompts_;
  std::size_t capacity_;
  int fd_ = -1;
  bool rotatable_ = false;
  std::uint64_t size_ = 0;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<std::string> queue_;
  bool stop_ = false;
  std::atomic<std::uint64_t> written_{0};
  std::atomic<std::uint64_t> dropped_{0};
  std::thread writer_;
};

}  // namespace shoal::gateway
