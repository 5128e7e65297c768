#pragma once
// The one family of CUDA status checks. Device code never sees fmt (nvcc cannot compile its
// consteval checks), so failures are classified and formatted in errors.cpp: running out of
// memory is `resource_exhausted` (the caller may shed load), anything else is `internal`.

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <string>

namespace shoal::kernels::cuda::detail {

[[noreturn]] void cuda_failed(bool out_of_memory, const char* error_name, const char* error_text,
                              const char* call, const char* file, int line);
[[noreturn]] void cublas_failed(bool out_of_memory, int status, const char* call,
                                const char* file, int line);
[[noreturn]] void require_failed(const char* condition, const char* file, int line,
                                 const std::string& message);

}  // namespace shoal::kernels::cuda::detail

#define SHOAL_CUDA_CHECK(call)                                                               \
  do {                                                                                       \
    const cudaError_t shoal_status_ = (call);                                                \
    if (shoal_status_ != cudaSuccess) [[unlikely]]                                           \
      ::shoal::kernels::cuda::detail::cuda_failed(                                           \
          shoal_status_ == cudaErrorMemoryAllocation, cudaGetErrorName(shoal_status_),       \
          cudaGetErrorString(shoal_status_), #call, __FILE__, __LINE__);                     \
  } while (false)

#define SHOAL_CUBLAS_CHECK(call)                                                             \
  do {                                                                                       \
    const cublasStatus_t shoal_status_ = (call);                                             \
    if (shoal_status_ != CUBLAS_STATUS_SUCCESS) [[unlikely]]                                 \
      ::shoal::kernels::cuda::detail::cublas_failed(                                         \
          shoal_status_ == CUBLAS_STATUS_ALLOC_FAILED, static_cast<int>(shoal_status_),      \
          #call, __FILE__, __LINE__);                                                        \
  } while (false)

// Checks that the kernel just queued was accepted (bad grid, too much shared memory).
#define SHOAL_CUDA_CHECK_LAUNCH() SHOAL_CUDA_CHECK(cudaGetLastError())

// SHOAL_REQUIRE for CUDA sources: `message` is a std::string expression.
#define SHOAL_CUDA_REQUIRE(cond, message)                                                     \
  do {                                                                                       \
    if (!(cond)) [[unlikely]]                                                                \
      ::shoal::kernels::cuda::detail::require_failed(#cond, __FILE__, __LINE__, (message));  \
  } while (false)
