#include "shoal/kernels/cuda/rope.hpp"

#include "check.cuh"
#include "rope.cuh"
#include "shoal/kernels/cuda/context.hpp"

#include <algorithm>

namespace shoal::kernels::cuda {

void rope(context& ctx, const rope_params& p) {
  if (p.tokens <= 0 || p.heads <= 0) return;
  SHOAL_CUDA_REQUIRE(p.x && p.positions && p.frequencies && p.rope_dim > 0 && p.rope_dim % 2 == 0,
                     "rope needs x, positions, frequencies and an even rope_dim, got rope_dim " +
                         std::to_string(p.rope_dim));
  const detail::rope_args a{p.x,          p.heads,     p.token_stride, p.head_stride,
                            p.offset,     p.rope_dim / 2, p.positions, p.frequencies};
  const int threads =
      static_cast<int>(std::clamp<std::int64_t>((p.heads * p.rope_dim / 2 + 31) / 32 * 32, 32, 512));
  detail::rope_kernel<<<static_cast<unsigned>(p.tokens), threads, 0,
                        detail::as_stream(ctx.stream())>>>(a);
  SHOAL_CUDA_CHECK_LAUNCH();
}

}  // namespace shoal::kernels::cuda
