#pragma once
/// \file
/// Weights encrypted at rest: AES-256-GCM, streamed in chunks, so that a checkpoint is never
/// held in memory twice while it is encrypted and only the chunks a process reads are
/// decrypted when it loads. The format is specified in docs/security.md ("Encrypted weights").
///
/// File layout: a 64-byte header, then each chunk's ciphertext followed by its 16-byte tag.
///
/// | offset | bytes | field                                                      |
/// |--------|-------|------------------------------------------------------------|
/// | 0      | 8     | magic `SHOALENC`                                           |
/// | 8      | 4     | format version, little-endian (1)                          |
/// | 12     | 4     | plaintext bytes per chunk, little-endian (the last is shorter) |
/// | 16     | 8     | plaintext size of the file, little-endian                  |
/// | 24     | 32    | random salt of this file                                   |
/// | 56     | 8     | zero                                                       |
///
/// Each file is encrypted under its own key, HMAC-SHA256(key, "shoal weights v1 file key" ||
/// salt); chunk i uses the 96-bit nonce i (big-endian), unique under that file key. The
/// additional authenticated data of chunk i is "shoal weights v1", the whole header, the
/// file's name (without directory), i (8 bytes, little-endian) and one byte, 1 for the final
/// chunk and 0 otherwise: a chunk cannot be moved within a file or to another file, a file
/// cannot be renamed to another shard's name, and cutting chunks off its end is detected. A file
/// always has at least one (possibly empty) final chunk.

#include <array>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>

namespace shoal::runtime {

/// A 256-bit key for weights at rest.
struct weights_key {
  std::array<unsigned char, 32> bytes{};  ///< The key material.
};

/// Reads a key file: 64 hex characters (32 bytes), surrounding whitespace ignored. Throws
/// `not_found` when it cannot be read, `failed_precondition` when users other than its owner
/// may read or write it (chmod 600), `invalid_argument` for any other content; every message
/// names the file.
weights_key read_weights_key(const std::filesystem::path& file);

/// Plaintext bytes per chunk unless told otherwise (4 MiB).
inline constexpr std::uint32_t kWeightsChunkBytes = 4u << 20;

/// Whether `file` starts with the encrypted format's magic.
bool is_encrypted_weights_file(const std::filesystem::path& file);

/// Encrypts `source` into `target` (created; an existing file is refused) in chunks of
/// `chunk_bytes` (4 KiB to 64 MiB), binding the chunks to `target`'s file name. Reads and
/// writes one chunk at a time.
void encrypt_weights_file(const std::filesystem::path& source, const std::filesystem::path& target,
                          const weights_key& key, std::uint32_t chunk_bytes = kWeightsChunkBytes);

/// An encrypted file opened for reading chunk by chunk. Not thread-safe.
class encrypted_weights_reader {
 public:
  /// Opens `file` and checks its header and its size against the header (a truncated or
  /// extended file is refused here). Throws `invalid_argument` naming the file.
  encrypted_weights_reader(const std::filesystem::path& file, const weights_key& key);
  ~encrypted_weights_reader();
  encrypted_weights_reader(const encrypted_weights_reader&) = delete;
  encrypted_weights_reader& operator=(const encrypted_weights_reader&) = delete;

  /// Plaintext size of the file.
  std::uint64_t plain_size() const noexcept { return plain_size_; }
  /// Plaintext bytes per chunk.
  std::uint32_t chunk_bytes() const noexcept { return chunk_bytes_; }
  /// Number of chunks (at least 1).
  std::uint64_t chunks() const noexcept { return chunks_; }
  /// Decrypts chunk `index` into `out` (room for its plaintext: `chunk_bytes`, less for the
  /// last). Throws `invalid_argument` naming the file and the chunk when it does not
  /// authenticate (a wrong key, or a changed, moved or missing chunk).
  void decrypt_chunk(std::uint64_t index, std::byte* out);

 private:
  void check_header(const std::filesystem::path& file, const weights_key& key);
  std::filesystem::path path_;
  int fd_ = -1;
  std::array<unsigned char, 64> header_{};
  std::array<unsigned char, 32> file_key_{};
  std::uint32_t chunk_bytes_ = 0;
  std::uint64_t plain_size_ = 0;
  std::uint64_t chunks_ = 0;
  std::unique_ptr<std::byte[]> buffer_;
};

/// What `encrypt_checkpoint` did.
struct encrypt_summary {
  std::size_t encrypted_files = 0;  ///< `.safetensors` files written encrypted.
  std::size_t copied_files = 0;     ///< Other files copied as they are.
  std::uint64_t bytes = 0;          ///< Plaintext bytes read.
  bool manifest = false;            ///< Whether a manifest of the output was written.
  double seconds = 0;               ///< Wall time.
};

/// Writes `out` (created; it must not exist or be empty) from checkpoint `dir`: every
/// `.safetensors` file encrypted, every other visible regular file copied as it is (config,
/// index, tokenizer, chat template: the gateway reads them without the key), except
/// `shoal-manifest.json`. When `dir` has a manifest it is verified first, and `out` gets a
/// manifest of its own stored files, so `shoal verify` works on both. `progress` gets a line
/// per file.
encrypt_summary encrypt_checkpoint(const std::filesystem::path& dir, const std::filesystem::path& out,
                                   const weights_key& key, std::uint32_t chunk_bytes = kWeightsChunkBytes,
                                   const std::function<void(const std::string&)>& progress = {});

}  // namespace shoal::runtime
