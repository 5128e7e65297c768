#include "shoal/kernels/cuda/moe.hpp"

#include "check.cuh"
#include "moe_route.cuh"
#include "shoal/kernels/cuda/context.hpp"

#include <string>

namespace shoal::kernels::cuda {

void moe_route(context& ctx, const moe_route_params& p) {
  if (p.tokens <= 0) return;
  SHOAL_CUDA_REQUIRE(p.logits && p.indices && p.weights, "moe_route needs logits, indices, weights");
  SHOAL_CUDA_REQUIRE(p.experts > 0 && p.experts <= detail::kRouteMaxExperts && p.groups > 0 &&
                         p.groups <= detail::kRouteMaxGroups && p.experts % p.groups == 0 &&
                         p.top_groups > 0 && p.top_groups <= p.groups && p.top_k > 0 &&
                         p.top_k <= detail::kRouteMaxTopK &&
                         p.top_k <= p.top_groups * (p.experts / p.groups),
                     "moe_route: unsupported experts " + std::to_string(p.experts) + " groups " +
                         std::to_string(p.groups) + " top_groups " + std::to_string(p.top_groups) +
                         " top_k " + std::to_string(p.top_k));
  const detail::moe_route_args a{p.logits,
                                 p.bias,
                                 static_cast<int>(p.experts),
                                 static_cast<int>(p.groups),
                                 static_cast<int>(p.top_groups),
                                 static_cast<int>(p.top_k),
                                 p.normalize,
                                 p.scaling_factor,
                                 p.indices,
                                 p.weights};
  // Whole warps, at least as many threads as experts and as groups.
  const int threads = static_cast<int>((std::max(p.experts, p.groups) + 31) / 32 * 32);
  detail::moe_route_kernel<<<static_cast<unsigned>(p.tokens), threads, 0,
                             detail::as_stream(ctx.stream())>>>(a);
  SHOAL_CUDA_CHECK_LAUNCH();
}

}  // namespace shoal::kernels::cuda
