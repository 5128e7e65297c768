#pragma once
/// \file
/// Multi-head latent attention on the GPU in the absorbed form, against the paged latent cache.
///
/// The caller absorbs the key up-projection into the queries (q_latent[h] = q_nope[h] W_uk[h],
/// followed by the roped q_pe[h]) and the value up-projection into the output
/// (out[h] = o_latent[h] W_uv[h]^T), both dense GEMMs. This kernel does the part that reads
/// the cache: every head of a token scores the same `kv_lora_rank + rope_dim`-wide latents, so
/// one pass over the cache serves all heads (the FlashMLA problem). The same kernel runs decode
/// (one query per sequence) and causal prefill (many queries of one or more sequences).

#include <cstddef>
#include <cstdint>

namespace shoal::kernels::cuda {

class context;

/// All pointers are device memory.
struct mla_attention_params {
  std::int64_t batch = 0;          ///< Sequences.
  std::int64_t queries = 1;        ///< Query tokens per sequence (1 for decode).
  std::int64_t heads = 0;          ///< Attention heads.
  std::int64_t kv_lora_rank = 0;   ///< Latent width (512; a multiple of 16).
  std::int64_t rope_dim = 0;       ///< Shared rope key width (64; rank + rope a multiple of 16, at most 576).
  float softmax_scale = 1.0f;      ///< Multiplies q.k before the softmax (YaRN mscale included).
  /// Absorbed queries `[batch][queries][heads][kv_lora_rank + rope_dim]`.
  const float* q = nullptr;
  /// bf16 cache pages `[pages][page_size][kv_lora_rank + rope_dim]` (see `mla_cache_write`).
  const std::uint16_t* cache = nullptr;
  std::int64_t page_size = 64;     ///< Tokens per page.
  /// Pages of each sequence, in order `[batch][max_pages]`.
  const std::int32_t* block_table = nullptr;
  std::int64_t max_pages = 0;      ///< Columns of `block_table`.
  /// Cached tokens of each sequence `[batch]`, this step's queries included: query i sits at
  /// position `seq_lens[b] - queries + i` and sees positions [0, that position].
  const std::int32_t* seq_lens = nullptr;
  std::int64_t max_seq_len = 0;    ///< Largest `seq_lens` entry (host-side bound for the grid).
  /// Latent outputs `[batch][queries][heads][kv_lora_rank]`.
  float* out = nullptr;
  std::int64_t splits = 1;         ///< Context chunks attended in parallel, then merged.
  void* workspace = nullptr;       ///< Scratch of `mla_attention_workspace_bytes` bytes.
  std::size_t workspace_bytes = 0; ///< Size of `workspace`.
};

/// Scratch bytes for the per-split partial outputs and softmax statistics.
std::size_t mla_attention_workspace_bytes(std::int64_t batch, std::int64_t queries,
                                          std::int64_t heads, std::int64_t kv_lora_rank,
                                          std::int64_t splits);

/// A split count that fills `multiprocessors` SMs for this shape (decode at small batch splits
/// the context; prefill needs none).
std::int64_t mla_attention_splits(int multiprocessors, std::int64_t batch, std::int64_t queries,
                                  std::int64_t heads, std::int64_t max_seq_len);

/// Blocks of 64 (query, head) rows of one sequence stream one context split through shared
/// memory 32 tokens at a time (bf16 tensor cores, fp32 online softmax); a second kernel
/// merges the splits. Asynchronous on the context's stream.
void mla_attention(context& ctx, const mla_attention_params& params);

}  // namespace shoal::kernels::cuda
