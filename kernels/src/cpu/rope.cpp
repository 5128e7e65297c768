#include "shoal/kernels/rope.hpp"

#include <algorithm>
#include <cmath>
#include <numbers>

namespace shoal::kernels {

std::vector<float> rope_frequencies(std::int64_t rope_dim, double base, const yarn_params& yarn) {
  const std::int64_t pairs = rope_dim / 2;
  std::vector<float> freqs(pairs);
  const float base_f = static_cast<float>(base);
  for (std::int64_t p = 0; p < pairs; ++p) {
    const float exponent = static_cast<float>(2 * p) / static_cast<float>(rope_dim);
    freqs[p] = 1.0f / std::pow(base_f, exponent);
  }
  if (yarn.factor <= 1.0) return freqs;
  // YaRN: keep high frequencies (many rotations within the original context), divide low ones
  // by the factor, blend linearly in between (DeepSeek's find_correction_range).
  const auto correction_dim = [&](double rotations) {
    return static_cast<double>(rope_dim) *
           std::log(yarn.original_max_position / (rotations * 2.0 * std::numbers::pi)) /
           (2.0 * std::log(base));
  };
  const double low =
      std::max(std::floor(correction_dim(yarn.beta_fast)), 0.0);
  double high = std::min(std::ceil(correction_dim(yarn.beta_slow)),
                         static_cast<double>(rope_dim - 1));
  const float low_f = static_cast<float>(low);
  float high_f = static_cast<float>(high);
  if (low == high) high_f += 0.001f;
  const float factor = static_cast<float>(yarn.factor);
  for (std::int64_t p = 0; p < pairs; ++p) {
    const float ramp = std::clamp((static_cast<float>(p) - low_f) / (high_f - low_f), 0.0f, 1.0f);
    const float smooth = 1.0f - ramp;
    freqs[p] = freqs[p] / factor * (1.0f - smooth) + freqs[p] * smooth;
  }
  return freqs;
}

namespace {
void rotate(const rope_params& p) {
  const std::int64_t pairs = p.rope_dim / 2;
  for (std::int64_t t = 0; t < p.tokens; ++t) {
    const float position = static_cast<float>(p.positions[t]);
    for (std::int64_t i = 0; i < pairs; ++i) {
      const float angle = position * p.frequencies[i];
      const float c = std::cos(angle);
      const float s = std::sin(angle);
      for (std::int64_t h = 0; h < p.heads; ++h) {
        float* v = p.x + t * p.token_stride + h * p.head_stride + p.offset + 2 * i;
        const float a = v[0];
        const float b = v[1];
        v[0] = a * c - b * s;
        v[1] = a * s + b * c;
      }
    }
  }
}
}  // namespace

// One cos/sin per (token, pair), shared by every head.
void rope(const rope_params& params) { rotate(params); }

namespace reference {
void rope(const rope_params& p) {
  for (std::int64_t t = 0; t < p.tokens; ++t)
    for (std::int64_t h = 0; h < p.heads; ++h)
      for (std::int64_t i = 0; i < p.rope_dim / 2; ++i) {
        const float angle = static_cast<float>(p.positions[t]) * p.frequencies[i];
        float* v = p.x + t * p.token_stride + h * p.head_stride + p.offset + 2 * i;
        const float a = v[0];
        const float b = v[1];
        v[0] = a * std::cos(angle) - b * std::sin(angle);
        v[1] = a * std::sin(angle) + b * std::cos(angle);
      }
}
}  // namespace reference

}  // namespace shoal::kernels
