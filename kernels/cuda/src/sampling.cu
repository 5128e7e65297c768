#include "shoal/kernels/cuda/sampling.hpp"

#include "check.cuh"
#include "sampling.cuh"
#include "shoal/kernels/cuda/context.hpp"

#include <string>

namespace shoal::kernels::cuda {

void sample(context& ctx, const sampling_params& p) {
  if (p.batch <= 0) return;
  SHOAL_CUDA_REQUIRE(p.logits && p.temperature && p.top_k && p.top_p && p.uniform && p.tokens,
                     "sample needs logits, temperature, top_k, top_p, uniform and tokens");
  SHOAL_CUDA_REQUIRE(p.vocab > 0 && p.vocab < 0x7fffffff,
                     "sample: unsupported vocab " + std::to_string(p.vocab));
  const detail::sample_args a{p.logits, p.vocab, p.temperature, p.top_k, p.top_p, p.uniform, p.tokens};
  detail::sample_kernel<<<static_cast<unsigned>(p.batch), detail::kSampleThreads, 0,
                          detail::as_stream(ctx.stream())>>>(a);
  SHOAL_CUDA_CHECK_LAUNCH();
}

}  // namespace shoal::kernels::cuda
