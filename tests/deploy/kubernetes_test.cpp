// deploy/kubernetes: every document parses, the objects refer to each other correctly, the
// embedded cluster config is what `shoal plan` writes and Shoal's parser accepts, and (where a
// loopback API server answers) kubectl's client-side dry run accepts the whole set.

#include "../tools/run_shoal.hpp"
#include "skip.hpp"

#include "shoal/config/cluster_config.hpp"
#include "shoal/runtime/deployment_plan.hpp"

#include <catch2/catch.hpp>
#include <yaml-cpp/yaml.h>

#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

namespace fs = std::filesystem;

namespace {

const fs::path kDir = fs::path(SHOAL_SOURCE_DIR) / "deploy" / "kubernetes";

std::string slurp(const fs::path& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

// Every object of the manifests, by "Kind/name".
struct manifests {
  std::map<std::string, YAML::Node> objects;
  std::vector<std::string> files;

  void load(const fs::path& file) {
    files.push_back(file.filename().string());
    for (const auto& doc : YAML::LoadAll(slurp(file))) {
      if (!doc || doc.IsNull()) continue;
      INFO(file);
      REQUIRE(doc.IsMap());
      REQUIRE(doc["apiVersion"]);
      REQUIRE(doc["kind"]);
      REQUIRE(doc["metadata"]["name"]);
      const auto key = doc["kind"].as<std::string>() + "/" + doc["metadata"]["name"].as<std::string>();
      REQUIRE(objects.emplace(key, doc).second);
    }
  }
  const YAML::Node& get(const std::string& key) const {
    INFO(key);
    const auto it = objects.find(key);
    REQUIRE(it != objects.end());
    return it->second;
  }
};

manifests load_all() {
  manifests m;
  const auto kustomization = YAML::LoadFile((kDir / "kustomization.yaml").string());
  std::set<std::string> listed;
  for (const auto& r : kustomization["resources"]) listed.insert(r.as<std::string>());
  for (const auto& entry : fs::directory_iterator(kDir)) {
    const auto name = entry.path().filename().string();
    if (name == "kustomization.yaml") continue;
    if (entry.path().extension() == ".yaml") {
      INFO(name << " is applied by nothing: list it in kustomization.yaml");
      CHECK(listed.count(name) == 1);
    }
    if (entry.path().extension() == ".yaml" || name.ends_with(".yaml.example")) m.load(entry.path());
  }
  for (const auto& name : listed) CHECK(fs::exists(kDir / name));
  return m;
}

bool labels_match(const YAML::Node& selector, const YAML::Node& labels) {
  if (!selector || !selector.IsMap() || selector.size() == 0) return false;
  for (const auto& kv : selector)
    if (!labels[kv.first.as<std::string>()] ||
        labels[kv.first.as<std::string>()].as<std::string>() != kv.second.as<std::string>())
      return false;
  return true;
}

std::vector<std::string> args_of(const YAML::Node& container) {
  std::vector<std::string> args;
  for (const auto& a : container["args"]) args.push_back(a.as<std::string>());
  return args;
}

std::string arg_after(const std::vector<std::string>& args, const std::string& flag) {
  for (std::size_t i = 0; i + 1 < args.size(); ++i)
    if (args[i] == flag) return args[i + 1];
  FAIL("no " << flag << " in the container's args");
  return {};
}

// The file a volume mount plus a volume's item puts at `path`, as "volume name".
std::string volume_at(const YAML::Node& pod_spec, const YAML::Node& container, const std::string& path,
                      const manifests& m) {
  for (const auto& mount : container["volumeMounts"]) {
    const auto dir = mount["mountPath"].as<std::string>();
    if (!path.starts_with(dir + "/")) continue;
    const auto rest = path.substr(dir.size() + 1);
    for (const auto& v : pod_spec["volumes"]) {
      if (v["name"].as<std::string>() != mount["name"].as<std::string>()) continue;
      if (v["persistentVolumeClaim"]) return v["name"].as<std::string>();
      const bool config_map = static_cast<bool>(v["configMap"]);
      const auto source = config_map ? v["configMap"] : v["secret"];
      REQUIRE(source);
      const auto object = config_map ? "ConfigMap/" + source["name"].as<std::string>()
                                     : "Secret/" + source["secretName"].as<std::string>();
      const auto& target = m.get(object);
      for (const auto& item : source["items"])
        if (item["path"].as<std::string>() == rest) {
          const auto key = item["key"].as<std::string>();
          const auto data = target["data"] ? target["data"] : target["stringData"];
          INFO(object << " has no key " << key);
          CHECK(data[key]);
          return v["name"].as<std::string>();
        }
    }
  }
  FAIL(path << " is on no mounted volume");
  return {};
}

}  // namespace

TEST_CASE("the Kubernetes manifests parse and refer to each other correctly", "[k8s]") {
  const auto m = load_all();
  const auto& sts = m.get("StatefulSet/shoal-node");
  const auto& headless = m.get("Service/shoal-node");
  const auto& gateway = m.get("Deployment/shoal-gateway");
  const auto& gateway_service = m.get("Service/shoal-gateway");
  const auto& config_map = m.get("ConfigMap/shoal-cluster");

  // Selectors: the workloads select their own pods, the Services select them too.
  for (const auto* workload : {&sts, &gateway})
    CHECK(labels_match((*workload)["spec"]["selector"]["matchLabels"], (*workload)["spec"]["template"]["metadata"]["labels"]));
  CHECK(labels_match(headless["spec"]["selector"], sts["spec"]["template"]["metadata"]["labels"]));
  CHECK_FALSE(labels_match(headless["spec"]["selector"], gateway["spec"]["template"]["metadata"]["labels"]));
  CHECK(labels_match(gateway_service["spec"]["selector"], gateway["spec"]["template"]["metadata"]["labels"]));
  CHECK_FALSE(labels_match(gateway_service["spec"]["selector"], sts["spec"]["template"]["metadata"]["labels"]));
  const auto& policy = m.get("NetworkPolicy/shoal-node");
  CHECK(labels_match(policy["spec"]["podSelector"]["matchLabels"], sts["spec"]["template"]["metadata"]["labels"]));
  CHECK(labels_match(policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"],
                     gateway["spec"]["template"]["metadata"]["labels"]));

  // Stable DNS names: a headless Service the StatefulSet names, published before readiness.
  CHECK(sts["spec"]["serviceName"].as<std::string>() == "shoal-node");
  CHECK(headless["spec"]["clusterIP"].as<std::string>() == "None");
  CHECK(headless["spec"]["publishNotReadyAddresses"].as<bool>());

  const auto& node_pod = sts["spec"]["template"]["spec"];
  const auto& node = node_pod["containers"][0];
  const auto& gateway_pod = gateway["spec"]["template"]["spec"];
  const auto& gw = gateway_pod["containers"][0];

  // Probes on the gateway: readiness /ready, liveness /health, on a port the container has.
  CHECK(gw["readinessProbe"]["httpGet"]["path"].as<std::string>() == "/ready");
  CHECK(gw["livenessProbe"]["httpGet"]["path"].as<std::string>() == "/health");
  std::set<std::string> gateway_ports;
  for (const auto& p : gw["ports"]) gateway_ports.insert(p["name"].as<std::string>());
  CHECK(gateway_ports.count(gw["readinessProbe"]["httpGet"]["port"].as<std::string>()) == 1);
  CHECK(gateway_ports.count(gw["livenessProbe"]["httpGet"]["port"].as<std::string>()) == 1);
  CHECK(gateway_ports.count(gateway_service["spec"]["ports"][0]["targetPort"].as<std::string>()) == 1);
  CHECK(node["ports"][0]["name"].as<std::string>() == headless["spec"]["ports"][0]["targetPort"].as<std::string>());

  // Anti-affinity: one node pod per machine (required), gateways spread (preferred).
  const auto& required = node_pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0];
  CHECK(required["topologyKey"].as<std::string>() == "kubernetes.io/hostname");
  CHECK(labels_match(required["labelSelector"]["matchLabels"], sts["spec"]["template"]["metadata"]["labels"]));
  const auto& preferred = gateway_pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0];
  CHECK(labels_match(preferred["podAffinityTerm"]["labelSelector"]["matchLabels"],
                     gateway["spec"]["template"]["metadata"]["labels"]));

  // The cluster config: parsed by Shoal's parser, checked against DeepSeek-V3's shapes.
  const auto text = config_map["data"]["cluster.yaml"].as<std::string>();
  auto cluster = shoal::config::parse_cluster_config(text, "configmap.yaml", "/");
  const auto model = shoal::runtime::deepseek_v3_config(true);
  shoal::config::validate_against_model(cluster, model);
  const auto replicas = sts["spec"]["replicas"].as<std::size_t>();
  REQUIRE(cluster.nodes.size() == replicas);
  const auto node_port = node["ports"][0]["containerPort"].as<int>();
  const auto gpus = node["resources"]["limits"]["nvidia.com/gpu"].as<std::size_t>();
  CHECK(node["resources"]["requests"]["nvidia.com/gpu"].as<std::size_t>() == gpus);
  for (std::size_t i = 0; i < replicas; ++i) {
    const auto pod = "shoal-node-" + std::to_string(i);
    CHECK(cluster.nodes[i].name == pod);
    CHECK(cluster.nodes[i].host == pod + ".shoal-node");
    CHECK(cluster.nodes[i].port == node_port);
    CHECK(cluster.nodes[i].devices.size() == gpus);
  }
  // Each pod runs the node named like itself, from the mounted config.
  const auto node_args = args_of(node);
  CHECK(node_args.front() == "node");
  CHECK(arg_after(node_args, "--name") == "$(POD_NAME)");
  CHECK(node["env"][0]["name"].as<std::string>() == "POD_NAME");
  CHECK(node["env"][0]["valueFrom"]["fieldRef"]["fieldPath"].as<std::string>() == "metadata.name");
  CHECK(volume_at(node_pod, node, arg_after(node_args, "--config"), m) == "cluster-config");
  CHECK(volume_at(node_pod, node, cluster.admin_token_file.string(), m) == "admin-token");
  CHECK(volume_at(node_pod, node, cluster.model.string() + "/config.json", m) == "models");

  // The gateway fronts the head and its standby, and reads the same checkpoint and the API
  // keys Secret.
  const auto gw_args = args_of(gw);
  CHECK(gw_args.front() == "serve");
  const auto* head = cluster.find_node(cluster.head);
  const auto* standby = cluster.find_node(cluster.standby);
  REQUIRE(head);
  REQUIRE(standby);
  CHECK(standby != head);
  CHECK(arg_after(gw_args, "--cluster") == head->host + ":" + std::to_string(head->port) + "," + standby->host + ":" +
                                               std::to_string(standby->port));
  CHECK(arg_after(gw_args, "--model") == cluster.model.string());
  CHECK(volume_at(gateway_pod, gw, cluster.model.string() + "/tokenizer.json", m) == "models");
  CHECK(volume_at(gateway_pod, gw, arg_after(gw_args, "--api-keys"), m) == "api-keys");
  CHECK(std::to_string(gateway_service["spec"]["ports"][0]["port"].as<int>()) == arg_after(gw_args, "--port"));
  CHECK(gateway_pod["terminationGracePeriodSeconds"].as<int>() > std::stoi(arg_after(gw_args, "--drain-seconds")));
}

TEST_CASE("the ConfigMap's cluster config is what shoal plan writes for its command", "[k8s]") {
  const auto text = slurp(kDir / "configmap.yaml");
  // The command is in the file's comment; run it as written there.
  const auto at = text.find("#   shoal plan ");
  REQUIRE(at != std::string::npos);
  std::string command;
  for (auto pos = at; pos < text.size() && text.compare(pos, 1, "#") == 0;) {
    auto end = text.find('\n', pos);
    auto line = text.substr(pos + 1, end - pos - 1);
    const bool more = !line.empty() && line.back() == '\\';
    if (more) line.pop_back();
    command += line;
    pos = end + 1;
    if (!more) break;
  }
  command = command.substr(command.find("plan "));
  const auto out = fs::temp_directory_path() / ("shoal-k8s-plan-" + std::to_string(::getpid()) + ".yaml");
  const auto file_at = command.find("--write-config cluster.yaml");
  REQUIRE(file_at != std::string::npos);
  command.replace(file_at, 27, "--write-config " + out.string());
  const auto r = shoal::test::run(command);
  REQUIRE(r.exit_code == 0);
  const auto written = slurp(out);
  fs::remove(out);
  const auto embedded = YAML::Load(text)["data"]["cluster.yaml"].as<std::string>();
  CHECK(embedded == written);
}

TEST_CASE("kubectl accepts the manifests", "[kubectl]") {
  if (std::system("command -v kubectl >/dev/null 2>&1") != 0) {
    shoal::testing::skip("kubectl is not installed");
    return;
  }
  // kustomize builds offline; it proves kubectl reads every resource the kustomization lists.
  const auto out = fs::temp_directory_path() / ("shoal-kubectl-" + std::to_string(::getpid()));
  auto sh = [&](const std::string& command) {
    const int status = std::system((command + " >" + out.string() + " 2>&1").c_str());
    const auto text = slurp(out);
    fs::remove(out);
    return std::pair{WIFEXITED(status) ? WEXITSTATUS(status) : -1, text};
  };
  const auto [built, manifest] = sh("timeout 60 kubectl kustomize " + kDir.string());
  INFO(manifest);
  REQUIRE(built == 0);
  std::size_t objects = 0;
  for (const auto& doc : YAML::LoadAll(manifest))
    if (doc && doc.IsMap()) ++objects;
  CHECK(objects == 6);

  // A client-side dry run still asks an API server for its resource types. Only a loopback
  // one is tried (an empty kubeconfig makes kubectl use localhost:8080): tests reach no other host.
  const auto kubeconfig = fs::temp_directory_path() / ("shoal-kubeconfig-" + std::to_string(::getpid()));
  std::ofstream(kubeconfig) << "";
  const auto [applied, output] =
      sh("KUBECONFIG=" + kubeconfig.string() + " timeout 60 kubectl apply --dry-run=client --request-timeout=5s -k " +
         kDir.string());
  fs::remove(kubeconfig);
  if (applied != 0 && (output.find("connection refused") != std::string::npos ||
                       output.find("couldn't get current server API") != std::string::npos ||
                       output.find("unable to recognize") != std::string::npos)) {
    shoal::testing::skip("kubectl apply --dry-run=client needs an API server for discovery and none answers on "
                         "loopback; kustomize build passed");
    return;
  }
  INFO(output);
  CHECK(applied == 0);
  CHECK(output.find("statefulset.apps/shoal-node created (dry run)") != std::string::npos);
}
