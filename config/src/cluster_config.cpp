#include "shoal/config/cluster_config.hpp"

#include "shoal/base/error.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <tuple>
#include <charconv>
#include <cmath>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

namespace shoal::config {
namespace {

int line_of(const YAML::Node& node) { return node.Mark().line + 1; }

// Layer and expert ids in a range stay below this: far above any model, and small enough that
// a range like 0-99999999999 is refused instead of listed.
constexpr std::int64_t kMaxId = 1 << 20;

// Parsing state shared by the helpers: only the source name, for messages.
struct parser {
  std::string source;

  [[noreturn]] void error(int line, const std::string& message) const {
    shoal::fail(errc::invalid_argument, "{}:{}: {}", source, line, message);
  }

  void require_map(const YAML::Node& node, std::string_view what) const {
    if (!node.IsMap()) error(line_of(node), fmt::format("{} must be a mapping", what));
  }

  // Unknown keys are errors: a misspelt key would otherwise silently fall back to a default.
  void allow_keys(const YAML::Node& node, std::string_view what, std::initializer_list<std::string_view> keys) const {
    for (const auto& item : node) {
      const auto key = string_at(item.first, fmt::format("a key in {}", what));
      if (std::find(keys.begin(), keys.end(), key) == keys.end())
        error(line_of(item.first), fmt::format("unknown key '{}' in {} (known: {})", key, what, fmt::join(keys, ", ")));
    }
  }

  // A string that must be one of `choices`.
  std::string one_of(const YAML::Node& node, std::string_view what, std::initializer_list<std::string_view> choices) const {
    const auto text = string_at(node, what);
    if (std::find(choices.begin(), choices.end(), text) == choices.end()) {
      std::vector<std::string_view> list(choices);
      const auto last = list.back();
      list.pop_back();
      error(line_of(node), fmt::format("{} must be {} or {}, got '{}'", what, fmt::join(list, ", "), last, text));
    }
    return text;
  }

  std::string string_at(const YAML::Node& node, std::string_view what) const {
    if (!node.IsScalar()) error(line_of(node), fmt::format("{} must be a string", what));
    return node.Scalar();
  }

  std::int64_t integer_at(const YAML::Node& node, std::string_view what, std::int64_t lo, std::int64_t hi) const {
    const std::string text = node.IsScalar() ? node.Scalar() : std::string();
    std::int64_t value = 0;
    const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
    if (!node.IsScalar() || ec != std::errc() || end != text.data() + text.size())
      error(line_of(node), fmt::format("{} must be an integer, got '{}'", what, text));
    if (value < lo || value > hi)
      error(line_of(node), fmt::format("{} = {} is out of range [{}, {}]", what, value, lo, hi));
    return value;
  }

  double number_at(const YAML::Node& node, std::string_view what, double lo, double hi) const {
    const std::string text = node.IsScalar() ? node.Scalar() : std::string();
    double value = 0;
    const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
    if (!node.IsScalar() || ec != std::errc() || end != text.data() + text.size() || !std::isfinite(value))
      error(line_of(node), fmt::format("{} must be a number, got '{}'", what, text));
    if (value < lo || value > hi) error(line_of(node), fmt::format("{} = {} is out of range [{}, {}]", what, value, lo, hi));
    return value;
  }

  // "a-b" (inclusive), "a", or an integer: a list of ids.
  std::vector<std::int64_t> range_at(const YAML::Node& node, std::string_view what) const {
    std::vector<std::int64_t> ids;
    auto add_text = [&](const YAML::Node& item) {
      const std::string text = string_at(item, what);
      const auto dash = text.find('-');
      auto number = [&](std::string_view part) {
        std::int64_t value = 0;
        const auto [end, ec] = std::from_chars(part.data(), part.data() + part.size(), value);
        if (part.empty() || ec != std::errc() || end != part.data() + part.size() || value < 0)
          error(line_of(item), fmt::format("{}: '{}' is not an id or an inclusive range like 0-15", what, text));
        if (value >= kMaxId) error(line_of(item), fmt::format("{}: id {} is out of range (ids are below {})", what, value, kMaxId));
        return value;
      };
      if (dash == std::string::npos) {
        ids.push_back(number(text));
      } else {
        const auto first = number(std::string_view(text).substr(0, dash));
        const auto last = number(std::string_view(text).substr(dash + 1));
        if (last < first) error(line_of(item), fmt::format("{}: range '{}' is empty", what, text));
        for (auto i = first; i <= last; ++i) ids.push_back(i);
      }
    };
    if (node.IsSequence()) {
      for (const auto& item : node) add_text(item);
    } else {
      add_text(node);
    }
    if (ids.empty()) error(line_of(node), fmt::format("{}: an empty list (give ids or ranges like 0-15)", what));
    return ids;
  }
};

}  // namespace

std::optional<std::pair<std::string, std::uint16_t>> parse_host_port(std::string_view text) {
  const auto colon = text.rfind(':');
  if (colon == std::string_view::npos || colon == 0 || colon + 1 == text.size()) return std::nullopt;
  int port = 0;
  const auto r = std::from_chars(text.data() + colon + 1, text.data() + text.size(), port);
  if (r.ec != std::errc() || r.ptr != text.data() + text.size() || port <= 0 || port > 65535) return std::nullopt;
  return std::pair{std::string(text.substr(0, colon)), static_cast<std::uint16_t>(port)};
}

const node_spec* cluster_config::find_node(std::string_view name) const noexcept {
  for (const auto& n : nodes)
    if (n.name == name) return &n;
  return nullptr;
}

std::string cluster_config::other_head(std::string_view node) const {
  if (standby.empty()) return {};
  if (node == head) return standby;
  if (node == standby) return head;
  return {};
}

std::string cluster_config::where(int line) const { return fmt::format("{}:{}", source.string(), line); }

cluster_config parse_cluster_config(std::string_view yaml_text, const std::filesystem::path& source,
                                    const std::filesystem::path& base_dir) {
  parser p{source.string()};
  YAML::Node root;
  try {
    root = YAML::Load(std::string(yaml_text));
  } catch (const YAML::Exception& e) {
    p.error(e.mark.line + 1, fmt::format("not valid YAML: {}", e.msg));
  }
  if (!root.IsMap()) p.error(1, "the cluster config must be a mapping with keys model, nodes, plan");
  p.allow_keys(root, "the cluster config",
               {"model", "nodes", "head", "standby", "plan", "threads", "max_batch", "max_batch_tokens", "cache_mb", "cache_blocks",
                "block_tokens", "prefix_cache", "ready_timeout_s", "heartbeat_ms", "heartbeat_misses", "restart_limit",
                "restart_window_s", "replay_limit", "replace_after_s", "admin_token_file", "load_window_s", "admin_audit_log", "micro_batches",
                "rebalance_every_s", "rebalance_max_copies", "actor_scheduler",
                "copy_weights_from", "join_secret_file", "version", "versions", "split"});

  cluster_config c;
  c.source = source;
  if (!root["model"]) p.error(1, "missing key 'model' (the checkpoint directory)");
  std::filesystem::path model = p.string_at(root["model"], "model");
  c.model = model.is_absolute() ? model : (base_dir / model).lexically_normal();
  if (root["threads"]) c.threads = static_cast<int>(p.integer_at(root["threads"], "threads", 0, 4096));
  if (root["max_batch"]) c.max_batch = static_cast<int>(p.integer_at(root["max_batch"], "max_batch", 1, 65536));
  if (root["max_batch_tokens"])
    c.max_batch_tokens = p.integer_at(root["max_batch_tokens"], "max_batch_tokens", 1, 1 << 20);
  for (const char* key : {"cache_mb", "cache_blocks", "block_tokens"})
    if (root[key] && c.cache_line == 0) c.cache_line = line_of(root[key]);
  if (root["cache_mb"]) c.cache_mb = p.integer_at(root["cache_mb"], "cache_mb", 1, 1 << 24);
  if (root["cache_blocks"]) c.cache_blocks = p.integer_at(root["cache_blocks"], "cache_blocks", 2, 1 << 24);
  if (root["block_tokens"]) c.block_tokens = p.integer_at(root["block_tokens"], "block_tokens", 1, 4096);
  if (root["prefix_cache"]) c.prefix_cache = p.one_of(root["prefix_cache"], "prefix_cache", {"true", "false"}) == "true";
  if (root["ready_timeout_s"])
    c.ready_timeout_s = static_cast<int>(p.integer_at(root["ready_timeout_s"], "ready_timeout_s", 1, 86400));
  if (root["heartbeat_ms"]) c.heartbeat_ms = static_cast<int>(p.integer_at(root["heartbeat_ms"], "heartbeat_ms", 0, 60000));
  if (root["heartbeat_misses"])
    c.heartbeat_misses = static_cast<int>(p.integer_at(root["heartbeat_misses"], "heartbeat_misses", 1, 1000));
  if (root["restart_limit"])
    c.restart_limit = static_cast<int>(p.integer_at(root["restart_limit"], "restart_limit", 0, 100000));
  if (root["restart_window_s"])
    c.restart_window_s = static_cast<int>(p.integer_at(root["restart_window_s"], "restart_window_s", 1, 86400 * 30));
  if (root["micro_batches"])
    c.micro_batches = static_cast<int>(p.integer_at(root["micro_batches"], "micro_batches", 0, 64));
  if (root["actor_scheduler"]) c.actor_scheduler = p.one_of(root["actor_scheduler"], "actor_scheduler", {"sharing", "stealing"});
  if (root["copy_weights_from"])
    c.copy_weights_from = p.one_of(root["copy_weights_from"], "copy_weights_from", {"peer", "checkpoint"});
  if (root["replay_limit"]) c.replay_limit = static_cast<int>(p.integer_at(root["replay_limit"], "replay_limit", 0, 1000));
  if (root["admin_token_file"]) {
    const std::filesystem::path token = p.string_at(root["admin_token_file"], "admin_token_file");
    c.admin_token_file = token.is_absolute() ? token : (base_dir / token).lexically_normal();
  }
  if (root["admin_audit_log"]) {
    const std::filesystem::path log = p.string_at(root["admin_audit_log"], "admin_audit_log");
    c.admin_audit_log = log.is_absolute() ? log : (base_dir / log).lexically_normal();
  }
  if (root["join_secret_file"]) {
    const std::filesystem::path secret = p.string_at(root["join_secret_file"], "join_secret_file");
    if (secret.empty()) p.error(line_of(root["join_secret_file"]), "join_secret_file must name a file");
    c.join_secret_file = secret.is_absolute() ? secret : (base_dir / secret).lexically_normal();
  }
  if (root["replace_after_s"])
    c.replace_after_s = static_cast<int>(p.integer_at(root["replace_after_s"], "replace_after_s", 0, 86400));
  if (root["load_window_s"])
    c.load_window_s = static_cast<int>(p.integer_at(root["load_window_s"], "load_window_s", 1, 86400));
  if (root["rebalance_every_s"])
    c.rebalance_every_s = static_cast<int>(p.integer_at(root["rebalance_every_s"], "rebalance_every_s", 0, 86400 * 7));
  if (root["rebalance_max_copies"])
    c.rebalance_max_copies =
        static_cast<int>(p.integer_at(root["rebalance_max_copies"], "rebalance_max_copies", 1, 4096));

  auto version_name = [&](const YAML::Node& n, std::string_view what) {
    const auto name = p.string_at(n, what);
    if (name.empty() || name.size() > 64 ||
        name.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-") != std::string::npos)
      p.error(line_of(n), fmt::format("{} '{}' must be 1-64 letters, digits, '.', '_' or '-'", what, name));
    return name;
  };
  if (root["version"]) c.version = version_name(root["version"], "version");
  if (root["versions"]) {
    if (!root["versions"].IsSequence())
      p.error(line_of(root["versions"]), "versions must be a list of {name, head: HOST:PORT}");
    for (const auto& v : root["versions"]) {
      p.require_map(v, "a version");
      p.allow_keys(v, "a version", {"name", "head"});
      model_version mv;
      mv.line = line_of(v);
      if (!v["name"]) p.error(mv.line, "version without a 'name'");
      mv.name = version_name(v["name"], "version name");
      if (mv.name == c.version)
        p.error(mv.line, fmt::format("version '{}' is this cluster's own version", mv.name));
      for (const auto& other : c.versions)
        if (other.name == mv.name) p.error(mv.line, fmt::format("version '{}' is defined twice", mv.name));
      if (!v["head"]) p.error(mv.line, fmt::format("version '{}' has no 'head' (HOST:PORT of its head node)", mv.name));
      const auto head = p.string_at(v["head"], "head");
      const auto address = parse_host_port(head);
      if (!address)
        p.error(line_of(v["head"]), fmt::format("version '{}': head '{}' must be HOST:PORT", mv.name, head));
      std::tie(mv.host, mv.port) = *address;
      c.versions.push_back(std::move(mv));
    }
  }
  if (root["split"]) {
    const auto& split = root["split"];
    p.require_map(split, "split");
    std::uint64_t total = 0;
    for (const auto& item : split) {
      const auto name = version_name(item.first, "split version");
      const bool known = name == c.version || std::any_of(c.versions.begin(), c.versions.end(),
                                                          [&](const model_version& v) { return v.name == name; });
      if (!known)
        p.error(line_of(item.first),
                fmt::format("split: no version '{}' (this cluster is '{}'; others go under versions)", name, c.version));
      const auto weight = static_cast<std::uint32_t>(p.integer_at(item.second, "split weight", 0, 1000000));
      total += weight;
      c.split.emplace_back(name, weight);
    }
    if (total == 0) p.error(line_of(split), "split: at least one version needs a weight above 0");
  }

  const YAML::Node nodes = root["nodes"];
  if (!nodes || !nodes.IsSequence() || nodes.size() == 0)
    p.error(nodes ? line_of(nodes) : 1, "'nodes' must be a non-empty list of {name, host, port, devices}");
  std::set<std::pair<std::string, std::uint16_t>> endpoints;
  for (const auto& n : nodes) {
    p.require_map(n, "a node");
    p.allow_keys(n, "a node", {"name", "host", "port", "devices", "memory_gb"});
    node_spec spec;
    spec.line = line_of(n);
    if (!n["name"]) p.error(spec.line, "node without a 'name'");
    spec.name = p.string_at(n["name"], "node name");
    if (spec.name.empty() || spec.name.find_first_of(" \t/:") != std::string::npos)
      p.error(spec.line, fmt::format("node name '{}' must be non-empty without spaces, '/' or ':'", spec.name));
    if (c.find_node(spec.name)) p.error(spec.line, fmt::format("node '{}' is defined twice", spec.name));
    if (n["host"]) spec.host = p.string_at(n["host"], "host");
    if (!n["port"]) p.error(spec.line, fmt::format("node '{}' has no 'port'", spec.name));
    spec.port = static_cast<std::uint16_t>(p.integer_at(n["port"], "port", 1, 65535));
    if (n["memory_gb"]) spec.memory_gb = p.number_at(n["memory_gb"], "memory_gb", 0, 1e6);
    if (!endpoints.emplace(spec.host, spec.port).second)
      p.error(line_of(n["port"]), fmt::format("node '{}': {}:{} is already used by another node", spec.name,
                                              spec.host, spec.port));
    if (n["devices"]) {
      if (!n["devices"].IsSequence()) p.error(line_of(n["devices"]), "devices must be a list like [cpu] or [cuda:0]");
      for (const auto& d : n["devices"]) {
        const auto device = p.string_at(d, "device");
        const bool cuda = device.rfind("cuda:", 0) == 0 && device.size() > 5 &&
                          device.find_first_not_of("0123456789", 5) == std::string::npos;
        if (device != "cpu" && !cuda)
          p.error(line_of(d), fmt::format("device '{}' is neither 'cpu' nor 'cuda:N'", device));
        spec.devices.push_back(device);
      }
    }
    c.nodes.push_back(std::move(spec));
  }

  auto node_ref = [&](const YAML::Node& n, std::string_view what) {
    const auto name = p.string_at(n, what);
    if (!c.find_node(name)) {
      std::vector<std::string> names;
      for (const auto& spec : c.nodes) names.push_back(spec.name);
      p.error(line_of(n), fmt::format("{}: unknown node '{}' (nodes: {})", what, name, fmt::join(names, ", ")));
    }
    return name;
  };
  c.head = root["head"] ? node_ref(root["head"], "head") : c.nodes.front().name;
  if (root["standby"]) {
    c.standby = node_ref(root["standby"], "standby");
    if (c.standby == c.head)
      p.error(line_of(root["standby"]), fmt::format("standby: '{}' is the head; the standby must be another node", c.standby));
  }

  const YAML::Node plan = root["plan"];
  if (!plan) p.error(1, "missing key 'plan' (pipeline stages and expert placement)");
  p.require_map(plan, "plan");
  p.allow_keys(plan, "plan", {"stages", "experts", "redundancy"});
  if (plan["redundancy"]) {
    c.redundancy_line = line_of(plan["redundancy"]);
    c.redundancy = static_cast<int>(p.integer_at(plan["redundancy"], "plan.redundancy", 1, 2));
  }
  const YAML::Node stages = plan["stages"];
  if (!stages || !stages.IsSequence() || stages.size() == 0)
    p.error(line_of(plan), "plan.stages must be a non-empty list of {node, layers}");
  for (const auto& s : stages) {
    p.require_map(s, "a stage");
    p.allow_keys(s, "a stage", {"node", "layers"});
    stage_spec spec;
    spec.line = line_of(s);
    if (!s["node"]) p.error(spec.line, "stage without a 'node'");
    spec.node = node_ref(s["node"], "stage node");
    if (!s["layers"]) p.error(spec.line, "stage without 'layers' (an inclusive range like 0-2)");
    const auto layers = p.range_at(s["layers"], "stage layers");
    for (std::size_t i = 1; i < layers.size(); ++i)
      if (layers[i] != layers[i - 1] + 1)
        p.error(line_of(s["layers"]), "stage layers must be one contiguous range like 0-2");
    spec.layer_begin = layers.front();
    spec.layer_end = layers.back() + 1;
    if (!c.stages.empty()) {
      const auto& prev = c.stages.back();
      if (spec.layer_begin > prev.layer_end)
        p.error(spec.line, fmt::format("layers {}-{} are held by no stage (gap between the stage at line {} and this one)",
                                       prev.layer_end, spec.layer_begin - 1, prev.line));
      if (spec.layer_begin < prev.layer_end)
        p.error(spec.line, fmt::format("layers {}-{} overlap the stage at line {} (stages list layers in pipeline order)",
                                       spec.layer_begin, std::min(spec.layer_end, prev.layer_end) - 1, prev.line));
    } else if (spec.layer_begin != 0) {
      p.error(spec.line, fmt::format("layers 0-{} are held by no stage (the first stage must start at layer 0)",
                                     spec.layer_begin - 1));
    }
    c.stages.push_back(spec);
  }

  if (const YAML::Node experts = plan["experts"]) {
    if (experts.IsMap()) {
      p.allow_keys(experts, "plan.experts", {"policy", "nodes"});
      c.expert_policy_line = line_of(experts);
      c.expert_policy = experts["policy"] ? p.string_at(experts["policy"], "policy") : "";
      if (c.expert_policy != "split")
        p.error(c.expert_policy_line, fmt::format("plan.experts.policy '{}' is unknown (known: split)", c.expert_policy));
      if (!experts["nodes"] || !experts["nodes"].IsSequence() || experts["nodes"].size() == 0)
        p.error(c.expert_policy_line, "plan.experts.nodes must list the nodes that hold experts");
      for (const auto& n : experts["nodes"]) c.expert_policy_nodes.push_back(node_ref(n, "expert node"));
    } else if (experts.IsSequence()) {
      std::map<std::int64_t, int> owner_line;
      for (const auto& g : experts) {
        p.require_map(g, "an expert group");
        p.allow_keys(g, "an expert group", {"node", "experts"});
        expert_group_spec spec;
        spec.line = line_of(g);
        if (!g["node"]) p.error(spec.line, "expert group without a 'node'");
        spec.node = node_ref(g["node"], "expert node");
        if (!g["experts"]) p.error(spec.line, "expert group without 'experts' (ids or ranges like 0-15)");
        spec.experts = p.range_at(g["experts"], "experts");
        for (auto id : spec.experts) {
          const auto [it, inserted] = owner_line.emplace(id, spec.line);
          if (!inserted)
            p.error(line_of(g["experts"]),
                    fmt::format("expert {} is assigned twice (also at line {})", id, it->second));
        }
        std::sort(spec.experts.begin(), spec.experts.end());
        c.expert_groups.push_back(std::move(spec));
      }
    } else {
      p.error(line_of(experts), "plan.experts must be a list of {node, experts} or {policy: split, nodes: [...]}");
    }
  }
  return c;
}

cluster_config load_cluster_config(const std::filesystem::path& path) {
  std::ifstream in(path);
  if (!in) shoal::fail(errc::not_found, "{}: cannot open the cluster config", path.string());
  std::stringstream text;
  text << in.rdbuf();
  return parse_cluster_config(text.str(), path, path.parent_path());
}

void validate_against_model(cluster_config& c, const model_config& model) {
  const auto& last = c.stages.back();
  if (last.layer_end != model.num_hidden_layers)
    shoal::fail(errc::invalid_argument, "{}: the last stage ends at layer {} but the model has {} layers (0-{})",
                c.where(last.line), last.layer_end - 1, model.num_hidden_layers, model.num_hidden_layers - 1);
  if (!c.expert_policy.empty()) {
    const auto parts = static_cast<std::int64_t>(c.expert_policy_nodes.size());
    if (parts > model.n_routed_experts)
      shoal::fail(errc::invalid_argument, "{}: {} expert nodes for only {} routed experts",
                  c.where(c.expert_policy_line), parts, model.n_routed_experts);
    c.expert_groups.clear();
    for (std::int64_t i = 0; i < parts; ++i) {
      expert_group_spec g{.node = c.expert_policy_nodes[static_cast<std::size_t>(i)], .experts = {},
                          .line = c.expert_policy_line};
      for (auto e = model.n_routed_experts * i / parts; e < model.n_routed_experts * (i + 1) / parts; ++e)
        g.experts.push_back(e);
      c.expert_groups.push_back(std::move(g));
    }
    c.expert_policy.clear();
  }
  if (c.redundancy > 1) {
    if (c.expert_groups.empty())
      shoal::fail(errc::invalid_argument, "{}: plan.redundancy {} needs expert nodes (plan.experts); stages that hold "
                  "their own experts have no second copy", c.where(c.redundancy_line), c.redundancy);
    std::vector<std::string> expert_nodes;
    for (const auto& g : c.expert_groups)
      if (g.copy == 0 && std::find(expert_nodes.begin(), expert_nodes.end(), g.node) == expert_nodes.end())
        expert_nodes.push_back(g.node);
    if (expert_nodes.size() < 2)
      shoal::fail(errc::invalid_argument, "{}: plan.redundancy {} needs at least 2 expert nodes, the plan has {} ({})",
                  c.where(c.redundancy_line), c.redundancy, expert_nodes.size(), fmt::join(expert_nodes, ", "));
    // The second copy of each group goes to the next expert node in plan order, so that one
    // node's death leaves a copy of every expert.
    std::vector<expert_group_spec> copies;
    for (const auto& g : c.expert_groups) {
      if (g.copy != 0) continue;
      const auto at = std::find(expert_nodes.begin(), expert_nodes.end(), g.node) - expert_nodes.begin();
      auto second = g;
      second.copy = 1;
      second.node = expert_nodes[static_cast<std::size_t>(at + 1) % expert_nodes.size()];
      copies.push_back(std::move(second));
    }
    std::erase_if(c.expert_groups, [](const expert_group_spec& g) { return g.copy != 0; });
    c.expert_groups.insert(c.expert_groups.end(), copies.begin(), copies.end());
  }
  if (c.expert_groups.empty()) return;
  std::vector<bool> placed(static_cast<std::size_t>(model.n_routed_experts), false);
  for (const auto& g : c.expert_groups)
    for (auto id : g.experts) {
      if (id >= model.n_routed_experts)
        shoal::fail(errc::invalid_argument, "{}: expert {} does not exist (the model has {} routed experts, 0-{})",
                    c.where(g.line), id, model.n_routed_experts, model.n_routed_experts - 1);
      placed[static_cast<std::size_t>(id)] = true;
    }
  std::vector<std::int64_t> missing;
  for (std::size_t i = 0; i < placed.size(); ++i)
    if (!placed[i]) missing.push_back(static_cast<std::int64_t>(i));
  if (!missing.empty())
    shoal::fail(errc::invalid_argument, "{}: routed experts {} are placed on no expert group",
                c.where(c.expert_groups.front().line), fmt::join(missing, ","));
}

std::int64_t cache_blocks_for(const cluster_config& c, const model_config& model) {
  if (c.cache_blocks > 0) return c.cache_blocks;
  std::int64_t layers = 1;
  for (const auto& s : c.stages) layers = std::max(layers, s.layer_end - s.layer_begin);
  const std::int64_t block_bytes = layers * c.block_tokens * model.latent_dim() * static_cast<std::int64_t>(sizeof(float));
  if (block_bytes <= 0)
    shoal::fail(errc::invalid_argument, "{}: the model's latent width is {}; no cache can be sized for it",
                c.where(c.cache_line), model.latent_dim());
  const std::int64_t blocks = (c.cache_mb << 20) / block_bytes;
  if (blocks < 2)
    shoal::fail(errc::invalid_argument,
                "{}: cache_mb = {} holds {} blocks of {} tokens for a stage of {} layers ({} bytes each); at least 2 "
                "are needed",
                c.where(c.cache_line), c.cache_mb, blocks, c.block_tokens, layers, block_bytes);
  return blocks;
}

cluster_config embedded_cluster_config(const std::filesystem::path& model, std::int64_t num_layers, int threads) {
  cluster_config c;
  c.source = "<embedded>";
  c.model = model;
  c.nodes.push_back({.name = "local", .host = "127.0.0.1", .port = 0, .devices = {"cpu"}, .line = 0});
  c.head = "local";
  c.stages.push_back({.node = "local", .layer_begin = 0, .layer_end = num_layers, .line = 0});
  c.threads = threads;
  return c;
}

}  // namespace shoal::config
