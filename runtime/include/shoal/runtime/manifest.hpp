#pragma once
/// \file
/// `shoal-manifest.json`: the SHA-256 of every file of a checkpoint directory, written by
/// `shoal verify --model DIR --write` and checked by `shoal verify` and, when present, by
/// every load of the weights (`model_weights::load`).
///
///     {"format": "shoal-manifest", "version": 1, "algorithm": "sha256",
///      "files": {"config.json": {"bytes": 1234, "sha256": "9f86..."}, ...}}
///
/// Paths are relative to the directory, with `/` separators. Checking reads every listed file
/// once (streamed, several files at a time); see docs/security.md for what that costs.

#include <cstdint>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>

namespace shoal::runtime {

/// The manifest's file name inside a checkpoint directory.
inline constexpr const char* kManifestFile = "shoal-manifest.json";

/// What a manifest covered.
struct manifest_summary {
  std::size_t files = 0;     ///< Files listed (written) or hashed now (checked).
  std::uint64_t bytes = 0;   ///< Their total size.
  double seconds = 0;        ///< Time spent hashing.
};

/// Progress lines (a file started, and every GiB of a big file).
using manifest_progress = std::function<void(const std::string& line)>;

/// Hashes every regular file under `dir` (hidden entries and the manifest itself left out)
/// and writes `dir/shoal-manifest.json` (atomically, through a temporary file). Throws
/// `shoal::error` (`invalid_argument`) when a file cannot be read.
manifest_summary write_manifest(const std::filesystem::path& dir, const manifest_progress& progress = {});

/// Checks `dir` against its manifest; nothing (and no work) when it has none. Throws
/// `shoal::error` (`invalid_argument`) naming the first file that is missing, has another size
/// or another hash, and any `.safetensors` or `.json` file the manifest does not list (a
/// loader would read it unchecked). Every listed file's size is checked; only the files for
/// which `hash` returns true (all, when it is empty) are hashed. A file this process already
/// hashed, unchanged since (same expected hash, size and modification time), is not hashed
/// again.
std::optional<manifest_summary> verify_manifest(const std::filesystem::path& dir,
                                                const manifest_progress& progress = {},
                                                const std::function<bool(const std::string& name)>& hash = {});

}  // namespace shoal::runtime
