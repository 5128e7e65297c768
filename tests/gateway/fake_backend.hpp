#pragma once
// A scripted backend for gateway tests: every request produces the same text pieces, one per
// step, on a thread of its own (as the engine thread would). It can also hang (accept work
// and never step) and records what was submitted and cancelled.

#include "shoal/base/error.hpp"
#include "shoal/gateway/backend.hpp"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

namespace shoal::gateway::testing {

struct fake_options {
  std::vector<std::string> pieces{"Hello", ",", " world", "!"};  // then EOS (finish: stop)
  std::chrono::milliseconds interval{1};
  std::int64_t context = 4096;
  std::int64_t max_waiting = 1000;
  bool hang = false;  // accept requests, never step (cancel still answers)
};

class fake_backend final : public backend {
 public:
  explicit fake_backend(fake_options o = {}) : o_(std::move(o)), thread_([this] { loop(); }) {}
  ~fake_backend() override {
    {
      std::lock_guard lock(mutex_);
      done_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }

  std::uint64_t submit(runtime::generation_request r) override {
    if (r.prompt.empty()) shoal::fail(errc::invalid_argument, "the prompt is empty");
    if (static_cast<std::int64_t>(r.prompt.size()) + r.limits.max_tokens > o_.context)
      shoal::fail(errc::invalid_argument, "prompt plus max_tokens exceeds the context");
    std::lock_guard lock(mutex_);
    if (static_cast<std::int64_t>(active_.size()) >= o_.max_waiting)
      shoal::fail(errc::resource_exhausted, "{} requests are already queued", o_.max_waiting);
    const auto id = next_id_++;
    auto record = r;
    record.on_event = nullptr;  // a record must not keep the connection alive
    submitted_.push_back(std::move(record));
    active_.emplace(id, entry{std::move(r), 0, false});
    cv_.notify_all();
    return id;
  }
  void cancel(std::uint64_t id) override {
    std::lock_guard lock(mutex_);
    if (auto it = active_.find(id); it != active_.end()) it->second.cancelled = true;
    cancelled_.insert(id);
    cv_.notify_all();
  }
  runtime::engine_stats stats() const override {
    std::lock_guard lock(mutex_);
    runtime::engine_stats s;
    (o_.hang ? s.waiting : s.running) = static_cast<std::int64_t>(active_.size());
    s.steps = steps_;
    s.last_step_end = last_step_end_;
    s.cache_blocks_total = 100;
    s.cache_blocks_used = 7;
    s.expert_tokens = {5, 0, 3, 1};
    return s;
  }
  std::int64_t max_sequence_tokens() const override { return o_.context; }

  std::vector<runtime::generation_request> submitted() const {
    std::lock_guard lock(mutex_);
    return submitted_;
  }
  std::set<std::uint64_t> cancelled() const {
    std::lock_guard lock(mutex_);
    return cancelled_;
  }
  std::size_t active() const {
    std::lock_guard lock(mutex_);
    return active_.size();
  }

 private:
  struct entry {
    runtime::generation_request request;
    std::size_t produced;
    bool cancelled;
  };

  void loop() {
    std::unique_lock lock(mutex_);
    while (!done_) {
      cv_.wait_for(lock, o_.interval);
      std::vector<std::pair<runtime::generation_request, runtime::generation_event>> out;
      bool stepped = false;
      for (auto it = active_.begin(); it != active_.end();) {
        auto& [id, e] = *it;
        runtime::generation_event ev;
        ev.request_id = id;
        ev.prompt_tokens = static_cast<std::int64_t>(e.request.prompt.size());
        ev.cached_prompt_tokens = ev.prompt_tokens / 2;
        if (e.cancelled) {
          ev.finished = true;
          ev.error = errc::cancelled;
          ev.error_message = "cancelled";
        } else if (o_.hang) {
          ++it;
          continue;
        } else {
          stepped = true;
          const auto limit = static_cast<std::size_t>(e.request.limits.max_tokens);
          if (e.produced < o_.pieces.size()) {
            ev.text = o_.pieces[e.produced];
            ev.tokens = {static_cast<runtime::token_id>(e.produced + 10)};
            ++e.produced;
            if (e.produced >= limit) {
              ev.finished = true;
              ev.reason = runtime::finish_reason::length;
            }
          } else {
            ev.tokens = {1};  // EOS: shown as nothing
            ++e.produced;
            ev.finished = true;
            ev.reason = runtime::finish_reason::stop;
          }
          ev.completion_tokens = static_cast<std::int64_t>(e.produced);
        }
        if (ev.finished) {
          out.emplace_back(std::move(e.request), std::move(ev));
          it = active_.erase(it);
        } else {
          out.emplace_back(e.request, std::move(ev));
          ++it;
        }
      }
      if (stepped) {
        ++steps_;
        last_step_end_ = std::chrono::steady_clock::now();
      }
      // Handlers run without the lock, as the engine calls them outside its own.
      lock.unlock();
      for (auto& [r, ev] : out) r.on_event(ev);
      out.clear();
      lock.lock();
    }
    // Like the engine's destructor: whatever is left is cancelled.
    auto rest = std::move(active_);
    lock.unlock();
    for (auto& [id, e] : rest) {
      runtime::generation_event ev;
      ev.request_id = id;
      ev.finished = true;
      ev.error = errc::cancelled;
      e.request.on_event(ev);
    }
  }

  fake_options o_;
  mutable std::mutex mutex_;
  std::condition_variable cv_;
  std::map<std::uint64_t, entry> active_;
  std::vector<runtime::generation_request> submitted_;
  std::set<std::uint64_t> cancelled_;
  std::uint64_t next_id_ = 1;
  std::uint64_t steps_ = 0;
  std::chrono::steady_clock::time_point last_step_end_{};
  bool done_ = false;
  std::thread thread_;
};

}  // namespace shoal::gateway::testing
