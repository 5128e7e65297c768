#include "shoal/kernels/linear.hpp"
#include "shoal/kernels/rmsnorm.hpp"
#include "shoal/kernels/rope.hpp"
#include "shoal/kernels/thread_pool.hpp"

#include "random_weights.hpp"

#include <catch2/catch.hpp>

#include <cmath>
#include <random>
#include <utility>
#include <vector>

using namespace shoal;
using kernels::dtype;

// FP32 accumulation in a different order: errors grow like sqrt(cols) * eps relative to the
// output scale; 1e-5 leaves a wide margin at these widths while catching any real mistake
// (a wrong scale block, a dropped tail, a wrong row). The BF16 GEMM (BF16 weights on CPUs
// with AVX512-BF16) also carries each activation as two BF16 parts, off by at
// most 2^-16 of it: about 3e-6 of the output scale here.
constexpr double kLinearTolerance = 1e-5;

TEST_CASE("optimized linear matches the reference for every dtype, batch and ragged shape", "[linear]") {
  std::mt19937 rng(1234);
  kernels::thread_pool pool(2);
  const dtype type = GENERATE(dtype::f32, dtype::bf16, dtype::f16, dtype::f8_e4m3);
  // 200 x 300: partial FP8 blocks in both directions and SIMD tails; 16 and 33 tokens take the
  // GEMM path, 1..7 the streaming path.
  const std::int64_t tokens = GENERATE(1, 2, 3, 7, 16, 33);
  const std::int64_t rows = GENERATE(200, 17);
  const std::int64_t cols = 300;
  CAPTURE(kernels::dtype_name(type), tokens, rows);
  auto w = test::random_matrix(type, rows, cols, rng);
  const auto x = test::random_vector(tokens * cols, rng);
  std::vector<float> expected(tokens * rows), actual(tokens * rows);
  kernels::linear_params p{.x = x.data(), .weight = w.view, .y = expected.data(), .tokens = tokens};
  kernels::reference::linear(p);
  p.y = actual.data();
  kernels::linear(pool, p);
  CHECK(test::relative_error(actual, expected) < kLinearTolerance);

  SECTION("accumulate adds into the output") {
    auto base = test::random_vector(tokens * rows, rng);
    std::vector<float> sum = base;
    p.y = sum.data();
    p.accumulate = true;
    kernels::linear(pool, p);
    for (std::size_t i = 0; i < base.size(); ++i) base[i] += expected[i];
    CHECK(test::relative_error(sum, base) < kLinearTolerance);
  }
}

TEST_CASE("a token's linear outputs do not depend on the tokens computed with it", "[linear]") {
  // Continuous batching, chunked prefill and recomputing a sequence after a node failure change
  // which tokens share a pass over the weights; a token's outputs must stay bit for bit the
  // same. BF16 weights take the BF16 GEMM at every batch size (one token alone streams one row
  // at a time); 2000 columns end in a partial 32-column step and make its token blocks 30 tokens
  // of 3-token tiles, and 37 rows end in a partial 4-row tile: the batch sizes below straddle
  // the tile and block edges and the old 16-token switch from the streaming kernel.
  std::mt19937 rng(31);
  kernels::thread_pool pool(2);
  const std::int64_t rows = 37, cols = 2000, all = 70;
  auto w = test::random_matrix(dtype::bf16, rows, cols, rng);
  const auto x = test::random_vector(all * cols, rng);
  auto run = [&](std::int64_t first, std::int64_t count) {
    std::vector<float> y(static_cast<std::size_t>(count * rows));
    kernels::linear(pool, {.x = x.data() + first * cols, .weight = w.view, .y = y.data(), .tokens = count});
    return y;
  };
  const auto together = run(0, all);
  for (const std::int64_t count : {1, 2, 3, 4, 5, 15, 16, 17, 29, 30, 31, 32, 33, 59, 60, 61, 69}) {
    for (const std::int64_t first : {std::int64_t{0}, (all - count) / 2, all - count}) {
      CAPTURE(count, first);
      const auto part = run(first, count);
      CHECK(std::equal(part.begin(), part.end(), together.begin() + first * rows));
    }
  }
}

TEST_CASE("linear honours input and output strides", "[linear]") {
  std::mt19937 rng(7);
  kernels::thread_pool pool(2);
  auto w = test::random_matrix(dtype::bf16, 40, 64, rng);
  const std::int64_t tokens = GENERATE(3, 20);
  const auto x = test::random_vector(tokens * 100, rng);
  std::vector<float> expected(tokens * 50, -7.0f), actual(tokens * 50, -7.0f);
  kernels::linear_params p{.x = x.data(), .weight = w.view, .y = expected.data(), .tokens = tokens,
                           .x_stride = 100, .y_stride = 50};
  kernels::reference::linear(p);
  p.y = actual.data();
  kernels::linear(pool, p);
  CHECK(test::relative_error(actual, expected) < kLinearTolerance);
  for (std::int64_t t = 0; t < tokens; ++t)
    for (std::int64_t j = 40; j < 50; ++j) REQUIRE(actual[t * 50 + j] == -7.0f);  // untouched
}

TEST_CASE("FP8 linear stays exact for subnormal weights and activations of any magnitude", "[linear]") {
  std::mt19937 rng(21);
  kernels::thread_pool pool(2);
  const std::int64_t rows = 64, cols = 300, tokens = GENERATE(1, 3);
  const int exponent = GENERATE(-90, -20, 0, 20, 60, 100);
  CAPTURE(tokens, exponent);
  auto w = test::random_matrix(dtype::f8_e4m3, rows, cols, rng);
  // Row 1 holds only E4M3 subnormals (exponent bits 0), both signs; row 0 starts with the
  // largest normals.
  for (std::int64_t c = 0; c < cols; ++c) w.bytes[cols + c] = static_cast<std::uint8_t>(rng() & 0x87);
  w.bytes[0] = 0x7e;
  w.bytes[1] = 0xfe;
  auto x = test::random_vector(tokens * cols, rng);
  for (auto& v : x) v = std::ldexp(v, exponent);
  std::vector<float> expected(tokens * rows), actual(tokens * rows);
  kernels::linear_params p{.x = x.data(), .weight = w.view, .y = expected.data(), .tokens = tokens};
  kernels::reference::linear(p);
  p.y = actual.data();
  kernels::linear(pool, p);
  CHECK(test::relative_error(actual, expected) < kLinearTolerance);
  for (std::int64_t t = 0; t < tokens; ++t) {
    // Relative to the sum of the terms' magnitudes: a sum that cancels has no relative precision.
    double magnitude = 0.0;
    for (std::int64_t c = 0; c < cols; ++c) magnitude += std::fabs(static_cast<double>(w.view.at(1, c)) * x[t * cols + c]);
    CHECK(std::fabs(actual[t * rows + 1] - expected[t * rows + 1]) / magnitude < kLinearTolerance);
  }
  std::fill(x.begin(), x.end(), 0.0f);
  p.y = actual.data();
  kernels::linear(pool, p);
  for (float v : actual) REQUIRE(v == 0.0f);
}

TEST_CASE("dequantize_row gives each element's exact value for any column range", "[linear]") {
  std::mt19937 rng(17);
  const dtype type = GENERATE(dtype::f32, dtype::bf16, dtype::f16, dtype::f8_e4m3);
  CAPTURE(kernels::dtype_name(type));
  auto w = test::random_matrix(type, 130, 300, rng);
  if (type == dtype::f8_e4m3)
    for (std::int64_t c = 0; c < 40; ++c) w.bytes[129 * 300 + c] = static_cast<std::uint8_t>(rng() & 0x87);  // subnormals
  for (const auto& [col0, count] : std::vector<std::pair<std::int64_t, std::int64_t>>{
           {0, 300}, {0, 1}, {5, 17}, {120, 20}, {127, 130}, {250, 50}, {16, 256}}) {
    for (std::int64_t row : {0, 1, 127, 128, 129}) {
      std::vector<float> out(count + 1, -3.0f);
      kernels::dequantize_row(w.view, row, col0, count, out.data());
      for (std::int64_t i = 0; i < count; ++i) REQUIRE(out[i] == w.view.at(row, col0 + i));
      REQUIRE(out[count] == -3.0f);  // nothing written past the range
    }
  }
}

TEST_CASE("FP8 dequantization applies each 128x128 block's own scale", "[linear]") {
  std::mt19937 rng(99);
  auto w = test::random_matrix(dtype::f8_e4m3, 130, 260, rng);
  // Element (129, 259) sits in block (1, 2); changing that block's scale must change it alone.
  const float before = w.view.at(129, 259);
  const float other = w.view.at(0, 0);
  w.scales[1 * 3 + 2] *= 2.0f;
  CHECK(w.view.at(129, 259) == 2.0f * before);
  CHECK(w.view.at(0, 0) == other);
}

TEST_CASE("optimized rmsnorm matches the reference", "[rmsnorm]") {
  std::mt19937 rng(5);
  kernels::thread_pool pool(2);
  const std::int64_t rows = GENERATE(1, 9), dim = GENERATE(7, 160, 2048);
  const auto x = test::random_vector(rows * dim, rng, 3.0f);
  const auto weight = test::random_vector(dim, rng);
  std::vector<float> expected(rows * dim), actual(rows * dim);
  kernels::rmsnorm_params p{.x = x.data(), .weight = weight.data(), .y = expected.data(), .rows = rows, .dim = dim};
  kernels::reference::rmsnorm(p);
  p.y = actual.data();
  kernels::rmsnorm(pool, p);
  CHECK(test::relative_error(actual, expected) < 1e-6);
  // Normalized rows have unit RMS before the gain.
  std::vector<float> ones(dim, 1.0f), unit(dim);
  kernels::reference::rmsnorm({.x = x.data(), .weight = ones.data(), .y = unit.data(), .rows = 1, .dim = dim});
  double sum = 0.0;
  for (float v : unit) sum += v * v;
  CHECK(sum / dim == Approx(1.0).epsilon(1e-4));
}

TEST_CASE("rope rotates interleaved pairs and matches the reference", "[rope]") {
  std::mt19937 rng(3);
  const auto freqs = kernels::rope_frequencies(16, 10000.0, {});
  REQUIRE(freqs.size() == 8);
  CHECK(freqs[0] == 1.0f);
  CHECK(freqs[1] == Approx(std::pow(10000.0, -2.0 / 16)).epsilon(1e-6));
  const std::int64_t tokens = 5, heads = 3, width = 40;
  auto x = test::random_vector(tokens * heads * width, rng);
  auto y = x;
  std::vector<std::int64_t> positions = {0, 1, 7, 300, 4095};
  kernels::rope_params p{.x = x.data(), .tokens = tokens, .heads = heads, .token_stride = heads * width,
                         .head_stride = width, .offset = 24, .rope_dim = 16, .positions = positions.data(),
                         .frequencies = freqs.data()};
  const auto original = x;
  kernels::rope(p);
  p.x = y.data();
  kernels::reference::rope(p);
  CHECK(test::relative_error(x, y) < 1e-6);
  for (std::int64_t t = 0; t < tokens; ++t)
    for (std::int64_t h = 0; h < heads; ++h) {
      const float* before = original.data() + (t * heads + h) * width;
      const float* after = x.data() + (t * heads + h) * width;
      for (int i = 0; i < 24; ++i) REQUIRE(after[i] == before[i]);  // the nope part is untouched
      for (int i = 0; i < 8; ++i) {  // rotation keeps each pair's length
        const float a = std::hypot(before[24 + 2 * i], before[25 + 2 * i]);
        const float b = std::hypot(after[24 + 2 * i], after[25 + 2 * i]);
        REQUIRE(a == Approx(b).epsilon(1e-5));
      }
    }
  // Position 0 is the identity.
  for (int i = 0; i < width; ++i) CHECK(x[i] == original[i]);
}

TEST_CASE("YaRN keeps high frequencies and divides low ones by the factor", "[rope]") {
  const kernels::yarn_params yarn{.factor = 4.0, .original_max_position = 128, .beta_fast = 32, .beta_slow = 1};
  const auto plain = kernels::rope_frequencies(32, 50000.0, {});
  const auto scaled = kernels::rope_frequencies(32, 50000.0, yarn);
  CHECK(scaled.front() == plain.front());
  CHECK(scaled.back() == Approx(plain.back() / 4.0f).epsilon(1e-6));
  for (std::size_t i = 0; i < plain.size(); ++i) {
    CHECK(scaled[i] <= plain[i]);
    CHECK(scaled[i] >= plain[i] / 4.0f * (1 - 1e-6f));
  }
}

TEST_CASE("thread pool covers every index exactly once", "[thread_pool]") {
  kernels::thread_pool pool(GENERATE(1, 2, 3));
  for (std::int64_t count : {0, 1, 2, 5, 1000}) {
    std::vector<std::atomic<int>> hits(static_cast<std::size_t>(count));
    for (int round = 0; round < 50; ++round)
      pool.parallel_for(count, [&](std::int64_t begin, std::int64_t end) {
        for (std::int64_t i = begin; i < end; ++i) hits[i].fetch_add(1);
      });
    for (auto& h : hits) REQUIRE(h.load() == 50);
  }
}
