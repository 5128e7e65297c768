#include "shoal/kernels/moe.hpp"
#include "shoal/kernels/thread_pool.hpp"

#include "random_weights.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <set>

using namespace shoal;
using kernels::dtype;

namespace {

struct expert_set {
  std::vector<test::owned_matrix> storage;
  std::vector<kernels::expert_weights> experts;
};

expert_set random_experts(dtype type, std::int64_t count, std::int64_t hidden, std::int64_t inter, std::mt19937& rng) {
  expert_set set;
  set.storage.reserve(count * 3);
  for (std::int64_t e = 0; e < count; ++e) {
    set.storage.push_back(test::random_matrix(type, inter, hidden, rng, 0.1f));
    set.storage.push_back(test::random_matrix(type, inter, hidden, rng, 0.1f));
    set.storage.push_back(test::random_matrix(type, hidden, inter, rng, 0.1f));
  }
  for (std::int64_t e = 0; e < count; ++e)
    set.experts.push_back({set.storage[3 * e].view, set.storage[3 * e + 1].view, set.storage[3 * e + 2].view});
  return set;
}

// Each expert's output for rows [first, first + count), one expert per row (`ids`), weight 1.
std::vector<float> outputs_of_rows(kernels::thread_pool& pool, const expert_set& set, const std::vector<float>& x,
                                   const std::vector<std::int32_t>& ids, std::int64_t hidden, std::int64_t first,
                                   std::int64_t count) {
  const std::vector<float> ones(static_cast<std::size_t>(count), 1.0f);
  std::vector<float> y(static_cast<std::size_t>(count * hidden), 0.0f);
  kernels::moe_experts(pool, {.x = x.data() + first * hidden, .tokens = count, .hidden = hidden, .top_k = 1,
                              .indices = ids.data() + first, .weights = ones.data(), .experts = set.experts,
                              .y = y.data()});
  return y;
}

}  // namespace

TEST_CASE("fused routed experts match the per-token reference", "[moe]") {
  std::mt19937 rng(11);
  kernels::thread_pool pool(2);
  const dtype type = GENERATE(dtype::bf16, dtype::f8_e4m3);
  const std::int64_t tokens = GENERATE(1, 5, 40);
  const std::int64_t experts = 8, top_k = 3, hidden = 136, inter = 200;
  CAPTURE(kernels::dtype_name(type), tokens);
  auto set = random_experts(type, experts, hidden, inter, rng);
  const auto x = test::random_vector(tokens * hidden, rng);
  // Experts 6 and 7 are never chosen: zero-token experts must be skipped cleanly.
  std::vector<std::int32_t> indices(tokens * top_k);
  std::vector<float> weights(tokens * top_k);
  for (std::int64_t t = 0; t < tokens; ++t) {
    std::vector<std::int32_t> ids(6);
    std::iota(ids.begin(), ids.end(), 0);
    std::shuffle(ids.begin(), ids.end(), rng);
    for (std::int64_t k = 0; k < top_k; ++k) {
      indices[t * top_k + k] = ids[k];
      weights[t * top_k + k] = 0.5f + 0.1f * static_cast<float>(k);
    }
  }
  auto base = test::random_vector(tokens * hidden, rng);
  std::vector<float> expected = base, actual = base;
  kernels::moe_experts_params p{.x = x.data(), .tokens = tokens, .hidden = hidden, .top_k = top_k,
                                .indices = indices.data(), .weights = weights.data(),
                                .experts = set.experts, .y = expected.data()};
  kernels::reference::moe_experts(p);
  p.y = actual.data();
  kernels::moe_experts(pool, p);
  CHECK(test::relative_error(actual, expected) < 1e-5);

  SECTION("experts not held here are skipped, and the held halves add up to the whole") {
    std::vector<kernels::expert_weights> even = set.experts, odd = set.experts;
    for (std::int64_t e = 0; e < experts; ++e) (e % 2 ? even : odd)[e] = {};
    std::vector<float> split = base;
    p.y = split.data();
    p.experts = even;
    kernels::moe_experts(pool, p);
    p.experts = odd;
    kernels::moe_experts(pool, p);
    CHECK(test::relative_error(split, expected) < 1e-5);
  }
}

TEST_CASE("router selects within the best groups by biased score and weights by unbiased score", "[moe]") {
  // 8 experts in 4 groups of 2; keep 2 groups; choose 2 experts.
  const std::vector<float> logits = {0.0f, 0.1f, 2.0f, -1.0f, 1.0f, 1.0f, -2.0f, 3.0f};
  // Bias lifts group 0 (experts 0, 1) above group 1 (experts 2, 3).
  const std::vector<float> bias = {1.0f, 1.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  std::vector<std::int32_t> indices(2);
  std::vector<float> weights(2);
  kernels::moe_route_params p{.logits = logits.data(), .bias = bias.data(), .tokens = 1, .experts = 8,
                              .groups = 4, .top_groups = 2, .top_k = 2, .normalize = true,
                              .scaling_factor = 2.5f, .indices = indices.data(), .weights = weights.data()};
  kernels::moe_route(p);
  const auto sigmoid = [](float x) { return 1.0f / (1.0f + std::exp(-x)); };
  // Group sums of biased scores: g0 = s(0)+1 + s(.1)+1 = 3.02, g1 = s(2)+s(-1) = 1.15,
  // g2 = 2 s(1) = 1.46, g3 = s(-2)+s(3) = 1.07. Kept: g0 and g2. Best biased: 1 then 0.
  CHECK(std::set<int>(indices.begin(), indices.end()) == std::set<int>{0, 1});
  CHECK(indices[0] == 1);  // descending biased score
  const float sum = sigmoid(0.1f) + sigmoid(0.0f);
  CHECK(weights[0] == Approx(sigmoid(0.1f) / sum * 2.5f));
  CHECK(weights[1] == Approx(sigmoid(0.0f) / sum * 2.5f));
  CHECK(weights[0] + weights[1] == Approx(2.5f));
  // Expert 7 has the highest raw score but its group loses: it must not be chosen.
  CHECK(std::find(indices.begin(), indices.end(), 7) == indices.end());
}

namespace {

// The routing rule checked from its definition: the chosen experts lie in the `top_groups`
// groups with the largest sums of their two best biased scores, no unchosen expert of those
// groups has a larger biased score than a chosen one, and the weights are the chosen unbiased
// scores normalised and scaled.
void check_routing(const kernels::moe_route_params& p) {
  const std::int64_t per_group = p.experts / p.groups;
  const auto sigmoid = [](float x) { return 1.0 / (1.0 + std::exp(-static_cast<double>(x))); };
  std::int64_t groups_checked = 0;
  for (std::int64_t t = 0; t < p.tokens; ++t) {
    CAPTURE(t);
    std::vector<double> score(p.experts), biased(p.experts);
    for (std::int64_t e = 0; e < p.experts; ++e) {
      score[e] = sigmoid(p.logits[t * p.experts + e]);
      biased[e] = score[e] + (p.bias ? p.bias[e] : 0.0f);
    }
    std::vector<std::pair<double, std::int64_t>> groups;
    for (std::int64_t g = 0; g < p.groups; ++g) {
      std::vector<double> b(biased.begin() + g * per_group, biased.begin() + (g + 1) * per_group);
      std::sort(b.rbegin(), b.rend());
      groups.emplace_back(per_group > 1 ? b[0] + b[1] : b[0], g);
    }
    std::sort(groups.rbegin(), groups.rend());
    // Group sums closer than float rounding may be ordered either way; such tokens check the
    // weights only.
    const bool clear_groups = p.top_groups == p.groups ||
                              groups[p.top_groups - 1].first - groups[p.top_groups].first > 1e-5;
    std::set<std::int64_t> best_groups;
    for (std::int64_t i = 0; i < p.top_groups; ++i) best_groups.insert(groups[i].second);
    std::set<std::int32_t> chosen;
    double worst_chosen = 1e30, sum = 0.0;
    for (std::int64_t k = 0; k < p.top_k; ++k) {
      const std::int32_t e = p.indices[t * p.top_k + k];
      REQUIRE(e >= 0);
      REQUIRE(e < p.experts);
      chosen.insert(e);
      worst_chosen = std::min(worst_chosen, biased[e]);
      sum += score[e];
      if (k > 0) REQUIRE(biased[e] <= biased[p.indices[t * p.top_k + k - 1]] + 1e-6);  // descending
    }
    REQUIRE(chosen.size() == static_cast<std::size_t>(p.top_k));
    for (std::int64_t k = 0; k < p.top_k; ++k) {
      const std::int32_t e = p.indices[t * p.top_k + k];
      const double want = (p.normalize ? score[e] / sum : score[e]) * p.scaling_factor;
      REQUIRE(p.weights[t * p.top_k + k] == Approx(want).epsilon(1e-5));
    }
    if (!clear_groups) continue;
    ++groups_checked;
    for (const auto e : chosen) REQUIRE(best_groups.count(e / per_group) == 1);
    for (const auto g : best_groups)
      for (std::int64_t e = g * per_group; e < (g + 1) * per_group; ++e)
        if (!chosen.count(static_cast<std::int32_t>(e))) REQUIRE(biased[e] <= worst_chosen + 1e-6);
  }
  CHECK(groups_checked * 10 >= p.tokens * 9);  // random scores: near ties are rare
}

struct route_shape {
  std::int64_t experts, groups, top_groups, top_k;
  bool normalize, bias;
  float scale;
};

// DeepSeek-V3's shape, the golden models' (tiny-a, tiny-b), unnormalised weights, one expert per
// group, one group, no bias.
const std::vector<route_shape> kRouteShapes = {
    {256, 8, 4, 8, true, true, 2.5f}, {16, 4, 2, 4, true, true, 2.5f}, {32, 8, 3, 6, true, true, 1.5f},
    {64, 8, 3, 6, false, true, 1.5f}, {16, 16, 5, 3, true, true, 1.0f}, {24, 1, 1, 6, true, true, 1.0f},
    {48, 4, 2, 5, true, false, 2.0f}};

}  // namespace

TEST_CASE("router chooses from the best groups and the best experts in them (random)", "[moe]") {
  const auto shape = GENERATE(from_range(kRouteShapes));
  CAPTURE(shape.experts, shape.groups, shape.top_groups, shape.top_k, shape.normalize, shape.bias);
  std::mt19937 rng(21);
  const std::int64_t tokens = 300;
  const auto logits = test::random_vector(tokens * shape.experts, rng, 2.0f);
  const auto bias = test::random_vector(shape.experts, rng, 0.3f);
  std::vector<std::int32_t> indices(tokens * shape.top_k);
  std::vector<float> weights(indices.size());
  kernels::moe_route_params p{.logits = logits.data(), .bias = shape.bias ? bias.data() : nullptr, .tokens = tokens,
                              .experts = shape.experts, .groups = shape.groups, .top_groups = shape.top_groups,
                              .top_k = shape.top_k, .normalize = shape.normalize, .scaling_factor = shape.scale,
                              .indices = indices.data(), .weights = weights.data()};
  SECTION("optimized") { kernels::moe_route(p); }
  SECTION("reference") { kernels::reference::moe_route(p); }
  check_routing(p);
}

TEST_CASE("optimized router chooses exactly as the plain reference, ties included", "[moe]") {
  const auto shape = GENERATE(from_range(kRouteShapes));
  CAPTURE(shape.experts, shape.groups, shape.top_groups, shape.top_k, shape.normalize, shape.bias);
  std::mt19937 rng(22);
  const std::int64_t tokens = 300;
  auto logits = test::random_vector(tokens * shape.experts, rng, 2.0f);
  // The second half of the tokens draws logits from five values, so that scores, group sums
  // and whole groups tie and the tie rule decides.
  for (std::size_t i = logits.size() / 2; i < logits.size(); ++i) logits[i] = static_cast<float>(rng() % 5) * 0.5f;
  auto bias = test::random_vector(shape.experts, rng, 0.3f);
  if (shape.experts > 8) std::fill(bias.begin(), bias.begin() + 8, 0.25f);
  std::vector<std::int32_t> got_i(tokens * shape.top_k), want_i(got_i.size());
  std::vector<float> got_w(got_i.size()), want_w(got_i.size());
  kernels::moe_route_params p{.logits = logits.data(), .bias = shape.bias ? bias.data() : nullptr, .tokens = tokens,
                              .experts = shape.experts, .groups = shape.groups, .top_groups = shape.top_groups,
                              .top_k = shape.top_k, .normalize = shape.normalize, .scaling_factor = shape.scale,
                              .indices = got_i.data(), .weights = got_w.data()};
  kernels::moe_route(p);
  p.indices = want_i.data();
  p.weights = want_w.data();
  kernels::reference::moe_route(p);
  for (std::int64_t t = 0; t < tokens; ++t) {
    CAPTURE(t);
    for (std::int64_t k = 0; k < shape.top_k; ++k) {
      REQUIRE(got_i[t * shape.top_k + k] == want_i[t * shape.top_k + k]);
      REQUIRE(got_w[t * shape.top_k + k] == Approx(want_w[t * shape.top_k + k]).epsilon(1e-6));
    }
  }
}

TEST_CASE("an expert's output for a row does not depend on the other rows computed with it", "[moe]") {
  // Expert copies (shoal admin replicate-expert, rebalance) and continuous batching change
  // which rows an expert computes together; the output of each row must stay bit for bit the
  // same, or greedy tokens would depend on the load.
  std::mt19937 rng(23);
  kernels::thread_pool pool(2);
  const dtype type = GENERATE(dtype::bf16, dtype::f8_e4m3);
  const std::int64_t experts = 4, hidden = 136, inter = 200, rows = 37;
  CAPTURE(kernels::dtype_name(type));
  auto set = random_experts(type, experts, hidden, inter, rng);
  const auto x = test::random_vector(rows * hidden, rng);
  std::vector<std::int32_t> ids(rows);
  for (std::int64_t r = 0; r < rows; ++r) ids[r] = static_cast<std::int32_t>(rng() % experts);
  auto run = [&](std::int64_t first, std::int64_t count) { return outputs_of_rows(pool, set, x, ids, hidden, first, count); };
  const auto together = run(0, rows);
  for (std::int64_t r = 0; r < rows; ++r) {
    CAPTURE(r);
    const auto alone = run(r, 1);
    CHECK(std::equal(alone.begin(), alone.end(), together.begin() + r * hidden));
  }
  // And in other company: the second half of the rows on their own.
  const auto half = run(rows / 2, rows - rows / 2);
  CHECK(std::equal(half.begin(), half.end(), together.begin() + (rows / 2) * hidden));
}

TEST_CASE("an expert's output for a row does not depend on the other rows of its GEMM", "[moe]") {
  // The same as above with 16 or more rows per expert (where the fp32 path switches from
  // streaming to a GEMM), BF16 weights: 2000-wide activations make the BF16 GEMM's token blocks
  // 30 rows of 3-row tiles, so the row counts below also straddle its tile and block edges.
  std::mt19937 rng(41);
  kernels::thread_pool pool(2);
  const std::int64_t experts = 2, hidden = 2000, inter = 200, rows = 80;
  auto set = random_experts(dtype::bf16, experts, hidden, inter, rng);
  const auto x = test::random_vector(rows * hidden, rng);
  std::vector<std::int32_t> ids(rows);
  for (std::int64_t r = 0; r < rows; ++r) ids[r] = static_cast<std::int32_t>(r % experts);
  auto run = [&](std::int64_t first, std::int64_t count) { return outputs_of_rows(pool, set, x, ids, hidden, first, count); };
  const auto together = run(0, rows);
  for (const std::int64_t count : {32, 33, 34, 35, 58, 59, 60, 61, 62, 63, 79}) {
    for (const std::int64_t first : {std::int64_t{0}, rows - count}) {
      CAPTURE(count, first);
      const auto part = run(first, count);
      CHECK(std::equal(part.begin(), part.end(), together.begin() + first * hidden));
    }
  }
}
