// Drives the shoal binary the way a user does and checks what it prints.

#include "run_shoal.hpp"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

using shoal::test::result;
using shoal::test::run;

struct temp_dir {
  fs::path path = fs::temp_directory_path() / ("shoal-cli-" + std::to_string(::getpid()));
  temp_dir() { fs::create_directories(path); }
  ~temp_dir() { fs::remove_all(path); }
};

const std::string kGolden = std::string(SHOAL_TEST_DATA_DIR) + "/golden";

}  // namespace

TEST_CASE("make-model writes a loadable, deterministic tiny checkpoint", "[cli]") {
  temp_dir dir;
  const auto first = run("make-model --preset tiny --out " + (dir.path / "a").string());
  REQUIRE(first.exit_code == 0);
  CHECK_THAT(first.err, Catch::Contains("wrote model-00001-of-"));
  REQUIRE(run("make-model --preset tiny --out " + (dir.path / "b").string()).exit_code == 0);
  for (const auto& entry : fs::directory_iterator(dir.path / "a")) {
    if (entry.path().extension() != ".safetensors") continue;
    const auto other = dir.path / "b" / entry.path().filename();
    REQUIRE(fs::exists(other));
    std::ifstream x(entry.path(), std::ios::binary), y(other, std::ios::binary);
    CHECK(std::equal(std::istreambuf_iterator<char>(x), {}, std::istreambuf_iterator<char>(y)));
  }
  const auto eval = run("eval --model " + (dir.path / "a").string() + " --tokens 0,17,5 --all-positions --json --quiet");
  REQUIRE(eval.exit_code == 0);
  const auto logits = json::parse(eval.out)["logits"];
  REQUIRE(logits.size() == 3);
  CHECK(logits[0].size() == 129280);
  for (const auto& row : logits)
    for (const auto& v : row) REQUIRE(std::isfinite(v.get<double>()));

  const auto gen = run("generate --model " + (dir.path / "a").string() + " --tokens 0,17,5 --max-new-tokens 6 --temperature 0 --json");
  REQUIRE(gen.exit_code == 0);
  CHECK(json::parse(gen.out)["tokens"].size() == 6);
  CHECK_THAT(gen.err, Catch::Contains("tokens/s"));
  // Progress names every layer of the tiny model, the dense first one included.
  for (int layer = 1; layer <= 4; ++layer)
    CHECK_THAT(gen.err, Catch::Contains("loaded layer " + std::to_string(layer) + "/4 "));

  const auto bench = run("bench --model " + (dir.path / "a").string() +
                         " --prompt-tokens 16 --decode-tokens 4 --repeats 1 --triad-mb 16 --threads 2");
  REQUIRE(bench.exit_code == 0);
  CHECK_THAT(bench.out, Catch::Contains("% of roofline") && Catch::Contains("| 1 |") && Catch::Contains("| 2 |"));
}

TEST_CASE("eval and generate on a golden checkpoint match DeepSeek's reference", "[cli][golden]") {
  std::ifstream in(kGolden + "/tiny-b-bf16/golden.json");
  const auto golden = json::parse(in);
  const auto& prompt = golden["prompts"][1];
  std::string ids;
  for (const auto& t : prompt["tokens"]) ids += (ids.empty() ? "" : ",") + std::to_string(t.get<int>());
  const auto eval = run("eval --model " + kGolden + "/tiny-b-bf16/ckpt --tokens " + ids + " --json --quiet");
  REQUIRE(eval.exit_code == 0);
  const auto row = json::parse(eval.out)["logits"][0];
  REQUIRE(row.size() == prompt["last_logits"].size());
  double diff = 0.0;
  for (std::size_t i = 0; i < row.size(); ++i)
    diff = std::max(diff, std::fabs(row[i].get<double>() - prompt["last_logits"][i].get<double>()));
  CHECK(diff < 1e-4);
  const auto gen = run("generate --model " + kGolden + "/tiny-b-bf16/ckpt --tokens " + ids +
                       " --max-new-tokens 16 --temperature 0 --json --quiet");
  REQUIRE(gen.exit_code == 0);
  CHECK(json::parse(gen.out)["tokens"] == prompt["greedy_tokens"]);
}

TEST_CASE("bad command lines get clear errors and a failing exit code", "[cli]") {
  const auto missing = run("eval --model /nonexistent/model --tokens 1 --json");
  CHECK(missing.exit_code != 0);
  CHECK_THAT(missing.err, Catch::Contains("/nonexistent/model/config.json"));
  const auto bad_tokens = run("eval --model " + kGolden + "/tiny-a-bf16/ckpt --tokens 1,x,3");
  CHECK(bad_tokens.exit_code != 0);
  CHECK_THAT(bad_tokens.err, Catch::Contains("'x'"));
  const auto out_of_vocab = run("eval --model " + kGolden + "/tiny-a-bf16/ckpt --tokens 1,99999 --quiet");
  CHECK(out_of_vocab.exit_code != 0);
  CHECK_THAT(out_of_vocab.err, Catch::Contains("99999") && Catch::Contains("vocabulary"));
  const auto preset = run("make-model --preset enormous --out /tmp/never-written");
  CHECK(preset.exit_code != 0);
  CHECK_THAT(preset.err, Catch::Contains("enormous") && Catch::Contains("tiny"));
  CHECK(run("no-such-command").exit_code != 0);
}
