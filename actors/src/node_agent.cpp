#include "shoal/actors/node_agent.hpp"

#include "shoal/actors/engines.hpp"
#include "shoal/actors/expert.hpp"
#include "shoal/actors/fabric.hpp"
#include "shoal/actors/stage.hpp"

#include <caf/actor_cast.hpp>
#include <caf/exit_reason.hpp>

#include <fmt/format.h>

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
  // Whether `address` runs as `spec` already (true: nothing to do); an actor at the address
  // spawned as something else is stopped first.
  auto already = [self](const actor_address& address, const std::string& spec) {
    auto& st = self->state;
    for (std::size_t i = 0; i < st.addresses.size(); ++i) {
      if (st.addresses[i] != address) continue;
      if (st.specs[i] == spec) return true;
      st.book->unregister(address);
      self->send_exit(st.children[i], caf::exit_reason::user_shutdown);
      const auto at = static_cast<std::ptrdiff_t>(i);
      st.children.erase(st.children.begin() + at);
      st.addresses.erase(st.addresses.begin() + at);
      st.specs.erase(st.specs.begin() + at);
      break;
    }
    return false;
  };
  return {
      [self, already](spawn_stage_cmd& cmd) -> caf::result<ok_atom> {
        auto& st = self->state;
        if (st.stopped) return to_caf_error(errc::failed_precondition, "node " + st.options.node + " is stopping");
        const actor_address address{st.options.node, cmd.actor};
        const auto spec = fmt::format("stage {}/{} layers {}-{} experts {} model {} blocks {}x{}", cmd.stage,
                                      cmd.stage_count, cmd.first_layer, cmd.end_layer, cmd.hold_experts, cmd.model_path,
                                      cmd.cache_blocks, cmd.block_tokens);
        if (already(address, spec)) return ok_atom::value;
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
          st.specs.push_back(spec);
        } catch (const shoal::error& e) {
          return to_caf_error(e.code(), fmt::format("node {}: stage {} (layers {}-{}): {}", st.options.node, cmd.stage,
                                                    cmd.first_layer, cmd.end_layer - 1, e.what()));
        }
        return ok_atom::value;
      },
      [self, already](spawn_expert_cmd& cmd) -> caf::result<ok_atom> {
        auto& st = self->state;
        if (st.stopped) return to_caf_error(errc::failed_precondition, "node " + st.options.node + " is stopping");
        const actor_address address{st.options.node, cmd.actor};
        const auto spec = fmt::format("experts {} model {}", fmt::join(cmd.experts, ","), cmd.model_path);
        if (already(address, spec)) return ok_atom::value;
        try {
          auto engine = std::make_shared<expert_engine>(
              st.options.model_override.empty() ? cmd.model_path : st.options.model_override, cmd.experts,
              st.options.threads, st.options.key);
          auto handle = self->spawn<caf::detached>(make_expert, engine);
          st.book->register_actor(address, caf::actor_cast<caf::actor>(handle));
          st.book->register_engine(address, engine);
          st.children.push_back(caf::actor_cast<caf::actor>(handle));
          st.addresses.push_back(address);
          st.specs.push_back(spec);
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
          st.specs.erase(st.specs.begin() + static_cast<std::ptrdiff_t>(i));
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
