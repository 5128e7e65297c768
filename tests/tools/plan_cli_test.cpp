// shoal plan, run as a user runs it: answers, refusals and the cluster config it writes.

#include "free_port.hpp"
#include "run_shoal.hpp"

#include "shoal/config/cluster_config.hpp"
#include "shoal/config/model_config.hpp"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>

namespace fs = std::filesystem;
using json = nlohmann::json;
using shoal::test::run;

namespace {

struct temp_dir {
  fs::path path = fs::temp_directory_path() / ("shoal-plan-cli-" + std::to_string(::getpid()));
  temp_dir() { fs::create_directories(path); }
  ~temp_dir() { fs::remove_all(path); }
};

const std::string kTiny = std::string(SHOAL_TEST_DATA_DIR) + "/golden/tiny-b-bf16/ckpt";

}  // namespace

TEST_CASE("plan answers for DeepSeek-V3 on 8 H200 and on 8 H100 in BF16", "[cli][plan]") {
  const auto h200 = run("plan --preset deepseek-v3 --nodes 1 --gpus-per-node 8 --gpu-mem 141GB --json");
  REQUIRE(h200.exit_code == 0);
  const auto j = json::parse(h200.out);
  CHECK(j["fits"] == true);
  CHECK(j["model"]["parameters"].get<double>() == Approx(671.03e9).epsilon(1e-4));
  CHECK(j["model"]["weights"] == "fp8");
  CHECK(j["gpus"].size() == 8);
  CHECK(j["stages"][0]["layers"] == "0-60");
  CHECK(j["cache"]["tokens"].get<std::int64_t>() >= 64 * 32768);

  const auto h100 = run("plan --preset deepseek-v3 --dtype bf16 --nodes 1 --gpus-per-node 8 --gpu-mem 80GiB --json");
  REQUIRE(h100.exit_code == 0);  // a plan that does not fit is still an answer
  const auto k = json::parse(h100.out);
  CHECK(k["fits"] == false);
  CHECK(k["weights_fit"] == false);
  CHECK_THAT(k["verdict"].get<std::string>(), Catch::StartsWith("does not fit"));

  const auto table = run("plan --preset deepseek-v3 --nodes 2 --gpus-per-node 8 --gpu-mem 80GiB");
  REQUIRE(table.exit_code == 0);
  CHECK_THAT(table.out, Catch::Contains("| node/gpu  | layers    |") && Catch::Contains("| 1/7       |") &&
                            Catch::Contains("\nfits: the latent cache holds"));
}

TEST_CASE("plan refuses bad input with exit code 2", "[cli][plan]") {
  const auto unit = run("plan --preset deepseek-v3 --nodes 1 --gpus-per-node 8 --gpu-mem 80GX");
  CHECK(unit.exit_code == 2);
  CHECK_THAT(unit.err, Catch::Contains("--gpu-mem '80GX': unknown unit 'GX'"));
  const auto bare = run("plan --preset deepseek-v3 --nodes 1 --gpus-per-node 8 --gpu-mem 80");
  CHECK(bare.exit_code == 2);
  CHECK_THAT(bare.err, Catch::Contains("the unit is missing"));
  CHECK(run("plan --nodes 1 --gpus-per-node 8 --gpu-mem 80GB").exit_code == 2);
  CHECK(run("plan --preset deepseek-v3 --model " + kTiny + " --nodes 1 --gpus-per-node 8 --gpu-mem 80GB").exit_code == 2);
  CHECK(run("plan --preset deepseek-v3 --dtype fp4 --nodes 1 --gpus-per-node 8 --gpu-mem 80GB").exit_code == 2);
  CHECK(run("plan --preset llama --nodes 1 --gpus-per-node 8 --gpu-mem 80GB").exit_code == 2);
  const auto dtype = run("plan --model " + kTiny + " --dtype fp8 --nodes 1 --gpus-per-node 8 --gpu-mem 80GB");
  CHECK(dtype.exit_code == 2);
  CHECK_THAT(dtype.err, Catch::Contains("--dtype applies to --preset"));
  const auto nodes = run("plan --preset deepseek-v3 --nodes 64 --gpus-per-node 8 --gpu-mem 80GB");
  CHECK(nodes.exit_code == 2);
  CHECK_THAT(nodes.err, Catch::Contains("64 nodes for 61 layers"));
  const auto missing = run("plan --model /nonexistent/ckpt --nodes 1 --gpus-per-node 8 --gpu-mem 80GB");
  CHECK(missing.exit_code == 2);
  const auto no_fit = run("plan --preset deepseek-v3 --dtype bf16 --nodes 1 --gpus-per-node 8 --gpu-mem 80GiB "
                          "--write-config /tmp/shoal-plan-never-written.yaml");
  CHECK(no_fit.exit_code == 2);
  CHECK_FALSE(fs::exists("/tmp/shoal-plan-never-written.yaml"));
}

TEST_CASE("plan --model reads a checkpoint and writes a config Shoal's parser accepts", "[cli][plan]") {
  temp_dir dir;
  const auto file = dir.path / "cluster.yaml";
  const auto r = run("plan --model " + kTiny + " --nodes 2 --gpus-per-node 2 --gpu-mem 2GiB --context 512 "
                     "--concurrency 4 --node-host 127.0.0.1 --port 7700 --json --write-config " + file.string());
  REQUIRE(r.exit_code == 0);
  const auto j = json::parse(r.out);
  const auto model = shoal::config::load_model_config(kTiny);
  CHECK(j["model"]["layers"] == model.num_hidden_layers);
  CHECK(j["fits"] == true);
  auto cluster = shoal::config::load_cluster_config(file);
  shoal::config::validate_against_model(cluster, model);
  CHECK(fs::equivalent(cluster.model, kTiny));
  REQUIRE(cluster.nodes.size() == 2);
  CHECK(cluster.nodes[0].port == 7700);
  CHECK(cluster.nodes[1].port == 7701);
  CHECK(cluster.nodes[1].devices == std::vector<std::string>{"cuda:0", "cuda:1"});
  CHECK(cluster.head == cluster.nodes[0].name);
  CHECK(cluster.standby == cluster.nodes[1].name);  // the launch test below runs it so
  REQUIRE(cluster.stages.size() == 2);
  CHECK(cluster.stages[0].layer_end == j["stages"][0]["layer_end"].get<std::int64_t>());
  CHECK(cluster.expert_groups.size() == 4);
  CHECK(shoal::config::cache_blocks_for(cluster, model) == j["cache"]["blocks"].get<std::int64_t>());
}

TEST_CASE("shoal launch runs the config shoal plan wrote and answers like one process", "[cli][plan][launch]") {
  temp_dir dir;
  // The nodes of a one-host config listen on consecutive ports.
  std::uint16_t port = 0;
  for (int attempt = 0; attempt < 100 && port == 0; ++attempt) {
    const auto p = shoal::testing::free_port();
    if (p < 65535 && shoal::testing::detail::reserve_port(static_cast<std::uint16_t>(p + 1)) &&
        shoal::testing::detail::port_bindable(static_cast<std::uint16_t>(p + 1)))
      port = p;
  }
  REQUIRE(port != 0);
  const auto file = dir.path / "cluster.yaml";
  // A small GPU memory keeps the cache these CPU processes allocate small.
  const auto planned = run("plan --model " + kTiny + " --nodes 2 --gpus-per-node 2 --gpu-mem 1100MiB --context 512 "
                           "--concurrency 2 --node-host 127.0.0.1 --port " + std::to_string(port) +
                           " --write-config " + file.string());
  INFO(planned.err);
  REQUIRE(planned.exit_code == 0);

  const auto log = dir.path / "launch.log";
  const pid_t pid = ::fork();
  if (pid == 0) {
    const int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    ::dup2(fd, 1);
    ::dup2(fd, 2);
    ::execl(SHOAL_BINARY, SHOAL_BINARY, "launch", file.c_str(), "--transports", "tcp", static_cast<char*>(nullptr));
    ::_exit(127);
  }
  auto text = [&] {
    std::ifstream in(log);
    std::stringstream s;
    s << in.rdbuf();
    return s.str();
  };
  bool ready = false;
  for (int i = 0; i < 1200 && !ready; ++i) {  // 120 s
    ready = text().find("\"ready\":true") != std::string::npos;
    if (::waitpid(pid, nullptr, WNOHANG) == pid) break;
    if (!ready) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  const auto cluster = ready ? run("generate --cluster 127.0.0.1:" + std::to_string(port) +
                                   " --tokens 0,17,5 --max-new-tokens 6 --json")
                             : shoal::test::result{};
  ::kill(pid, SIGTERM);
  int status = 0;
  for (int i = 0; i < 300 && ::waitpid(pid, &status, WNOHANG) != pid; ++i)  // 30 s, then SIGKILL
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  if (::kill(pid, 0) == 0) {
    ::kill(pid, SIGKILL);
    ::waitpid(pid, &status, 0);
  }
  INFO(text());
  REQUIRE(ready);
  REQUIRE(cluster.exit_code == 0);
  const auto local = run("generate --model " + kTiny + " --tokens 0,17,5 --max-new-tokens 6 --temperature 0 --json");
  REQUIRE(local.exit_code == 0);
  CHECK(json::parse(cluster.out)["tokens"] == json::parse(local.out)["tokens"]);
  CHECK(json::parse(cluster.out)["tokens"].size() == 6);
}

TEST_CASE("the plans shown in docs/deployment.md are what the command prints", "[cli][plan][docs]") {
  std::ifstream in(fs::path(SHOAL_TEST_DATA_DIR).parent_path().parent_path() / "docs" / "deployment.md");
  REQUIRE(in);
  std::stringstream doc;
  doc << in.rdbuf();
  const auto text = doc.str();
  int shown = 0;
  for (auto at = text.find("```\n$ shoal plan "); at != std::string::npos; at = text.find("```\n$ shoal plan ", at + 1)) {
    const auto command_end = text.find('\n', at + 4);
    const auto command = text.substr(at + 12, command_end - at - 12);
    const auto block_end = text.find("```", command_end);
    REQUIRE(block_end != std::string::npos);
    const auto r = run(command);
    INFO(command);
    REQUIRE(r.exit_code == 0);
    CHECK(r.out == text.substr(command_end + 1, block_end - command_end - 1));
    ++shown;
  }
  CHECK(shown == 8);
}
