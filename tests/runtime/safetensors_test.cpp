#include "shoal/base/error.hpp"
#include "shoal/runtime/safetensors.hpp"
#include "shoal/runtime/weights.hpp"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>

using namespace shoal;
using namespace shoal::runtime;
namespace fs = std::filesystem;

namespace {

const fs::path kGolden = fs::path(SHOAL_TEST_DATA_DIR) / "golden";

struct temp_dir {
  fs::path path;
  temp_dir() {
    path = fs::temp_directory_path() / ("shoal-test-" + std::to_string(::getpid()) + "-" + std::to_string(counter()++));
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~temp_dir() { fs::remove_all(path); }
  static int& counter() {
    static int n = 0;
    return n;
  }
};

std::vector<std::byte> file_bytes(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::vector<char> chars((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<std::byte> bytes(chars.size());
  std::memcpy(bytes.data(), chars.data(), chars.size());
  return bytes;
}

std::vector<std::byte> make_file(const std::string& header, std::size_t data_bytes) {
  std::vector<std::byte> out(8 + header.size() + data_bytes);
  const std::uint64_t len = header.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<std::byte>((len >> (8 * i)) & 0xff);
  std::memcpy(out.data() + 8, header.data(), header.size());
  return out;
}

std::string parse_error(const std::vector<std::byte>& bytes) {
  try {
    parse_safetensors_header(bytes.data(), bytes.size(), "f.safetensors");
  } catch (const shoal::error& e) {
    return e.what();
  }
  return "";
}

// Copies a golden checkpoint, with every tensor passed through `edit` (return false to drop it)
// and `extra` tensors added, as a single model.safetensors.
template <typename Edit>
void rewrite_checkpoint(const std::string& model, const fs::path& out, Edit edit,
                        std::vector<tensor_blob> extra = {}) {
  const auto files = checkpoint::open(kGolden / model / "ckpt");
  std::vector<tensor_blob> blobs;
  for (const auto& name : files.names()) {
    const tensor_ref ref = files.find(name);
    tensor_blob blob{name, *ref.entry->type, ref.entry->shape, {}};
    blob.bytes.assign(ref.bytes(), ref.bytes() + (ref.entry->end - ref.entry->begin));
    if (edit(blob)) blobs.push_back(std::move(blob));
  }
  for (auto& e : extra) blobs.push_back(std::move(e));
  std::vector<const tensor_blob*> pointers;
  for (const auto& b : blobs) pointers.push_back(&b);
  fs::copy_file(kGolden / model / "ckpt" / "config.json", out / "config.json");
  write_safetensors(out / "model.safetensors", pointers);
}

std::string load_error(const fs::path& dir) {
  try {
    model_weights::load(dir, {}, weight_residency::mapped);
  } catch (const shoal::error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST_CASE("safetensors write and read round-trip", "[safetensors]") {
  temp_dir dir;
  tensor_blob a{"a", kernels::dtype::bf16, {2, 3}, std::vector<std::byte>(12, std::byte{7})};
  tensor_blob b{"b.weight", kernels::dtype::f32, {4}, std::vector<std::byte>(16, std::byte{1})};
  write_safetensors(dir.path / "x.safetensors", {&a, &b});
  const auto file = safetensors_file::open(dir.path / "x.safetensors");
  REQUIRE(file->entries().size() == 2);
  const auto& entry = file->entries().at("a");
  CHECK(entry.type == kernels::dtype::bf16);
  CHECK(entry.shape == std::vector<std::int64_t>{2, 3});
  CHECK(std::memcmp(file->data(entry), a.bytes.data(), 12) == 0);
  CHECK(std::memcmp(file->data(file->entries().at("b.weight")), b.bytes.data(), 16) == 0);
}

TEST_CASE("corrupt safetensors headers are refused with the file and tensor named", "[safetensors]") {
  CHECK_THAT(parse_error(std::vector<std::byte>(5)), Catch::Contains("f.safetensors") && Catch::Contains("shorter"));
  auto lying = make_file("{}", 0);
  lying[0] = std::byte{0xff};
  CHECK_THAT(parse_error(lying), Catch::Contains("runs past the end"));
  CHECK_THAT(parse_error(make_file("{not json", 0)), Catch::Contains("not valid JSON"));
  CHECK_THAT(parse_error(make_file(R"({"w": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}})", 1)),
             Catch::Contains("'w'") && Catch::Contains("unknown dtype"));
  CHECK_THAT(parse_error(make_file(R"({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}})", 8)),
             Catch::Contains("'w'") && Catch::Contains("needs 12"));
  CHECK_THAT(parse_error(make_file(R"({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})", 10)),
             Catch::Contains("'w'") && Catch::Contains("truncated"));
  CHECK_THAT(parse_error(make_file(R"({"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}})", 16)),
             Catch::Contains("'w'"));
  CHECK_THAT(parse_error(make_file(R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}})", 16)),
             Catch::Contains("reversed"));
  CHECK_THAT(parse_error(make_file(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})", 16)),
             Catch::Contains("overlap"));
  CHECK_THAT(parse_error(make_file(R"({"w": {"dtype": "F32", "shape": [4294967296, 4294967296, 4294967296], "data_offsets": [0, 16]}})", 16)),
             Catch::Contains("overflows"));
  CHECK(parse_error(make_file(R"({"__metadata__": {"format": "pt"}, "w": {"dtype": "F8_E4M3", "shape": [2, 2], "data_offsets": [0, 4]}})", 4)).empty());
}

TEST_CASE("fuzzed safetensors headers never crash the parser", "[safetensors][fuzz]") {
  const auto original = file_bytes(kGolden / "tiny-a-fp8" / "ckpt" / "model-00001-of-00002.safetensors");
  std::uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | static_cast<std::uint8_t>(original[i]);
  REQUIRE(header_len + 8 < original.size());
  std::mt19937_64 rng(2024);
  int accepted = 0, refused = 0;
  for (int round = 0; round < 3000; ++round) {
    auto bytes = original;
    const int mutations = 1 + static_cast<int>(rng() % 8);
    for (int m = 0; m < mutations; ++m) {
      const std::size_t at = rng() % (header_len + 8);
      switch (rng() % 3) {
        case 0: bytes[at] = static_cast<std::byte>(rng()); break;
        case 1: bytes[at] = static_cast<std::byte>("0123456789[]{},:\"-e"[rng() % 19]); break;
        default: bytes.resize(std::max<std::size_t>(1, rng() % bytes.size())); break;
      }
      if (at >= bytes.size()) break;
    }
    try {
      parse_safetensors_header(bytes.data(), bytes.size(), "fuzz");
      ++accepted;
    } catch (const shoal::error& e) {
      REQUIRE(e.code() == errc::invalid_argument);
      ++refused;
    }
  }
  CHECK(refused > 0);
  CHECK(accepted + refused == 3000);
}

TEST_CASE("checkpoints load, skipping MTP layers and finding scales in other shards", "[weights]") {
  const auto b = model_weights::load(kGolden / "tiny-b-bf16" / "ckpt", {}, weight_residency::copy);
  CHECK(b->layers().size() == 6);
  const auto a = model_weights::load(kGolden / "tiny-a-fp8" / "ckpt", {}, weight_residency::copy);
  CHECK(a->layers()[1].q_a.type == kernels::dtype::f8_e4m3);
  CHECK(a->layers()[1].q_a.scale_inv != nullptr);
  CHECK(a->resident_bytes() > 2'000'000);

  SECTION("a selection loads only its layers and experts") {
    weight_selection sel;
    sel.layer_begin = 2;
    sel.layer_end = 4;
    sel.embedding = false;
    sel.head = false;
    sel.expert_filter = [](std::int64_t, std::int64_t e) { return e < 8; };
    const auto part = model_weights::load(kGolden / "tiny-b-bf16" / "ckpt", sel, weight_residency::copy);
    CHECK(part->embedding().data == nullptr);
    CHECK(part->layers()[0].input_norm.empty());
    CHECK(part->layers()[2].experts[7].gate.data != nullptr);
    CHECK(part->layers()[2].experts[8].gate.data == nullptr);
    CHECK(part->resident_bytes() < b->resident_bytes());
  }
}

TEST_CASE("broken checkpoints are refused at load naming file and tensor", "[weights]") {
  temp_dir dir;
  SECTION("missing tensor") {
    rewrite_checkpoint("tiny-a-bf16", dir.path, [](tensor_blob& t) { return t.name != "model.layers.2.mlp.experts.3.up_proj.weight"; });
    CHECK_THAT(load_error(dir.path), Catch::Contains("missing tensor 'model.layers.2.mlp.experts.3.up_proj.weight'"));
  }
  SECTION("wrong shape") {
    rewrite_checkpoint("tiny-a-bf16", dir.path, [](tensor_blob& t) {
      if (t.name == "model.layers.1.self_attn.o_proj.weight") t.shape = {t.shape[1], t.shape[0]};
      return true;
    });
    CHECK_THAT(load_error(dir.path), Catch::Contains("model.safetensors") &&
                                         Catch::Contains("'model.layers.1.self_attn.o_proj.weight'") &&
                                         Catch::Contains("shape [256, 160], expected [160, 256]"));
  }
  SECTION("unexpected tensor") {
    std::vector<tensor_blob> extra;
    extra.push_back({"model.layers.1.mlp.experts.99.up_proj.weight", kernels::dtype::bf16, {2}, std::vector<std::byte>(4)});
    rewrite_checkpoint("tiny-a-bf16", dir.path, [](tensor_blob&) { return true; }, std::move(extra));
    CHECK_THAT(load_error(dir.path), Catch::Contains("'model.layers.1.mlp.experts.99.up_proj.weight'") &&
                                         Catch::Contains("unexpected"));
  }
  SECTION("wrong dtype for a norm") {
    rewrite_checkpoint("tiny-a-fp8", dir.path, [](tensor_blob& t) {
      if (t.name == "model.norm.weight") {
        t.type = kernels::dtype::f8_e4m3;
        t.bytes.resize(t.bytes.size() / 2);
      }
      return true;
    });
    CHECK_THAT(load_error(dir.path), Catch::Contains("'model.norm.weight'") && Catch::Contains("F8_E4M3"));
  }
  SECTION("FP8 weight without its block scales") {
    rewrite_checkpoint("tiny-a-fp8", dir.path, [](tensor_blob& t) { return t.name != "model.layers.1.self_attn.kv_b_proj.weight_scale_inv"; });
    CHECK_THAT(load_error(dir.path), Catch::Contains("missing tensor 'model.layers.1.self_attn.kv_b_proj.weight_scale_inv'"));
  }
  SECTION("truncated shard") {
    for (const auto& entry : fs::directory_iterator(kGolden / "tiny-a-fp8" / "ckpt"))
      fs::copy_file(entry.path(), dir.path / entry.path().filename());
    const auto shard = dir.path / "model-00002-of-00002.safetensors";
    fs::permissions(shard, fs::perms::owner_write, fs::perm_options::add);
    fs::resize_file(shard, fs::file_size(shard) - 1000);
    CHECK_THAT(load_error(dir.path), Catch::Contains("model-00002-of-00002.safetensors") && Catch::Contains("truncated"));
  }
  SECTION("index that points a tensor at the wrong shard") {
    for (const auto& entry : fs::directory_iterator(kGolden / "tiny-a-fp8" / "ckpt"))
      fs::copy_file(entry.path(), dir.path / entry.path().filename());
    const auto index_path = dir.path / "model.safetensors.index.json";
    fs::permissions(index_path, fs::perms::owner_write, fs::perm_options::add);
    auto index = nlohmann::json::parse(std::ifstream(index_path));
    auto& map = index["weight_map"];
    const std::string name = "model.layers.1.self_attn.q_a_proj.weight";
    map[name] = map[name] == "model-00001-of-00002.safetensors" ? "model-00002-of-00002.safetensors"
                                                                 : "model-00001-of-00002.safetensors";
    std::ofstream(index_path) << index.dump();
    CHECK_THAT(load_error(dir.path), Catch::Contains(name));
  }
}
