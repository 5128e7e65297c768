#pragma once
/// \file
/// Token sampling on the GPU: temperature, top-k, top-p (nucleus) with caller-supplied uniform
/// draws, so a run is reproducible and the CPU specification gives the same tokens.
///
/// Per row: temperature <= 0 picks the argmax (lowest index among equals). Otherwise the
/// candidates are the `k` largest logits (ties: lower index first), with k = top_k clamped to
/// [1, kSamplingMaxCandidates] (top_k <= 0 means the cap); probabilities are the softmax of
/// logits / temperature over the whole vocabulary; the kept set is the shortest prefix of the
/// candidates whose probability mass reaches top_p (at least one token); the token is the first
/// kept candidate whose running mass exceeds `uniform * kept mass`.

#include <cstdint>

namespace shoal::kernels::cuda {

class context;

/// The most candidates a row keeps: nucleus sampling looks only at the 1024 most probable
/// tokens (the tail beyond them is dropped, as in TensorRT-LLM's top-k cap).
inline constexpr std::int64_t kSamplingMaxCandidates = 1024;

/// Per-row sampling settings and inputs.
struct sampling_params {
  const float* logits = nullptr;       ///< `[batch][vocab]` (device).
  std::int64_t batch = 0;              ///< Rows.
  std::int64_t vocab = 0;              ///< Logits per row.
  const float* temperature = nullptr;  ///< `[batch]`; <= 0 means greedy.
  const std::int32_t* top_k = nullptr; ///< `[batch]`; <= 0 means no limit but the cap.
  const float* top_p = nullptr;        ///< `[batch]`; >= 1 keeps every candidate.
  const float* uniform = nullptr;      ///< `[batch]` draws in [0, 1).
  std::int32_t* tokens = nullptr;      ///< Out `[batch]` sampled token ids.
};

/// One 1024-thread block per row: softmax statistics, a 4-pass radix select of the k-th
/// largest logit, an ordered gather of the candidates, a bitonic sort, a prefix sum.
void sample(context& ctx, const sampling_params& params);

namespace reference {
/// The specification on the CPU: the same fields, every pointer in host memory.
void sample(const sampling_params& params);
}  // namespace reference

}  // namespace shoal::kernels::cuda
