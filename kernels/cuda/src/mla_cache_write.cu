#include "shoal/kernels/cuda/mla_cache_write.hpp"

#include "check.cuh"
#include "mla_cache_write.cuh"
#include "shoal/kernels/cuda/context.hpp"

namespace shoal::kernels::cuda {

void mla_cache_write(context& ctx, const mla_cache_write_params& p) {
  if (p.tokens <= 0) return;
  SHOAL_CUDA_REQUIRE(p.kv && p.norm_weight && p.positions && p.frequencies && p.slots && p.cache &&
                         p.kv_lora_rank > 0 && p.rope_dim > 0 && p.rope_dim % 2 == 0,
                     "mla_cache_write needs every pointer, kv_lora_rank > 0 and an even rope_dim");
  const detail::mla_cache_write_args a{p.kv,
                                       p.kv_stride ? p.kv_stride : p.kv_lora_rank + p.rope_dim,
                                       p.norm_weight,
                                       p.eps,
                                       p.positions,
                                       p.frequencies,
                                       p.slots,
                                       reinterpret_cast<__nv_bfloat16*>(p.cache),
                                       p.kv_lora_rank,
                                       p.rope_dim};
  detail::mla_cache_write_kernel<<<static_cast<unsigned>(p.tokens), 128, 0,
                                   detail::as_stream(ctx.stream())>>>(a);
  SHOAL_CUDA_CHECK_LAUNCH();
}

}  // namespace shoal::kernels::cuda
