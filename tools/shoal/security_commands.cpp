// shoal keys new: API keys for `shoal serve --api-keys`; keys new-join-secret: a cluster's
// join secret; keys new-weights-key and encrypt-weights: weights encrypted at rest; shoal
// verify: the checkpoint's SHA-256 manifest.

#include "commands.hpp"

#include "shoal/base/error.hpp"
#include "shoal/gateway/security.hpp"
#include "shoal/runtime/manifest.hpp"
#include "shoal/runtime/weights_crypto.hpp"

#include <CLI/CLI.hpp>
#include <fmt/core.h>
#include <openssl/rand.h>

#include <array>
#include <cerrno>
#include <cstdio>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <string>

#include <fcntl.h>
#include <unistd.h>

namespace shoal::tools {
namespace {

struct keys_new_options {
  std::string file;
  std::string name;
  std::string scope = "model";
};

// 32 random bytes from OpenSSL's generator, as 64 hex characters and a newline, into a new
// file only its owner can read; an existing file is never overwritten (it may be in use).
void write_random_secret(const std::string& file) {
  std::array<unsigned char, 32> bytes{};
  if (RAND_bytes(bytes.data(), static_cast<int>(bytes.size())) != 1)
    shoal::fail(errc::internal, "OpenSSL's random generator failed");
  std::string text;
  for (auto b : bytes) text += fmt::format("{:02x}", b);
  text += '\n';
  const int fd = ::open(file.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0)
    shoal::fail(errno == EEXIST ? errc::failed_precondition : errc::invalid_argument, "{}: cannot create it: {}", file,
                std::strerror(errno));
  const bool written = ::write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size());
  const bool closed = ::close(fd) == 0;
  if (!written || !closed) {
    ::unlink(file.c_str());
    shoal::fail(errc::unavailable, "{}: cannot write it: {}", file, std::strerror(errno));
  }
}

void add_keys(CLI::App& app) {
  auto* keys = app.add_subcommand("keys", "API keys for shoal serve --api-keys, a cluster's join secret, a weights key");
  auto join_secret = std::make_shared<std::string>();
  auto* secret = keys->add_subcommand(
      "new-join-secret", "Write a cluster join secret (32 random bytes as 64 hex characters, mode 0600) for the "
                         "cluster config's join_secret_file; an existing file is left alone");
  secret->add_option("--file", *join_secret, "File to create")->required();
  secret->callback([join_secret] {
    write_random_secret(*join_secret);
    fmt::print(stderr, "wrote a join secret to {}: give every node, gateway and admin of the cluster a copy (mode 0600)\n",
               *join_secret);
  });
  auto weights_key = std::make_shared<std::string>();
  auto* key = keys->add_subcommand(
      "new-weights-key", "Write a key for shoal encrypt-weights (32 random bytes as 64 hex characters, mode 0600); "
                         "an existing file is left alone");
  key->add_option("--file", *weights_key, "File to create")->required();
  key->callback([weights_key] {
    write_random_secret(*weights_key);
    fmt::print(stderr, "wrote a weights key to {}: keep a copy where the encrypted checkpoint's readers cannot reach "
                       "it, and give it to every node that loads the weights (mode 0600)\n",
               *weights_key);
  });
  keys->require_subcommand(1);
  auto o = std::make_shared<keys_new_options>();
  auto* add = keys->add_subcommand(
      "new", "Make a key: its salted SHA-256 is appended to --file and the key is printed on stdout, the only time it is shown");
  add->add_option("--file", o->file, "Keys file (created, mode 0600, when absent)")->required();
  add->add_option("--name", o->name, "Who the key is for ([A-Za-z0-9._@-], unique in the file; the audit log shows it)")
      ->required();
  add->add_option("--scope", o->scope, "model: generate and list models; admin: that and the admin routes")
      ->capture_default_str()
      ->check(CLI::IsMember({"model", "admin"}));
  add->callback([o] {
    const auto key = gateway::add_api_key(o->file, o->name, o->scope == "admin");
    fmt::print(stderr, "added key '{}' (scope {}) to {}; it is shown once, below\n", o->name, o->scope, o->file);
    fmt::print("{}\n", key);
    std::fflush(stdout);
  });
}

struct verify_options {
  std::string model;
  bool write = false;
  bool quiet = false;
};

struct encrypt_options {
  std::string model;
  std::string out;
  std::string key_file;
  std::uint32_t chunk_kib = runtime::kWeightsChunkBytes / 1024;
  bool quiet = false;
};

void add_encrypt_weights(CLI::App& app) {
  auto o = std::make_shared<encrypt_options>();
  auto* cmd = app.add_subcommand("encrypt-weights",
                                 "Write a copy of a checkpoint whose .safetensors files are encrypted (AES-256-GCM, "
                                 "in chunks); other files are copied as they are");
  cmd->add_option("--model", o->model, "Checkpoint directory to encrypt")->required();
  cmd->add_option("--out", o->out, "Output directory (created; must not exist or be empty)")->required();
  cmd->add_option("--key-file", o->key_file, "Key file (shoal keys new-weights-key)")->required();
  cmd->add_option("--chunk-kib", o->chunk_kib, "Plaintext KiB per authenticated chunk")
      ->capture_default_str()
      ->check(CLI::Range(4, 65536));
  cmd->add_flag("--quiet", o->quiet, "No progress lines on stderr");
  cmd->callback([o] {
    const auto key = runtime::read_weights_key(o->key_file);
    std::function<void(const std::string&)> progress;
    if (!o->quiet) progress = [](const std::string& line) { fmt::print(stderr, "[encrypt] {}\n", line); };
    const auto s = runtime::encrypt_checkpoint(o->model, o->out, key, o->chunk_kib * 1024, progress);
    fmt::print("wrote {}: {} files encrypted, {} copied, {:.2f} GB, {:.1f} s{}\n", o->out, s.encrypted_files,
               s.copied_files, static_cast<double>(s.bytes) / 1e9, s.seconds,
               s.manifest ? fmt::format(" (and its {})", runtime::kManifestFile) : std::string());
  });
}

void add_verify(CLI::App& app) {
  auto o = std::make_shared<verify_options>();
  auto* cmd = app.add_subcommand("verify",
                                 "Check a checkpoint directory against its shoal-manifest.json (SHA-256 of every file), "
                                 "or --write one");
  cmd->add_option("--model", o->model, "Checkpoint directory")->required();
  cmd->add_flag("--write", o->write, "Hash every file and write shoal-manifest.json (replacing one that is there)");
  cmd->add_flag("--quiet", o->quiet, "No progress lines on stderr");
  cmd->callback([o] {
    runtime::manifest_progress progress;
    if (!o->quiet) progress = [](const std::string& line) { fmt::print(stderr, "[verify] {}\n", line); };
    if (o->write) {
      const auto s = runtime::write_manifest(o->model, progress);
      fmt::print("wrote {}/{}: {} files, {:.2f} GB, {:.1f} s\n", o->model, runtime::kManifestFile, s.files,
                 static_cast<double>(s.bytes) / 1e9, s.seconds);
      return;
    }
    const auto s = runtime::verify_manifest(o->model, progress);
    if (!s)
      shoal::fail(errc::invalid_argument, "{} has no {}; write one with `shoal verify --model {} --write`", o->model,
                  runtime::kManifestFile, o->model);
    fmt::print("{}: {} files, {:.2f} GB match {} ({:.1f} s)\n", o->model, s->files, static_cast<double>(s->bytes) / 1e9,
               runtime::kManifestFile, s->seconds);
  });
}

}  // namespace

void add_security_commands(CLI::App& app) {
  add_keys(app);
  add_encrypt_weights(app);
  add_verify(app);
}

}  // namespace shoal::tools
