#include "shoal/actors/node_process.hpp"

#include "remote.hpp"
#include "shoal/actors/node_agent.hpp"
#include "shoal/actors/router.hpp"
#include "shoal/actors/supervisor.hpp"

#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/exit_reason.hpp>
#include <caf/scoped_actor.hpp>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <cstdio>

#include <atomic>
#include <fstream>
#include <sstream>
#include <thread>
#include <unistd.h>

namespace shoal::actors {

struct node_process::impl {
  node_process_options options;
  const config::node_spec* self_spec = nullptr;
  config::model_config model;
  bool head = false;          // runs the supervisor and router now
  std::string active_head;    // whose supervisor this node belongs to
  caf::actor_system_config system_config;
  std::unique_ptr<caf::actor_system> system;
  std::shared_ptr<remote_fabric> book;
  node_agent_actor agent;
  router_actor router;
  supervisor_actor supervisor;
  // After losing its head: the node it tries to join next, and until when.
  bool seeking = false;
  std::chrono::steady_clock::time_point seek_deadline;
  std::chrono::steady_clock::time_point last_watch;
  // Set by the supervisor's `superseded` event: another head took over while this one was
  // frozen or cut off.
  std::shared_ptr<std::atomic<bool>> superseded = std::make_shared<std::atomic<bool>>(false);
  // When the supervisor last declared a node dead (steady clock, ms): a head that woke up
  // after its standby took over finds its nodes gone; it then asks the standby.
  std::shared_ptr<std::atomic<std::int64_t>> node_down_at = std::make_shared<std::atomic<std::int64_t>>(-1);
  std::chrono::steady_clock::time_point last_probe;

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

  const config::cluster_config& cluster() const { return options.cluster; }
  std::chrono::milliseconds patience() const {
    return std::chrono::milliseconds(static_cast<std::int64_t>(cluster().heartbeat_ms) * cluster().heartbeat_misses);
  }
  // The other node that can be head (head <-> standby), or "" for the others.
  std::string peer_head() const { return cluster().other_head(options.node); }
  void become_head(const std::string& takeover_from);
  std::optional<shoal::error> join(const std::string& target, std::chrono::milliseconds timeout);
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

void node_process::impl::become_head(const std::string& takeover_from) {
  const auto& c = cluster();
  const auto& t = options.timeouts;
  router_options rop{.scheduling = scheduling_for(c, model), .step_timeout = t.step_timeout,
                     .vocab_size = model.vocab_size, .max_positions = model.max_position_embeddings,
                     .replay_limit = c.replay_limit, .micro_batches = c.micro_batches};
  rop.version = c.version;
  rop.versions = c.versions;
  rop.split = c.split;
  if (!c.join_secret_file.empty()) rop.join_secret = transport::read_join_secret(c.join_secret_file);
  router = system->spawn(make_router, rop, book);
  book->register_actor({options.node, actor_ids::router}, caf::actor_cast<caf::actor>(router));
  if (!c.admin_audit_log.empty() && !std::ofstream(c.admin_audit_log, std::ios::app))
    shoal::fail(errc::invalid_argument, "{}: cannot append to the admin audit log (admin_audit_log in {})",
                c.admin_audit_log.string(), c.source.string());
  supervisor_options so{.cluster = c, .model = model, .ready_timeout = t.ready_timeout,
                        .heartbeat_interval = std::chrono::milliseconds(c.heartbeat_ms),
                        .heartbeat_misses = c.heartbeat_misses,
                        .replace_after = std::chrono::seconds(c.replace_after_s),
                        .load_window = std::chrono::seconds(c.load_window_s),
                        .admin_token = read_admin_token(c), .admin_audit_log = c.admin_audit_log,
                        .on_event =
                            [forward = options.on_event, flag = superseded, down = node_down_at](const std::string& event) {
                              if (event.find("\"event\":\"superseded\"") != std::string::npos) flag->store(true);
                              if (event.find("\"event\":\"node_down\"") != std::string::npos)
                                down->store(std::chrono::duration_cast<std::chrono::milliseconds>(
                                                std::chrono::steady_clock::now().time_since_epoch())
                                                .count());
                              if (forward) forward(event);
                            },
                        .key = options.key, .node = options.node,
                        .takeover_from = takeover_from, .epoch = book->epoch(),
                        .adopt = takeover_from.empty() ? std::string() : book->head_state()};
  supervisor = system->spawn(make_supervisor, so, book, router);
  book->register_actor({options.node, actor_ids::supervisor}, caf::actor_cast<caf::actor>(supervisor));
  head = true;
  active_head = options.node;
  book->set_head(options.node);
}

// One join attempt at `target`'s supervisor; nothing on success, else why it failed.
std::optional<shoal::error> node_process::impl::join(const std::string& target, std::chrono::milliseconds timeout) {
  caf::scoped_actor self{*system};
  const join_request request{.node = options.node, .host = self_spec->host, .port = self_spec->port,
                             .pid = static_cast<std::uint32_t>(::getpid()), .schema_version = schema_version,
                             .memory_bytes = self_spec->memory_gb > 0
                                                 ? static_cast<std::uint64_t>(self_spec->memory_gb * 1e9)
                                                 : available_memory_bytes(),
                             .epoch = book->epoch()};
  auto supervisor_handle = caf::actor_cast<supervisor_actor>(book->resolve({target, actor_ids::supervisor}));
  std::optional<shoal::error> failure;
  bool joined = false;
  self->request(supervisor_handle, timeout, join_atom::value, request, agent)
      .receive([&](std::uint64_t) { joined = true; }, [&](caf::error& e) { failure = from_caf_error(e); });
  if (joined) {
    active_head = target;
    book->set_head(target);
  }
  return failure;
}

node_process::node_process(node_process_options options) : impl_(std::make_unique<impl>()) {
  auto& s = *impl_;
  s.options = std::move(options);
  auto& cluster = s.options.cluster;
  s.self_spec = cluster.find_node(s.options.node);
  if (!s.self_spec)
    shoal::fail(errc::invalid_argument, "node '{}' is not in the cluster config {}", s.options.node,
                cluster.source.string());
  const auto model_dir = s.options.model_override.empty() ? cluster.model : std::filesystem::path(s.options.model_override);
  s.model = read_model_config(model_dir);
  config::validate_against_model(cluster, s.model);
  const auto& t = s.options.timeouts;
  if (t.scheduler_threads > 0)
    s.system_config.set("scheduler.max-threads", static_cast<std::size_t>(t.scheduler_threads));
  s.system_config.set("scheduler.policy", cluster.actor_scheduler == "stealing" ? caf::atom("stealing") : caf::atom("sharing"));
  s.system = std::make_unique<caf::actor_system>(s.system_config);

  remote_options ro;
  ro.node = s.options.node;
  ro.listen_host = s.self_spec->host;
  ro.listen_port = s.self_spec->port;
  ro.transports = s.options.transports;
  for (const auto& n : cluster.nodes) ro.addresses[n.name] = {n.host, n.port};
  ro.head = cluster.head;
  ro.standby = cluster.standby;
  ro.call_timeout = t.step_timeout;
  ro.control_timeout = t.ready_timeout;
  ro.connect_timeout = std::chrono::milliseconds(std::min<std::int64_t>(t.ready_timeout.count(), 5000));
  ro.stages_hold_experts = cluster.expert_groups.empty();
  if (!cluster.join_secret_file.empty()) ro.join_secret = transport::read_join_secret(cluster.join_secret_file);
  s.book = std::make_shared<remote_fabric>(*s.system, ro);
  s.book->start();

  // Loading a large checkpoint or streaming expert weights takes minutes: say how far it got
  // (stderr, where `shoal launch` keeps each node's log).
  auto progress = [node = s.options.node](const std::string& line) {
    std::fprintf(stderr, "[node %s] %s\n", node.c_str(), line.c_str());
  };
  node_agent_options ao{.node = s.options.node, .model_override = s.options.model_override, .threads = cluster.threads,
                        .expert_timeout = t.expert_timeout, .progress = progress, .key = s.options.key};
  s.agent = s.system->spawn<caf::detached>(make_node_agent, ao, s.book);
  s.book->register_actor({s.options.node, actor_ids::node_agent}, caf::actor_cast<caf::actor>(s.agent));

  // The config's head leads unless its standby took over while it was away (it was restarted
  // after a failure): then it joins the standby and is the standby from now on.
  if (s.options.node == cluster.head) {
    if (!cluster.standby.empty() && supervisor_epoch(*s.system, *s.book, cluster.standby, std::chrono::seconds(3))) {
      if (s.options.on_event)
        s.options.on_event(nlohmann::json{{"event", "standby"}, {"node", s.options.node}, {"head", cluster.standby}}.dump());
      s.active_head = cluster.standby;
    } else {
      s.become_head({});
    }
  } else {
    s.active_head = cluster.head;
  }

  // Join: the head's supervisor directly, others through the transport, retrying while the
  // head is not up yet. With a standby, a node that finds no supervisor at the head tries the
  // standby too (it may have taken over while this process was away).
  std::vector<std::string> targets{s.active_head};
  if (const auto other = cluster.other_head(s.active_head); !other.empty() && other != s.options.node)
    targets.push_back(other);
  const auto deadline = std::chrono::steady_clock::now() + t.ready_timeout;
  std::string last_error;
  for (std::size_t attempt = 0;; ++attempt) {
    const auto& target = targets[attempt % targets.size()];
    const auto failure = s.join(target, t.ready_timeout);
    if (!failure) break;
    // not_found: the node runs no supervisor (yet: the head is still starting, or a standby
    // has not taken over).
    const bool retry = failure->code() == errc::unavailable || failure->code() == errc::not_found;
    if (!retry) throw *failure;  // refused: retrying will not help
    last_error = fmt::format("{}: {}", target, failure->what());
    if (std::chrono::steady_clock::now() + std::chrono::milliseconds(250) > deadline)
      shoal::fail(errc::deadline_exceeded, "node {}: could not join the head node {} within {} ms: {}", s.options.node,
                  cluster.head, t.ready_timeout.count(), last_error);
    std::this_thread::sleep_for(std::chrono::milliseconds(250));
  }
  s.last_watch = std::chrono::steady_clock::now();
}

bool node_process::watch() {
  auto& s = *impl_;
  const auto now = std::chrono::steady_clock::now();
  const auto since_last = now - s.last_watch;
  s.last_watch = now;
  const auto& cluster = s.options.cluster;
  if (s.head) {
    const auto down_at = std::chrono::steady_clock::time_point(std::chrono::milliseconds(s.node_down_at->load()));
    if (!s.superseded->load() && !s.peer_head().empty() && s.node_down_at->load() >= 0 &&
        now - down_at < std::chrono::seconds(30) && now - s.last_probe > std::chrono::seconds(1)) {
      // Nodes lost: maybe this process was frozen or cut off and the standby took over.
      s.last_probe = now;
      // Both may run a supervisor for a moment (this one woke up): the newer placement epoch
      // wins, and a takeover always starts a newer one than the head it replaced could reach.
      const auto theirs = supervisor_epoch(*s.system, *s.book, s.peer_head(), std::chrono::seconds(3));
      if (theirs && *theirs > s.book->epoch()) s.superseded->store(true);
    }
    if (!s.superseded->load()) return true;
    fmt::print(stderr, "[node {}] the nodes answer that another head took over while this one was frozen or cut off: "
                       "stopping (started again, it joins the new head)\n", s.options.node);
    return false;
  }
  if (s.seeking) {
    // The standby takes over once it sees the head gone too: until then joins find no
    // supervisor there.
    const auto target = s.active_head;
    if (const auto failure = s.join(target, std::chrono::seconds(5)); !failure) {
      s.seeking = false;
      fmt::print(stderr, "[node {}] joined the new head {}\n", s.options.node, s.active_head);
      return true;
    } else if (now > s.seek_deadline) {
      fmt::print(stderr, "[node {}] no head accepted this node within {} ms (last: {}): stopping\n", s.options.node,
                 s.options.timeouts.ready_timeout.count(), failure->what());
      return false;
    }
    // The other one may be in charge after all (the one that seemed gone woke up first).
    if (const auto other = cluster.other_head(target); !other.empty() && other != s.options.node)
      s.active_head = other;
    return true;
  }
  // A watcher that was itself stalled (a loaded machine) lets the transport catch up first.
  if (since_last > s.patience() / 2) return true;
  const auto heard = s.book->last_heard(s.active_head);
  // Silence matters only when a standby can take over: without one, a head that is merely
  // slow (a loaded machine) is better waited for than left.
  const bool silent = !cluster.standby.empty() && cluster.heartbeat_ms > 0 && heard && now - *heard > s.patience();
  const bool lost = !s.book->connected(s.active_head) || silent;
  if (!lost) return true;
  const auto why = silent ? fmt::format("silent for {} ms", std::chrono::duration_cast<std::chrono::milliseconds>(now - *heard).count())
                          : std::string("its connection failed");
  const auto old = s.active_head;
  if (cluster.standby.empty()) {
    fmt::print(stderr, "[node {}] the head node {} is gone ({}): stopping\n", s.options.node, old, why);
    return false;
  }
  if (s.peer_head() == old) {
    fmt::print(stderr, "[node {}] the head node {} is gone ({}): taking over as head\n", s.options.node, old, why);
    s.book->evict(old, s.book->epoch());
    s.become_head(old);
    if (const auto failure = s.join(s.options.node, s.options.timeouts.ready_timeout)) throw *failure;
    return true;
  }
  // Another node: the one of head and standby that was not in charge is now.
  const auto next = cluster.other_head(old);
  fmt::print(stderr, "[node {}] the head node {} is gone ({}): joining {}\n", s.options.node, old, why, next);
  s.book->evict(old, s.book->epoch());
  s.active_head = next;
  s.seeking = true;
  s.seek_deadline = now + s.options.timeouts.ready_timeout;
  return true;
}

std::string node_process::head() const { return impl_->active_head; }

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


}  // namespace shoal::actors
