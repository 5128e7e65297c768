// `shoal admin plan` as a user runs it: the plan on stdout, bad files refused with exit 2, and
// ([eplb], needs Debian's python3-numpy) the comparison with DeepSeek's EPLB on generated loads.

#include "exit_codes.hpp"
#include "run_shoal.hpp"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>

namespace fs = std::filesystem;
using json = nlohmann::json;
using shoal::test::run;

namespace {

struct loads_file {
  fs::path path = fs::temp_directory_path() / ("shoal-plan-" + std::to_string(::getpid()) + ".json");
  explicit loads_file(const std::string& text) { std::ofstream(path) << text; }
  ~loads_file() { fs::remove(path); }
};

}  // namespace

TEST_CASE("admin plan prints a plan with every expert and the layout asked for", "[cli]") {
  loads_file file(R"({"loads": [[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                                [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]],
                      "slots": 16, "nodes": 2, "gpus": 8, "groups": 4})");
  const auto r = run("admin plan --loads " + file.path.string() + " --json");
  INFO(r.err);
  REQUIRE(r.exit_code == shoal::tools::kExitSuccess);
  const auto plan = json::parse(r.out);
  REQUIRE(plan["layers"].size() == 2);
  for (const auto& layer : plan["layers"]) {
    const auto slots = layer["slots"].get<std::vector<int>>();
    REQUIRE(slots.size() == 16);
    CHECK(std::set<int>(slots.begin(), slots.end()).size() == 12);
    // 8 slots per node; each group of 3 experts on one node.
    for (int s = 0; s < 16; ++s) {
      for (int t = 0; t < 16; ++t) {
        if (slots[s] / 3 == slots[t] / 3) CHECK(s / 8 == t / 8);
      }
    }
  }
  CHECK(plan["policy"] == "group_per_node");

  const auto text = run("admin plan --loads " + file.path.string());
  REQUIRE(text.exit_code == shoal::tools::kExitSuccess);
  CHECK_THAT(text.out, Catch::Contains("imbalance: max"));
}

TEST_CASE("admin plan refuses bad files with exit 2 naming the field", "[cli]") {
  {
    loads_file file(R"({"loads": [[1, 2, 3, 4]], "slots": 10, "gpus": 4})");
    const auto r = run("admin plan --loads " + file.path.string() + " --json");
    CHECK(r.exit_code == shoal::tools::kExitBadInput);
    CHECK_THAT(r.err, Catch::Contains("gpus: 4 does not divide slots (10)"));
    CHECK(r.out.empty());
  }
  {
    loads_file file(R"({"loads": [[1, -2, 3, 4]], "slots": 8, "gpus": 4})");
    const auto r = run("admin plan --loads " + file.path.string() + " --json");
    CHECK(r.exit_code == shoal::tools::kExitBadInput);
    CHECK_THAT(r.err, Catch::Contains("loads[0][1]: -2 is negative"));
  }
  {
    const auto r = run("admin plan --loads /nonexistent/loads.json --json");
    CHECK(r.exit_code == shoal::tools::kExitBadInput);
    CHECK_THAT(r.err, Catch::Contains("--loads: cannot open /nonexistent/loads.json"));
  }
  CHECK(run("admin").exit_code == shoal::tools::kExitBadInput);
  CHECK(run("admin plan").exit_code == shoal::tools::kExitBadInput);
}

TEST_CASE("admin plan is at least as balanced as DeepSeek's EPLB on every layer", "[eplb]") {
  // eplb_reference.py is a NumPy port of EPLB (Debian has no PyTorch), checked against the
  // example in EPLB's README before the comparison.
  const std::string command = std::string("/usr/bin/python3 ") + SHOAL_TOOLS_TEST_DIR +
                              "/planner_vs_eplb.py --shoal " + SHOAL_BINARY + " 2>&1";
  INFO("command: " << command << " (needs Debian's python3-numpy, see tools/setup/install-deps.sh)");
  FILE* pipe = ::popen(command.c_str(), "r");
  REQUIRE(pipe != nullptr);
  std::string output;
  char buffer[4096];
  std::size_t n;
  while ((n = std::fread(buffer, 1, sizeof buffer, pipe)) > 0) output.append(buffer, n);
  const int status = ::pclose(pipe);
  INFO(output);
  CHECK(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
  CHECK_THAT(output, Catch::Contains("; 0 failures"));
}
