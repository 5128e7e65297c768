#pragma once
// Private: what a client holds, shared by its in-process and its network constructors.

#include "shoal/actors/client.hpp"
#include "shoal/actors/protocols.hpp"

#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/typed_event_based_actor.hpp>

#include <atomic>
#include <condition_variable>
#include <thread>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>

namespace shoal {
namespace actors {
class remote_fabric;
}

// A request of a network client, kept until it finishes so that it can be resubmitted to
// another head: as sent, with every token the client received and the attempt now streaming.
struct tracked_request {
  actors::generate_request request;     // as first sent (seed fixed, deadline absolute)
  std::vector<std::int32_t> delivered;  // tokens received so far
  std::uint64_t attempt = 0;            // chunks of earlier attempts are dropped
  bool cancel_wanted = false;
  bool ending = false;                  // ended here while no head answered; its last chunk is on its way
};

// The router sees `id | attempt << attempt_shift`, so that a late chunk of an attempt on a
// head that was given up is told apart from the current one.
inline constexpr unsigned attempt_shift = 40;
inline constexpr std::uint64_t id_mask = (std::uint64_t{1} << attempt_shift) - 1;

// Chunks that arrived, per request, until `next` takes them.
struct client_inbox {
  std::mutex mutex;
  std::condition_variable arrived;
  std::map<std::uint64_t, std::deque<actors::token_chunk>> chunks;
  // Requests submitted with a callback: their chunks go there instead.
  std::map<std::uint64_t, std::shared_ptr<std::function<void(const actors::token_chunk&)>>> callbacks;
  bool track = false;                               // a network client: requests are tracked
  std::map<std::uint64_t, tracked_request> tracked; // by client id, until their last chunk
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

  // Failover (network clients of a cluster with a standby head).
  std::vector<head_endpoint> heads;     // where a head may listen
  std::string head_node;                // the head in charge
  std::set<std::string> head_names;     // nodes this client reached at `heads`
  std::chrono::milliseconds failover_after{3000};
  std::chrono::milliseconds no_head_limit{60000};  // requests fail after this long with no head
  std::mutex route_mutex;               // router/supervisor/head_node, and sending under them
  struct watchdog {
    std::mutex mutex;
    std::condition_variable wake;
    bool lost = false;
    bool stopping = false;
    std::string lost_node;
  };
  std::shared_ptr<watchdog> dog = std::make_shared<watchdog>();
  std::thread failover_thread;
  std::atomic<std::uint64_t> failovers{0};
  void watch_heads();
  bool fail_over(bool connection_lost);
  void end_stranded(std::chrono::steady_clock::time_point lost_since);
  bool any_head_alive();
};

}  // namespace shoal
