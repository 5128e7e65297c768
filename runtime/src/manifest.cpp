#include "shoal/runtime/manifest.hpp"

#include "shoal/base/error.hpp"
#include "shoal/base/hex.hpp"

#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <openssl/evp.h>

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <fstream>
#include <map>
#include <mutex>
#include <sstream>
#include <thread>
#include <vector>

namespace shoal::runtime {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using clock_type = std::chrono::steady_clock;

constexpr std::size_t kReadBytes = 8 << 20;
constexpr std::uint64_t kProgressEvery = 1ull << 30;

struct md_ctx_free {
  void operator()(EVP_MD_CTX* c) const { EVP_MD_CTX_free(c); }
};

// SHA-256 of one file, streamed; progress every GiB of a big file.
std::string sha256_file(const fs::path& path, const std::string& name, const manifest_progress& progress) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) shoal::fail(errc::invalid_argument, "{}: cannot be read", path.string());
  struct closer {
    int fd;
    ~closer() { ::close(fd); }
  } guard{fd};
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);
  std::unique_ptr<EVP_MD_CTX, md_ctx_free> ctx(EVP_MD_CTX_new());
  SHOAL_REQUIRE(ctx && EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) == 1, "SHA-256 init failed");
  std::vector<unsigned char> buf(kReadBytes);
  std::error_code ec;
  const auto total = fs::file_size(path, ec);
  std::uint64_t done = 0, next_report = kProgressEvery;
  for (;;) {
    const auto n = ::read(fd, buf.data(), buf.size());
    if (n < 0) shoal::fail(errc::invalid_argument, "{}: read failed", path.string());
    if (n == 0) break;
    SHOAL_REQUIRE(EVP_DigestUpdate(ctx.get(), buf.data(), static_cast<std::size_t>(n)) == 1, "SHA-256 update failed");
    done += static_cast<std::uint64_t>(n);
    if (progress && done >= next_report) {
      progress(fmt::format("hashing {}: {:.1f}/{:.1f} GB", name, static_cast<double>(done) / 1e9,
                           static_cast<double>(total) / 1e9));
      next_report += kProgressEvery;
    }
  }
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  SHOAL_REQUIRE(EVP_DigestFinal_ex(ctx.get(), digest, &len) == 1 && len == 32, "SHA-256 final failed");
  return to_hex(digest, len);
}

// Hashes `names` (relative to `dir`) on a few threads; the hashes in the same order. The
// first failure is rethrown after every thread has stopped.
std::vector<std::string> hash_files(const fs::path& dir, const std::vector<std::string>& names,
                                    const manifest_progress& progress) {
  std::vector<std::string> hashes(names.size());
  std::mutex progress_mutex;
  const manifest_progress locked = progress ? manifest_progress([&](const std::string& line) {
    std::lock_guard lock(progress_mutex);
    progress(line);
  })
                                            : manifest_progress();
  std::atomic<std::size_t> next{0};
  std::exception_ptr failure;
  std::mutex failure_mutex;
  // Reading is usually the limit; a few files at once keep a fast disk (and SHA-256 on more
  // than one core) busy without thrashing a slow one.
  const unsigned threads = std::clamp<unsigned>(std::thread::hardware_concurrency(), 1, 4);
  auto work = [&] {
    for (std::size_t i; (i = next.fetch_add(1)) < names.size();) {
      try {
        hashes[i] = sha256_file(dir / names[i], names[i], locked);
      } catch (...) {
        std::lock_guard lock(failure_mutex);
        if (!failure) failure = std::current_exception();
        next = names.size();
      }
    }
  };
  std::vector<std::thread> pool;
  for (unsigned t = 1; t < std::min<std::size_t>(threads, names.size()); ++t) pool.emplace_back(work);
  work();
  for (auto& t : pool) t.join();
  if (failure) std::rethrow_exception(failure);
  return hashes;
}

bool hidden(const fs::path& relative) {
  for (const auto& part : relative)
    if (part.string().starts_with(".")) return true;
  return false;
}

// Regular files under `dir` (relative, `/`-separated, sorted), hidden ones and the manifest
// left out.
std::vector<std::string> list_files(const fs::path& dir) {
  std::vector<std::string> names;
  for (auto it = fs::recursive_directory_iterator(dir); it != fs::recursive_directory_iterator(); ++it) {
    const auto relative = it->path().lexically_relative(dir);
    if (hidden(relative)) {
      if (it->is_directory()) it.disable_recursion_pending();
      continue;
    }
    if (!it->is_regular_file()) continue;
    const auto name = relative.generic_string();
    if (name == kManifestFile || name.starts_with(std::string(kManifestFile) + ".tmp")) continue;
    names.push_back(name);
  }
  std::sort(names.begin(), names.end());
  return names;
}

std::string file_signature(const fs::path& path) {
  std::error_code ec;
  const auto size = fs::file_size(path, ec);
  const auto time = fs::last_write_time(path, ec).time_since_epoch().count();
  return fmt::format("{}:{}:{};", path.string(), size, time);
}

}  // namespace

manifest_summary write_manifest(const fs::path& dir, const manifest_progress& progress) {
  if (!fs::is_directory(dir)) shoal::fail(errc::invalid_argument, "--model {}: not a directory", dir.string());
  const auto start = clock_type::now();
  const auto names = list_files(dir);
  if (names.empty()) shoal::fail(errc::invalid_argument, "{}: no files to list", dir.string());
  if (progress) progress(fmt::format("hashing {} files in {}", names.size(), dir.string()));
  const auto hashes = hash_files(dir, names, progress);
  manifest_summary summary;
  json files = json::object();
  for (std::size_t i = 0; i < names.size(); ++i) {
    const auto bytes = fs::file_size(dir / names[i]);
    files[names[i]] = {{"bytes", bytes}, {"sha256", hashes[i]}};
    summary.bytes += bytes;
  }
  summary.files = names.size();
  const json manifest{{"format", "shoal-manifest"}, {"version", 1}, {"algorithm", "sha256"}, {"files", files}};
  const auto tmp = dir / fmt::format("{}.tmp-{}", kManifestFile, ::getpid());
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out << manifest.dump(1) << "\n";
    if (!out.flush()) shoal::fail(errc::invalid_argument, "{}: cannot be written", tmp.string());
  }
  fs::rename(tmp, dir / kManifestFile);
  summary.seconds = std::chrono::duration<double>(clock_type::now() - start).count();
  return summary;
}

std::optional<manifest_summary> verify_manifest(const fs::path& dir, const manifest_progress& progress,
                                                const std::function<bool(const std::string& name)>& hash) {
  const auto manifest_path = dir / kManifestFile;
  if (!fs::exists(manifest_path)) return std::nullopt;
  const auto start = clock_type::now();
  std::string text;
  {
    std::ifstream in(manifest_path, std::ios::binary);
    std::stringstream s;
    s << in.rdbuf();
    text = s.str();
  }
  const auto manifest = json::parse(text, nullptr, false);
  auto malformed = [&](std::string_view why) {
    shoal::fail(errc::invalid_argument, "{}: {}; write it again with `shoal verify --model {} --write`",
                manifest_path.string(), why, dir.string());
  };
  if (!manifest.is_object() || manifest.value("format", "") != "shoal-manifest" || !manifest.contains("version") ||
      manifest["version"] != 1 || manifest.value("algorithm", "") != "sha256" || !manifest.contains("files") ||
      !manifest["files"].is_object())
    malformed("not a version 1 shoal-manifest of SHA-256 hashes");
  struct listed {
    std::string name, sha256;
    std::uint64_t bytes = 0;
  };
  std::vector<listed> files;
  for (const auto& [name, entry] : manifest["files"].items()) {
    const fs::path relative(name);
    if (name.empty() || relative.is_absolute() || relative.lexically_normal().generic_string() != name ||
        name.starts_with("../") || name == "..")
      malformed(fmt::format("the entry '{}' is not a plain path inside the directory", name.substr(0, 200)));
    if (!entry.is_object() || !entry.contains("sha256") || !entry["sha256"].is_string() || !entry.contains("bytes") ||
        !entry["bytes"].is_number_unsigned())
      malformed(fmt::format("the entry '{}' has no bytes and sha256", name));
    files.push_back({name, entry["sha256"].get<std::string>(), entry["bytes"].get<std::uint64_t>()});
  }
  // Cheap checks first: every listed file there with its size, nothing the loader reads unlisted.
  for (const auto& f : files) {
    const auto path = dir / f.name;
    std::error_code ec;
    if (!fs::is_regular_file(path, ec))
      shoal::fail(errc::invalid_argument, "{}: listed in {} but missing", path.string(), kManifestFile);
    const auto size = fs::file_size(path, ec);
    if (size != f.bytes)
      shoal::fail(errc::invalid_argument, "{}: {} bytes, but {} says {}: the file was changed or truncated",
                  path.string(), size, kManifestFile, f.bytes);
  }
  for (const auto& name : list_files(dir)) {
    const bool read_by_loader = name.ends_with(".safetensors") || name.ends_with(".json");
    if (read_by_loader && !manifest["files"].contains(name))
      shoal::fail(errc::invalid_argument, "{}: not listed in {}: remove it, or write the manifest again",
                  (dir / name).string(), kManifestFile);
  }
  // Every stage and expert actor of a process loads from the same directory: a file is hashed
  // once per process. The memo is process-wide by nature (it stands for files on disk), keyed
  // by canonical path and invalidated by any change of expected hash, size or mtime.
  static std::mutex memo_mutex;
  static std::map<std::string, std::string> hashed;
  std::vector<std::string> names, expected, keys, signatures;
  manifest_summary summary;
  for (const auto& f : files) {
    if (hash && !hash(f.name)) continue;
    std::error_code ec;
    const auto path = dir / f.name;
    const auto key = fs::canonical(path, ec).string();
    const auto signature = f.sha256 + ";" + file_signature(path);
    {
      std::lock_guard lock(memo_mutex);
      if (auto it = hashed.find(key); it != hashed.end() && it->second == signature) continue;
    }
    names.push_back(f.name);
    expected.push_back(f.sha256);
    keys.push_back(key);
    signatures.push_back(signature);
    summary.bytes += f.bytes;
  }
  summary.files = names.size();
  if (names.empty()) return summary;
  if (progress)
    progress(fmt::format("checking {} files ({:.2f} GB) against {}", names.size(), static_cast<double>(summary.bytes) / 1e9,
                         kManifestFile));
  const auto hashes = hash_files(dir, names, progress);
  for (std::size_t i = 0; i < names.size(); ++i)
    if (hashes[i] != expected[i])
      shoal::fail(errc::invalid_argument, "{}: SHA-256 {} does not match {} ({}): the file was changed",
                  (dir / names[i]).string(), hashes[i], kManifestFile, expected[i]);
  summary.seconds = std::chrono::duration<double>(clock_type::now() - start).count();
  std::lock_guard lock(memo_mutex);
  for (std::size_t i = 0; i < names.size(); ++i) hashed[keys[i]] = signatures[i];
  return summary;
}

}  // namespace shoal::runtime
