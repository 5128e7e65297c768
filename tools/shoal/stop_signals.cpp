#include "stop_signals.hpp"

#include <pthread.h>

#include <algorithm>
#include <atomic>

namespace shoal::tools {
namespace {

// A signal handler has nowhere else to put what it saw: one process-wide slot, lock-free.
std::atomic<int> caught{0};
static_assert(std::atomic<int>::is_always_lock_free);

extern "C" void record_stop_signal(int signal) { caught.store(signal); }

}  // namespace

sigset_t block_stop_signals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  struct sigaction action {};
  action.sa_handler = record_stop_signal;
  sigemptyset(&action.sa_mask);
  action.sa_flags = SA_RESTART;
  sigaction(SIGINT, &action, nullptr);
  sigaction(SIGTERM, &action, nullptr);
  return set;
}

int wait_stop_signal(const sigset_t& set, std::chrono::milliseconds timeout) {
  using clock_type = std::chrono::steady_clock;
  const auto deadline = clock_type::now() + timeout;
  // Short slices: a signal the handler caught on another thread does not wake this one.
  constexpr std::chrono::milliseconds kSlice{50};
  while (true) {
    if (const int signal = caught.exchange(0)) return signal;
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - clock_type::now());
    const auto wait = std::clamp(left, std::chrono::milliseconds(0), kSlice);
    timespec ts{0, static_cast<long>(wait.count()) * 1'000'000};
    if (const int signal = sigtimedwait(&set, nullptr, &ts); signal > 0) return signal;
    if (clock_type::now() >= deadline) return caught.exchange(0);
  }
}

}  // namespace shoal::tools
