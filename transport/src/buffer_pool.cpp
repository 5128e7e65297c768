#include "buffer_pool.hpp"

#include <bit>
#include <cstdlib>
#include <new>

namespace shoal::transport::detail {

namespace {
// Below this, malloc already recycles memory quickly and pooling buys nothing.
constexpr std::size_t kPooledMinBytes = 64 * 1024;
constexpr std::size_t kAlignment = 64;
}  // namespace

buffer_pool* buffer_pool::create(std::size_t max_cached_bytes) {
  return new buffer_pool(max_cached_bytes);
}

buffer_pool::~buffer_pool() {
  for (auto& entry : free_) std::free(entry.data);
}

byte_buffer buffer_pool::acquire(std::size_t size) {
  if (size < kPooledMinBytes) return byte_buffer(size);
  std::size_t capacity = std::bit_ceil(size);
  {
    std::lock_guard lock(mutex_);
    for (std::size_t i = 0; i < free_.size(); ++i) {
      if (free_[i].capacity == capacity) {
        std::byte* data = free_[i].data;
        cached_bytes_ -= capacity;
        free_[i] = free_.back();
        free_.pop_back();
        refs_.fetch_add(1, std::memory_order_relaxed);
        return byte_buffer(data, size, capacity, &buffer_pool::release, this);
      }
    }
  }
  void* memory = std::aligned_alloc(kAlignment, capacity);
  if (memory == nullptr) throw std::bad_alloc();
  refs_.fetch_add(1, std::memory_order_relaxed);
  return byte_buffer(static_cast<std::byte*>(memory), size, capacity, &buffer_pool::release,
                     this);
}

void buffer_pool::release(void* context, std::byte* data, std::size_t capacity) noexcept {
  auto* pool = static_cast<buffer_pool*>(context);
  bool keep = false;
  {
    std::lock_guard lock(pool->mutex_);
    if (pool->cached_bytes_ + capacity <= pool->max_cached_bytes_) {
      try {
        pool->free_.push_back({data, capacity});
        pool->cached_bytes_ += capacity;
        keep = true;
      } catch (...) {
        keep = false;  // Out of memory for the free list: just free the buffer.
      }
    }
  }
  if (!keep) std::free(data);
  pool->unref();
}

void buffer_pool::release_owner() noexcept { unref(); }

void buffer_pool::unref() noexcept {
  if (refs_.fetch_sub(1, std::memory_order_acq_rel) == 1) delete this;
}

}  // namespace shoal::transport::detail
