#include "shoal/actors/node_agent.hpp"

#include "shoal/actors/engines.hpp"
#include "shoal/actors/expert.hpp"
#include "shoal/actors/fabric.hpp"
#include "shoal/actors/stage.hpp"

#include <caf/actor_cast.hpp>
#include <caf/exit_reason.hpp>

namespace shoal::actors {

node_agent_actor::behavior_type make_node_agent(node_agent_actor::stateful_pointer<node_agent_state> self,
                                                node_agent_options options, std::shared_ptr<fabric> book) {
  self->state.options = std::move(options);
  self->state.book = std::move(book);
  auto stop = [self] {
    auto& st = self->state;
    if (st.stopped) return;
    st.stopped = true;
    for (const auto& a : st.addresses) st.book->unregister(a);
    for (auto& child : st.children) self->send_exit(child, caf::exit_reason::user_shutdown);
    st.children.clear();
  };
  self->attach_functor([stop] { stop(); });
  return {
      [self](spawn_stage_cmd& cmd) -> caf::result<ok_atom> {
        auto& st = self->state;
        if (st.stopped) return to_caf_error(errc::failed_precondition, "node " + st.options.node + " is stopping");
        const actor_address address{st.options.node, cmd.actor};
        try {
          stage_engine::options o{.model = st.options.model_override.empty() ? cmd.model_path : st.options.model_override,
                                  .first_layer = cmd.first_layer, .end_layer = cmd.end_layer,
                                  .first = cmd.stage == 0, .last = cmd.stage + 1 == cmd.stage_count,
                                  .hold_experts = cmd.hold_experts, .threads = st.options.threads,
                                  .cache_blocks = cmd.cache_blocks, .block_tokens = cmd.block_tokens,
                                  .progress = st.options.progress, .key = st.options.key};
          auto engine = std::make_shared<stage_engine>(o);
          auto handle = self->spawn<caf::detached>(make_stage, st.options.node, engine, st.book,
                                                   st.options.expert_timeout);
          st.book->register_actor(address, caf::actor_cast<caf::actor>(handle));
          st.book->register_stage_engine(address, engine);
          st.children.push_back(caf::actor_cast<caf::actor>(handle));
          st.addresses.push_back(address);
        } catch (const shoal::error& e) {
          return to_caf_error(e.code(), fmt::format("node {}: stage {} (layers {}-{}): {}", st.options.node, cmd.stage,
                                                    cmd.first_layer, cmd.end_layer - 1, e.what()));
        }
        return ok_atom::value;
      },
      [self](spawn_expert_cmd& cmd) -> caf::result<ok_atom> {
        auto& st = self->state;
        if (st.stopped) return to_caf_error(errc::failed_precondition, "node " + st.options.node + " is stopping");
        const actor_address address{st.options.node, cmd.actor};
        try {
          auto engine = std::make_shared<expert_engine>(
              st.options.model_override.empty() ? cmd.model_path : st.options.model_override, cmd.experts,
              st.options.threads, st.options.key);
          auto handle = self->spawn<caf::detached>(make_expert, engine);
          st.book->register_actor(address, caf::actor_cast<caf::actor>(handle));
          st.book->register_engine(address, engine);
          st.children.push_back(caf::actor_cast<caf::actor>(handle));
          st.addresses.push_back(address);
        } catch (const shoal::error& e) {
          return to_caf_error(e.code(), fmt::format("node {}: expert actor {}: {}", st.options.node, cmd.actor, e.what()));
        }
        return ok_atom::value;
      },
      [self](retire_actor_cmd& cmd) -> caf::result<ok_atom> {
        auto& st = self->state;
        const actor_address address{st.options.node, cmd.actor};
        for (std::size_t i = 0; i < st.addresses.size(); ++i) {
          if (st.addresses[i] != address) continue;
          st.book->unregister(address);
          self->send_exit(st.children[i], caf::exit_reason::user_shutdown);
          st.children.erase(st.children.begin() + static_cast<std::ptrdiff_t>(i));
          st.addresses.erase(st.addresses.begin() + static_cast<std::ptrdiff_t>(i));
          break;
        }
        return ok_atom::value;
      },
      [self, stop](stop_atom) {
        stop();
        self->quit();
      },
      [](heartbeat& h) {
        heartbeat answer;
        answer.epoch = h.epoch;
        answer.sequence = h.sequence;
        return answer;
      },
  };
}

}  // namespace shoal::actors
