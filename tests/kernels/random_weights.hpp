#pragma once
// Random weight matrices in every storage type, for comparing kernels with their references.

#include "shoal/kernels/dtype.hpp"
#include "shoal/kernels/matrix.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

namespace shoal::test {

/// A matrix and the memory behind it.
struct owned_matrix {
  std::vector<std::uint8_t> bytes;
  std::vector<float> scales;
  kernels::matrix_view view;
};

inline owned_matrix random_matrix(kernels::dtype type, std::int64_t rows, std::int64_t cols,
                                  std::mt19937& rng, float stddev = 1.0f) {
  std::normal_distribution<float> normal(0.0f, stddev);
  owned_matrix m;
  m.bytes.resize(static_cast<std::size_t>(rows * cols) * kernels::dtype_size(type));
  std::vector<float> values(static_cast<std::size_t>(rows * cols));
  for (auto& v : values) v = normal(rng);
  using kernels::dtype;
  switch (type) {
    case dtype::f32: std::memcpy(m.bytes.data(), values.data(), m.bytes.size()); break;
    case dtype::bf16:
      for (std::size_t i = 0; i < values.size(); ++i) {
        const std::uint16_t b = kernels::f32_to_bf16(values[i]);
        std::memcpy(m.bytes.data() + 2 * i, &b, 2);
      }
      break;
    case dtype::f16:
      for (std::size_t i = 0; i < values.size(); ++i) {
        const std::uint16_t b = kernels::f32_to_f16(values[i]);
        std::memcpy(m.bytes.data() + 2 * i, &b, 2);
      }
      break;
    case dtype::f8_e4m3: {
      // DeepSeek's recipe: per 128x128 block, scale_inv = amax / 448 (edge blocks partial).
      const std::int64_t br = (rows + 127) / 128, bc = (cols + 127) / 128;
      m.scales.assign(static_cast<std::size_t>(br * bc), 0.0f);
      for (std::int64_t r = 0; r < rows; ++r)
        for (std::int64_t c = 0; c < cols; ++c) {
          float& s = m.scales[(r / 128) * bc + c / 128];
          s = std::max(s, std::fabs(values[r * cols + c]) / 448.0f);
        }
      for (auto& s : m.scales)
        if (s == 0.0f) s = 1.0f;
      for (std::int64_t r = 0; r < rows; ++r)
        for (std::int64_t c = 0; c < cols; ++c)
          m.bytes[r * cols + c] =
              kernels::f32_to_fp8_e4m3(values[r * cols + c] / m.scales[(r / 128) * bc + c / 128]);
      break;
    }
  }
  m.view = {type, rows, cols, m.bytes.data(), m.scales.empty() ? nullptr : m.scales.data()};
  return m;
}

inline std::vector<float> random_vector(std::int64_t n, std::mt19937& rng, float stddev = 1.0f) {
  std::normal_distribution<float> normal(0.0f, stddev);
  std::vector<float> v(static_cast<std::size_t>(n));
  for (auto& x : v) x = normal(rng);
  return v;
}

/// Largest |a - b| / (atol + |b|) style error: max |a-b| divided by max |b| (scale-free).
inline double relative_error(const std::vector<float>& actual, const std::vector<float>& expected) {
  double diff = 0.0, scale = 0.0;
  for (std::size_t i = 0; i < expected.size(); ++i) {
    diff = std::max(diff, static_cast<double>(std::fabs(actual[i] - expected[i])));
    scale = std::max(scale, static_cast<double>(std::fabs(expected[i])));
  }
  return scale == 0.0 ? diff : diff / scale;
}

}  // namespace shoal::test
