#include "shoal/kernels/thread_pool.hpp"

#include <chrono>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace shoal::kernels {
namespace {

inline void cpu_relax() noexcept {
#if defined(__x86_64__)
  _mm_pause();
#endif
}

// How long an idle worker keeps polling before it sleeps on the condition variable.
constexpr auto kSpinBeforeSleep = std::chrono::microseconds(200);

}  // namespace

thread_pool::thread_pool(int threads) {
  if (threads <= 0) threads = static_cast<int>(std::thread::hardware_concurrency());
  if (threads <= 0) threads = 1;
  workers_.reserve(threads - 1);
  for (int i = 1; i < threads; ++i) workers_.emplace_back([this, i] { worker_loop(i); });
}

thread_pool::~thread_pool() {
  {
    std::lock_guard lock(mutex_);
    stopping_.store(true);
  }
  wake_.notify_all();
  for (auto& worker : workers_) worker.join();
}

void thread_pool::run(const std::function<void(int)>& body) {
  if (workers_.empty()) {
    body(0);
    return;
  }
  {
    std::lock_guard lock(mutex_);
    body_ = &body;
    pending_.store(static_cast<int>(workers_.size()), std::memory_order_relaxed);
    generation_.fetch_add(1, std::memory_order_release);
  }
  wake_.notify_all();
  body(0);
  // Spin first (the common case: workers finish within microseconds), then yield so that a
  // worker preempted by another process can run on this core instead of us burning it.
  for (int spins = 0; pending_.load(std::memory_order_acquire) != 0; ++spins) {
    if (spins < 4096)
      cpu_relax();
    else
      std::this_thread::yield();
  }
}

void thread_pool::parallel_for(std::int64_t count,
                               const std::function<void(std::int64_t, std::int64_t)>& body) {
  if (count <= 0) return;
  const std::int64_t threads = size();
  if (threads == 1 || count == 1) {
    body(0, count);
    return;
  }
  run([&](int index) {
    const std::int64_t begin = count * index / threads;
    const std::int64_t end = count * (index + 1) / threads;
    if (begin < end) body(begin, end);
  });
}

void thread_pool::worker_loop(int index) {
  std::uint64_t seen = 0;
  while (true) {
    const auto spin_start = std::chrono::steady_clock::now();
    std::uint64_t current = generation_.load(std::memory_order_acquire);
    while (current == seen && !stopping_.load(std::memory_order_relaxed)) {
      if (std::chrono::steady_clock::now() - spin_start > kSpinBeforeSleep) {
        std::unique_lock lock(mutex_);
        wake_.wait(lock, [&] {
          return generation_.load(std::memory_order_acquire) != seen || stopping_.load();
        });
      }
      cpu_relax();
      current = generation_.load(std::memory_order_acquire);
    }
    if (stopping_.load()) return;
    seen = current;
    (*body_)(index);
    pending_.fetch_sub(1, std::memory_order_acq_rel);
  }
}

}  // namespace shoal::kernels
