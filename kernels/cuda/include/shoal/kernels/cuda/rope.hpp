#pragma once
/// \file
/// Rotary embedding (DeepSeek's interleaved pairs, YaRN frequencies) on the GPU, in place.

#include <cstdint>

namespace shoal::kernels::cuda {

class context;

/// The fields of `kernels::rope_params`, all pointers in device memory.
struct rope_params {
  float* x = nullptr;                        ///< Vectors rotated in place.
  std::int64_t tokens = 0;                   ///< Number of tokens.
  std::int64_t heads = 1;                    ///< Vectors per token.
  std::int64_t token_stride = 0;             ///< Floats between tokens.
  std::int64_t head_stride = 0;              ///< Floats between heads of one token.
  std::int64_t offset = 0;                   ///< Start of the rope slice inside a vector.
  std::int64_t rope_dim = 0;                 ///< Width of the rope slice (even).
  const std::int64_t* positions = nullptr;   ///< Position of each token `[tokens]`.
  /// `rope_dim / 2` pair frequencies from `kernels::rope_frequencies` (YaRN applied there).
  const float* frequencies = nullptr;
};

/// Rotates (x[2p], x[2p+1]) by `position * frequencies[p]` (fp32 angle, accurate sincosf).
void rope(context& ctx, const rope_params& params);

}  // namespace shoal::kernels::cuda
