#pragma once
/// \file
/// A read-only view of a weight matrix in any storage type, including FP8 with block scales.

#include "shoal/kernels/dtype.hpp"

#include <cstdint>

namespace shoal::kernels {

/// Row-major weight matrix `[rows][cols]` as stored in a checkpoint (a Linear's `[out][in]`).
/// Does not own its memory.
struct matrix_view {
  dtype type = dtype::f32;       ///< Storage type of `data`.
  std::int64_t rows = 0;         ///< Output features.
  std::int64_t cols = 0;         ///< Input features.
  const void* data = nullptr;    ///< rows * cols elements of `type`.
  /// FP8 only: per-block multipliers `[ceil(rows/128)][ceil(cols/128)]` (DeepSeek's
  /// `weight_scale_inv`); the real weight is `fp8(q[r][c]) * scale_inv[r/128][c/128]`.
  const float* scale_inv = nullptr;
  static constexpr std::int64_t kBlock = 128;  ///< FP8 block edge (rows and columns).

  /// Number of scale blocks along the rows.
  std::int64_t scale_rows() const noexcept { return (rows + kBlock - 1) / kBlock; }
  /// Number of scale blocks along the columns.
  std::int64_t scale_cols() const noexcept { return (cols + kBlock - 1) / kBlock; }
  /// Bytes a full read of the matrix touches (elements plus scales).
  std::int64_t bytes() const noexcept {
    std::int64_t total = rows * cols * static_cast<std::int64_t>(dtype_size(type));
    if (scale_inv) total += scale_rows() * scale_cols() * 4;
    return total;
  }
  /// The exact fp32 value of element (row, col).
  float at(std::int64_t row, std::int64_t col) const noexcept {
    const std::int64_t i = row * cols + col;
    switch (type) {
      case dtype::f32: return static_cast<const float*>(data)[i];
      case dtype::bf16: return bf16_to_f32(static_cast<const std::uint16_t*>(data)[i]);
      case dtype::f16: return f16_to_f32(static_cast<const std::uint16_t*>(data)[i]);
      case dtype::f8_e4m3: {
        const float scale = scale_inv[(row / kBlock) * scale_cols() + col / kBlock];
        return fp8_e4m3_to_f32(static_cast<const std::uint8_t*>(data)[i]) * scale;
      }
    }
    return 0.0f;
  }
  /// The sub-matrix of rows [first, first + count); FP8 views must start on a block edge.
  matrix_view row_slice(std::int64_t first, std::int64_t count) const noexcept;
};

/// Writes the exact fp32 values of `row`, columns [col0, col0 + count), to `out`.
void dequantize_row(const matrix_view& matrix, std::int64_t row, std::int64_t col0,
                    std::int64_t count, float* out) noexcept;

}  // namespace shoal::kernels
