#pragma once
/// \file
/// Multi-head latent attention (DeepSeek-V2/V3 MLA) against a cache of compressed latents.

#include "shoal/kernels/matrix.hpp"

#include <cstdint>

namespace shoal::kernels {

class thread_pool;

/// One sequence's queries attending to its latent cache. Query i sits at position
/// `first_position + i` and sees cache entries [0, first_position + i] (causal).
struct mla_params {
  std::int64_t heads = 0;          ///< Attention heads.
  std::int64_t qk_nope_dim = 0;    ///< Per-head query/key width without rope.
  std::int64_t qk_rope_dim = 0;    ///< Per-head rope width (shared key part).
  std::int64_t v_head_dim = 0;     ///< Per-head value width.
  std::int64_t kv_lora_rank = 0;   ///< Latent width.
  float softmax_scale = 1.0f;      ///< Multiplies q.k before the softmax.
  /// Queries `[queries][heads][qk_nope_dim + qk_rope_dim]`, rope already applied.
  const float* q = nullptr;
  std::int64_t queries = 0;        ///< Query tokens.
  std::int64_t first_position = 0; ///< Position of the first query.
  /// Cache rows `[kv_lora_rank + qk_rope_dim]`: normalized latent, then roped key part.
  /// Without a block table, row t is at `latent + t * (kv_lora_rank + qk_rope_dim)`.
  const float* latent = nullptr;
  /// Paged cache: row t is row `t % block_tokens` of block `block_table[t / block_tokens]`,
  /// blocks being `block_tokens` consecutive rows from `latent`. Null: contiguous.
  const std::int32_t* block_table = nullptr;
  std::int64_t block_tokens = 0;   ///< Rows per cache block (with `block_table`).
  /// `kv_b_proj`: `[heads * (qk_nope_dim + v_head_dim)][kv_lora_rank]`, per head the key rows
  /// then the value rows.
  matrix_view kv_b;
  /// Output `[queries][heads][v_head_dim]`.
  float* out = nullptr;
};

/// Address of cache row `position` (paged or contiguous).
inline const float* mla_latent_row(const mla_params& p, std::int64_t position) noexcept {
  const std::int64_t stride = p.kv_lora_rank + p.qk_rope_dim;
  if (!p.block_table) return p.latent + position * stride;
  return p.latent + (static_cast<std::int64_t>(p.block_table[position / p.block_tokens]) * p.block_tokens +
                     position % p.block_tokens) * stride;
}

/// Optimized MLA in the absorbed form: queries are projected into latent space, scores and
/// weighted sums run over the 576-wide latents directly, values are decompressed once per head.
void mla_attention(thread_pool& pool, const mla_params& params);

namespace reference {
/// Plain MLA in the naive form: decompresses per-head keys and values from every cached
/// latent, then ordinary softmax attention. The specification the absorbed form must match.
void mla_attention(const mla_params& params);
}  // namespace reference

}  // namespace shoal::kernels
