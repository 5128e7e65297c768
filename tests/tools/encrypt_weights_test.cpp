// shoal encrypt-weights and --key-file: an encrypted copy generates the plain model's tokens;
// a wrong key, a changed byte, reordered chunks, swapped shards, a cut-off file, a plain shard
// in an encrypted checkpoint and malformed key files are refused with exit code 2 naming the
// file.

#include "run_shoal.hpp"

#include <catch2/catch.hpp>

#include <sys/stat.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

namespace fs = std::filesystem;
using shoal::test::run;

namespace {

struct temp_dir {
  fs::path path;
  temp_dir() {
    char pattern[] = "/tmp/shoal-encrypt-XXXXXX";
    path = ::mkdtemp(pattern);
  }
  ~temp_dir() { fs::remove_all(path); }
};

void write_private(const fs::path& file, const std::string& text) {
  std::ofstream(file) << text;
  fs::permissions(file, fs::perms::owner_read | fs::perms::owner_write);
}

const std::string kGenerate = " --tokens 0,17,5 --max-new-tokens 8 --temperature 0 --json --quiet";

// A tiny checkpoint, a key and its encrypted copy in 64 KiB chunks (several per shard).
struct encrypted_model {
  temp_dir dir;
  fs::path plain = dir.path / "plain";
  fs::path enc = dir.path / "enc";
  fs::path key = dir.path / "key";
  std::string plain_tokens;

  encrypted_model() {
    REQUIRE(run("make-model --preset tiny --out " + plain.string()).exit_code == 0);
    REQUIRE(run("verify --write --quiet --model " + plain.string()).exit_code == 0);
    const auto made = run("keys new-weights-key --file " + key.string());
    REQUIRE(made.exit_code == 0);
    const auto r = run("encrypt-weights --quiet --chunk-kib 64 --model " + plain.string() + " --out " + enc.string() +
                       " --key-file " + key.string());
    INFO(r.err);
    REQUIRE(r.exit_code == 0);
    const auto g = run("generate --model " + plain.string() + kGenerate);
    REQUIRE(g.exit_code == 0);
    plain_tokens = g.out;
  }

  // The first shard of the encrypted copy.
  fs::path shard() const { return enc / "model-00001-of-00003.safetensors"; }
};

}  // namespace

TEST_CASE("an encrypted checkpoint generates the plain one's greedy tokens with its key", "[cli][encrypt]") {
  encrypted_model m;
  struct stat info {};
  REQUIRE(::stat(m.key.c_str(), &info) == 0);
  CHECK((info.st_mode & 0777) == 0600);
  std::ifstream key_in(m.key);
  std::string key_text;
  key_in >> key_text;
  CHECK(key_text.size() == 64);
  CHECK(key_text.find_first_not_of("0123456789abcdef") == std::string::npos);
  CHECK(run("keys new-weights-key --file " + m.key.string()).exit_code == 2);  // never overwritten

  // Weights are encrypted; the files the gateway reads without the key are not.
  std::ifstream shard(m.shard(), std::ios::binary);
  std::string magic(8, '\0');
  shard.read(magic.data(), 8);
  CHECK(magic == "SHOALENC");
  CHECK(fs::file_size(m.enc / "config.json") == fs::file_size(m.plain / "config.json"));

  const auto with_option = run("generate --model " + m.enc.string() + " --key-file " + m.key.string() + kGenerate);
  INFO(with_option.err);
  REQUIRE(with_option.exit_code == 0);
  CHECK(with_option.out == m.plain_tokens);
  const auto no_key = run("generate --model " + m.enc.string() + kGenerate + " --mmap");
  CHECK(no_key.exit_code == 2);
  CHECK_THAT(no_key.err, Catch::Contains(m.shard().string()) && Catch::Contains("SHOAL_WEIGHTS_KEY_FILE"));
  ::setenv("SHOAL_WEIGHTS_KEY_FILE", m.key.c_str(), 1);
  const auto env_run = run("generate --model " + m.enc.string() + kGenerate + " --mmap");
  ::unsetenv("SHOAL_WEIGHTS_KEY_FILE");
  CHECK(env_run.exit_code == 0);
  CHECK(env_run.out == m.plain_tokens);

  // The manifest of the copy lists its stored (encrypted) files.
  const auto verified = run("verify --quiet --model " + m.enc.string());
  INFO(verified.err);
  CHECK(verified.exit_code == 0);
}

TEST_CASE("a wrong key, a changed byte, a cut-off file or a plain shard is refused naming the file",
          "[cli][encrypt]") {
  encrypted_model m;
  const auto generate = [&](const fs::path& key) {
    return run("generate --model " + m.enc.string() + " --key-file " + key.string() + kGenerate);
  };
  // verify would name the changed file too; these check the decryption itself.
  fs::remove(m.enc / "shoal-manifest.json");

  SECTION("wrong key") {
    write_private(m.dir.path / "other", std::string(64, '7') + "\n");
    const auto r = generate(m.dir.path / "other");
    CHECK(r.exit_code == 2);
    CHECK_THAT(r.err, Catch::Contains(m.shard().string()) && Catch::Contains("does not authenticate"));
  }
  SECTION("one flipped byte in a chunk") {
    {
      std::fstream f(m.shard(), std::ios::in | std::ios::out | std::ios::binary);
      f.seekg(200000);  // inside the fourth 64 KiB chunk, in tensor data
      char c = 0;
      f.read(&c, 1);
      f.seekp(200000);
      c = static_cast<char>(c ^ 0x01);
      f.write(&c, 1);
    }
    const auto r = generate(m.key);
    CHECK(r.exit_code == 2);
    CHECK_THAT(r.err, Catch::Contains(m.shard().string()) && Catch::Contains("chunk 3 ") &&
                          Catch::Contains("does not authenticate"));
  }
  SECTION("two chunks of a file swapped") {
    constexpr std::streamoff kStride = 64 * 1024 + 16;  // a chunk's ciphertext and tag
    std::fstream f(m.shard(), std::ios::in | std::ios::out | std::ios::binary);
    std::string first(kStride, '\0'), second(kStride, '\0');
    f.seekg(64 + kStride);
    f.read(first.data(), kStride);
    f.read(second.data(), kStride);
    f.seekp(64 + kStride);
    f.write(second.data(), kStride);
    f.write(first.data(), kStride);
    f.close();
    const auto r = generate(m.key);
    CHECK(r.exit_code == 2);
    CHECK_THAT(r.err, Catch::Contains(m.shard().string()) && Catch::Contains("chunk 1 ") &&
                          Catch::Contains("does not authenticate"));
  }
  SECTION("a cut-off file") {
    fs::resize_file(m.shard(), fs::file_size(m.shard()) - 70000);
    const auto r = generate(m.key);
    CHECK(r.exit_code == 2);
    CHECK_THAT(r.err, Catch::Contains(m.shard().string()) && Catch::Contains("truncated"));
  }
  SECTION("two shards swapped by name") {
    const auto second = m.enc / "model-00002-of-00003.safetensors";
    fs::rename(m.shard(), m.dir.path / "swap");
    fs::rename(second, m.shard());
    fs::rename(m.dir.path / "swap", second);
    const auto r = generate(m.key);
    CHECK(r.exit_code == 2);
    CHECK_THAT(r.err, Catch::Contains("does not authenticate"));
  }
  SECTION("a plain shard among encrypted ones") {
    fs::remove(m.shard());
    fs::copy_file(m.plain / m.shard().filename(), m.shard());
    const auto r = generate(m.key);
    CHECK(r.exit_code == 2);
    CHECK_THAT(r.err, Catch::Contains(m.shard().string()) && Catch::Contains("not encrypted, but a weights key was given"));
  }
}

TEST_CASE("a weights key file must hold 64 hex characters and be private", "[cli][encrypt]") {
  temp_dir dir;
  REQUIRE(run("make-model --preset tiny --out " + (dir.path / "plain").string()).exit_code == 0);
  const auto encrypt_with = [&](const std::string& text, fs::perms mode) {
    const auto key = dir.path / "key";
    fs::remove(key);
    std::ofstream(key) << text;
    fs::permissions(key, mode);
    fs::remove_all(dir.path / "enc");
    return run("encrypt-weights --quiet --model " + (dir.path / "plain").string() + " --out " +
               (dir.path / "enc").string() + " --key-file " + key.string());
  };
  const auto owner = fs::perms::owner_read | fs::perms::owner_write;
  auto r = encrypt_with(std::string(63, 'a') + "\n", owner);
  CHECK(r.exit_code == 2);
  CHECK_THAT(r.err, Catch::Contains("key: a weights key file holds 64 hex characters (32 bytes), this one holds 63"));
  r = encrypt_with(std::string(62, 'a') + "zz", owner);
  CHECK(r.exit_code == 2);
  CHECK_THAT(r.err, Catch::Contains("key: character 63 of the weights key is not a hex digit"));
  r = encrypt_with("", owner);
  CHECK(r.exit_code == 2);
  CHECK_THAT(r.err, Catch::Contains("this one holds 0 characters"));
  r = encrypt_with(std::string(64, 'a'), owner | fs::perms::group_read | fs::perms::others_read);
  CHECK(r.exit_code == 2);
  CHECK_THAT(r.err, Catch::Contains("may be read or written by other users (mode 0644); run chmod 600"));
  CHECK(run("encrypt-weights --quiet --model " + (dir.path / "plain").string() + " --out " +
            (dir.path / "enc").string() + " --key-file " + (dir.path / "missing").string())
            .exit_code == 2);
  // A key is only ever read from a file: there is no option that takes one.
  CHECK(run("generate --key " + std::string(64, 'a') + " --model " + (dir.path / "plain").string() + kGenerate)
            .exit_code == 2);
}
