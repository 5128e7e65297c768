#include "shoal/actors/stage.hpp"

#include "shoal/actors/engines.hpp"
#include "shoal/actors/fabric.hpp"

#include <caf/actor_cast.hpp>
#include <caf/scoped_actor.hpp>

#include <algorithm>
#include <numeric>
#include <optional>

namespace shoal::actors {

/// The stage's `expert_backend`: sends each expert actor the rows routed to its experts (one
/// row per token and choice), calls engines of its own node directly, and sums each token's
/// choices in expert-id order as `kernels::moe_experts` does, so results are bit-identical
/// to the single-process model. An expert with several copies (`plan.redundancy`) sends all
/// its rows of a layer to one of them, the least loaded in that layer so far: an expert's
/// rows are then computed together whichever copy runs them, and results do not depend on
/// the choice.
class expert_dispatcher final : public runtime::expert_backend {
 public:
  struct group {
    std::shared_ptr<expert_engine> local;  // set: same node, called directly
    expert_actor remote;                   // otherwise
    actor_address address;
  };

  expert_dispatcher(caf::actor_system& system, std::vector<group> groups, std::vector<std::vector<int>> owners,
                    std::int64_t hidden, std::chrono::milliseconds timeout)
      : self_(system), groups_(std::move(groups)), owners_(std::move(owners)), hidden_(hidden), timeout_(timeout) {}

  std::uint64_t step = 0;

  void run(std::int64_t layer, const float* x, std::int64_t tokens, std::int64_t top_k, const std::int32_t* indices,
           const float* weights, float* y, const std::function<void()>& meanwhile) override {
    const auto n = tokens * top_k;
    const auto experts = static_cast<std::int64_t>(owners_.size());
    std::vector<std::int64_t> rows_of(owners_.size(), 0);
    for (std::int64_t i = 0; i < n; ++i) {
      const auto e = indices[i];
      if (e < 0 || e >= experts || owners_[static_cast<std::size_t>(e)].empty())
        shoal::fail(errc::internal, "layer {}: routed expert {} is placed on no expert actor", layer, e);
      ++rows_of[static_cast<std::size_t>(e)];
    }
    // One copy per expert, least loaded first (in expert-id order, so the choice is the same
    // for the same routing).
    std::vector<int> chosen(owners_.size(), -1);
    std::vector<std::int64_t> load(groups_.size(), 0);
    for (std::size_t e = 0; e < owners_.size(); ++e) {
      if (rows_of[e] == 0) continue;
      int best = owners_[e].front();
      for (int g : owners_[e])
        if (load[static_cast<std::size_t>(g)] < load[static_cast<std::size_t>(best)]) best = g;
      chosen[e] = best;
      load[static_cast<std::size_t>(best)] += rows_of[e];
    }
    std::vector<std::vector<std::int64_t>> choices(groups_.size());  // per group: choice indices t*k
    for (std::int64_t i = 0; i < n; ++i)
      choices[static_cast<std::size_t>(chosen[static_cast<std::size_t>(indices[i])])].push_back(i);
    std::vector<const float*> output_of(static_cast<std::size_t>(n), nullptr);
    std::vector<std::vector<float>> outputs(groups_.size());
    std::vector<std::optional<decltype(self_->request(expert_actor(), caf::infinite, expert_dispatch()))>> pending(groups_.size());
    auto build = [&](std::size_t g) {
      expert_dispatch d{.step = step, .layer = static_cast<std::uint32_t>(layer), .hidden = {}, .expert_ids = {}};
      d.hidden.resize(choices[g].size() * static_cast<std::size_t>(hidden_));
      d.expert_ids.reserve(choices[g].size());
      for (std::size_t r = 0; r < choices[g].size(); ++r) {
        const auto i = choices[g][r];
        std::copy_n(x + (i / top_k) * hidden_, hidden_, d.hidden.data() + r * hidden_);
        d.expert_ids.push_back(indices[i]);
      }
      return d;
    };
    // Remote groups first, so they compute while local ones and the shared expert run here.
    for (std::size_t g = 0; g < groups_.size(); ++g)
      if (!choices[g].empty() && !groups_[g].local)
        pending[g].emplace(self_->request(groups_[g].remote, timeout_, build(g)));
    for (std::size_t g = 0; g < groups_.size(); ++g) {
      if (choices[g].empty() || !groups_[g].local) continue;
      auto d = build(g);
      outputs[g].resize(d.hidden.size());
      groups_[g].local->compute(layer, d.hidden.data(), d.expert_ids.data(),
                                static_cast<std::int64_t>(d.expert_ids.size()), outputs[g].data());
    }
    meanwhile();
    std::optional<shoal::error> failure;
    for (std::size_t g = 0; g < groups_.size(); ++g) {
      if (!pending[g]) continue;
      pending[g]->receive(
          [&](expert_combine& c) { outputs[g] = std::move(c.output); },
          [&](caf::error& e) {
            const auto inner = from_caf_error(e);
            failure.emplace(inner.code() == errc::deadline_exceeded ? errc::unavailable : inner.code(),
                            fmt::format("layer {}: expert actor {}/{} failed: {}", layer, groups_[g].address.node,
                                        groups_[g].address.actor, inner.what()));
          });
    }
    if (failure) throw *failure;
    for (std::size_t g = 0; g < groups_.size(); ++g) {
      if (choices[g].empty()) continue;
      if (outputs[g].size() != choices[g].size() * static_cast<std::size_t>(hidden_))
        shoal::fail(errc::internal, "layer {}: expert actor {}/{} returned {} values for {} rows", layer,
                    groups_[g].address.node, groups_[g].address.actor, outputs[g].size(), choices[g].size());
      for (std::size_t r = 0; r < choices[g].size(); ++r)
        output_of[static_cast<std::size_t>(choices[g][r])] = outputs[g].data() + r * hidden_;
    }
    std::vector<std::int64_t> order(static_cast<std::size_t>(top_k));
    for (std::int64_t t = 0; t < tokens; ++t) {
      std::iota(order.begin(), order.end(), 0);
      std::sort(order.begin(), order.end(),
                [&](std::int64_t a, std::int64_t b) { return indices[t * top_k + a] < indices[t * top_k + b]; });
      float* row = y + t * hidden_;
      for (const auto k : order) {
        const float weight = weights[t * top_k + k];
        const float* out = output_of[static_cast<std::size_t>(t * top_k + k)];
        for (std::int64_t d = 0; d < hidden_; ++d) row[d] += weight * out[d];
      }
    }
  }

 private:
  caf::scoped_actor self_;
  std::vector<group> groups_;
  std::vector<std::vector<int>> owners_;  // per routed expert: the groups holding a copy
  std::int64_t hidden_;
  std::chrono::milliseconds timeout_;
};

stage_state::stage_state() = default;
stage_state::~stage_state() = default;

stage_actor::behavior_type make_stage(stage_actor::stateful_pointer<stage_state> self, std::string node,
                                      std::shared_ptr<stage_engine> engine, std::shared_ptr<fabric> book,
                                      std::chrono::milliseconds expert_timeout) {
  auto& st = self->state;
  st.node = std::move(node);
  st.engine = std::move(engine);
  st.book = std::move(book);
  st.expert_timeout = expert_timeout;
  return {
      [self](step_batch& batch) -> caf::result<sampled_batch> {
        auto& st = self->state;
        const auto& o = st.engine->settings();
        if (!o.hold_experts && !st.experts)
          return to_caf_error(errc::unavailable, fmt::format("stage for layers {}-{} has no expert placement yet",
                                                             o.first_layer, o.end_layer - 1));
        if (!o.last && !st.next)
          return to_caf_error(errc::unavailable, fmt::format("stage for layers {}-{} does not know the next stage yet",
                                                             o.first_layer, o.end_layer - 1));
        try {
          if (st.experts) st.experts->step = batch.step;
          st.engine->run(batch, st.experts.get());
          if (o.last) return st.engine->sample(batch);
        } catch (const shoal::error& e) {
          return to_caf_error(e);
        }
        return self->delegate(st.next, std::move(batch));
      },
      [self](release_atom, std::vector<request_id>& ids) {
        self->state.engine->release(ids);
        if (self->state.next) self->send(self->state.next, release_atom::value, std::move(ids));
      },
      [self](wire_atom, placement_table& table) -> caf::result<ok_atom> {
        auto& st = self->state;
        const auto& o = st.engine->settings();
        const auto& config = st.engine->config();
        try {
          stage_actor next;
          for (std::size_t i = 0; i < table.stages.size(); ++i) {
            if (table.stages[i].first_layer != static_cast<std::uint32_t>(o.first_layer)) continue;
            if (i + 1 < table.stages.size()) {
              next = caf::actor_cast<stage_actor>(st.book->resolve(table.stages[i + 1].address));
              if (!next)
                shoal::fail(errc::not_found, "next stage {}/{} is not reachable", table.stages[i + 1].address.node,
                            table.stages[i + 1].address.actor);
            }
          }
          std::unique_ptr<expert_dispatcher> experts;
          if (!o.hold_experts) {
            std::vector<expert_dispatcher::group> groups;
            std::vector<std::vector<int>> owners(static_cast<std::size_t>(config.n_routed_experts));
            for (const auto& p : table.experts) {
              expert_dispatcher::group g;
              g.address = p.address;
              if (p.address.node == st.node) g.local = st.book->engine(p.address);
              if (!g.local) {
                g.remote = caf::actor_cast<expert_actor>(st.book->resolve(p.address));
                if (!g.remote)
                  shoal::fail(errc::not_found, "expert actor {}/{} is not reachable", p.address.node, p.address.actor);
              }
              for (auto e : p.experts) {
                if (e >= owners.size())
                  shoal::fail(errc::invalid_argument, "placement epoch {}: expert {} is out of range", table.epoch, e);
                owners[e].push_back(static_cast<int>(groups.size()));
              }
              groups.push_back(std::move(g));
            }
            for (std::size_t e = 0; e < owners.size(); ++e)
              if (owners[e].empty())
                shoal::fail(errc::invalid_argument, "placement epoch {}: expert {} is placed nowhere", table.epoch, e);
            experts = std::make_unique<expert_dispatcher>(self->system(), std::move(groups), std::move(owners),
                                                          config.hidden_size, st.expert_timeout);
          }
          st.next = std::move(next);
          st.experts = std::move(experts);
          st.epoch = table.epoch;
        } catch (const shoal::error& e) {
          return to_caf_error(e);
        }
        return ok_atom::value;
      },
  };
}

}  // namespace shoal::actors
