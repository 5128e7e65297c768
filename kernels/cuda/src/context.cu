#include "shoal/kernels/cuda/context.hpp"

#include "check.cuh"
#include "device_common.cuh"

#include <algorithm>
#include <string>
#include <utility>

namespace shoal::kernels::cuda {

namespace {
// cuBLASLt picks faster algorithms (split-K, stream-K) when given scratch space.
constexpr std::size_t kLtWorkspaceBytes = std::size_t{32} << 20;

__global__ void f32_to_bf16_kernel(const float* src, __nv_bfloat16* dst, std::int64_t count) {
  for (std::int64_t i = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; i < count;
       i += std::int64_t{gridDim.x} * blockDim.x)
    dst[i] = __float2bfloat16_rn(src[i]);
}
}  // namespace

bool device_available() noexcept {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // Clear the sticky "no driver" error for later callers.
    return false;
  }
  return count > 0;
}

std::string device_description(int device) {
  cudaDeviceProp prop{};
  SHOAL_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  return std::string(prop.name) + " (sm_" + std::to_string(prop.major) +
         std::to_string(prop.minor) + ", " + std::to_string(prop.multiProcessorCount) + " SMs, " +
         std::to_string(prop.totalGlobalMem >> 20) + " MiB)";
}

struct context::impl {
  int device = 0;
  int sms = 0;
  cudaStream_t stream = nullptr;
  cublasHandle_t blas = nullptr;
  cublasLtHandle_t lt = nullptr;
  void* workspace = nullptr;

  ~impl() {
    // Destructors must not throw; errors here leave nothing the caller could act on.
    if (workspace) cudaFree(workspace);
    if (lt) cublasLtDestroy(lt);
    if (blas) cublasDestroy(blas);
    if (stream) cudaStreamDestroy(stream);
  }
};

context::context(int device) : impl_(std::make_unique<impl>()) {
  impl_->device = device;
  SHOAL_CUDA_CHECK(cudaSetDevice(device));
  SHOAL_CUDA_CHECK(cudaDeviceGetAttribute(&impl_->sms, cudaDevAttrMultiProcessorCount, device));
  SHOAL_CUDA_CHECK(cudaStreamCreateWithFlags(&impl_->stream, cudaStreamNonBlocking));
  SHOAL_CUBLAS_CHECK(cublasCreate(&impl_->blas));
  SHOAL_CUBLAS_CHECK(cublasSetStream(impl_->blas, impl_->stream));
  SHOAL_CUBLAS_CHECK(cublasLtCreate(&impl_->lt));
  SHOAL_CUDA_CHECK(cudaMalloc(&impl_->workspace, kLtWorkspaceBytes));
  SHOAL_CUBLAS_CHECK(cublasSetWorkspace(impl_->blas, impl_->workspace, kLtWorkspaceBytes));
}

context::~context() = default;

int context::device() const noexcept { return impl_->device; }
void* context::stream() const noexcept { return impl_->stream; }
void* context::cublas() const noexcept { return impl_->blas; }
void* context::cublas_lt() const noexcept { return impl_->lt; }
void* context::lt_workspace() const noexcept { return impl_->workspace; }
std::size_t context::lt_workspace_bytes() const noexcept { return kLtWorkspaceBytes; }
int context::multiprocessors() const noexcept { return impl_->sms; }

void context::synchronize() { SHOAL_CUDA_CHECK(cudaStreamSynchronize(impl_->stream)); }

device_buffer::device_buffer(std::size_t bytes) : bytes_(bytes) {
  if (bytes) SHOAL_CUDA_CHECK(cudaMalloc(&data_, bytes));
}

device_buffer::~device_buffer() {
  if (data_) cudaFree(data_);
}

device_buffer::device_buffer(device_buffer&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)), bytes_(std::exchange(other.bytes_, 0)) {}

device_buffer& device_buffer::operator=(device_buffer&& other) noexcept {
  if (this != &other) {
    if (data_) cudaFree(data_);
    data_ = std::exchange(other.data_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
  }
  return *this;
}

void copy_to_device(context& ctx, void* device_dst, const void* host_src, std::size_t bytes) {
  if (!bytes) return;
  const cudaStream_t stream = detail::as_stream(ctx.stream());
  SHOAL_CUDA_CHECK(cudaMemcpyAsync(device_dst, host_src, bytes, cudaMemcpyHostToDevice, stream));
  SHOAL_CUDA_CHECK(cudaStreamSynchronize(stream));
}

void copy_to_host(context& ctx, void* host_dst, const void* device_src, std::size_t bytes) {
  if (!bytes) return;
  const cudaStream_t stream = detail::as_stream(ctx.stream());
  SHOAL_CUDA_CHECK(cudaMemcpyAsync(host_dst, device_src, bytes, cudaMemcpyDeviceToHost, stream));
  SHOAL_CUDA_CHECK(cudaStreamSynchronize(stream));
}

void fill_zero(context& ctx, void* device_dst, std::size_t bytes) {
  if (!bytes) return;
  SHOAL_CUDA_CHECK(cudaMemsetAsync(device_dst, 0, bytes, detail::as_stream(ctx.stream())));
}

void convert_f32_to_bf16(context& ctx, const float* device_src, std::uint16_t* device_dst,
                         std::int64_t count) {
  if (count <= 0) return;
  const int blocks = static_cast<int>(std::min<std::int64_t>(detail::ceil_div<std::int64_t>(count, 256), 4096));
  f32_to_bf16_kernel<<<blocks, 256, 0, detail::as_stream(ctx.stream())>>>(
      device_src, reinterpret_cast<__nv_bfloat16*>(device_dst), count);
  SHOAL_CUDA_CHECK_LAUNCH();
}

}  // namespace shoal::kernels::cuda
