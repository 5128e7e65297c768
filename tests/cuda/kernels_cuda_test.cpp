// GPU kernels against the CPU reference kernels on random inputs. Tolerances are relative L2
// errors over the whole output, stated per op with the reason for their size.

#include "cuda_test_util.hpp"

#include "shoal/kernels/cuda/context.hpp"
#include "shoal/kernels/cuda/gemm.hpp"
#include "shoal/kernels/cuda/mla_attention.hpp"
#include "shoal/kernels/cuda/mla_cache_write.hpp"
#include "shoal/kernels/cuda/moe.hpp"
#include "shoal/kernels/cuda/rmsnorm.hpp"
#include "shoal/kernels/cuda/rope.hpp"
#include "shoal/kernels/cuda/sampling.hpp"
#include "shoal/kernels/mla_attention.hpp"
#include "shoal/kernels/moe.hpp"
#include "shoal/kernels/rmsnorm.hpp"
#include "shoal/kernels/rope.hpp"

#include <algorithm>
#include <array>
#include <cstring>
#include <numeric>

namespace cu = shoal::kernels::cuda;
namespace k = shoal::kernels;
using shoal::test::download;
using shoal::test::random_floats;
using shoal::test::relative_error;
using shoal::test::upload;

// ---- CPU-only checks: run everywhere, GPU or not. ----

TEST_CASE("sampling reference: greedy, top-k 1 and a tiny top-p all give the argmax", "[cuda][cpu]") {
  std::mt19937 rng(1);
  const std::int64_t batch = 16, vocab = 3000;
  const auto logits = random_floats(rng, batch * vocab, 2.0f);
  std::vector<float> temperature(batch, 0.0f), top_p(batch, 1.0f), uniform(batch, 0.999f);
  std::vector<std::int32_t> top_k(batch, 0), greedy(batch), tokens(batch);
  cu::sampling_params p{logits.data(), batch, vocab, temperature.data(), top_k.data(),
                        top_p.data(), uniform.data(), greedy.data()};
  cu::reference::sample(p);
  for (std::int64_t b = 0; b < batch; ++b) {
    const float* row = logits.data() + b * vocab;
    CHECK(greedy[b] == std::max_element(row, row + vocab) - row);
  }
  std::fill(temperature.begin(), temperature.end(), 0.7f);
  std::fill(top_k.begin(), top_k.end(), 1);
  p.tokens = tokens.data();
  cu::reference::sample(p);
  CHECK(tokens == greedy);
  std::fill(top_k.begin(), top_k.end(), 0);
  std::fill(top_p.begin(), top_p.end(), 1e-6f);
  cu::reference::sample(p);
  CHECK(tokens == greedy);
}

TEST_CASE("sampling reference: frequencies follow the truncated distribution", "[cuda][cpu]") {
  // Three live tokens with probabilities ~ 0.5, 0.3, 0.2 and top_k 2: only the first two, at 5:3.
  const std::vector<float> logits = {std::log(0.5f), std::log(0.3f), std::log(0.2f), -50.0f};
  const std::int64_t draws = 4000;
  std::vector<float> batch_logits, temperature(draws, 1.0f), top_p(draws, 1.0f), uniform(draws);
  std::vector<std::int32_t> top_k(draws, 2), tokens(draws);
  for (std::int64_t i = 0; i < draws; ++i) {
    batch_logits.insert(batch_logits.end(), logits.begin(), logits.end());
    uniform[i] = (static_cast<float>(i) + 0.5f) / draws;
  }
  cu::reference::sample({batch_logits.data(), draws, 4, temperature.data(), top_k.data(),
                         top_p.data(), uniform.data(), tokens.data()});
  const auto first = std::count(tokens.begin(), tokens.end(), 0);
  const auto second = std::count(tokens.begin(), tokens.end(), 1);
  CHECK(first + second == draws);
  CHECK(std::abs(static_cast<double>(first) / draws - 0.625) < 0.01);
}

TEST_CASE("workspace sizes cover the tables and grow with the batch", "[cuda][cpu]") {
  const auto ordered = cu::moe_experts_workspace_bytes(256, 8, 256, 7168, 2048, cu::moe_combine::ordered);
  const auto atomic = cu::moe_experts_workspace_bytes(256, 8, 256, 7168, 2048, cu::moe_combine::atomic);
  CHECK(ordered >= atomic + std::size_t{256} * 8 * 7168 * 4);
  CHECK(atomic >= std::size_t{256} * 8 * (7168 + 2048) * 2);
  CHECK(cu::moe_experts_workspace_bytes(1, 8, 256, 7168, 2048, cu::moe_combine::ordered) < ordered);
  CHECK(cu::mla_attention_workspace_bytes(4, 1, 128, 512, 8) >= std::size_t{4} * 8 * 128 * 514 * 4);
  for (std::int64_t batch : {1, 8, 64, 256}) {
    const auto splits = cu::mla_attention_splits(132, batch, 1, 128, 4096);
    CHECK(splits >= 1);
    CHECK(splits <= 32);
  }
  CHECK(cu::mla_attention_splits(132, 1, 4096, 128, 4096) == 1);  // prefill fills the GPU alone
}

// ---- GPU checks: skip without a device. ----

TEST_CASE("rmsnorm with and without the residual add matches the reference", "[cuda][gpu]") {
  if (!shoal::test::gpu_present()) return;
  cu::context ctx;
  std::mt19937 rng(2);
  for (const std::int64_t dim : {160, 7168, 1000}) {
    const std::int64_t rows = 37;
    const auto x = random_floats(rng, rows * dim), residual = random_floats(rng, rows * dim);
    const auto weight = random_floats(rng, dim);
    auto dx = upload(ctx, x), dres = upload(ctx, residual), dw = upload(ctx, weight);
    cu::device_buffer dy(rows * dim * 4);
    cu::rmsnorm(ctx, {dx.as<float>(), nullptr, dw.as<float>(), dy.as<float>(), nullptr, rows, dim});
    std::vector<float> want(rows * dim);
    k::reference::rmsnorm({x.data(), weight.data(), want.data(), rows, dim});
    // fp32 throughout; only the summation order differs.
    CHECK(relative_error(download<float>(ctx, dy, rows * dim), want) < 1e-5);

    cu::rmsnorm(ctx, {dx.as<float>(), dres.as<float>(), dw.as<float>(), dy.as<float>(), nullptr, rows, dim});
    std::vector<float> h(rows * dim);
    for (std::size_t i = 0; i < h.size(); ++i) h[i] = x[i] + residual[i];
    k::reference::rmsnorm({h.data(), weight.data(), want.data(), rows, dim});
    CHECK(relative_error(download<float>(ctx, dy, rows * dim), want) < 1e-5);
    CHECK(relative_error(download<float>(ctx, dres, rows * dim), h) < 1e-7);
  }
}

TEST_CASE("rope with YaRN frequencies matches the reference at long positions", "[cuda][gpu]") {
  if (!shoal::test::gpu_present()) return;
  cu::context ctx;
  std::mt19937 rng(3);
  const std::int64_t tokens = 29, heads = 5, head_dim = 192, rope_dim = 64;
  const auto freqs = k::rope_frequencies(rope_dim, 10000.0, {40.0, 4096, 32, 1});
  std::vector<std::int64_t> positions(tokens);
  for (auto& pos : positions) pos = std::uniform_int_distribution<std::int64_t>(0, 163839)(rng);
  auto x = random_floats(rng, tokens * heads * head_dim);
  auto dx = upload(ctx, x), dpos = upload(ctx, positions), dfreq = upload(ctx, freqs);
  cu::rope(ctx, {dx.as<float>(), tokens, heads, heads * head_dim, head_dim, 128, rope_dim,
                 dpos.as<std::int64_t>(), dfreq.as<float>()});
  k::reference::rope({x.data(), tokens, heads, heads * head_dim, head_dim, 128, rope_dim,
                      positions.data(), freqs.data()});
  // Same fp32 angle; sincosf and std::sin/cos differ by an ulp or two.
  CHECK(relative_error(download<float>(ctx, dx, x.size()), x) < 1e-5);
}

TEST_CASE("mla_cache_write normalizes, ropes and stores bf16 rows at their slots", "[cuda][gpu]") {
  if (!shoal::test::gpu_present()) return;
  cu::context ctx;
  std::mt19937 rng(4);
  const std::int64_t tokens = 13, rank = 512, rope_dim = 64, dim = rank + rope_dim, rows = 64;
  const auto kv = random_floats(rng, tokens * dim, 3.0f);
  const auto norm = random_floats(rng, rank);
  const auto freqs = k::rope_frequencies(rope_dim, 10000.0, {40.0, 4096, 32, 1});
  std::vector<std::int64_t> positions(tokens);
  std::vector<std::int32_t> slots(tokens);
  for (std::int64_t t = 0; t < tokens; ++t) {
    positions[t] = 1000 + 7 * t;
    slots[t] = static_cast<std::int32_t>((t * 37) % rows);
  }
  auto dkv = upload(ctx, kv), dnorm = upload(ctx, norm), dfreq = upload(ctx, freqs),
       dpos = upload(ctx, positions), dslot = upload(ctx, slots);
  cu::device_buffer cache(rows * dim * 2);
  cu::mla_cache_write(ctx, {dkv.as<float>(), 0, dnorm.as<float>(), 1e-6f, dpos.as<std::int64_t>(),
                            dfreq.as<float>(), dslot.as<std::int32_t>(), cache.as<std::uint16_t>(),
                            tokens, rank, rope_dim});
  const auto got_bits = download<std::uint16_t>(ctx, cache, rows * dim);
  std::vector<float> want = kv, got(tokens * dim);
  k::reference::rmsnorm({kv.data(), norm.data(), want.data(), tokens, rank, dim, dim, 1e-6f});
  k::reference::rope({want.data(), tokens, 1, dim, dim, rank, rope_dim, positions.data(), freqs.data()});
  for (std::int64_t t = 0; t < tokens; ++t)
    for (std::int64_t d = 0; d < dim; ++d) got[t * dim + d] = k::bf16_to_f32(got_bits[slots[t] * dim + d]);
  // The stored rows are bf16: half an ulp of 8 bits, 2^-9 relative.
  CHECK(relative_error(got, want) < 4e-3);
}

TEST_CASE("moe_route matches the reference choices and weights", "[cuda][gpu]") {
  if (!shoal::test::gpu_present()) return;
  cu::context ctx;
  std::mt19937 rng(5);
  struct shape { std::int64_t experts, groups, top_groups, top_k; };
  for (const shape s : {shape{256, 8, 4, 8}, shape{16, 4, 2, 4}, shape{64, 1, 1, 6}}) {
    const std::int64_t tokens = 203;
    const auto logits = random_floats(rng, tokens * s.experts, 2.0f);
    const auto bias = random_floats(rng, s.experts, 0.1f);
    auto dl = upload(ctx, logits), db = upload(ctx, bias);
    cu::device_buffer di(tokens * s.top_k * 4), dw(tokens * s.top_k * 4);
    cu::moe_route(ctx, {dl.as<float>(), db.as<float>(), tokens, s.experts, s.groups, s.top_groups,
                        s.top_k, true, 2.5f, di.as<std::int32_t>(), dw.as<float>()});
    std::vector<std::int32_t> indices(tokens * s.top_k);
    std::vector<float> weights(tokens * s.top_k);
    k::reference::moe_route({logits.data(), bias.data(), tokens, s.experts, s.groups, s.top_groups,
                             s.top_k, true, 2.5f, indices.data(), weights.data()});
    // Random logits leave gaps far above an ulp, so the choices must agree exactly.
    CHECK(download<std::int32_t>(ctx, di, indices.size()) == indices);
    CHECK(relative_error(download<float>(ctx, dw, weights.size()), weights) < 1e-5);
  }
}

namespace {

// Host copies and device copies of random experts in one storage type.
struct expert_set {
  std::int64_t hidden, inter;
  k::dtype type;
  std::vector<std::vector<std::uint8_t>> data;  // per expert: gate, up, down bytes
  std::vector<std::vector<float>> scales;       // per expert: gate, up, down scales
  std::vector<cu::device_buffer> device;
  std::vector<k::expert_weights> views;
  std::vector<cu::moe_expert_pointers> pointers;
};

k::matrix_view make_matrix(std::mt19937& rng, k::dtype type, std::int64_t rows, std::int64_t cols,
                           std::vector<std::uint8_t>& bytes, std::vector<float>& scales) {
  const auto values = random_floats(rng, rows * cols, 1.0f);
  k::matrix_view m{type, rows, cols};
  if (type == k::dtype::bf16) {
    bytes.resize(rows * cols * 2);
    for (std::int64_t i = 0; i < rows * cols; ++i) {
      const std::uint16_t b = k::f32_to_bf16(values[i] * 0.05f);
      std::memcpy(bytes.data() + 2 * i, &b, 2);
    }
  } else {
    bytes.resize(rows * cols);
    for (std::int64_t i = 0; i < rows * cols; ++i) bytes[i] = k::f32_to_fp8_e4m3(values[i] * 64.0f);
    scales.resize(((rows + 127) / 128) * ((cols + 127) / 128));
    for (float& s : scales) s = std::uniform_real_distribution<float>(0.2f, 1.5f)(rng) / 1024.0f;
    m.scale_inv = scales.data();
  }
  m.data = bytes.data();
  return m;
}

expert_set make_experts(cu::context& ctx, std::mt19937& rng, k::dtype type, std::int64_t experts,
                        std::int64_t hidden, std::int64_t inter, const std::vector<bool>& held) {
  expert_set set{hidden, inter, type, {}, {}, {}, {}, {}};
  set.data.resize(experts * 3);
  set.scales.resize(experts * 3);
  set.views.resize(experts);
  set.pointers.resize(experts);
  for (std::int64_t e = 0; e < experts; ++e) {
    if (!held[e]) continue;
    const std::int64_t shapes[3][2] = {{inter, hidden}, {inter, hidden}, {hidden, inter}};
    k::matrix_view views[3];
    const void* device[3];
    const float* device_scale[3] = {nullptr, nullptr, nullptr};
    for (int m = 0; m < 3; ++m) {
      views[m] = make_matrix(rng, type, shapes[m][0], shapes[m][1], set.data[e * 3 + m], set.scales[e * 3 + m]);
      set.device.push_back(upload(ctx, set.data[e * 3 + m]));
      device[m] = set.device.back().data();
      if (type == k::dtype::f8_e4m3) {
        set.device.push_back(upload(ctx, set.scales[e * 3 + m]));
        device_scale[m] = set.device.back().as<float>();
      }
    }
    set.views[e] = {views[0], views[1], views[2]};
    set.pointers[e] = {device[0], device[1], device[2], device_scale[0], device_scale[1], device_scale[2]};
  }
  return set;
}

}  // namespace

TEST_CASE("moe_experts in bf16 and FP8 matches the reference", "[cuda][gpu]") {
  if (!shoal::test::gpu_present()) return;
  cu::context ctx;
  std::mt19937 rng(6);
  // Neither width is a multiple of the 64-wide tiles or the 128-wide FP8 blocks.
  const std::int64_t experts = 24, hidden = 272, inter = 208, top_k = 4;
  std::vector<bool> held(experts, true);
  held[3] = held[17] = false;  // held by another process: skipped
  for (const k::dtype type : {k::dtype::bf16, k::dtype::f8_e4m3}) {
    auto set = make_experts(ctx, rng, type, experts, hidden, inter, held);
    auto table = upload(ctx, set.pointers);
    // 5 tokens take the 16-row tiles, 300 the 64-row tiles; 0 must be a no-op.
    for (const std::int64_t tokens : {0, 1, 5, 300}) {
      for (const auto combine : {cu::moe_combine::ordered, cu::moe_combine::atomic}) {
        const auto x = random_floats(rng, std::max<std::int64_t>(tokens, 1) * hidden);
        const auto y0 = random_floats(rng, std::max<std::int64_t>(tokens, 1) * hidden);
        // Choices avoid experts 20..23 entirely, so some experts see zero tokens.
        std::vector<std::int32_t> indices(std::max<std::int64_t>(tokens, 1) * top_k);
        std::vector<float> weights(indices.size());
        for (std::int64_t t = 0; t < tokens; ++t) {
          std::vector<std::int32_t> pool(20);
          std::iota(pool.begin(), pool.end(), 0);
          std::shuffle(pool.begin(), pool.end(), rng);
          for (std::int64_t c = 0; c < top_k; ++c) {
            indices[t * top_k + c] = pool[c];
            weights[t * top_k + c] = std::uniform_real_distribution<float>(0.1f, 1.0f)(rng);
          }
        }
        auto dx = upload(ctx, x), dy = upload(ctx, y0), di = upload(ctx, indices), dw = upload(ctx, weights);
        const auto ws_bytes = cu::moe_experts_workspace_bytes(tokens, top_k, experts, hidden, inter, combine);
        cu::device_buffer ws(std::max<std::size_t>(ws_bytes, 1));
        cu::moe_experts_params p;
        p.x = dx.as<float>();
        p.tokens = tokens;
        p.hidden = hidden;
        p.inter = inter;
        p.experts = experts;
        p.top_k = top_k;
        p.indices = di.as<std::int32_t>();
        p.weights = dw.as<float>();
        p.expert_table = static_cast<const cu::moe_expert_pointers*>(table.data());
        p.weight_type = type;
        p.y = dy.as<float>();
        p.combine = combine;
        p.workspace = ws.data();
        p.workspace_bytes = ws.bytes();
        cu::moe_experts(ctx, p);
        std::vector<float> want = y0;
        k::reference::moe_experts({x.data(), tokens, hidden, top_k, indices.data(), weights.data(),
                                   set.views, want.data()});
        const auto got = download<float>(ctx, dy, want.size());
        INFO("dtype " << k::dtype_name(type) << " tokens " << tokens << " ordered "
                      << (combine == cu::moe_combine::ordered));
        // Activations and SwiGLU outputs are rounded to bf16 (2^-9 each) before fp32 GEMMs.
        // Compared is what the experts added to y0, whole and row by row: y0 itself would
        // dilute the error.
        const auto added = shoal::test::minus(got, y0), want_added = shoal::test::minus(want, y0);
        CHECK(relative_error(added, want_added) < 1e-2);
        CHECK(shoal::test::max_row_relative_error(added, want_added, static_cast<std::size_t>(hidden)) < 1e-2);
      }
    }
  }
}

TEST_CASE("the ordered combine is bit-reproducible", "[cuda][gpu]") {
  if (!shoal::test::gpu_present()) return;
  cu::context ctx;
  std::mt19937 rng(7);
  const std::int64_t experts = 8, hidden = 128, inter = 64, top_k = 2, tokens = 100;
  auto set = make_experts(ctx, rng, k::dtype::f8_e4m3, experts, hidden, inter, std::vector<bool>(experts, true));
  auto table = upload(ctx, set.pointers);
  const auto x = random_floats(rng, tokens * hidden);
  std::vector<std::int32_t> indices(tokens * top_k);
  std::vector<float> weights(indices.size(), 0.5f);
  for (std::int64_t t = 0; t < tokens; ++t) {
    indices[t * top_k] = static_cast<std::int32_t>(t % experts);
    indices[t * top_k + 1] = static_cast<std::int32_t>((t + 3) % experts);
  }
  auto dx = upload(ctx, x), di = upload(ctx, indices), dw = upload(ctx, weights);
  cu::device_buffer ws(cu::moe_experts_workspace_bytes(tokens, top_k, experts, hidden, inter, cu::moe_combine::ordered));
  std::vector<float> first;
  for (int run = 0; run < 3; ++run) {
    cu::device_buffer dy(tokens * hidden * 4);
    cu::fill_zero(ctx, dy.data(), dy.bytes());
    cu::moe_experts_params p;
    p.x = dx.as<float>();
    p.tokens = tokens;
    p.hidden = hidden;
    p.inter = inter;
    p.experts = experts;
    p.top_k = top_k;
    p.indices = di.as<std::int32_t>();
    p.weights = dw.as<float>();
    p.expert_table = static_cast<const cu::moe_expert_pointers*>(table.data());
    p.weight_type = k::dtype::f8_e4m3;
    p.y = dy.as<float>();
    p.workspace = ws.data();
    p.workspace_bytes = ws.bytes();
    cu::moe_experts(ctx, p);
    const auto got = download<float>(ctx, dy, tokens * hidden);
    if (run == 0) first = got;
    else CHECK(std::memcmp(first.data(), got.data(), got.size() * 4) == 0);
  }
}

namespace {

// Runs GPU MLA (absorbed, paged) and the reference (naive form) on the same data; returns the
// relative error of the per-head value outputs: over all of them, or of one (query, head) row if
// that is worse.
double mla_case(cu::context& ctx, std::mt19937& rng, std::int64_t heads,
                const std::vector<std::int32_t>& seq_lens, std::int64_t queries, std::int64_t splits) {
  const std::int64_t nope = 32, rope = 16, v_dim = 24, rank = 64, dim = rank + rope, page = 16;
  const std::int64_t batch = static_cast<std::int64_t>(seq_lens.size());
  const float scale = 0.3f;
  const auto kv_b_values = random_floats(rng, heads * (nope + v_dim) * rank, 0.2f);
  k::matrix_view kv_b{k::dtype::f32, heads * (nope + v_dim), rank, kv_b_values.data()};
  std::int64_t max_len = 0, total_pages = 0;
  for (auto len : seq_lens) {
    max_len = std::max<std::int64_t>(max_len, len);
    total_pages += (len + page - 1) / page;
  }
  const std::int64_t max_pages = (max_len + page - 1) / page;
  // Pages handed out in a shuffled order, as a paged allocator would.
  std::vector<std::int32_t> page_order(total_pages);
  std::iota(page_order.begin(), page_order.end(), 0);
  std::shuffle(page_order.begin(), page_order.end(), rng);
  std::vector<std::int32_t> table(batch * max_pages, 0);
  std::vector<std::uint16_t> cache(total_pages * page * dim, 0);
  std::vector<float> q_abs(batch * queries * heads * dim), want_all(batch * queries * heads * v_dim);
  std::int64_t next_page = 0;
  for (std::int64_t b = 0; b < batch; ++b) {
    const std::int64_t len = seq_lens[b];
    // The reference reads fp32 latents; give it the bf16 values the cache holds.
    const auto latent = shoal::test::bf16_round(random_floats(rng, len * dim));
    for (std::int64_t pg = 0; pg < (len + page - 1) / page; ++pg) table[b * max_pages + pg] = page_order[next_page++];
    for (std::int64_t t = 0; t < len; ++t)
      for (std::int64_t d = 0; d < dim; ++d)
        cache[(table[b * max_pages + t / page] * page + t % page) * dim + d] = k::f32_to_bf16(latent[t * dim + d]);
    const auto q = random_floats(rng, queries * heads * (nope + rope));
    std::vector<float> want(queries * heads * v_dim);
    k::mla_params ref;
    ref.heads = heads;
    ref.qk_nope_dim = nope;
    ref.qk_rope_dim = rope;
    ref.v_head_dim = v_dim;
    ref.kv_lora_rank = rank;
    ref.softmax_scale = scale;
    ref.q = q.data();
    ref.queries = queries;
    ref.first_position = len - queries;
    ref.latent = latent.data();
    ref.kv_b = kv_b;
    ref.out = want.data();
    k::reference::mla_attention(ref);
    std::copy(want.begin(), want.end(), want_all.begin() + b * queries * heads * v_dim);
    // Absorb W_uk into the queries: q_latent[c] = sum_d q_nope[d] kv_b[h * (nope + v) + d][c].
    for (std::int64_t i = 0; i < queries; ++i)
      for (std::int64_t h = 0; h < heads; ++h) {
        const float* qh = q.data() + (i * heads + h) * (nope + rope);
        float* out = q_abs.data() + ((b * queries + i) * heads + h) * dim;
        for (std::int64_t c = 0; c < rank; ++c) {
          float sum = 0.0f;
          for (std::int64_t d = 0; d < nope; ++d) sum += qh[d] * kv_b.at(h * (nope + v_dim) + d, c);
          out[c] = sum;
        }
        for (std::int64_t d = 0; d < rope; ++d) out[rank + d] = qh[nope + d];
      }
  }
  auto dq = upload(ctx, q_abs), dcache = upload(ctx, cache), dtable = upload(ctx, table),
       dlens = upload(ctx, seq_lens);
  cu::device_buffer dout(batch * queries * heads * rank * 4);
  cu::device_buffer ws(cu::mla_attention_workspace_bytes(batch, queries, heads, rank, splits));
  cu::mla_attention_params p;
  p.batch = batch;
  p.queries = queries;
  p.heads = heads;
  p.kv_lora_rank = rank;
  p.rope_dim = rope;
  p.softmax_scale = scale;
  p.q = dq.as<float>();
  p.cache = dcache.as<std::uint16_t>();
  p.page_size = page;
  p.block_table = dtable.as<std::int32_t>();
  p.max_pages = max_pages;
  p.seq_lens = dlens.as<std::int32_t>();
  p.max_seq_len = max_len;
  p.out = dout.as<float>();
  p.splits = splits;
  p.workspace = ws.data();
  p.workspace_bytes = ws.bytes();
  cu::mla_attention(ctx, p);
  const auto o_latent = download<float>(ctx, dout, batch * queries * heads * rank);
  // Apply W_uv: out[v] = sum_c o_latent[c] kv_b[h * (nope + v) + nope + v][c].
  std::vector<float> got(want_all.size());
  for (std::int64_t r = 0; r < batch * queries; ++r)
    for (std::int64_t h = 0; h < heads; ++h)
      for (std::int64_t v = 0; v < v_dim; ++v) {
        float sum = 0.0f;
        for (std::int64_t c = 0; c < rank; ++c)
          sum += o_latent[(r * heads + h) * rank + c] * kv_b.at(h * (nope + v_dim) + nope + v, c);
        got[(r * heads + h) * v_dim + v] = sum;
      }
  return std::max(relative_error(got, want_all),
                  shoal::test::max_row_relative_error(got, want_all, static_cast<std::size_t>(v_dim)));
}

}  // namespace

TEST_CASE("MLA decode on a paged cache matches the reference", "[cuda][gpu]") {
  if (!shoal::test::gpu_present()) return;
  cu::context ctx;
  std::mt19937 rng(8);
  // Queries and probabilities are rounded to bf16 for the tensor cores: about 2^-9 each.
  CHECK(mla_case(ctx, rng, 20, {1, 77, 300}, 1, 1) < 2e-2);
  CHECK(mla_case(ctx, rng, 20, {1, 77, 300}, 1, 3) < 2e-2);
  CHECK(mla_case(ctx, rng, 80, {33, 129}, 1, 4) < 2e-2);  // two row blocks per sequence
}

TEST_CASE("MLA causal prefill matches the reference", "[cuda][gpu]") {
  if (!shoal::test::gpu_present()) return;
  cu::context ctx;
  std::mt19937 rng(9);
  CHECK(mla_case(ctx, rng, 8, {57}, 37, 1) < 2e-2);       // a chunk after 20 cached tokens
  CHECK(mla_case(ctx, rng, 16, {45, 45}, 45, 2) < 2e-2);  // whole prompts, split context
}

TEST_CASE("sampling on the GPU picks the reference's tokens", "[cuda][gpu]") {
  if (!shoal::test::gpu_present()) return;
  cu::context ctx;
  std::mt19937 rng(10);
  const std::int64_t batch = 96, vocab = 5003;
  auto logits = random_floats(rng, batch * vocab, 3.0f);
  for (std::int64_t i = 0; i < 40; ++i) logits[i * 3] = logits[0];  // ties in row 0
  std::vector<float> temperature(batch), top_p(batch), uniform(batch);
  std::vector<std::int32_t> top_k(batch), want(batch);
  for (std::int64_t b = 0; b < batch; ++b) {
    temperature[b] = b % 8 == 0 ? 0.0f : 0.3f + 0.02f * static_cast<float>(b);
    top_k[b] = std::array<std::int32_t, 4>{0, 1, 50, 2000}[b % 4];
    top_p[b] = std::array<float, 3>{1.0f, 0.9f, 0.5f}[b % 3];
    uniform[b] = std::uniform_real_distribution<float>(0.0f, 1.0f)(rng);
  }
  auto dl = upload(ctx, logits), dt = upload(ctx, temperature), dk = upload(ctx, top_k),
       dp = upload(ctx, top_p), du = upload(ctx, uniform);
  cu::device_buffer dtok(batch * 4);
  cu::sample(ctx, {dl.as<float>(), batch, vocab, dt.as<float>(), dk.as<std::int32_t>(),
                   dp.as<float>(), du.as<float>(), dtok.as<std::int32_t>()});
  cu::reference::sample({logits.data(), batch, vocab, temperature.data(), top_k.data(),
                         top_p.data(), uniform.data(), want.data()});
  const auto got = download<std::int32_t>(ctx, dtok, batch);
  // A draw within float rounding of a cumulative boundary may fall either way.
  int mismatches = 0;
  for (std::int64_t b = 0; b < batch; ++b) {
    if (temperature[b] <= 0.0f) CHECK(got[b] == want[b]);  // greedy: exact
    mismatches += got[b] != want[b];
  }
  CHECK(mismatches <= 2);
}

TEST_CASE("cuBLASLt GEMM matches a double-precision product", "[cuda][gpu]") {
  if (!shoal::test::gpu_present()) return;
  cu::context ctx;
  std::mt19937 rng(11);
  const std::int64_t m = 37, n = 200, kdim = 272;
  const auto x = shoal::test::bf16_round(random_floats(rng, m * kdim));
  const auto w = shoal::test::bf16_round(random_floats(rng, n * kdim));
  auto dx = upload(ctx, shoal::test::to_bf16(x)), dw = upload(ctx, shoal::test::to_bf16(w));
  cu::device_buffer dy(m * n * 4);
  cu::gemm_params p;
  p.x = dx.as<std::uint16_t>();
  p.w = dw.as<std::uint16_t>();
  p.y = dy.data();
  p.m = m;
  p.n = n;
  p.k = kdim;
  cu::gemm(ctx, p);
  std::vector<float> want(m * n);
  for (std::int64_t i = 0; i < m; ++i)
    for (std::int64_t j = 0; j < n; ++j) {
      double sum = 0.0;
      for (std::int64_t c = 0; c < kdim; ++c) sum += static_cast<double>(x[i * kdim + c]) * w[j * kdim + c];
      want[i * n + j] = static_cast<float>(sum);
    }
  // Exact bf16 inputs, fp32 accumulation.
  CHECK(relative_error(download<float>(ctx, dy, m * n), want) < 1e-5);
}
