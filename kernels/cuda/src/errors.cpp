// Host-compiled half of check.cuh: turns CUDA and cuBLAS statuses into shoal::error.
#include "shoal/base/error.hpp"

#include <string>

namespace shoal::kernels::cuda::detail {

void cuda_failed(bool out_of_memory, const char* error_name, const char* error_text,
                 const char* call, const char* file, int line) {
  fail(out_of_memory ? errc::resource_exhausted : errc::internal, "{}:{}: {} failed: {} ({})",
       file, line, call, error_name, error_text);
}

void cublas_failed(bool out_of_memory, int status, const char* call, const char* file,
                   int line) {
  fail(out_of_memory ? errc::resource_exhausted : errc::internal,
       "{}:{}: {} failed: cuBLAS status {}", file, line, call, status);
}

void require_failed(const char* condition, const char* file, int line,
                    const std::string& message) {
  ::shoal::detail::require_failed(condition, file, line, message);
}

}  // namespace shoal::kernels::cuda::detail
