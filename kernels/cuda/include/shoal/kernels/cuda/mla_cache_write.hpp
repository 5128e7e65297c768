#pragma once
/// \file
/// Appends new tokens' attention latents to the paged latent cache: RMSNorm of the latent and
/// YaRN rope of the shared key part fused into one pass that writes bf16 cache rows.

#include <cstdint>

namespace shoal::kernels::cuda {

class context;

/// All pointers are device memory.
struct mla_cache_write_params {
  /// `kv_a_proj_with_mqa` outputs `[tokens][kv_stride]`: `kv_lora_rank` latent values, then
  /// `rope_dim` key values before rope.
  const float* kv = nullptr;
  std::int64_t kv_stride = 0;                ///< Floats between tokens (0: rank + rope_dim).
  const float* norm_weight = nullptr;        ///< `kv_a_layernorm` gain `[kv_lora_rank]`.
  float eps = 1e-6f;                         ///< RMSNorm epsilon.
  const std::int64_t* positions = nullptr;   ///< Position of each token `[tokens]`.
  const float* frequencies = nullptr;        ///< `rope_dim / 2` pair frequencies.
  /// Cache row of each token `[tokens]`: page * page_size + offset in the page.
  const std::int32_t* slots = nullptr;
  /// bf16 cache `[pages][page_size][kv_lora_rank + rope_dim]`.
  std::uint16_t* cache = nullptr;
  std::int64_t tokens = 0;                   ///< Tokens appended.
  std::int64_t kv_lora_rank = 0;             ///< Latent width (512 in DeepSeek-V3).
  std::int64_t rope_dim = 0;                 ///< Shared rope key width (64).
};

/// One block per token: normalize the latent, rotate the key part, round both to bf16.
void mla_cache_write(context& ctx, const mla_cache_write_params& params);

}  // namespace shoal::kernels::cuda
