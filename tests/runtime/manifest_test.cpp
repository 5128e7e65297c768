// shoal-manifest.json at load: what model_weights::load hashes (the small files first, then
// only the shards its selection read) and what it refuses, on the tiny model.

#include "shoal/base/error.hpp"
#include "shoal/runtime/make_model.hpp"
#include "shoal/runtime/manifest.hpp"
#include "shoal/runtime/weights.hpp"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

namespace fs = std::filesystem;
using json = nlohmann::json;
using namespace shoal;

namespace {

struct tiny_dir {
  fs::path dir;
  tiny_dir() {
    dir = fs::temp_directory_path() / ("shoal-manifest-test-" + std::to_string(::getpid()));
    fs::remove_all(dir);
    runtime::write_random_model(runtime::model_preset("tiny", false), dir, 3);
  }
  ~tiny_dir() { fs::remove_all(dir); }
  // The shard holding `tensor`, from the index.
  std::string shard_of(const std::string& tensor) const {
    std::ifstream in(dir / "model.safetensors.index.json");
    return json::parse(in)["weight_map"][tensor].get<std::string>();
  }
};

void flip_middle_byte(const fs::path& file) {
  std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
  const auto middle = static_cast<std::streamoff>(fs::file_size(file) / 2);
  f.seekg(middle);
  char c = 0;
  f.get(c);
  f.seekp(middle);
  f.put(static_cast<char>(c ^ 0x40));
}

std::string load_error(const fs::path& dir, const runtime::weight_selection& sel) {
  try {
    runtime::model_weights::load(dir, sel, runtime::weight_residency::mapped);
  } catch (const shoal::error& e) {
    CHECK(e.code() == errc::invalid_argument);
    return e.what();
  }
  return {};
}

}  // namespace

TEST_CASE("a load hashes the shards it reads, and only those", "[runtime][manifest]") {
  tiny_dir m;
  const auto written = runtime::write_manifest(m.dir);
  CHECK(written.files == 5);  // config.json, the index, three shards
  const auto early = m.shard_of("model.layers.0.input_layernorm.weight");
  const auto late = m.shard_of("model.layers.3.input_layernorm.weight");
  const auto head = m.shard_of("lm_head.weight");
  REQUIRE(early != late);
  REQUIRE(late != head);

  flip_middle_byte(m.dir / late);
  // Layers 0-1 (and the embedding): the changed shard is not read, so not hashed.
  runtime::weight_selection front;
  front.layer_end = 2;
  front.head = false;
  std::vector<std::string> lines;
  auto weights = runtime::model_weights::load(m.dir, front, runtime::weight_residency::mapped,
                                              [&lines](const std::string& l) { lines.push_back(l); });
  // Loaded although a shard differs from the manifest: it was size-checked, not hashed. The
  // two shards read (embedding, layers 0-1) were hashed after the two small files.
  CHECK(weights->layers()[0].input_norm.size() > 0);
  int matched = 0;
  for (const auto& l : lines) matched += l.starts_with("2 files") && l.find("match shoal-manifest.json") != std::string::npos;
  CHECK(matched == 2);
  // The whole model, or the back half: refused, naming the shard.
  const auto all = load_error(m.dir, {});
  CHECK(all.find((m.dir / late).string() + ": SHA-256") != std::string::npos);
  runtime::weight_selection back;
  back.layer_begin = 2;
  back.embedding = false;
  CHECK(load_error(m.dir, back).find(late) != std::string::npos);
  CHECK_THROWS_AS(runtime::verify_manifest(m.dir), shoal::error);
}

TEST_CASE("the manifest is checked before anything is parsed", "[runtime][manifest]") {
  tiny_dir m;
  runtime::write_manifest(m.dir);
  SECTION("a changed config.json") {
    std::string text;
    {
      std::ifstream in(m.dir / "config.json");
      text.assign(std::istreambuf_iterator<char>(in), {});
    }
    const auto pos = text.find("128");
    REQUIRE(pos != std::string::npos);
    text.replace(pos, 3, "256");  // same size, another hidden_size
    std::ofstream(m.dir / "config.json") << text;
    const auto e = load_error(m.dir, {});
    CHECK(e.find("config.json: SHA-256") != std::string::npos);
  }
  SECTION("a shard that is not listed") {
    fs::copy_file(m.dir / m.shard_of("lm_head.weight"), m.dir / "model-extra.safetensors");
    CHECK(load_error(m.dir, {}).find("model-extra.safetensors: not listed") != std::string::npos);
  }
  SECTION("a missing file") {
    fs::remove(m.dir / "model.safetensors.index.json");
    CHECK(load_error(m.dir, {}).find("model.safetensors.index.json: listed in shoal-manifest.json but missing") !=
          std::string::npos);
  }
  SECTION("a manifest entry leading out of the directory") {
    std::ifstream in(m.dir / runtime::kManifestFile);
    auto j = json::parse(in);
    j["files"]["../escape"] = {{"bytes", 1}, {"sha256", std::string(64, '0')}};
    std::ofstream(m.dir / runtime::kManifestFile) << j.dump();
    CHECK(load_error(m.dir, {}).find("not a plain path inside the directory") != std::string::npos);
  }
  SECTION("a manifest that is not one") {
    std::ofstream(m.dir / runtime::kManifestFile) << "{\"files\": []}";
    CHECK(load_error(m.dir, {}).find("not a version 1 shoal-manifest") != std::string::npos);
  }
}

TEST_CASE("without a manifest nothing is hashed", "[runtime][manifest]") {
  tiny_dir m;
  CHECK(!runtime::verify_manifest(m.dir).has_value());
  std::vector<std::string> lines;
  runtime::model_weights::load(m.dir, {}, runtime::weight_residency::mapped,
                               [&lines](const std::string& l) { lines.push_back(l); });
  for (const auto& l : lines) CHECK(l.find("manifest") == std::string::npos);
}
