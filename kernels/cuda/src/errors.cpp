// Host-compiled half of check.cuh: turns CUDA and cuBLAS statuses into shoal::error.
// Without fmt, or when nvcc drives the host compiler (fmt's constexpr checks break under
// __NVCC__), SHOAL_CUDA_NO_FMT makes the same messages travel as std::runtime_error: the
// nvcc-only build of tools/bench/gpu_bench.sh uses it.
#if __has_include(<fmt/format.h>) && !defined(SHOAL_CUDA_NO_FMT)
#include "shoal/base/error.hpp"
#define SHOAL_CUDA_HAVE_FMT 1
#else
#include <stdexcept>
#endif

#include <string>

namespace shoal::kernels::cuda::detail {

namespace {
[[noreturn]] void raise(bool out_of_memory, const std::string& message) {
#ifdef SHOAL_CUDA_HAVE_FMT
  throw ::shoal::error(out_of_memory ? errc::resource_exhausted : errc::internal, message);
#else
  (void)out_of_memory;
  throw std::runtime_error(message);
#endif
}
std::string where(const char* file, int line) { return std::string(file) + ":" + std::to_string(line) + ": "; }
}  // namespace

void cuda_failed(bool out_of_memory, const char* error_name, const char* error_text,
                 const char* call, const char* file, int line) {
  raise(out_of_memory, where(file, line) + call + " failed: " + error_name + " (" + error_text + ")");
}

void cublas_failed(bool out_of_memory, int status, const char* call, const char* file,
                   int line) {
  raise(out_of_memory, where(file, line) + call + " failed: cuBLAS status " + std::to_string(status));
}

void require_failed(const char* condition, const char* file, int line,
                    const std::string& message) {
  // A violated launcher precondition is a caller bug: errc::internal, like SHOAL_REQUIRE.
  raise(false, where(file, line) + "requirement `" + condition + "` failed: " + message);
}

}  // namespace shoal::kernels::cuda::detail
