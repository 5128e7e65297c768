#include "shoal/actors/cluster.hpp"

#include "cluster_impl.hpp"
#include "shoal/actors/engines.hpp"
#include "shoal/actors/fabric.hpp"
#include "shoal/actors/node_agent.hpp"
#include "shoal/actors/router.hpp"
#include "shoal/actors/supervisor.hpp"

#include <caf/exit_reason.hpp>
#include <caf/scoped_actor.hpp>

#include <nlohmann/json.hpp>

#include <fstream>
#include <sstream>
#include <unistd.h>

namespace shoal::actors {
namespace {

config::model_config read_model_config(const std::filesystem::path& model) {
  const auto path = model / "config.json";
  std::ifstream in(path);
  if (!in) shoal::fail(errc::not_found, "{}: cannot open the model's config.json", path.string());
  std::stringstream text;
  text << in.rdbuf();
  return config::parse_model_config(text.str(), path.string());
}

}  // namespace

local_cluster::impl::impl(config::cluster_config c, cluster_options o) : config(std::move(c)), options(o) {
  const auto model = read_model_config(config.model);
  config::validate_against_model(config, model);
  if (options.scheduler_threads > 0)
    system_config.set("scheduler.max-threads", static_cast<std::size_t>(options.scheduler_threads));
  system_config.set("scheduler.policy", config.actor_scheduler == "stealing" ? caf::atom("stealing") : caf::atom("sharing"));
  system = std::make_unique<caf::actor_system>(system_config);
  book = std::make_shared<fabric>();
  router_options ro{.scheduling = scheduling_for(config, model), .step_timeout = options.step_timeout,
                    .vocab_size = model.vocab_size, .max_positions = model.max_position_embeddings,
                    .replay_limit = config.replay_limit, .micro_batches = config.micro_batches};
  ro.version = config.version;
  ro.versions = config.versions;
  ro.split = config.split;
  router = system->spawn(make_router, ro, book);
  book->register_actor({config.head, actor_ids::router}, caf::actor_cast<caf::actor>(router));
  supervisor_options so{.cluster = config, .model = model, .ready_timeout = options.ready_timeout};
  so.load_window = std::chrono::seconds(config.load_window_s);
  so.key = options.key;
  supervisor = system->spawn(make_supervisor, so, book, router);
  book->register_actor({config.head, actor_ids::supervisor}, caf::actor_cast<caf::actor>(supervisor));
  caf::scoped_actor self{*system};
  for (const auto& node : config.nodes) {
    node_agent_options ao{.node = node.name, .model_override = {}, .threads = config.threads,
                          .expert_timeout = options.expert_timeout, .progress = options.progress, .key = options.key};
    auto agent = system->spawn<caf::detached>(make_node_agent, ao, book);
    book->register_actor({node.name, actor_ids::node_agent}, caf::actor_cast<caf::actor>(agent));
    agents.push_back(agent);
    join_request join{.node = node.name, .host = node.host, .port = node.port,
                      .pid = static_cast<std::uint32_t>(::getpid()), .schema_version = schema_version};
    std::optional<shoal::error> failure;
    self->request(supervisor, options.ready_timeout, join_atom::value, join, agent)
        .receive([](std::uint64_t) {}, [&](caf::error& e) { failure = from_caf_error(e); });
    if (failure) throw *failure;
  }
}

local_cluster::impl::~impl() {
  caf::scoped_actor self{*system};
  for (auto& agent : agents) self->send(agent, stop_atom::value);
  self->send_exit(supervisor, caf::exit_reason::user_shutdown);
  self->send_exit(router, caf::exit_reason::user_shutdown);
  for (auto& agent : agents) self->wait_for(agent);
  self->wait_for(supervisor, router);
  agents.clear();
  router = nullptr;
  supervisor = nullptr;
  book.reset();
}

local_cluster::local_cluster(config::cluster_config config, cluster_options options)
    : impl_(std::make_unique<impl>(std::move(config), options)) {}

local_cluster::~local_cluster() = default;

placement_table local_cluster::wait_ready() {
  caf::scoped_actor self{*impl_->system};
  placement_table table;
  std::optional<shoal::error> failure;
  // The supervisor enforces the ready deadline; the extra second only guards against a
  // supervisor that cannot answer at all.
  self->request(impl_->supervisor, impl_->options.ready_timeout + std::chrono::seconds(1), ready_atom::value)
      .receive([&](placement_table& t) { table = std::move(t); }, [&](caf::error& e) { failure = from_caf_error(e); });
  if (failure) throw *failure;
  return table;
}

std::string local_cluster::status() { return head_status(*impl_->system, impl_->supervisor); }

std::vector<std::uint64_t> local_cluster::routed_tokens() { return impl_->book->routed_tokens(); }

const config::cluster_config& local_cluster::config() const noexcept { return impl_->config; }

}  // namespace shoal::actors
