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

TEST_CASE("an encrypted file decrypts only the chunks of the tensors read", "[safetensors][encrypted]") {
  temp_dir dir;
  // Three tensors of 12 KiB each in 4 KiB chunks; written sorted by name, "middle" is last.
  tensor_blob early{"early", kernels::dtype::f32, {3072}, std::vector<std::byte>(12288, std::byte{1})};
  tensor_blob late{"late", kernels::dtype::f32, {3072}, std::vector<std::byte>(12288, std::byte{3})};
  tensor_blob middle{"middle", kernels::dtype::f32, {3072}, std::vector<std::byte>(12288, std::byte{2})};
  write_safetensors(dir.path / "plain.safetensors", {&early, &late, &middle});
  weights_key key;
  key.bytes.fill(0x42);
  const auto encrypted = dir.path / "x.safetensors";
  encrypt_weights_file(dir.path / "plain.safetensors", encrypted, key, 4096);
  // A byte of the last chunk's ciphertext changes: opening and reading the first tensor still
  // work, reading the last one is refused naming the file.
  const auto size = std::filesystem::file_size(encrypted);
  {
    // Flipped, not overwritten: a constant would equal the random ciphertext byte once in 256.
    std::fstream f(encrypted, std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(static_cast<std::streamoff>(size - 100));
    const auto byte = static_cast<char>(f.get());
    f.seekp(static_cast<std::streamoff>(size - 100));
    f.put(static_cast<char>(~byte));
  }
  const auto file = safetensors_file::open(encrypted, &key);
  CHECK(file->encrypted());
  const auto& first = file->entries().at("early");
  CHECK(std::memcmp(file->data(first), early.bytes.data(), early.bytes.size()) == 0);
  try {
    (void)file->data(file->entries().at("middle"));
    FAIL("a changed chunk was decrypted");
  } catch (const shoal::error& e) {
    CHECK(e.code() == shoal::errc::invalid_argument);
    CHECK_THAT(e.what(), Catch::Contains(encrypted.string()) && Catch::Contains("does not authenticate"));
  }
  // Without the key, or with a key for a plain file, nothing opens.
  CHECK_THROWS_WITH(safetensors_file::open(encrypted), Catch::Contains("SHOAL_WEIGHTS_KEY_FILE"));
  CHECK_THROWS_WITH(safetensors_file::open(dir.path / "plain.safetensors", &key),
                    Catch::Contains("not encrypted, but a weights key was given"));

  // A refused file keeps no descriptor open: a truncated copy, refused 200 times.
  const auto truncated = dir.path / "t.safetensors";
  std::filesystem::copy_file(encrypted, truncated);
  std::filesystem::resize_file(truncated, size - 1);
  auto open_descriptors = [] {
    return std::distance(std::filesystem::directory_iterator("/proc/self/fd"), std::filesystem::directory_iterator{});
  };
  const auto before = open_descriptors();
  for (int i = 0; i < 200; ++i) CHECK_THROWS_WITH(safetensors_file::open(truncated, &key), Catch::Contains("truncated"));
  CHECK(open_descriptors() == before);
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
  int accepted = 0, refused = 0;  // anything else thrown fails the test case
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
      const auto entries = parse_safetensors_header(bytes.data(), bytes.size(), "fuzz");
      // What is accepted must be safe to map: every tensor inside the data area, sized by its
      // dtype and shape.
      std::uint64_t len = 0;
      for (int i = 7; i >= 0; --i) len = (len << 8) | static_cast<std::uint8_t>(bytes[i]);
      for (const auto& e : entries) {
        REQUIRE(e.begin <= e.end);
        REQUIRE(e.end <= bytes.size() - 8 - len);
        if (e.type) REQUIRE(e.end - e.begin == e.elements() * kernels::dtype_size(*e.type));
      }
      ++accepted;
    } catch (const shoal::error& e) {
      REQUIRE(e.code() == errc::invalid_argument);
      REQUIRE_THAT(e.what(), Catch::StartsWith("fuzz: "));
      ++refused;
    }
  }
  // Both outcomes happen, so the mutations reach the checks and also leave valid headers.
  CHECK(refused > 0);
  CHECK(accepted > 0);
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

TEST_CASE("every refusal of a safetensors header names the file and the tensor", "[safetensors]") {
  auto huge = make_file("{}", 0);
  huge[3] = std::byte{0x10};  // 256 MiB header length, over the limit
  CHECK_THAT(parse_error(huge), Catch::StartsWith("f.safetensors: ") && Catch::Contains("exceeds the"));
  auto lying = make_file("{}", 0);
  lying[0] = std::byte{0xff};
  CHECK_THAT(parse_error(lying), Catch::StartsWith("f.safetensors: ") && Catch::Contains("runs past the end"));
  CHECK_THAT(parse_error(make_file("{not json", 0)), Catch::StartsWith("f.safetensors: ") && Catch::Contains("not valid JSON"));
  CHECK_THAT(parse_error(make_file("[1, 2]", 0)), Catch::StartsWith("f.safetensors: ") && Catch::Contains("not a JSON object"));
  const std::string prefix = "f.safetensors: tensor 'w': ";
  CHECK_THAT(parse_error(make_file(R"({"w": 3})", 0)), Catch::StartsWith(prefix) && Catch::Contains("not an object"));
  CHECK_THAT(parse_error(make_file(R"({"w": {"shape": [1], "data_offsets": [0, 4]}})", 4)),
             Catch::StartsWith(prefix) && Catch::Contains("missing string 'dtype'"));
  CHECK_THAT(parse_error(make_file(R"({"w": {"dtype": 5, "shape": [1], "data_offsets": [0, 4]}})", 4)),
             Catch::StartsWith(prefix) && Catch::Contains("missing string 'dtype'"));
  CHECK_THAT(parse_error(make_file(R"({"w": {"dtype": "F32", "data_offsets": [0, 4]}})", 4)),
             Catch::StartsWith(prefix) && Catch::Contains("missing array 'shape'"));
  CHECK_THAT(parse_error(make_file(R"({"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}})", 16)),
             Catch::StartsWith(prefix) && Catch::Contains("non-integer or negative dimension"));
  CHECK_THAT(parse_error(make_file(R"({"w": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}})", 4)),
             Catch::StartsWith(prefix) && Catch::Contains("non-integer or negative dimension"));
  for (const char* offsets : {R"("data_offsets": [0])", R"("data_offsets": [0, -4])", R"("data_offsets": "0-4")", ""}) {
    CAPTURE(offsets);
    const std::string header = std::string(R"({"w": {"dtype": "F32", "shape": [1])") +
                               (*offsets ? ", " : "") + offsets + "}}";
    CHECK_THAT(parse_error(make_file(header, 4)), Catch::StartsWith(prefix) && Catch::Contains("missing 'data_offsets'"));
  }
  CHECK_THAT(parse_error(make_file(R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}})", 16)),
             Catch::StartsWith(prefix) && Catch::Contains("reversed"));
  CHECK_THAT(parse_error(make_file(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                      "w": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})", 16)),
             Catch::StartsWith("f.safetensors: ") && Catch::Contains("'a' and 'w' overlap"));
}

TEST_CASE("safetensors files that are not files or too short are refused with their path", "[safetensors]") {
  temp_dir dir;
  const auto error_of = [](const fs::path& path) -> std::string {
    try {
      safetensors_file::open(path);
    } catch (const shoal::error& e) {
      return e.what();
    }
    return "";
  };
  CHECK_THAT(error_of(dir.path / "absent.safetensors"),
             Catch::Contains((dir.path / "absent.safetensors").string()) && Catch::Contains("cannot open"));
  fs::create_directory(dir.path / "d.safetensors");
  CHECK_THAT(error_of(dir.path / "d.safetensors"),
             Catch::Contains((dir.path / "d.safetensors").string()) && Catch::Contains("not a regular file"));
  std::ofstream(dir.path / "short.safetensors") << "1234";
  CHECK_THAT(error_of(dir.path / "short.safetensors"),
             Catch::Contains((dir.path / "short.safetensors").string()) && Catch::Contains("only 4 bytes"));
}

namespace {

// A copy of the sharded tiny-a-fp8 checkpoint whose index `edit` has changed.
template <typename Edit>
void copy_with_index(const fs::path& out, Edit edit) {
  for (const auto& entry : fs::directory_iterator(kGolden / "tiny-a-fp8" / "ckpt"))
    fs::copy_file(entry.path(), out / entry.path().filename());
  const auto index_path = out / "model.safetensors.index.json";
  fs::permissions(index_path, fs::perms::owner_write, fs::perm_options::add);
  auto index = nlohmann::json::parse(std::ifstream(index_path));
  edit(index);
  std::ofstream(index_path, std::ios::trunc) << index.dump();
}

std::string open_error(const fs::path& dir) {
  try {
    checkpoint::open(dir);
  } catch (const shoal::error& e) {
    CHECK((e.code() == errc::invalid_argument || e.code() == errc::not_found));
    return e.what();
  }
  return "";
}

const std::string kTensor = "model.layers.1.self_attn.q_a_proj.weight";

// Overwrites, in the header of `file`, the first `from` after tensor `name`'s key with `to`
// (the same length, so that every offset stays valid).
void replace_in_header(const std::string& file, const std::string& name, const std::string& from, const std::string& to) {
  REQUIRE(from.size() == to.size());
  auto bytes = file_bytes(file);
  std::uint64_t len = 0;
  for (int i = 7; i >= 0; --i) len = (len << 8) | static_cast<std::uint8_t>(bytes[i]);
  const std::string header(reinterpret_cast<const char*>(bytes.data()) + 8, len);
  const auto key = header.find("\"" + name + "\":{");
  REQUIRE(key != std::string::npos);
  const auto at = header.find(from, key);
  REQUIRE(at < header.find('}', key));
  std::memcpy(bytes.data() + 8 + at, to.data(), to.size());
  std::ofstream(file, std::ios::binary | std::ios::trunc).write(reinterpret_cast<const char*>(bytes.data()), bytes.size());
}

}  // namespace

TEST_CASE("the index is refused naming itself and the key when it is malformed", "[safetensors][index]") {
  temp_dir dir;
  const std::string index = (dir.path / "model.safetensors.index.json").string();
  SECTION("not JSON") {
    copy_with_index(dir.path, [](nlohmann::json&) {});
    std::ofstream(index, std::ios::trunc) << "{\"weight_map\": {";
    CHECK_THAT(open_error(dir.path), Catch::StartsWith(index + ": ") && Catch::Contains("not valid JSON"));
  }
  SECTION("no weight_map") {
    copy_with_index(dir.path, [](nlohmann::json& j) { j.erase("weight_map"); });
    CHECK_THAT(open_error(dir.path), Catch::StartsWith(index + ": ") && Catch::Contains("missing object 'weight_map'"));
  }
  SECTION("weight_map not an object") {
    copy_with_index(dir.path, [](nlohmann::json& j) { j["weight_map"] = nlohmann::json::array({"a"}); });
    CHECK_THAT(open_error(dir.path), Catch::StartsWith(index + ": ") && Catch::Contains("missing object 'weight_map'"));
  }
  SECTION("an entry that is not a string") {
    copy_with_index(dir.path, [](nlohmann::json& j) { j["weight_map"][kTensor] = 1; });
    CHECK_THAT(open_error(dir.path), Catch::StartsWith(index + ": ") &&
                                         Catch::Contains("weight_map['" + kTensor + "'] is not a file name"));
  }
  SECTION("a tensor of a shard that the index does not list") {
    copy_with_index(dir.path, [](nlohmann::json& j) { j["weight_map"].erase(kTensor); });
    CHECK_THAT(open_error(dir.path), Catch::Contains("model-0000") && Catch::Contains(".safetensors: tensor '" + kTensor +
                                                     "' is not listed in model.safetensors.index.json"));
  }
  SECTION("a listed tensor its shard does not hold") {
    copy_with_index(dir.path, [](nlohmann::json& j) { j["weight_map"]["model.layers.9.extra.weight"] = "model-00001-of-00002.safetensors"; });
    CHECK_THAT(open_error(dir.path), Catch::Contains((dir.path / "model-00001-of-00002.safetensors").string() +
                                                     ": tensor 'model.layers.9.extra.weight' is listed in "
                                                     "model.safetensors.index.json but missing from this shard"));
  }
  SECTION("a shard that does not exist") {
    // (Shards open in name order: this one comes first.)
    copy_with_index(dir.path, [](nlohmann::json& j) { j["weight_map"]["model.extra.weight"] = "model-00000-of-00002.safetensors"; });
    CHECK_THAT(open_error(dir.path), Catch::StartsWith((dir.path / "model-00000-of-00002.safetensors").string() + ": cannot open"));
  }
  SECTION("neither index nor single file") {
    CHECK_THAT(open_error(dir.path), Catch::StartsWith(dir.path.string() + ": no model.safetensors or model.safetensors.index.json"));
  }
}

TEST_CASE("the index may not point outside the model directory", "[safetensors][index]") {
  temp_dir dir;
  const fs::path model = dir.path / "model";
  fs::create_directories(model);
  const std::string index = (model / "model.safetensors.index.json").string();
  const auto fresh_model = [&] {
    fs::remove_all(model);
    fs::create_directories(model);
  };
  // A real safetensors file next to the model directory: a path to it must still be refused.
  for (const auto& entry : fs::directory_iterator(kGolden / "tiny-a-fp8" / "ckpt"))
    if (entry.path().extension() == ".safetensors") fs::copy_file(entry.path(), dir.path / entry.path().filename());
  for (const std::string& bad : std::vector<std::string>{"../model-00001-of-00002.safetensors", (dir.path / "model-00001-of-00002.safetensors").string(),
                                std::string("sub/../../model-00001-of-00002.safetensors"), std::string(".."), std::string("."),
                                std::string(""), std::string("/etc/passwd")}) {
    CAPTURE(bad);
    fresh_model();
    copy_with_index(model, [&](nlohmann::json& j) { j["weight_map"][kTensor] = bad; });
    CHECK_THAT(open_error(model), Catch::StartsWith(index + ": ") &&
                                      Catch::Contains("weight_map['" + kTensor + "'] = '" + bad + "' leaves the model directory"));
  }
  SECTION("a symbolic link out of the directory") {
    fresh_model();
    copy_with_index(model, [&](nlohmann::json& j) { j["weight_map"][kTensor] = "outside.safetensors"; });
    fs::create_symlink(dir.path / "model-00001-of-00002.safetensors", model / "outside.safetensors");
    CHECK_THAT(open_error(model), Catch::StartsWith(index + ": ") &&
                                      Catch::Contains("weight_map['" + kTensor + "'] = 'outside.safetensors' is a symbolic link to " +
                                                      (dir.path / "model-00001-of-00002.safetensors").string()) &&
                                      Catch::Contains("outside the model directory"));
  }
  SECTION("a relative symbolic link that climbs out") {
    fresh_model();
    copy_with_index(model, [&](nlohmann::json& j) { j["weight_map"][kTensor] = "up.safetensors"; });
    fs::create_symlink("../model-00001-of-00002.safetensors", model / "up.safetensors");
    CHECK_THAT(open_error(model), Catch::Contains("'up.safetensors' is a symbolic link") && Catch::Contains("outside the model directory"));
  }
  SECTION("a symbolic link that stays inside loads") {
    fresh_model();
    // Every tensor of shard 1 is listed under a link to it in a subdirectory.
    copy_with_index(model, [&](nlohmann::json& j) {
      for (auto& [name, shard] : j["weight_map"].items())
        if (shard == "model-00001-of-00002.safetensors") shard = "link.safetensors";
    });
    fs::create_directories(model / "blobs");
    fs::rename(model / "model-00001-of-00002.safetensors", model / "blobs" / "shard1");
    fs::create_symlink("blobs/shard1", model / "link.safetensors");
    CHECK(open_error(model).empty());
    CHECK(checkpoint::open(model).find(kTensor).entry != nullptr);
  }
}

TEST_CASE("every weight refusal names the file and the tensor", "[weights]") {
  temp_dir dir;
  const std::string file = (dir.path / "model.safetensors").string();
  SECTION("a layer range outside the model") {
    rewrite_checkpoint("tiny-a-bf16", dir.path, [](tensor_blob&) { return true; });
    weight_selection sel;
    sel.layer_begin = 2;
    sel.layer_end = 9;
    try {
      model_weights::load(dir.path, sel, weight_residency::mapped);
      FAIL("loaded layers 2-9 of a 4-layer model");
    } catch (const shoal::error& e) {
      CHECK(e.code() == errc::invalid_argument);
      CHECK_THAT(e.what(), Catch::Contains("layer range [2, 9) is outside the model's 4 layers"));
    }
  }
  SECTION("a weight of a type the runtime does not compute with") {
    rewrite_checkpoint("tiny-a-bf16", dir.path, [](tensor_blob& t) {
      if (t.name == "model.layers.1.self_attn.o_proj.weight") {
        t.type = kernels::dtype::f32;
        t.bytes.resize(t.bytes.size() * 2);
      }
      return true;
    });
    // F32 is computed with; rewrite the header's dtype name to one that is not (I32, same size).
    replace_in_header(file, "model.layers.1.self_attn.o_proj.weight", R"("F32")", R"("I32")");
    CHECK_THAT(load_error(dir.path), Catch::StartsWith(file + ": tensor 'model.layers.1.self_attn.o_proj.weight': ") &&
                                         Catch::Contains("dtype I32 is not supported for weights"));
  }
  SECTION("FP8 weights without quantization_config") {
    rewrite_checkpoint("tiny-a-fp8", dir.path, [](tensor_blob&) { return true; });
    fs::remove(dir.path / "config.json");
    fs::copy_file(kGolden / "tiny-a-bf16" / "ckpt" / "config.json", dir.path / "config.json");
    CHECK_THAT(load_error(dir.path), Catch::StartsWith(file + ": tensor '") &&
                                         Catch::Contains("F8_E4M3 but config.json has no quantization_config"));
  }
  SECTION("FP8 where only full precision is expected") {
    rewrite_checkpoint("tiny-a-fp8", dir.path, [](tensor_blob& t) {
      if (t.name == "model.embed_tokens.weight") {
        t.type = kernels::dtype::f8_e4m3;
        t.bytes.resize(t.bytes.size() / 2);
      }
      return true;
    });
    CHECK_THAT(load_error(dir.path), Catch::StartsWith(file + ": tensor 'model.embed_tokens.weight': ") &&
                                         Catch::Contains("F8_E4M3 is not expected for this tensor"));
  }
  SECTION("a block scale that is not F32") {
    const std::string scale = "model.layers.1.self_attn.kv_b_proj.weight_scale_inv";
    rewrite_checkpoint("tiny-a-fp8", dir.path, [&](tensor_blob& t) {
      if (t.name == scale) {
        t.type = kernels::dtype::bf16;
        t.bytes.resize(t.bytes.size() / 2);
      }
      return true;
    });
    CHECK_THAT(load_error(dir.path), Catch::StartsWith(file + ": tensor '" + scale + "': ") && Catch::Contains("dtype BF16, expected F32"));
  }
  SECTION("a block scale of the wrong shape") {
    const std::string scale = "model.layers.1.self_attn.kv_b_proj.weight_scale_inv";
    rewrite_checkpoint("tiny-a-fp8", dir.path, [&](tensor_blob& t) {
      if (t.name == scale) {
        t.shape = {t.shape[0] * t.shape[1]};
      }
      return true;
    });
    CHECK_THAT(load_error(dir.path), Catch::StartsWith(file + ": tensor '" + scale + "': shape [") && Catch::Contains("], expected ["));
  }
  SECTION("a block scale for a weight that is not FP8") {
    std::vector<tensor_blob> extra;
    extra.push_back({"model.layers.1.self_attn.o_proj.weight_scale_inv", kernels::dtype::f32, {2, 2}, std::vector<std::byte>(16)});
    rewrite_checkpoint("tiny-a-bf16", dir.path, [](tensor_blob&) { return true; }, std::move(extra));
    CHECK_THAT(load_error(dir.path), Catch::StartsWith(file + ": tensor 'model.layers.1.self_attn.o_proj.weight_scale_inv': ") &&
                                         Catch::Contains("a block scale for a tensor that is not F8_E4M3"));
  }
  SECTION("a norm of a type the runtime does not compute with") {
    rewrite_checkpoint("tiny-a-bf16", dir.path, [](tensor_blob&) { return true; });
    replace_in_header(file, "model.norm.weight", R"("BF16")", R"("I16" )");
    CHECK_THAT(load_error(dir.path), Catch::StartsWith(file + ": tensor 'model.norm.weight': ") &&
                                         Catch::Contains("dtype I16, expected F32, BF16 or F16"));
  }
}

TEST_CASE("safetensors bytes made in memory are read back checked, each tensor 64-byte aligned", "[safetensors]") {
  const std::vector<float> a{1.5f, -2.0f, 3.25f};
  const std::vector<std::uint16_t> b(70, 0x3f80);  // BF16 ones
  const std::vector<runtime::tensor_bytes> tensors{
      {"a", kernels::dtype::f32, {3}, std::as_bytes(std::span(a))},
      {"b", kernels::dtype::bf16, {7, 10}, std::as_bytes(std::span(b))}};
  const auto bytes = runtime::encode_safetensors(tensors);
  const auto file = runtime::safetensors_file::from_memory(std::as_bytes(std::span(bytes)), "peer part 1/1");
  CHECK(file->anonymous());
  REQUIRE(file->entries().size() == 2);
  for (const auto& [name, entry] : file->entries())
    CHECK(reinterpret_cast<std::uintptr_t>(file->data(entry)) % 64 == 0);
  CHECK(std::memcmp(file->data(file->entries().at("a")), a.data(), sizeof(float) * a.size()) == 0);
  CHECK(file->entries().at("b").shape == std::vector<std::int64_t>{7, 10});
  CHECK(std::memcmp(file->data(file->entries().at("b")), b.data(), 2 * b.size()) == 0);

  // A tensor whose bytes do not match its shape is not encoded.
  CHECK_THROWS_WITH(runtime::encode_safetensors(std::vector<runtime::tensor_bytes>{
                        {"c", kernels::dtype::f32, {4}, std::as_bytes(std::span(a))}}),
                    Catch::Contains("tensor 'c': 12 bytes for 4 elements of F32"));
  // Bytes that are not a safetensors file, and a file cut short, are refused by label.
  const std::vector<std::byte> junk(5, std::byte{0x7f});
  CHECK_THROWS_WITH(runtime::safetensors_file::from_memory(junk, "peer part 2/3"),
                    Catch::Contains("peer part 2/3: corrupt safetensors file: only 5 bytes"));
  CHECK_THROWS_WITH(runtime::safetensors_file::from_memory(std::as_bytes(std::span(bytes)).first(bytes.size() - 4),
                                                           "peer part 3/3"),
                    Catch::Contains("peer part 3/3"));
  // Files put together into a checkpoint: a tensor in two of them is refused naming both.
  std::vector<std::unique_ptr<runtime::safetensors_file>> files;
  files.push_back(runtime::safetensors_file::from_memory(std::as_bytes(std::span(bytes)), "part 1"));
  files.push_back(runtime::safetensors_file::from_memory(std::as_bytes(std::span(bytes)), "part 2"));
  CHECK_THROWS_WITH(runtime::checkpoint::from_files("weights from node x", std::move(files)),
                    Catch::Contains("weights from node x: tensor 'a' is in both part 1 and part 2"));
}
