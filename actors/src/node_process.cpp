#include "shoal/actors/node_process.hpp"

#include "remote.hpp"
#include "shoal/actors/node_agent.hpp"
#include "shoal/actors/router.hpp"
#include "shoal/actors/supervisor.hpp"

#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/exit_reason.hpp>
#include <caf/scoped_actor.hpp>

#include <nlohmann/json.hpp>

#include <fstream>
#include <sstream>
#include <thread>
#include <unistd.h>

namespace shoal::actors {

struct node_process::impl {
  node_process_options options;
  const config::node_spec* self_spec = nullptr;
  bool head = false;
  caf::actor_system_config system_config;
  std::unique_ptr<caf::actor_system> system;
  std::shared_ptr<remote_fabric> book;
  node_agent_actor agent;
  router_actor router;
  supervisor_actor supervisor;

  ~impl() {
    if (system) {
      caf::scoped_actor self{*system};
      if (agent) self->send(agent, stop_atom::value);
      if (supervisor) self->send_exit(supervisor, caf::exit_reason::user_shutdown);
      if (router) self->send_exit(router, caf::exit_reason::user_shutdown);
      if (agent) self->wait_for(agent);
    }
    if (book) book->stop();
    agent = nullptr;
    router = nullptr;
    supervisor = nullptr;
    book.reset();
  }
};

namespace {

// MemAvailable of /proc/meminfo, or 0 when it cannot be read.
std::uint64_t available_memory_bytes() {
  std::ifstream in("/proc/meminfo");
  std::string key;
  std::uint64_t kb = 0;
  std::string unit;
  while (in >> key >> kb >> unit)
    if (key == "MemAvailable:") return kb * 1024;
  return 0;
}

// The admin token of the config (surrounding whitespace dropped), or "" when none is set.
std::string read_admin_token(const config::cluster_config& cluster) {
  if (cluster.admin_token_file.empty()) return {};
  std::ifstream in(cluster.admin_token_file);
  if (!in) shoal::fail(errc::not_found, "{}: cannot read the admin token file (admin_token_file)", cluster.admin_token_file.string());
  std::stringstream text;
  text << in.rdbuf();
  auto token = text.str();
  const auto first = token.find_first_not_of(" \t\r\n");
  const auto last = token.find_last_not_of(" \t\r\n");
  token = first == std::string::npos ? std::string() : token.substr(first, last - first + 1);
  if (token.size() < 16)
    shoal::fail(errc::invalid_argument, "{}: the admin token must be at least 16 characters", cluster.admin_token_file.string());
  return token;
}

config::model_config read_model_config(const std::filesystem::path& model) {
  const auto path = model / "config.json";
  std::ifstream in(path);
  if (!in) shoal::fail(errc::not_found, "{}: cannot open the model's config.json", path.string());
  std::stringstream text;
  text << in.rdbuf();
  return config::parse_model_config(text.str(), path.string());
}

}  // namespace

node_process::node_process(node_process_options options) : impl_(std::make_unique<impl>()) {
  auto& s = *impl_;
  s.options = std::move(options);
  auto& cluster = s.options.cluster;
  s.self_spec = cluster.find_node(s.options.node);
  if (!s.self_spec)
    shoal::fail(errc::invalid_argument, "node '{}' is not in the cluster config {}", s.options.node,
                cluster.source.string());
  s.head = cluster.head == s.options.node;
  const auto model_dir = s.options.model_override.empty() ? cluster.model : std::filesystem::path(s.options.model_override);
  const auto model = read_model_config(model_dir);
  config::validate_against_model(cluster, model);
  const auto& t = s.options.timeouts;
  if (t.scheduler_threads > 0)
    s.system_config.set("scheduler.max-threads", static_cast<std::size_t>(t.scheduler_threads));
  s.system = std::make_unique<caf::actor_system>(s.system_config);

  remote_options ro;
  ro.node = s.options.node;
  ro.listen_host = s.self_spec->host;
  ro.listen_port = s.self_spec->port;
  ro.transports = s.options.transports;
  for (const auto& n : cluster.nodes) ro.addresses[n.name] = {n.host, n.port};
  ro.head = cluster.head;
  ro.call_timeout = t.step_timeout;
  ro.connect_timeout = std::chrono::milliseconds(std::min<std::int64_t>(t.ready_timeout.count(), 5000));
  ro.stages_hold_experts = cluster.expert_groups.empty();
  if (!cluster.join_secret_file.empty()) ro.join_secret = transport::read_join_secret(cluster.join_secret_file);
  s.book = std::make_shared<remote_fabric>(*s.system, ro);
  s.book->start();

  node_agent_options ao{.node = s.options.node, .model_override = s.options.model_override, .threads = cluster.threads,
                        .expert_timeout = t.expert_timeout, .progress = {}, .key = s.options.key};
  s.agent = s.system->spawn<caf::detached>(make_node_agent, ao, s.book);
  s.book->register_actor({s.options.node, actor_ids::node_agent}, caf::actor_cast<caf::actor>(s.agent));

  if (s.head) {
    router_options rop{.scheduling = scheduling_for(cluster, model), .step_timeout = t.step_timeout,
                       .vocab_size = model.vocab_size, .max_positions = model.max_position_embeddings,
                       .replay_limit = cluster.replay_limit, .micro_batches = cluster.micro_batches};
    s.router = s.system->spawn(make_router, rop, s.book);
    s.book->register_actor({s.options.node, actor_ids::router}, caf::actor_cast<caf::actor>(s.router));
    if (!cluster.admin_audit_log.empty() && !std::ofstream(cluster.admin_audit_log, std::ios::app))
      shoal::fail(errc::invalid_argument, "{}: cannot append to the admin audit log (admin_audit_log in {})",
                  cluster.admin_audit_log.string(), cluster.source.string());
    supervisor_options so{.cluster = cluster, .model = model, .ready_timeout = t.ready_timeout,
                          .heartbeat_interval = std::chrono::milliseconds(cluster.heartbeat_ms),
                          .heartbeat_misses = cluster.heartbeat_misses,
                          .replace_after = std::chrono::seconds(cluster.replace_after_s),
                          .load_window = std::chrono::seconds(cluster.load_window_s),
                          .admin_token = read_admin_token(cluster), .admin_audit_log = cluster.admin_audit_log,
                          .on_event = s.options.on_event, .key = s.options.key};
    s.supervisor = s.system->spawn(make_supervisor, so, s.book, s.router);
    s.book->register_actor({s.options.node, actor_ids::supervisor}, caf::actor_cast<caf::actor>(s.supervisor));
  }

  // Join: the head's supervisor directly, others through the transport, retrying while the
  // head is not up yet.
  caf::scoped_actor self{*s.system};
  const join_request join{.node = s.options.node, .host = s.self_spec->host, .port = s.self_spec->port,
                          .pid = static_cast<std::uint32_t>(::getpid()), .schema_version = schema_version,
                          .memory_bytes = s.self_spec->memory_gb > 0
                                              ? static_cast<std::uint64_t>(s.self_spec->memory_gb * 1e9)
                                              : available_memory_bytes()};
  const auto deadline = std::chrono::steady_clock::now() + t.ready_timeout;
  std::string last_error;
  while (true) {
    auto target = caf::actor_cast<supervisor_actor>(s.book->resolve({cluster.head, actor_ids::supervisor}));
    std::optional<shoal::error> failure;
    bool joined = false;
    self->request(target, t.ready_timeout, join_atom::value, join, s.agent)
        .receive([&](std::uint64_t) { joined = true; }, [&](caf::error& e) { failure = from_caf_error(e); });
    if (joined) break;
    if (failure->code() != errc::unavailable) throw *failure;  // refused: retrying will not help
    last_error = failure->what();
    if (std::chrono::steady_clock::now() + std::chrono::milliseconds(250) > deadline)
      shoal::fail(errc::deadline_exceeded, "node {}: could not join the head node {} within {} ms: {}", s.options.node,
                  cluster.head, t.ready_timeout.count(), last_error);
    std::this_thread::sleep_for(std::chrono::milliseconds(250));
  }
}

node_process::~node_process() = default;

bool node_process::is_head() const noexcept { return impl_->head; }

placement_table node_process::wait_ready() {
  if (!impl_->head) shoal::fail(errc::failed_precondition, "only the head node knows when the cluster is ready");
  caf::scoped_actor self{*impl_->system};
  placement_table table;
  std::optional<shoal::error> failure;
  self->request(impl_->supervisor, impl_->options.timeouts.ready_timeout + std::chrono::seconds(1), ready_atom::value)
      .receive([&](placement_table& t) { table = std::move(t); }, [&](caf::error& e) { failure = from_caf_error(e); });
  if (failure) throw *failure;
  return table;
}

std::string node_process::status() {
  if (!impl_->head) shoal::fail(errc::failed_precondition, "only the head node has the cluster status");
  return head_status(*impl_->system, impl_->supervisor);
}

bool node_process::head_alive() const {
  if (impl_->head) return true;
  return impl_->book->connected(impl_->options.cluster.head);
}

}  // namespace shoal::actors
