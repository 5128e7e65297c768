#pragma once
// Private: what `local_cluster` holds, shared with the client.

#include "shoal/actors/cluster.hpp"
#include "shoal/actors/fabric.hpp"
#include "shoal/actors/protocols.hpp"

#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>

#include <memory>
#include <vector>

namespace shoal::actors {

class local_cluster::impl {
 public:
  impl(config::cluster_config config, cluster_options options);
  ~impl();

  config::cluster_config config;
  cluster_options options;
  caf::actor_system_config system_config;
  std::unique_ptr<caf::actor_system> system;
  std::shared_ptr<fabric> book;
  router_actor router;
  supervisor_actor supervisor;
  std::vector<node_agent_actor> agents;
};

}  // namespace shoal::actors
