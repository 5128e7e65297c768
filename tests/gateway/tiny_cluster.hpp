#pragma once
// The tiny model (4 layers, 16 routed experts) and a cluster config that serves it with 4
// node processes: 2 pipeline stages, 2 expert nodes. Both are written once per test process
// under SHOAL_GATEWAY_WORK_DIR, the ports reserved for the process (free_port.hpp).

#include "free_port.hpp"
#include "serve_process.hpp"

#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>
#include <string>

namespace shoal::gateway::testing {

inline std::filesystem::path tiny_model() {
  static const std::filesystem::path dir = [] {
    const auto d = std::filesystem::path(SHOAL_GATEWAY_WORK_DIR) / "tiny";
    if (!std::filesystem::exists(d / "tokenizer.json")) {
      std::filesystem::remove_all(d);
      const auto r = run(std::string(SHOAL_BINARY) + " make-model --preset tiny --out " + d.string(), 300);
      INFO(r.out);
      REQUIRE(r.exit_code == 0);
    }
    return d;
  }();
  return dir;
}

inline std::filesystem::path tiny_cluster_config() {
  static const std::filesystem::path path = [] {
    const auto p = std::filesystem::path(SHOAL_GATEWAY_WORK_DIR) / "cluster.yaml";
    std::ofstream out(p);
    out << "model: " << tiny_model().string() << "\nthreads: 1\nready_timeout_s: 90\nnodes:\n";
    for (const char* n : {"stage0", "stage1", "experts0", "experts1"})
      out << "  - {name: " << n << ", host: 127.0.0.1, port: " << shoal::testing::free_port() << "}\n";
    out << R"(head: stage0
plan:
  stages:
    - {node: stage0, layers: 0-1}
    - {node: stage1, layers: 2-3}
  experts:
    - {node: experts0, experts: 0-7}
    - {node: experts1, experts: 8-15}
)";
    return p;
  }();
  return path;
}

}  // namespace shoal::gateway::testing
