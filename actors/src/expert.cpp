#include "shoal/actors/expert.hpp"

#include "shoal/actors/engines.hpp"

namespace shoal::actors {

expert_actor::behavior_type make_expert(expert_actor::stateful_pointer<expert_state> self,
                                        std::shared_ptr<expert_engine> engine) {
  self->state.engine = std::move(engine);
  return {
      [self](expert_dispatch& d) -> caf::result<expert_combine> {
        auto& engine = *self->state.engine;
        const auto hidden = engine.config().hidden_size;
        const auto rows = static_cast<std::int64_t>(d.expert_ids.size());
        if (static_cast<std::int64_t>(d.hidden.size()) != rows * hidden)
          return to_caf_error(errc::invalid_argument,
                              fmt::format("expert dispatch for layer {}: {} values for {} rows of width {}",
                                          d.layer, d.hidden.size(), rows, hidden));
        expert_combine out{.step = d.step, .layer = d.layer, .output = std::vector<float>(d.hidden.size())};
        try {
          engine.compute(d.layer, d.hidden.data(), d.expert_ids.data(), rows, out.output.data());
        } catch (const shoal::error& e) {
          return to_caf_error(e);
        }
        self->state.rows_served += static_cast<std::uint64_t>(rows);
        return out;
      },
  };
}

}  // namespace shoal::actors
