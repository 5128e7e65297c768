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
#include <string>
#include <vector>

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

  // The machine-readable forms that tools/bench/vs-llamacpp.sh reads.
  const auto bench_json = run("bench --model " + (dir.path / "a").string() +
                              " --prompt-tokens 16 --decode-tokens 4 --repeats 1 --triad-mb 16 --threads 2 --json");
  REQUIRE(bench_json.exit_code == 0);
  const auto rows = json::parse(bench_json.out)["rows"];
  REQUIRE(rows.size() == 2);
  CHECK(rows[1]["threads"] == 2);
  CHECK(rows[0]["decode_tokens_per_s"].get<double>() > 0.0);
  CHECK(rows[0]["decode_roofline_tokens_per_s"].get<double>() > 0.0);
  const auto bandwidth = run("bench --bandwidth-only --triad-mb 16 --threads 2 --json");
  REQUIRE(bandwidth.exit_code == 0);
  const auto triad = json::parse(bandwidth.out)["rows"];
  REQUIRE(triad.size() == 2);
  CHECK(triad[0]["threads"] == 1);
  CHECK(triad[1]["triad_gbps"].get<double>() > 0.0);
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

TEST_CASE("bad command lines get clear errors and exit code 2", "[cli]") {
  const auto missing = run("eval --model /nonexistent/model --tokens 1 --json");
  CHECK(missing.exit_code == 2);
  CHECK_THAT(missing.err, Catch::Contains("/nonexistent/model/config.json"));
  const auto bad_tokens = run("eval --model " + kGolden + "/tiny-a-bf16/ckpt --tokens 1,x,3");
  CHECK(bad_tokens.exit_code == 2);
  CHECK_THAT(bad_tokens.err, Catch::Contains("'x'"));
  const auto out_of_vocab = run("eval --model " + kGolden + "/tiny-a-bf16/ckpt --tokens 1,99999 --quiet");
  CHECK(out_of_vocab.exit_code == 2);
  CHECK_THAT(out_of_vocab.err, Catch::Contains("99999") && Catch::Contains("vocabulary"));
  const auto preset = run("make-model --preset enormous --out /tmp/never-written");
  CHECK(preset.exit_code == 2);
  CHECK_THAT(preset.err, Catch::Contains("enormous") && Catch::Contains("tiny"));
  CHECK(run("no-such-command").exit_code == 2);
}

TEST_CASE("every command exits 0 for --help and 2 for a bad command line", "[cli][exit]") {
  const auto top = run("--help");
  REQUIRE(top.exit_code == 0);
  CHECK_THAT(top.out, Catch::Contains("Subcommands:"));
  CHECK(run("--version").exit_code == 0);
  // The commands, as the top-level help lists them (two spaces, a name, spaces, a summary).
  std::vector<std::string> commands;
  std::istringstream lines(top.out.substr(top.out.find("Subcommands:")));
  for (std::string line; std::getline(lines, line);)
    if (line.size() > 2 && line.rfind("  ", 0) == 0 && line[2] != ' ') commands.push_back(line.substr(2, line.find(' ', 2) - 2));
  CHECK(commands.size() >= 11);
  for (const auto& command : commands) {
    CAPTURE(command);
    const auto help = run(command + " --help");
    CHECK(help.exit_code == 0);
    CHECK_THAT(help.out, Catch::Contains("Usage:"));
    // CLI11 names a missing required option before an unknown one.
    const auto unknown = run(command + " --no-such-option 1");
    CHECK(unknown.exit_code == 2);
    CHECK_THAT(unknown.err, Catch::Contains("--no-such-option") || Catch::Contains("is required"));
  }
  const auto none = run("");
  CHECK(none.exit_code == 2);
  CHECK_THAT(none.err, Catch::Contains("A subcommand is required"));
  CHECK(run("no-such-command").exit_code == 2);
  const auto missing = run("eval --tokens 1");
  CHECK(missing.exit_code == 2);
  CHECK_THAT(missing.err, Catch::Contains("--model is required"));
  const auto not_a_number = run("eval --model x --tokens 1 --threads many");
  CHECK(not_a_number.exit_code == 2);
  CHECK_THAT(not_a_number.err, Catch::Contains("--threads"));
}

TEST_CASE("every command exits 2 naming what is wrong with its input", "[cli][exit]") {
  temp_dir dir;
  const auto check = [](const std::string& args, const std::string& input, const std::string& named) {
    CAPTURE(args);
    const auto r = run(args, input);
    CHECK(r.exit_code == 2);
    CHECK_THAT(r.err, Catch::Contains("shoal: error: ") && Catch::Contains(named));
  };
  const std::string model = kGolden + "/tiny-a-bf16/ckpt";
  check("make-model --preset enormous --out " + (dir.path / "m").string(), "", "enormous");
  check("make-model --preset tiny --out /dev/null/m", "", "/dev/null/m: cannot create the output directory");
  check("eval --model /nonexistent/model --tokens 1 --json", "", "/nonexistent/model/config.json");
  check("eval --model " + model + " --tokens 1,x,3", "", "'x'");
  check("generate --model " + model + " --tokens 1,99999999 --quiet", "", "99999999");
  check("generate --model /nonexistent/model --chat hi", "", "/nonexistent/model/tokenizer.json");
  check("bench --model /nonexistent/model", "", "/nonexistent/model/config.json");
  check("node --config /nonexistent/cluster.yaml --name a", "", "/nonexistent/cluster.yaml");
  check("launch /nonexistent/cluster.yaml", "", "/nonexistent/cluster.yaml");
  std::ofstream(dir.path / "bad.yaml") << "model: m\nnodes: []\n";
  check("launch " + (dir.path / "bad.yaml").string(), "", (dir.path / "bad.yaml").string() + ":2:");
  // A join secret file that is not private, too short or empty stops launch before any node
  // starts, naming the file.
  std::ofstream(dir.path / "secret.yaml") << "model: " << model << "\njoin_secret_file: join.secret\n"
                                          << "nodes:\n  - {name: a, port: 1}\nplan:\n  stages:\n    - {node: a, layers: 0-1}\n";
  const auto secret = dir.path / "join.secret";
  const auto launch_secret = "launch " + (dir.path / "secret.yaml").string();
  check(launch_secret, "", secret.string() + ": cannot read the join secret file");
  std::ofstream(secret) << std::string(40, 'x');
  fs::permissions(secret, fs::perms::owner_read | fs::perms::owner_write | fs::perms::group_read);
  check(launch_secret, "", secret.string() + ": the join secret file may be read or written by other users (mode 0640)");
  fs::permissions(secret, fs::perms::owner_read | fs::perms::owner_write);
  std::ofstream(secret) << "short\n";
  check(launch_secret, "", secret.string() + ": the join secret has 5 bytes, at least 32 are needed");
  std::ofstream(secret) << "\n";
  check(launch_secret, "", secret.string() + ": the join secret file is empty");
  const std::string text_model = std::string(SHOAL_TEST_DATA_DIR) + "/tokenizer";
  check("tokenize --model " + text_model, "\"fine\"\n[1]\n", "stdin line 2");
  check("detokenize --model " + text_model, "{\"ids\": [\"a\"]}\n", "stdin line 1");
  check("bench-tokenizer --model /nonexistent/model", "", "/nonexistent/model/tokenizer.json");
  check("serve --model /nonexistent/model --port 0", "", "/nonexistent/model");
  check("bench-serve --url http://127.0.0.1:1 --duration 1", "", "127.0.0.1:1");
}
