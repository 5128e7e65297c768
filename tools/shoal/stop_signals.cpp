#include "stop_signals.hpp"

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <utility>

namespace shoal::tools {
namespace {

// A signal handler has nowhere else to put what it saw: process-wide counts, lock-free, one
// per signal so that a second signal arriving before the first is taken is not lost.
std::atomic<int> caught_int{0};
std::atomic<int> caught_term{0};
static_assert(std::atomic<int>::is_always_lock_free);

extern "C" void record_stop_signal(int signal) { (signal == SIGINT ? caught_int : caught_term).fetch_add(1); }

// One signal the handler counted, or 0.
int take_caught() {
  for (auto [count, signal] : {std::pair{&caught_term, SIGTERM}, std::pair{&caught_int, SIGINT}}) {
    int n = count->load();
    while (n > 0)
      if (count->compare_exchange_weak(n, n - 1)) return signal;
  }
  return 0;
}

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
    if (const int signal = take_caught()) return signal;
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - clock_type::now());
    const auto wait = std::clamp(left, std::chrono::milliseconds(0), kSlice);
    timespec ts{0, static_cast<long>(wait.count()) * 1'000'000};
    if (const int signal = sigtimedwait(&set, nullptr, &ts); signal > 0) return signal;
    if (clock_type::now() >= deadline) return take_caught();
  }
}

}  // namespace shoal::tools
