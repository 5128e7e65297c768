#pragma once
/// \file
/// The CUDA device, stream and library handles kernels run on, and device memory with RAII.
/// Plain C++: the stream is an opaque pointer, so callers compile without nvcc.

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace shoal::kernels::cuda {

/// True when the CUDA runtime reports at least one device. Never throws: a machine without a
/// driver or GPU simply has none.
bool device_available() noexcept;

/// "NVIDIA H100 80GB HBM3 (sm_90, 132 SMs)"-style description of `device`.
std::string device_description(int device = 0);

/// A device, one stream on it, and the cuBLAS/cuBLASLt handles and workspace bound to that
/// stream. Every launcher takes one; kernels of one context run in stream order. Not
/// thread-safe: one context per thread that launches.
class context {
 public:
  /// Selects `device`, creates a non-blocking stream and the library handles.
  explicit context(int device = 0);
  ~context();
  context(const context&) = delete;
  context& operator=(const context&) = delete;

  /// The device ordinal.
  int device() const noexcept;
  /// The `cudaStream_t`, as an opaque pointer.
  void* stream() const noexcept;
  /// The `cublasHandle_t`, as an opaque pointer.
  void* cublas() const noexcept;
  /// The `cublasLtHandle_t`, as an opaque pointer.
  void* cublas_lt() const noexcept;
  /// cuBLASLt workspace (device memory) and its size in bytes.
  void* lt_workspace() const noexcept;
  std::size_t lt_workspace_bytes() const noexcept;
  /// Streaming multiprocessors of the device (for grid sizing).
  int multiprocessors() const noexcept;
  /// Waits for all work queued on the stream; throws if any of it failed.
  void synchronize();

 private:
  struct impl;
  std::unique_ptr<impl> impl_;
};

/// Device memory from `cudaMalloc` (never managed memory), freed on destruction.
class device_buffer {
 public:
  device_buffer() = default;
  /// Allocates `bytes` (0: no allocation). Throws `resource_exhausted` when the device is full.
  explicit device_buffer(std::size_t bytes);
  ~device_buffer();
  device_buffer(device_buffer&& other) noexcept;
  device_buffer& operator=(device_buffer&& other) noexcept;
  device_buffer(const device_buffer&) = delete;
  device_buffer& operator=(const device_buffer&) = delete;

  /// The device pointer.
  void* data() const noexcept { return data_; }
  /// Typed device pointer.
  template <typename T>
  T* as() const noexcept { return static_cast<T*>(data_); }
  /// Bytes allocated.
  std::size_t bytes() const noexcept { return bytes_; }

 private:
  void* data_ = nullptr;
  std::size_t bytes_ = 0;
};

/// Copies `bytes` from host memory to device memory, in stream order, then waits for it.
void copy_to_device(context& ctx, void* device_dst, const void* host_src, std::size_t bytes);
/// Copies `bytes` from device memory to host memory, in stream order, then waits for it.
void copy_to_host(context& ctx, void* host_dst, const void* device_src, std::size_t bytes);
/// Sets `bytes` of device memory to zero, in stream order (does not wait).
void fill_zero(context& ctx, void* device_dst, std::size_t bytes);

/// Converts `count` floats to bfloat16 (round to nearest even) on the device, in stream order.
void convert_f32_to_bf16(context& ctx, const float* device_src, std::uint16_t* device_dst,
                         std::int64_t count);

}  // namespace shoal::kernels::cuda
