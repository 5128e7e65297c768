#pragma once
// Private to the CPU kernels: y = x W^T for BF16 weights read as stored, with AVX512-BF16 dot
// products (`vdpbf16ps`). The fp32 activations are split once per call into BF16 parts whose
// sum approximates them; every part meets every weight in a product that is exact in fp32, and
// the products are summed in fp32.

#include "shoal/kernels/matrix.hpp"

#include <cstdint>
#include <vector>

namespace shoal::kernels {
class thread_pool;
}

namespace shoal::kernels::detail {

/// BF16 parts per activation: x = hi + lo + e with |e| <= 2^-16 |x| (hi is x rounded to BF16,
/// lo the remainder rounded to BF16); two parts pass the golden tests. One part (x rounded to
/// BF16, |e| <= 2^-8 |x|, as llama.cpp's BF16 path does) runs twice as fast but fails them: over
/// 1e-4 from DeepSeek's fp32 logits (median 3e-4 where over), router choices and greedy tokens
/// changed.
inline constexpr int kBf16Parts = 2;

/// kBf16Parts, or 1-3 from `SHOAL_BF16_PARTS` in the environment: a switch for measuring
/// what the parts cost, not a setting (one part fails the golden tests).
int bf16_parts();

/// Whether this CPU runs `vdpbf16ps` (and the AVX-512 the kernel also uses), and the BF16 path
/// is not switched off by `SHOAL_BF16_GEMM=0` in the environment (kept for A/B measurements
/// against the fp32 path in the same run).
bool bf16_gemm_enabled();

/// Whether `linear` and the expert kernel run `weight` through this kernel: BF16 weights, for
/// any number of tokens. A token's outputs then do not depend on the batch it is in (one token
/// or 500, decode or prefill); a switch at some batch size to another summation (the fp32
/// streaming kernel) changed greedy tokens of sequences recomputed after a node failure.
bool bf16_gemm_applies(const matrix_view& weight);

/// Activations split into BF16 parts: token t's part q is the `stride` BF16 values from
/// `data + (t * bf16_parts() + q) * stride`, zero past the real width.
struct bf16_activations {
  std::vector<std::uint16_t> data;  ///< `[tokens][bf16_parts()][stride]` BF16 bit patterns.
  std::int64_t tokens = 0;          ///< Rows.
  std::int64_t stride = 0;          ///< Elements per part: the width rounded up to 32.

  /// BF16 elements from one token to the next.
  std::int64_t token_stride() const noexcept { return bf16_parts() * stride; }
};

/// Splits `tokens` rows of `cols` floats (`x_stride` apart) into `out`; rows are split on the
/// pool when `pool` is given.
void bf16_split(const float* x, std::int64_t tokens, std::int64_t cols, std::int64_t x_stride,
                bf16_activations& out, thread_pool* pool = nullptr);

struct gemm_bf16_params {
  const std::uint16_t* x = nullptr;  ///< Token 0 of split activations (`bf16_activations`).
  std::int64_t x_stride = 0;         ///< BF16 elements per part, >= weight.cols, multiple of 32.
  matrix_view weight;                ///< BF16 `[out][in]`.
  float* y = nullptr;                ///< Outputs `[tokens][y_stride]`.
  std::int64_t tokens = 0;           ///< Rows of x and y.
  std::int64_t y_stride = 0;         ///< Floats between rows of y.
  bool accumulate = false;           ///< Add into y instead of overwriting it.
};

/// Outputs of weight rows [row_begin, row_end) for all tokens, on the calling thread. A
/// token's result depends only on its own activations: every output is one fixed sequence of
/// operations whatever the number of tokens, their order or the rows around it.
void gemm_bf16_rows(const gemm_bf16_params& params, std::int64_t row_begin, std::int64_t row_end);

}  // namespace shoal::kernels::detail
