#pragma once
/// \file
/// Rotary position embedding in DeepSeek's interleaved-pair convention, with YaRN frequencies.

#include <cstdint>
#include <vector>

namespace shoal::kernels {

/// YaRN settings (`rope_scaling` of a DeepSeek-V3 config). `factor <= 1` disables scaling.
struct yarn_params {
  double factor = 1.0;                    ///< Context extension factor.
  double original_max_position = 4096;    ///< Training context (`original_max_position_embeddings`).
  double beta_fast = 32;                  ///< Rotations above which frequencies are kept.
  double beta_slow = 1;                   ///< Rotations below which frequencies are fully scaled.
};

/// Rotation frequency of each pair p of a `rope_dim`-wide rope slice: base^(-2p/d), blended
/// toward freq/factor by YaRN's linear ramp when `yarn.factor > 1`. Computed in fp32 like
/// DeepSeek's `precompute_freqs_cis`.
std::vector<float> rope_frequencies(std::int64_t rope_dim, double base, const yarn_params& yarn);

struct rope_params {
  float* x = nullptr;                  ///< Vectors to rotate in place.
  std::int64_t tokens = 0;             ///< Number of tokens.
  std::int64_t heads = 1;              ///< Vectors per token.
  std::int64_t token_stride = 0;       ///< Floats between tokens.
  std::int64_t head_stride = 0;        ///< Floats between heads of one token.
  std::int64_t offset = 0;             ///< Where the rope slice starts inside a vector.
  std::int64_t rope_dim = 0;           ///< Width of the rope slice (even).
  const std::int64_t* positions = nullptr;  ///< Position of each token.
  const float* frequencies = nullptr;  ///< `rope_dim / 2` pair frequencies.
};

/// Rotates pairs (x[2p], x[2p+1]) by angle `position * frequencies[p]` (fp32 angle, as
/// upstream's `torch.polar(ones, outer(t, freqs))`).
void rope(const rope_params& params);

namespace reference {
/// Plain rope: the specification.
void rope(const rope_params& params);
}  // namespace reference

}  // namespace shoal::kernels
