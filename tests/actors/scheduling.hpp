#pragma once
// The serving guarantees on the actor path: many requests at once through the router's
// scheduler (continuous batching, chunked prefill, preemption under cache pressure, prefix
// reuse) give exactly the golden greedy tokens of DeepSeek's reference, and no cache block
// leaks. Shared by the one-process test and the multi-process one.

#include "reference.hpp"
#include "shoal/actors/client.hpp"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <chrono>
#include <fstream>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace shoal::testing {

struct golden_prompt {
  std::string name;
  std::vector<std::int32_t> tokens;
  std::vector<std::int32_t> greedy;  // the reference's continuation (it does not stop at EOS)
};

inline std::vector<golden_prompt> scheduling_prompts() {
  std::ifstream in(kClusterModelDir + "/golden.json");
  const auto j = nlohmann::json::parse(in);
  std::vector<golden_prompt> out;
  for (const auto& p : j["prompts"])
    out.push_back({p["name"].get<std::string>(), p["tokens"].get<std::vector<std::int32_t>>(),
                   p["greedy_tokens"].get<std::vector<std::int32_t>>()});
  return out;
}

// Collects the streams of concurrently submitted requests.
struct stream_collector {
  std::mutex mutex;
  std::map<std::uint64_t, std::vector<std::int32_t>> tokens;
  std::map<std::uint64_t, actors::token_chunk> last;

  std::function<void(const actors::token_chunk&)> sink(std::uint64_t slot) {
    return [this, slot](const actors::token_chunk& c) {
      std::lock_guard lock(mutex);
      auto& t = tokens[slot];
      t.insert(t.end(), c.tokens.begin(), c.tokens.end());
      if (c.finish != actors::finish_reason::none) last[slot] = c;
    };
  }
  bool wait(std::size_t count, std::chrono::seconds limit) {
    const auto deadline = std::chrono::steady_clock::now() + limit;
    while (std::chrono::steady_clock::now() < deadline) {
      {
        std::lock_guard lock(mutex);
        if (last.size() >= count) return true;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return false;
  }
};

// Submits every golden prompt `copies` times at once and checks each stream against the
// reference; returns nothing, checks with Catch.
inline void check_concurrent_golden(client& c, int copies) {
  const auto prompts = scheduling_prompts();
  stream_collector streams;
  std::vector<const golden_prompt*> submitted;
  for (int copy = 0; copy < copies; ++copy)
    for (const auto& p : prompts) {
      const auto slot = submitted.size();
      submitted.push_back(&p);
      c.submit({.prompt = p.tokens, .sampling = {}, .max_tokens = static_cast<std::uint32_t>(p.greedy.size()),
                .stop_tokens = {}, .want_logits = false, .deadline = {}},
               streams.sink(slot));
    }
  REQUIRE(streams.wait(submitted.size(), std::chrono::seconds(240)));
  std::lock_guard lock(streams.mutex);
  for (std::size_t slot = 0; slot < submitted.size(); ++slot) {
    CAPTURE(submitted[slot]->name, slot);
    CHECK(streams.last[slot].finish == actors::finish_reason::length);
    CHECK(streams.tokens[slot] == submitted[slot]->greedy);
  }
}

// The scheduler's counters from a cluster status JSON.
inline nlohmann::json scheduler_status(const std::string& status) { return nlohmann::json::parse(status)["scheduler"]; }

// No request left, and every block in use is one kept for prefix reuse.
inline void check_no_block_leaked(const nlohmann::json& s) {
  INFO(s.dump());
  CHECK(s["requests"] == 0);
  CHECK(s["running"] == 0);
  CHECK(s["waiting"] == 0);
  CHECK(s["cache_blocks_used"] == s["prefix_cache_blocks"]);
}

}  // namespace shoal::testing
