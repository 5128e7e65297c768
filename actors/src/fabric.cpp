#include "shoal/actors/fabric.hpp"

#include "shoal/actors/engines.hpp"

namespace shoal::actors {

void fabric::register_actor(const actor_address& address, caf::actor handle) {
  std::lock_guard lock(mutex_);
  actors_[{address.node, address.actor}] = std::move(handle);
}

void fabric::register_engine(const actor_address& address, std::shared_ptr<expert_engine> engine) {
  std::lock_guard lock(mutex_);
  engines_[{address.node, address.actor}] = std::move(engine);
}

void fabric::unregister(const actor_address& address) {
  std::lock_guard lock(mutex_);
  actors_.erase({address.node, address.actor});
  engines_.erase({address.node, address.actor});
  stage_engines_.erase({address.node, address.actor});
}

caf::actor fabric::find_local(const actor_address& address) {
  std::lock_guard lock(mutex_);
  const auto it = actors_.find({address.node, address.actor});
  return it == actors_.end() ? caf::actor() : it->second;
}

caf::actor fabric::resolve(const actor_address& address) { return find_local(address); }

void fabric::register_stage_engine(const actor_address& address, std::shared_ptr<stage_engine> engine) {
  std::lock_guard lock(mutex_);
  stage_engines_[{address.node, address.actor}] = std::move(engine);
}

std::vector<std::shared_ptr<stage_engine>> fabric::stage_engines() {
  std::lock_guard lock(mutex_);
  std::vector<std::shared_ptr<stage_engine>> out;
  for (const auto& [key, engine] : stage_engines_) out.push_back(engine);
  return out;
}

std::vector<std::uint64_t> fabric::routed_tokens() {
  std::vector<std::uint64_t> sum;
  for (const auto& engine : stage_engines()) {
    const auto counts = engine->routed_tokens();
    if (sum.size() < counts.size()) sum.resize(counts.size(), 0);
    for (std::size_t i = 0; i < counts.size(); ++i) sum[i] += counts[i];
  }
  return sum;
}

std::map<std::pair<std::string, std::uint64_t>, std::uint64_t> fabric::served_rows() {
  std::lock_guard lock(mutex_);
  std::map<std::pair<std::string, std::uint64_t>, std::uint64_t> out;
  for (const auto& [key, engine] : engines_) out[key] = engine->rows_computed();
  return out;
}

std::shared_ptr<expert_engine> fabric::engine(const actor_address& address) {
  std::lock_guard lock(mutex_);
  const auto it = engines_.find({address.node, address.actor});
  return it == engines_.end() ? nullptr : it->second;
}

std::map<std::pair<std::string, std::uint64_t>, caf::actor> fabric::local_actors() {
  std::lock_guard lock(mutex_);
  return actors_;
}

}  // namespace shoal::actors
