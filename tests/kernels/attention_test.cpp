#include "shoal/kernels/mla_attention.hpp"
#include "shoal/kernels/thread_pool.hpp"

#include "random_weights.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <random>
#include <utility>

using namespace shoal;
using kernels::dtype;

TEST_CASE("absorbed MLA matches naive decompressed attention", "[mla]") {
  std::mt19937 rng(42);
  kernels::thread_pool pool(2);
  const dtype type = GENERATE(dtype::bf16, dtype::f8_e4m3);
  // (prefill from empty, chunk after a cached prefix, single-token decode deep in the cache)
  using shape = std::pair<std::int64_t, std::int64_t>;
  const auto [first, queries] = GENERATE(shape{0, 9}, shape{5, 4}, shape{300, 1}, shape{0, 1});
  const std::int64_t heads = 3, nope = 24, rope = 16, v = 40, rank = 48;
  CAPTURE(kernels::dtype_name(type), first, queries);
  auto kv_b = test::random_matrix(type, heads * (nope + v), rank, rng, 0.2f);
  const auto q = test::random_vector(queries * heads * (nope + rope), rng);
  const auto latent = test::random_vector((first + queries) * (rank + rope), rng);
  std::vector<float> expected(queries * heads * v), actual(queries * heads * v);
  kernels::mla_params p{.heads = heads, .qk_nope_dim = nope, .qk_rope_dim = rope, .v_head_dim = v,
                        .kv_lora_rank = rank, .softmax_scale = 0.125f, .q = q.data(), .queries = queries,
                        .first_position = first, .latent = latent.data(), .kv_b = kv_b.view,
                        .out = expected.data()};
  kernels::reference::mla_attention(p);
  p.out = actual.data();
  kernels::mla_attention(pool, p);
  CHECK(test::relative_error(actual, expected) < 1e-5);
}

TEST_CASE("MLA is causal: later cache entries do not affect earlier queries", "[mla]") {
  std::mt19937 rng(8);
  kernels::thread_pool pool(2);
  const std::int64_t heads = 2, nope = 8, rope = 8, v = 8, rank = 16, queries = 6;
  auto kv_b = test::random_matrix(dtype::f32, heads * (nope + v), rank, rng);
  const auto q = test::random_vector(queries * heads * (nope + rope), rng);
  auto latent = test::random_vector(queries * (rank + rope), rng);
  std::vector<float> before(queries * heads * v), after(queries * heads * v);
  kernels::mla_params p{.heads = heads, .qk_nope_dim = nope, .qk_rope_dim = rope, .v_head_dim = v,
                        .kv_lora_rank = rank, .softmax_scale = 0.3f, .q = q.data(), .queries = queries,
                        .first_position = 0, .latent = latent.data(), .kv_b = kv_b.view, .out = before.data()};
  kernels::mla_attention(pool, p);
  for (std::int64_t i = 0; i < rank + rope; ++i) latent[(queries - 1) * (rank + rope) + i] += 5.0f;
  p.out = after.data();
  kernels::mla_attention(pool, p);
  for (std::int64_t i = 0; i < (queries - 1) * heads * v; ++i) REQUIRE(after[i] == before[i]);
  bool last_changed = false;
  for (std::int64_t i = (queries - 1) * heads * v; i < queries * heads * v; ++i) last_changed |= after[i] != before[i];
  CHECK(last_changed);
}

TEST_CASE("an MLA query's output does not depend on the queries computed with it", "[mla]") {
  // Prefill, decode, chunked prefill and a sequence recomputed after a node failure attend for
  // the same query in different company; its output must stay bit for bit the same. A rank of
  // 40 leaves partial vectors in every product.
  std::mt19937 rng(12);
  kernels::thread_pool pool(2);
  const std::int64_t heads = 3, nope = 24, rope = 16, v = 40, rank = 40, queries = 11;
  auto kv_b = test::random_matrix(dtype::bf16, heads * (nope + v), rank, rng, 0.2f);
  const auto q = test::random_vector(queries * heads * (nope + rope), rng);
  const auto latent = test::random_vector(queries * (rank + rope), rng);
  const std::int64_t q_row = heads * (nope + rope), out_row = heads * v;
  auto run = [&](std::int64_t first, std::int64_t count) {
    std::vector<float> out(static_cast<std::size_t>(count * out_row));
    kernels::mla_attention(pool, {.heads = heads, .qk_nope_dim = nope, .qk_rope_dim = rope, .v_head_dim = v,
                                  .kv_lora_rank = rank, .softmax_scale = 0.125f, .q = q.data() + first * q_row,
                                  .queries = count, .first_position = first, .latent = latent.data(),
                                  .kv_b = kv_b.view, .out = out.data()});
    return out;
  };
  const auto together = run(0, queries);
  using range = std::pair<std::int64_t, std::int64_t>;
  for (const auto& [first, count] : {range{0, 1}, range{4, 1}, range{10, 1}, range{3, 6}, range{5, 6}, range{1, 10}}) {
    CAPTURE(first, count);
    const auto part = run(first, count);
    CHECK(std::equal(part.begin(), part.end(), together.begin() + first * out_row));
  }
}
