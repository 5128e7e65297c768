#pragma once
/// \file
/// Safetensors checkpoints: single files and sharded sets with `model.safetensors.index.json`,
/// memory-mapped and validated before any tensor is used. Files encrypted at rest
/// (weights_crypto.hpp) are decrypted into anonymous memory, a chunk when a tensor in it is
/// first read.

#include "shoal/kernels/dtype.hpp"
#include "shoal/runtime/weights_crypto.hpp"

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace shoal::runtime {

/// One tensor's entry in a safetensors header.
struct tensor_entry {
  std::string name;                         ///< Tensor name.
  std::string dtype_name;                   ///< As written ("BF16", "I64", ...).
  std::optional<kernels::dtype> type;       ///< Set for the types the runtime computes with.
  std::vector<std::int64_t> shape;          ///< Dimensions.
  std::uint64_t begin = 0;                  ///< Offset of the data from the end of the header.
  std::uint64_t end = 0;                    ///< One past the last byte.
  std::uint64_t elements() const noexcept;  ///< Product of the shape.
};

/// Parses and validates a safetensors header: `data` holds the whole file's first `size` bytes
/// (at least the 8-byte length and the JSON header). `data_size` is the size of the data area
/// that follows the header (file size - 8 - header length). Every entry's dtype and shape
/// must agree with its byte range, ranges must lie inside the data area and not overlap.
/// Errors name `source` and the tensor. Throws `shoal::error(errc::invalid_argument)`.
std::vector<tensor_entry> parse_safetensors_header(const std::byte* data, std::size_t size,
                                                   std::string_view source);

/// A memory-mapped safetensors file, or an encrypted one decrypted as it is read.
class safetensors_file {
 public:
  /// Maps and validates `path`; throws with the file name on any inconsistency. With `key`
  /// the file must be encrypted with it (a plain file is refused: it could have replaced an
  /// encrypted one); without, an encrypted file is refused, saying how to give the key. Only
  /// the chunks holding the header are decrypted here.
  static std::unique_ptr<safetensors_file> open(const std::filesystem::path& path, const weights_key* key = nullptr);
  /// Validates `bytes` (a whole safetensors file, e.g. received from a peer) like `open` does
  /// and keeps a copy in anonymous memory, 64-byte aligned; errors name `label`.
  static std::unique_ptr<safetensors_file> from_memory(std::span<const std::byte> bytes, const std::string& label);
  ~safetensors_file();
  safetensors_file(const safetensors_file&) = delete;
  safetensors_file& operator=(const safetensors_file&) = delete;

  /// The file's path.
  const std::filesystem::path& path() const noexcept { return path_; }
  /// All entries, by name.
  const std::map<std::string, tensor_entry, std::less<>>& entries() const noexcept { return entries_; }
  /// Pointer to a tensor's bytes inside the mapping. For an encrypted file the chunks that
  /// hold them are decrypted first, once (thread-safe); throws `invalid_argument` naming the
  /// file when one does not authenticate.
  const std::byte* data(const tensor_entry& entry) const;
  /// Whether the file is encrypted at rest (its tensors then live in anonymous memory).
  bool encrypted() const noexcept { return reader_ != nullptr; }
  /// Whether the tensors live in anonymous memory this object owns (decrypted or received),
  /// rather than in the page cache behind a file mapping: holding them needs no copy.
  bool anonymous() const noexcept { return reader_ != nullptr || owned_ != nullptr; }
  /// Size of the mapping in bytes.
  std::size_t file_size() const noexcept { return size_; }

 private:
  safetensors_file() = default;
  // Parses the header at base_ (size_ bytes, its first 8 + header length readable) and fills
  // data_ and entries_; errors name `source`.
  void index_header(const std::string& source);
  // Decrypts the chunks covering plaintext bytes [begin, end) that are not yet decrypted.
  void decrypt_range(std::uint64_t begin, std::uint64_t end) const;

  std::filesystem::path path_;
  const std::byte* base_ = nullptr;
  const std::byte* data_ = nullptr;
  std::size_t size_ = 0;
  std::size_t mapped_size_ = 0;
  std::map<std::string, tensor_entry, std::less<>> entries_;
  std::unique_ptr<encrypted_weights_reader> reader_;  // Set for encrypted files.
  std::unique_ptr<std::byte, void (*)(void*)> owned_{nullptr, nullptr};  // Set for files from memory.
  mutable std::vector<bool> decrypted_;               // By chunk.
  mutable std::mutex decrypt_mutex_;
};

/// A tensor found in a checkpoint, with the file that holds it.
struct tensor_ref {
  const tensor_entry* entry = nullptr;
  const safetensors_file* file = nullptr;
  const std::byte* bytes() const { return file->data(*entry); }
};

/// A checkpoint directory: `model.safetensors`, or shards listed by
/// `model.safetensors.index.json` (every listed tensor must be in the shard the index names).
class checkpoint {
 public:
  /// Opens every shard. `progress` (if set) is called after each shard with (done, total, path).
  /// `key`: the shards are encrypted with it (see `safetensors_file::open`).
  static checkpoint open(const std::filesystem::path& dir,
                         const std::function<void(std::size_t, std::size_t,
                                                  const std::filesystem::path&)>& progress = {},
                         const weights_key* key = nullptr);
  /// A checkpoint made of files already open (e.g. received from a peer with
  /// `safetensors_file::from_memory`); `label` stands for the directory in errors. A tensor
  /// in two files is an `invalid_argument` error naming both.
  static checkpoint from_files(const std::filesystem::path& label,
                               std::vector<std::unique_ptr<safetensors_file>> files);

  /// The tensor called `name`, or an empty ref.
  tensor_ref find(std::string_view name) const;
  /// All tensor names.
  std::vector<std::string> names() const;
  /// The directory.
  const std::filesystem::path& directory() const noexcept { return dir_; }
  /// The shard files.
  const std::vector<std::unique_ptr<safetensors_file>>& files() const noexcept { return files_; }

 private:
  std::filesystem::path dir_;
  std::vector<std::unique_ptr<safetensors_file>> files_;
  std::map<std::string, tensor_ref, std::less<>> tensors_;
};

/// A tensor to write: name, dtype and raw little-endian bytes.
struct tensor_blob {
  std::string name;
  kernels::dtype type = kernels::dtype::f32;
  std::vector<std::int64_t> shape;
  std::vector<std::byte> bytes;
};

/// Writes tensors as one safetensors file (entries sorted by name, data 8-byte aligned).
void write_safetensors(const std::filesystem::path& path, const std::vector<const tensor_blob*>& tensors);

/// A tensor to encode straight from where it lives.
struct tensor_bytes {
  std::string name;
  kernels::dtype type = kernels::dtype::f32;
  std::vector<std::int64_t> shape;
  std::span<const std::byte> bytes;
};

/// The bytes of one safetensors file holding `tensors` in the given order, each tensor's data
/// at a 64-byte aligned offset of the file (so that `safetensors_file::from_memory` keeps SIMD
/// loads within cache lines). Throws `invalid_argument` when a tensor's bytes do not match its
/// dtype and shape.
std::vector<std::uint8_t> encode_safetensors(std::span<const tensor_bytes> tensors);

}  // namespace shoal::runtime
