#include "shoal/kernels/cuda/rmsnorm.hpp"

#include "check.cuh"
#include "rmsnorm.cuh"
#include "shoal/kernels/cuda/context.hpp"

#include <algorithm>

namespace shoal::kernels::cuda {

void rmsnorm(context& ctx, const rmsnorm_params& p) {
  if (p.rows <= 0) return;
  SHOAL_CUDA_REQUIRE(p.x && p.weight && (p.y || p.y_bf16) && p.dim > 0,
                     "rmsnorm needs x, weight, an output and dim > 0");
  detail::rmsnorm_args a{p.x,
                         p.residual,
                         p.weight,
                         p.y,
                         reinterpret_cast<__nv_bfloat16*>(p.y_bf16),
                         p.dim,
                         p.x_stride ? p.x_stride : p.dim,
                         p.y_stride ? p.y_stride : p.dim,
                         p.eps};
  // 7168-wide rows: 256 threads x 28 values each keeps one row's loads in flight.
  const int threads = static_cast<int>(std::clamp<std::int64_t>((p.dim + 31) / 32 * 32, 32, 256));
  detail::rmsnorm_kernel<<<static_cast<unsigned>(p.rows), threads, 0,
                           detail::as_stream(ctx.stream())>>>(a);
  SHOAL_CUDA_CHECK_LAUNCH();
}

}  // namespace shoal::kernels::cuda
