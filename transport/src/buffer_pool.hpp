#pragma once
// A pool of large receive buffers. Fresh multi-megabyte allocations are mmap'ed and page-fault
// on first touch, which costs as much as moving the bytes; reusing them keeps receives at the
// speed of the wire. Buffers outlive the node that handed them out, so the pool frees itself
// when its owner and the last outstanding buffer are gone.

#include "shoal/transport/buffer.hpp"

#include <atomic>
#include <cstddef>
#include <mutex>
#include <vector>

namespace shoal::transport::detail {

class buffer_pool {
 public:
  /// Creates a pool owned by the caller until `release_owner`.
  static buffer_pool* create(std::size_t max_cached_bytes);
  /// A buffer of exactly `size` valid bytes; large sizes come from the pool.
  byte_buffer acquire(std::size_t size);
  /// Gives up the owner's reference; the pool is freed once no buffer is outstanding.
  void release_owner() noexcept;

 private:
  explicit buffer_pool(std::size_t max_cached_bytes) : max_cached_bytes_(max_cached_bytes) {}
  ~buffer_pool();
  static void release(void* context, std::byte* data, std::size_t capacity) noexcept;
  void unref() noexcept;

  struct cached {
    std::byte* data;
    std::size_t capacity;
  };
  std::mutex mutex_;
  std::vector<cached> free_;
  std::size_t cached_bytes_ = 0;
  std::size_t max_cached_bytes_;
  std::atomic<std::size_t> refs_{1};
};

}  // namespace shoal::transport::detail
