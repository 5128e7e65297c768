// Cluster configs: what parses, and that every mistake is refused naming file and line.

#include "shoal/base/error.hpp"
#include "shoal/config/cluster_config.hpp"

#include <catch2/catch.hpp>

#include <string>

using shoal::config::parse_cluster_config;

namespace {

const char* const kGood = R"(model: ckpt
nodes:
  - name: a
    port: 7000
  - name: b
    host: 10.0.0.2
    port: 7000
    devices: [cpu, cuda:1]
  - name: c
    port: 7001
plan:
  stages:
    - node: a
      layers: 0-2
    - node: b
      layers: 3-5
  experts:
    - node: b
      experts: 0-15
    - node: c
      experts: [16-30, 31]
)";

// The error message of parsing `text`, or "" when it parses.
std::string error_of(const std::string& text) {
  try {
    parse_cluster_config(text, "cluster.yaml", "/base");
  } catch (const shoal::error& e) {
    CHECK(e.code() == shoal::errc::invalid_argument);
    return e.what();
  }
  return "";
}

std::string replace(std::string text, const std::string& from, const std::string& to) {
  const auto pos = text.find(from);
  REQUIRE(pos != std::string::npos);
  return text.replace(pos, from.size(), to);
}

shoal::config::model_config model(std::int64_t layers, std::int64_t experts) {
  shoal::config::model_config m;
  m.num_hidden_layers = layers;
  m.n_routed_experts = experts;
  return m;
}

}  // namespace

TEST_CASE("a good cluster config parses with everything in place") {
  const auto c = parse_cluster_config(kGood, "cluster.yaml", "/base");
  CHECK(c.model == "/base/ckpt");
  REQUIRE(c.nodes.size() == 3);
  CHECK(c.nodes[0].host == "127.0.0.1");
  CHECK(c.nodes[1].host == "10.0.0.2");
  CHECK(c.nodes[1].devices == std::vector<std::string>{"cpu", "cuda:1"});
  CHECK(c.nodes[2].line == 9);
  CHECK(c.head == "a");
  REQUIRE(c.stages.size() == 2);
  CHECK(c.stages[1].layer_begin == 3);
  CHECK(c.stages[1].layer_end == 6);
  REQUIRE(c.expert_groups.size() == 2);
  CHECK(c.expert_groups[1].experts.size() == 16);
  CHECK(c.expert_groups[1].experts.back() == 31);
  auto copy = c;
  CHECK_NOTHROW(shoal::config::validate_against_model(copy, model(6, 32)));
}

TEST_CASE("a standby head is optional and names another node") {
  CHECK(parse_cluster_config(kGood, "cluster.yaml", "/base").standby.empty());
  const auto c = parse_cluster_config(replace(kGood, "model: ckpt", "model: ckpt\nhead: a\nstandby: c"), "cluster.yaml", "/base");
  CHECK(c.head == "a");
  CHECK(c.standby == "c");
  CHECK(c.other_head("a") == "c");
  CHECK(c.other_head("c") == "a");
  CHECK(c.other_head("b").empty());
  CHECK(parse_cluster_config(kGood, "cluster.yaml", "/base").other_head("a").empty());
}

TEST_CASE("actor threads steal work as CAF does unless the config asks them to share one queue") {
  CHECK(parse_cluster_config(kGood, "cluster.yaml", "/base").actor_scheduler == "stealing");
  CHECK(parse_cluster_config(replace(kGood, "model: ckpt", "model: ckpt\nactor_scheduler: sharing"), "cluster.yaml", "/base")
            .actor_scheduler == "sharing");
}

TEST_CASE("expert copies get their weights from a running copy unless the config says checkpoint") {
  CHECK(parse_cluster_config(kGood, "cluster.yaml", "/base").copy_weights_from == "peer");
  CHECK(parse_cluster_config(replace(kGood, "model: ckpt", "model: ckpt\ncopy_weights_from: checkpoint"), "cluster.yaml",
                             "/base")
            .copy_weights_from == "checkpoint");
}

TEST_CASE("model versions served side by side: this cluster's name, the others' heads and the split") {
  const auto plain = parse_cluster_config(kGood, "cluster.yaml", "/base");
  CHECK(plain.version == "default");
  CHECK(plain.versions.empty());
  CHECK(plain.split.empty());
  const auto c = parse_cluster_config(
      replace(kGood, "model: ckpt",
              "model: ckpt\nversion: v1\nversions:\n  - {name: v2-canary, head: 10.0.0.9:7610}\nsplit: {v1: 95, v2-canary: 5}"),
      "cluster.yaml", "/base");
  CHECK(c.version == "v1");
  REQUIRE(c.versions.size() == 1);
  CHECK(c.versions[0].name == "v2-canary");
  CHECK(c.versions[0].host == "10.0.0.9");
  CHECK(c.versions[0].port == 7610);
  CHECK(c.split == std::vector<std::pair<std::string, std::uint32_t>>{{"v1", 95}, {"v2-canary", 5}});
}

TEST_CASE("join_secret_file is resolved against the config's directory") {
  CHECK(parse_cluster_config(kGood, "cluster.yaml", "/base").join_secret_file.empty());
  CHECK(parse_cluster_config(replace(kGood, "model: ckpt", "model: ckpt\njoin_secret_file: secrets/join"), "cluster.yaml", "/base")
            .join_secret_file == "/base/secrets/join");
  CHECK(parse_cluster_config(replace(kGood, "model: ckpt", "model: ckpt\njoin_secret_file: /etc/shoal/join"), "cluster.yaml",
                             "/base")
            .join_secret_file == "/etc/shoal/join");
}

TEST_CASE("cluster config mistakes are refused with file and line") {
  CHECK(error_of(replace(kGood, "    - node: b\n      layers: 3-5", "    - node: x\n      layers: 3-5"))
            .find("cluster.yaml:15: stage node: unknown node 'x' (nodes: a, b, c)") != std::string::npos);
  CHECK(error_of(replace(kGood, "layers: 3-5", "layers: 4-5")).find("cluster.yaml:15: layers 3-3 are held by no stage") !=
        std::string::npos);
  CHECK(error_of(replace(kGood, "layers: 3-5", "layers: 2-5")).find("cluster.yaml:15: layers 2-2 overlap") !=
        std::string::npos);
  CHECK(error_of(replace(kGood, "layers: 0-2", "layers: 1-2")).find("cluster.yaml:13: layers 0-0 are held by no stage") !=
        std::string::npos);
  CHECK(error_of(replace(kGood, "[16-30, 31]", "[15-31]")).find("cluster.yaml:21: expert 15 is assigned twice (also at line 18)") !=
        std::string::npos);
  CHECK(error_of(replace(kGood, "port: 7001", "port: 70000")).find("cluster.yaml:10: port = 70000 is out of range") !=
        std::string::npos);
  CHECK(error_of(replace(kGood, "port: 7001", "port: 7000")).find("cluster.yaml:10: node 'c': 127.0.0.1:7000 is already used") !=
        std::string::npos);
  CHECK(error_of(replace(kGood, "  - name: c", "  - name: a")).find("cluster.yaml:9: node 'a' is defined twice") !=
        std::string::npos);
  CHECK(error_of(replace(kGood, "cuda:1", "gpu1")).find("cluster.yaml:8: device 'gpu1'") != std::string::npos);
  CHECK(error_of(replace(kGood, "      layers: 0-2", "      layer: 0-2")).find("cluster.yaml:14: unknown key 'layer'") !=
        std::string::npos);
  CHECK(error_of(replace(kGood, "model: ckpt", "model: [ckpt")).find("cluster.yaml:") != std::string::npos);
  CHECK(error_of(replace(kGood, "experts: 0-15", "experts: 15-0")).find("cluster.yaml:19: experts: range '15-0' is empty") !=
        std::string::npos);
}

TEST_CASE("cluster configs are checked against the model") {
  auto c = parse_cluster_config(kGood, "cluster.yaml", "/base");
  try {
    shoal::config::validate_against_model(c, model(8, 32));
    FAIL("8 layers accepted");
  } catch (const shoal::error& e) {
    CHECK(std::string(e.what()).find("cluster.yaml:15: the last stage ends at layer 5 but the model has 8 layers") !=
          std::string::npos);
  }
  auto missing = parse_cluster_config(replace(kGood, "[16-30, 31]", "[16-30]"), "cluster.yaml", "/base");
  try {
    shoal::config::validate_against_model(missing, model(6, 32));
    FAIL("expert 31 missing accepted");
  } catch (const shoal::error& e) {
    CHECK(std::string(e.what()).find("routed experts 31 are placed on no expert group") != std::string::npos);
  }
  auto extra = parse_cluster_config(replace(kGood, "[16-30, 31]", "[16-31, 40]"), "cluster.yaml", "/base");
  CHECK_THROWS_WITH(shoal::config::validate_against_model(extra, model(6, 32)),
                    Catch::Contains("cluster.yaml:20: expert 40 does not exist"));
}

TEST_CASE("the split policy divides experts into contiguous, disjoint groups") {
  auto c = parse_cluster_config(replace(kGood, R"(  experts:
    - node: b
      experts: 0-15
    - node: c
      experts: [16-30, 31]
)", "  experts: {policy: split, nodes: [b, c, a]}\n"),
                                "cluster.yaml", "/base");
  shoal::config::validate_against_model(c, model(6, 32));
  REQUIRE(c.expert_groups.size() == 3);
  CHECK(c.expert_groups[0].experts.front() == 0);
  CHECK(c.expert_groups[0].experts.back() == 9);
  CHECK(c.expert_groups[1].experts.front() == 10);
  CHECK(c.expert_groups[2].experts.back() == 31);
  CHECK(c.expert_groups[0].experts.size() + c.expert_groups[1].experts.size() + c.expert_groups[2].experts.size() == 32);
  CHECK(error_of(replace(kGood, R"(    - node: b
      experts: 0-15
    - node: c
      experts: [16-30, 31]
)", "    policy: even\n")).find("cluster.yaml:18: plan.experts.policy 'even' is unknown") != std::string::npos);
}

TEST_CASE("redundancy 2 puts a second copy of every expert group on the next expert node") {
  auto c = parse_cluster_config(replace(kGood, "plan:\n", "plan:\n  redundancy: 2\n"), "cluster.yaml", "/base");
  shoal::config::validate_against_model(c, model(6, 32));
  REQUIRE(c.expert_groups.size() == 4);
  CHECK(c.expert_groups[2].copy == 1);
  CHECK(c.expert_groups[2].node == "c");  // b's group: its copy on c
  CHECK(c.expert_groups[2].experts == c.expert_groups[0].experts);
  CHECK(c.expert_groups[3].node == "b");  // and c's on b
  CHECK(c.expert_groups[3].experts == c.expert_groups[1].experts);
  shoal::config::validate_against_model(c, model(6, 32));  // idempotent
  CHECK(c.expert_groups.size() == 4);

  // One expert node cannot hold the second copy; stages holding experts have none.
  auto lonely = parse_cluster_config(replace(kGood, "plan:\n", "plan:\n  redundancy: 2\n"), "cluster.yaml", "/base");
  lonely.expert_groups[1].node = "b";
  CHECK_THROWS_WITH(shoal::config::validate_against_model(lonely, model(6, 32)),
                    Catch::Contains("cluster.yaml:12: plan.redundancy 2 needs at least 2 expert nodes, the plan has 1 (b)"));
  const auto three = error_of(replace(kGood, "plan:\n", "plan:\n  redundancy: 3\n"));
  CHECK_THAT(three, Catch::StartsWith("cluster.yaml:12:") && Catch::Contains("plan.redundancy"));
}

TEST_CASE("the example configs parse and fit the golden model") {
  for (const char* name : {"embedded.yaml", "local-4.yaml"}) {
    auto c = shoal::config::load_cluster_config(std::string(SHOAL_SOURCE_DIR) + "/config/examples/" + name);
    CHECK_NOTHROW(shoal::config::validate_against_model(c, model(6, 32)));
  }
  {
    // The one for HTTP serving, on the tiny preset of `shoal make-model` (4 layers, 16 experts).
    auto c = shoal::config::load_cluster_config(std::string(SHOAL_SOURCE_DIR) + "/config/examples/tiny-4.yaml");
    CHECK(c.standby == "stage1");
    CHECK(c.model.filename() == "tiny");
    CHECK_NOTHROW(shoal::config::validate_against_model(c, model(4, 16)));
  }
}

TEST_CASE("every refusal of a cluster config names the file and the line") {
  const auto refused = [](const std::string& text, const std::string& expected) {
    const std::string message = error_of(text);
    CAPTURE(text);
    CHECK_THAT(message, Catch::StartsWith(expected));
  };
  refused("- a\n- b\n", "cluster.yaml:1: the cluster config must be a mapping with keys model, nodes, plan");
  CHECK_THAT(error_of("model: [ckpt\n"), Catch::StartsWith("cluster.yaml:") && Catch::Contains(": not valid YAML: "));
  refused(replace(kGood, "model: ckpt\n", ""), "cluster.yaml:1: missing key 'model' (the checkpoint directory)");
  refused(replace(kGood, "model: ckpt", "model: {dir: ckpt}"), "cluster.yaml:1: model must be a string");
  refused(replace(kGood, "model: ckpt", "model: ckpt\nthreads: lots"), "cluster.yaml:2: threads must be an integer, got 'lots'");
  refused(replace(kGood, "model: ckpt", "model: ckpt\nmax_batch: 0"), "cluster.yaml:2: max_batch = 0 is out of range [1, 65536]");
  refused(replace(kGood, "model: ckpt", "model: ckpt\nreplicas: 2"), "cluster.yaml:2: unknown key 'replicas' in the cluster config");
  refused(replace(kGood, "model: ckpt", "model: ckpt\nheartbeat_misses: 0"), "cluster.yaml:2: heartbeat_misses = 0 is out of range [1, 1000]");
  refused(replace(kGood, "model: ckpt", "model: ckpt\nreplace_after_s: soon"), "cluster.yaml:2: replace_after_s must be an integer, got 'soon'");
  refused(replace(kGood, "model: ckpt", "model: ckpt\nload_window_s: 0"), "cluster.yaml:2: load_window_s = 0 is out of range [1, 86400]");
  refused(replace(kGood, "model: ckpt", "model: ckpt\nrebalance_every_s: -1"), "cluster.yaml:2: rebalance_every_s = -1 is out of range [0, 604800]");
  refused(replace(kGood, "model: ckpt", "model: ckpt\nrebalance_max_copies: 0"), "cluster.yaml:2: rebalance_max_copies = 0 is out of range [1, 4096]");
  refused(replace(kGood, "model: ckpt", "model: ckpt\nadmin_audit_log: [a]"), "cluster.yaml:2: admin_audit_log must be a string");
  refused(replace(kGood, "model: ckpt", "model: ckpt\nactor_scheduler: fifo"),
          "cluster.yaml:2: actor_scheduler must be sharing or stealing, got 'fifo'");
  refused(replace(kGood, "model: ckpt", "model: ckpt\ncopy_weights_from: disk"),
          "cluster.yaml:2: copy_weights_from must be peer or checkpoint, got 'disk'");
  refused(replace(kGood, "model: ckpt", "model: ckpt\nversion: 'v 1'"),
          "cluster.yaml:2: version 'v 1' must be 1-64 letters, digits, '.', '_' or '-'");
  refused(replace(kGood, "model: ckpt", "model: ckpt\nversions: v2"),
          "cluster.yaml:2: versions must be a list of {name, head: HOST:PORT}");
  refused(replace(kGood, "model: ckpt", "model: ckpt\nversions:\n  - {name: v2}"),
          "cluster.yaml:3: version 'v2' has no 'head' (HOST:PORT of its head node)");
  refused(replace(kGood, "model: ckpt", "model: ckpt\nversions:\n  - {name: v2, head: somewhere}"),
          "cluster.yaml:3: version 'v2': head 'somewhere' must be HOST:PORT");
  refused(replace(kGood, "model: ckpt", "model: ckpt\nversions:\n  - {name: v2, head: h:70000}"),
          "cluster.yaml:3: version 'v2': head 'h:70000' must be HOST:PORT");
  refused(replace(kGood, "model: ckpt", "model: ckpt\nversions:\n  - {name: default, head: h:1}"),
          "cluster.yaml:3: version 'default' is this cluster's own version");
  refused(replace(kGood, "model: ckpt", "model: ckpt\nversions:\n  - {name: v2, head: h:1}\n  - {name: v2, head: h:2}"),
          "cluster.yaml:4: version 'v2' is defined twice");
  refused(replace(kGood, "model: ckpt", "model: ckpt\nversions:\n  - {name: v2, head: h:1, weight: 5}"),
          "cluster.yaml:3: unknown key 'weight' in a version");
  refused(replace(kGood, "model: ckpt", "model: ckpt\nsplit: {v9: 1}"),
          "cluster.yaml:2: split: no version 'v9' (this cluster is 'default'; others go under versions)");
  refused(replace(kGood, "model: ckpt", "model: ckpt\nsplit: {default: 0}"),
          "cluster.yaml:2: split: at least one version needs a weight above 0");
  refused(replace(kGood, "model: ckpt", "model: ckpt\nsplit: {default: -1}"),
          "cluster.yaml:2: split weight = -1 is out of range [0, 1000000]");
  refused(replace(kGood, "model: ckpt", "model: ckpt\njoin_secret_file: [a, b]"), "cluster.yaml:2: join_secret_file must be a string");
  refused(replace(kGood, "model: ckpt", "model: ckpt\njoin_secret_file: ''"), "cluster.yaml:2: join_secret_file must name a file");
  refused(replace(kGood, "model: ckpt", "model: ckpt\njoin_secrets: s"), "cluster.yaml:2: unknown key 'join_secrets' in the cluster config");
  refused(replace(kGood, "port: 7001", "port: 7001\n    memory_gb: lots"), "cluster.yaml:11: memory_gb must be a number, got 'lots'");
  refused(replace(kGood, "port: 7001", "port: 7001\n    memory_gb: -1"), "cluster.yaml:11: memory_gb = -1 is out of range [0, 1000000]");
  refused("model: ckpt\nplan: {stages: [{node: a, layers: 0-1}]}\n",
          "cluster.yaml:1: 'nodes' must be a non-empty list of {name, host, port, devices}");
  refused("model: ckpt\nnodes: []\n", "cluster.yaml:2: 'nodes' must be a non-empty list");
  refused(replace(kGood, "  - name: c\n    port: 7001", "  - port: 7001"), "cluster.yaml:9: node without a 'name'");
  refused(replace(kGood, "  - name: c", "  - name: c d"), "cluster.yaml:9: node name 'c d' must be non-empty without spaces, '/' or ':'");
  refused(replace(kGood, "  - name: c", "  - name: n:1"), "cluster.yaml:9: node name 'n:1' must be non-empty");
  refused(replace(kGood, "  - name: c", "  - name: ''"), "cluster.yaml:9: node name '' must be non-empty");
  refused(replace(kGood, "  - name: c\n    port: 7001", "  - name: c"), "cluster.yaml:9: node 'c' has no 'port'");
  refused(replace(kGood, "port: 7001", "port: seven"), "cluster.yaml:10: port must be an integer, got 'seven'");
  refused(replace(kGood, "port: 7001", "port: 7001.5"), "cluster.yaml:10: port must be an integer, got '7001.5'");
  refused(replace(kGood, "port: 7001", "port: [7001]"), "cluster.yaml:10: port must be an integer, got ''");
  refused(replace(kGood, "devices: [cpu, cuda:1]", "devices: cpu"), "cluster.yaml:8: devices must be a list like [cpu] or [cuda:0]");
  refused(replace(kGood, "cuda:1", "cuda:x"), "cluster.yaml:8: device 'cuda:x' is neither 'cpu' nor 'cuda:N'");
  refused(replace(kGood, "  - name: c\n", "  - name: c\n    ? [x, y]\n    : 1\n"), "cluster.yaml:10: a key in a node must be a string");
  refused(replace(kGood, "  - name: c\n    port: 7001", "  - c"), "cluster.yaml:9: a node must be a mapping");
  refused(replace(kGood, "model: ckpt", "model: ckpt\nhead: z"), "cluster.yaml:2: head: unknown node 'z' (nodes: a, b, c)");
  refused(replace(kGood, "model: ckpt", "model: ckpt\nstandby: z"), "cluster.yaml:2: standby: unknown node 'z' (nodes: a, b, c)");
  refused(replace(kGood, "model: ckpt", "model: ckpt\nhead: b\nstandby: b"),
          "cluster.yaml:3: standby: 'b' is the head; the standby must be another node");
  const std::string before_plan = std::string(kGood).substr(0, std::string(kGood).find("plan:"));
  refused(before_plan, "cluster.yaml:1: missing key 'plan' (pipeline stages and expert placement)");
  refused(before_plan + "plan: [1]\n", "cluster.yaml:11: plan must be a mapping");
  refused(replace(kGood, "plan:\n  stages:\n    - node: a\n      layers: 0-2\n    - node: b\n      layers: 3-5\n", "plan:\n  stages: []\n"),
          "cluster.yaml:12: plan.stages must be a non-empty list of {node, layers}");
  refused(replace(kGood, "    - node: a\n      layers: 0-2", "    - layers: 0-2"), "cluster.yaml:13: stage without a 'node'");
  refused(replace(kGood, "    - node: a\n      layers: 0-2", "    - node: a"), "cluster.yaml:13: stage without 'layers'");
  refused(replace(kGood, "layers: 0-2", "layers: [0, 2]"), "cluster.yaml:14: stage layers must be one contiguous range like 0-2");
  refused(replace(kGood, "layers: 0-2", "layers: []"), "cluster.yaml:14: stage layers: an empty list");
  refused(replace(kGood, "layers: 0-2", "layers: 0-9223372036854775807"), "cluster.yaml:14: stage layers: id 9223372036854775807 is out of range");
  refused(replace(kGood, "experts: 0-15", "experts: 0-99999999999"), "cluster.yaml:19: experts: id 99999999999 is out of range");
  refused(replace(kGood, "experts: 0-15", "experts: 0..15"), "cluster.yaml:19: experts: '0..15' is not an id or an inclusive range like 0-15");
  refused(replace(kGood, "experts: 0-15", "experts: -1"), "cluster.yaml:19: experts: '-1' is not an id");
  refused(replace(kGood, "experts: 0-15", "experts: [0-7, x]"), "cluster.yaml:19: experts: 'x' is not an id");
  refused(replace(kGood, "    - node: b\n      experts: 0-15", "    - experts: 0-15"), "cluster.yaml:18: expert group without a 'node'");
  refused(replace(kGood, "    - node: b\n      experts: 0-15", "    - node: b"), "cluster.yaml:18: expert group without 'experts'");
  refused(replace(kGood, "    - node: b\n      experts: 0-15", "    - node: z\n      experts: 0-15"),
          "cluster.yaml:18: expert node: unknown node 'z'");
  const std::string groups = "    - node: b\n      experts: 0-15\n    - node: c\n      experts: [16-30, 31]\n";
  refused(replace(kGood, "  experts:\n" + groups, "  experts: 7\n"), "cluster.yaml:17: plan.experts must be a list");
  refused(replace(kGood, groups, "    policy: split\n"), "cluster.yaml:18: plan.experts.nodes must list the nodes that hold experts");
  refused(replace(kGood, groups, "    policy: split\n    nodes: []\n"), "cluster.yaml:18: plan.experts.nodes must list");
  refused(replace(kGood, groups, "    nodes: [b]\n"), "cluster.yaml:18: plan.experts.policy '' is unknown (known: split)");
  refused(replace(kGood, groups, "    policy: split\n    nodes: [b, q]\n"), "cluster.yaml:19: expert node: unknown node 'q'");

  // Against the model.
  auto split = parse_cluster_config(replace(kGood, groups, "    policy: split\n    nodes: [a, b, c]\n"), "cluster.yaml", "/base");
  CHECK_THROWS_WITH(shoal::config::validate_against_model(split, model(6, 2)),
                    Catch::StartsWith("cluster.yaml:18: 3 expert nodes for only 2 routed experts"));
  try {
    shoal::config::load_cluster_config("/nonexistent/cluster.yaml");
    FAIL("loaded a file that does not exist");
  } catch (const shoal::error& e) {
    CHECK(e.code() == shoal::errc::not_found);
    CHECK_THAT(e.what(), Catch::StartsWith("/nonexistent/cluster.yaml: cannot open the cluster config"));
  }
}

TEST_CASE("the admin audit log and the load window are read and resolved against the config's directory") {
  const auto c = parse_cluster_config(replace(kGood, "model: ckpt", "model: ckpt\nadmin_audit_log: logs/admin.jsonl\nload_window_s: 120"),
                                      "cluster.yaml", "/base");
  CHECK(c.admin_audit_log == std::filesystem::path("/base/logs/admin.jsonl"));
  CHECK(c.load_window_s == 120);
  const auto defaults = parse_cluster_config(kGood, "cluster.yaml", "/base");
  CHECK(defaults.admin_audit_log.empty());
  CHECK(defaults.load_window_s == 60);
}
