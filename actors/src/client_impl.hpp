#pragma once
// Private: what a client holds, shared by its in-process and its network constructors.

#include "shoal/actors/client.hpp"
#include "shoal/actors/protocols.hpp"

#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/typed_event_based_actor.hpp>

#include <condition_variable>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>

namespace shoal {
namespace actors {
class remote_fabric;
}

// Chunks that arrived, per request, until `next` takes them.
struct client_inbox {
  std::mutex mutex;
  std::condition_variable arrived;
  std::map<std::uint64_t, std::deque<actors::token_chunk>> chunks;
  // Requests submitted with a callback: their chunks go there instead.
  std::map<std::uint64_t, std::shared_ptr<std::function<void(const actors::token_chunk&)>>> callbacks;
};

/// The actor tokens arrive at; it only fills the inbox.
actors::token_sink_actor::behavior_type make_client_sink(actors::token_sink_actor::pointer self,
                                                         std::shared_ptr<client_inbox> box);

class client::impl {
 public:
  ~impl();
  // A network client owns its actor system and fabric; an in-process one borrows them.
  std::unique_ptr<caf::actor_system_config> own_config;
  std::unique_ptr<caf::actor_system> own_system;
  std::shared_ptr<actors::remote_fabric> remote;
  caf::actor_system* system = nullptr;
  actors::router_actor router;
  actors::supervisor_actor supervisor;
  actors::token_sink_actor sink;
  std::shared_ptr<client_inbox> box = std::make_shared<client_inbox>();
  std::mutex ids_mutex;
  std::uint64_t next_id = 1;
};

}  // namespace shoal
