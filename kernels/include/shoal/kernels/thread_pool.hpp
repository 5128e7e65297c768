#pragma once
/// \file
/// A fixed set of worker threads for data-parallel kernels.

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace shoal::kernels {

/// Runs one function on every thread at once (the caller is thread 0) and waits for all.
/// Workers spin briefly before sleeping, because decode issues thousands of short parallel
/// regions per second and a condition-variable wake-up costs more than the work.
class thread_pool {
 public:
  /// Starts `threads - 1` workers; `threads <= 0` means one per hardware thread.
  explicit thread_pool(int threads = 0);
  ~thread_pool();
  thread_pool(const thread_pool&) = delete;
  thread_pool& operator=(const thread_pool&) = delete;

  /// Number of threads taking part in a region, the caller included.
  int size() const noexcept { return static_cast<int>(workers_.size()) + 1; }

  /// Calls `body(thread_index)` once on each of `size()` threads; returns when all are done.
  /// Not reentrant: a body must not call back into the same pool.
  void run(const std::function<void(int)>& body);

  /// Splits [0, count) into `size()` contiguous ranges and calls `body(begin, end)` for each
  /// non-empty one.
  void parallel_for(std::int64_t count,
                    const std::function<void(std::int64_t, std::int64_t)>& body);

 private:
  void worker_loop(int index);

  std::vector<std::thread> workers_;
  const std::function<void(int)>* body_ = nullptr;
  std::atomic<std::uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  std::atomic<bool> stopping_{false};
  std::mutex mutex_;
  std::condition_variable wake_;
};

}  // namespace shoal::kernels
