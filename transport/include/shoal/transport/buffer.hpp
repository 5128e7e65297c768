#pragma once
/// \file
/// Byte buffers for bulk tensors. Bulk data never goes through a Cap'n Proto buffer: the sender
/// lends memory (`bulk_view`) that UCX reads in place, the receiver gets an owned, aligned
/// `byte_buffer` that UCX wrote into.

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <utility>

namespace shoal::transport {

/// Owned, 64-byte aligned, uninitialized bytes. Move-only. Buffers received by a `node` come
/// from a per-node pool and return to it when destroyed (from any thread), so large receives do
/// not page-fault fresh memory every time; large bulk buffers sent eagerly are the memory UCX
/// assembled them in, and go back to UCX when destroyed (from any thread, even after the node
/// stopped).
class byte_buffer {
 public:
  /// How a buffer gives its memory back; `context` is the pool or null for plain heap memory.
  using release_fn = void (*)(void* context, std::byte* data, std::size_t capacity) noexcept;

  /// An empty buffer (data() == nullptr, size() == 0).
  byte_buffer() noexcept = default;
  /// Allocates `size` bytes from the heap, 64-byte aligned; contents are indeterminate.
  explicit byte_buffer(std::size_t size);
  /// Adopts memory that `release(context, data, capacity)` frees. For pools.
  byte_buffer(std::byte* data, std::size_t size, std::size_t capacity, release_fn release,
              void* context) noexcept;
  byte_buffer(byte_buffer&& other) noexcept;
  byte_buffer& operator=(byte_buffer&& other) noexcept;
  byte_buffer(const byte_buffer&) = delete;
  byte_buffer& operator=(const byte_buffer&) = delete;
  ~byte_buffer();

  /// First byte, or nullptr when empty.
  std::byte* data() noexcept { return data_; }
  /// First byte, or nullptr when empty.
  const std::byte* data() const noexcept { return data_; }
  /// Number of valid bytes.
  std::size_t size() const noexcept { return size_; }
  /// Whether size() == 0.
  bool empty() const noexcept { return size_ == 0; }
  /// The valid bytes.
  std::span<std::byte> span() noexcept { return {data_, size_}; }
  /// The valid bytes.
  std::span<const std::byte> span() const noexcept { return {data_, size_}; }

 private:
  void reset() noexcept;

  std::byte* data_ = nullptr;
  std::size_t size_ = 0;
  std::size_t capacity_ = 0;
  release_fn release_ = nullptr;
  void* context_ = nullptr;
};

/// Memory lent to a send. The transport reads `data[0, size)` in place (zero-copy where UCX can)
/// and keeps `owner` alive until the send completed or failed, then drops it; the caller must
/// not modify the bytes meanwhile.
struct bulk_view {
  const void* data = nullptr;        ///< First byte.
  std::size_t size = 0;              ///< Number of bytes.
  std::shared_ptr<const void> owner; ///< Keeps `data` alive; may be null for static memory.
};

/// A view of `buffer` that keeps it alive by moving it into a shared owner.
bulk_view make_bulk_view(byte_buffer buffer);

}  // namespace shoal::transport
