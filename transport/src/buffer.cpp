#include "shoal/transport/buffer.hpp"

#include <cstdlib>
#include <new>

namespace shoal::transport {

namespace {
// 64 bytes: a cache line, and enough for any element type and for Cap'n Proto's 8-byte words.
constexpr std::size_t kAlignment = 64;

void heap_release(void*, std::byte* data, std::size_t) noexcept { std::free(data); }
}  // namespace

byte_buffer::byte_buffer(std::size_t size) {
  if (size == 0) return;
  std::size_t rounded = (size + kAlignment - 1) / kAlignment * kAlignment;
  void* memory = std::aligned_alloc(kAlignment, rounded);
  if (memory == nullptr) throw std::bad_alloc();
  data_ = static_cast<std::byte*>(memory);
  size_ = size;
  capacity_ = rounded;
  release_ = heap_release;
}

byte_buffer::byte_buffer(std::byte* data, std::size_t size, std::size_t capacity,
                         release_fn release, void* context) noexcept
    : data_(data), size_(size), capacity_(capacity), release_(release), context_(context) {}

byte_buffer::byte_buffer(byte_buffer&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)),
      size_(std::exchange(other.size_, 0)),
      capacity_(std::exchange(other.capacity_, 0)),
      release_(std::exchange(other.release_, nullptr)),
      context_(std::exchange(other.context_, nullptr)) {}

byte_buffer& byte_buffer::operator=(byte_buffer&& other) noexcept {
  if (this != &other) {
    reset();
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
    capacity_ = std::exchange(other.capacity_, 0);
    release_ = std::exchange(other.release_, nullptr);
    context_ = std::exchange(other.context_, nullptr);
  }
  return *this;
}

byte_buffer::~byte_buffer() { reset(); }

void byte_buffer::reset() noexcept {
  if (data_ != nullptr && release_ != nullptr) release_(context_, data_, capacity_);
  data_ = nullptr;
  size_ = capacity_ = 0;
  release_ = nullptr;
  context_ = nullptr;
}

bulk_view make_bulk_view(byte_buffer buffer) {
  auto owner = std::make_shared<byte_buffer>(std::move(buffer));
  bulk_view view{owner->data(), owner->size(), nullptr};
  view.owner = std::move(owner);
  return view;
}

}  // namespace shoal::transport
