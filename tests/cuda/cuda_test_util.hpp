#pragma once
// Helpers shared by the GPU suites: skipping without a device, uploads, error norms.

#include "shoal/kernels/cuda/context.hpp"
#include "shoal/kernels/dtype.hpp"

#include "skip.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

namespace shoal::test {

// True when a GPU is present; otherwise records the skip, so that the CTest entry of the [gpu]
// cases reports Skipped (tests/skip.hpp), never Passed.
inline bool gpu_present() {
  if (kernels::cuda::device_available()) return true;
  shoal::testing::skip("no CUDA device (cudaGetDeviceCount failed or returned 0)");
  return false;
}

template <typename T>
kernels::cuda::device_buffer upload(kernels::cuda::context& ctx, const std::vector<T>& host) {
  kernels::cuda::device_buffer buffer(host.size() * sizeof(T));
  kernels::cuda::copy_to_device(ctx, buffer.data(), host.data(), host.size() * sizeof(T));
  return buffer;
}

template <typename T>
std::vector<T> download(kernels::cuda::context& ctx, const kernels::cuda::device_buffer& buffer,
                        std::size_t count) {
  std::vector<T> host(count);
  kernels::cuda::copy_to_host(ctx, host.data(), buffer.data(), count * sizeof(T));
  return host;
}

inline std::vector<float> random_floats(std::mt19937& rng, std::size_t count, float scale = 1.0f) {
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(count);
  for (float& x : v) x = dist(rng);
  return v;
}

inline std::vector<std::uint16_t> to_bf16(const std::vector<float>& v) {
  std::vector<std::uint16_t> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = kernels::f32_to_bf16(v[i]);
  return out;
}

inline std::vector<float> bf16_round(const std::vector<float>& v) {
  std::vector<float> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = kernels::bf16_to_f32(kernels::f32_to_bf16(v[i]));
  return out;
}

// ||got - want|| / ||want|| over all elements (0 when both are zero).
inline double relative_error(const std::vector<float>& got, const std::vector<float>& want) {
  REQUIRE(got.size() == want.size());
  double diff = 0.0, norm = 0.0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    diff += (static_cast<double>(got[i]) - want[i]) * (static_cast<double>(got[i]) - want[i]);
    norm += static_cast<double>(want[i]) * want[i];
  }
  return norm == 0.0 ? std::sqrt(diff) : std::sqrt(diff / norm);
}

// The worst row's ||got - want|| / ||want||, over rows of `cols` (0 for rows where both are zero).
inline double max_row_relative_error(const std::vector<float>& got, const std::vector<float>& want,
                                     std::size_t cols) {
  REQUIRE(got.size() == want.size());
  REQUIRE(cols > 0);
  double worst = 0.0;
  for (std::size_t row = 0; row * cols < got.size(); ++row) {
    const std::vector<float> g(got.begin() + row * cols, got.begin() + (row + 1) * cols);
    const std::vector<float> w(want.begin() + row * cols, want.begin() + (row + 1) * cols);
    worst = std::max(worst, relative_error(g, w));
  }
  return worst;
}

// What an op that adds into `base` contributed: out - base, element by element.
inline std::vector<float> minus(const std::vector<float>& out, const std::vector<float>& base) {
  REQUIRE(out.size() == base.size());
  std::vector<float> d(out.size());
  for (std::size_t i = 0; i < out.size(); ++i) d[i] = out[i] - base[i];
  return d;
}

}  // namespace shoal::test
