// The tiny golden checkpoints' MoE and attention layers on the GPU against the CPU reference
// kernels on the same weights (bf16 and FP8 with partial 128x128 blocks: the tiny widths are not
// multiples of 128). Only the weights come from the checkpoints: the outputs are compared with
// the CPU kernels, not with DeepSeek's golden.json (runtime_golden_test compares those).

#include "cuda_test_util.hpp"

#include "shoal/kernels/cuda/mla_attention.hpp"
#include "shoal/kernels/cuda/moe.hpp"
#include "shoal/kernels/linear.hpp"
#include "shoal/kernels/mla_attention.hpp"
#include "shoal/kernels/moe.hpp"
#include "shoal/runtime/weights.hpp"

#include <algorithm>
#include <filesystem>
#include <numeric>

namespace cu = shoal::kernels::cuda;
namespace k = shoal::kernels;
namespace fs = std::filesystem;
using shoal::test::download;
using shoal::test::random_floats;
using shoal::test::relative_error;
using shoal::test::upload;

namespace {

const char* const kModels[] = {"tiny-a-bf16", "tiny-a-fp8", "tiny-b-bf16"};

std::unique_ptr<shoal::runtime::model_weights> load_model(const char* name) {
  const fs::path dir = fs::path(SHOAL_TEST_DATA_DIR) / "golden" / name / "ckpt";
  return shoal::runtime::model_weights::load(dir, {}, shoal::runtime::weight_residency::copy);
}

// Uploads a matrix's elements (and FP8 scales) into `keep`; returns the device pointers.
std::pair<const void*, const float*> upload_matrix(cu::context& ctx, const k::matrix_view& m,
                                                   std::vector<cu::device_buffer>& keep) {
  const std::size_t bytes = static_cast<std::size_t>(m.rows * m.cols) * k::dtype_size(m.type);
  keep.emplace_back(bytes);
  cu::copy_to_device(ctx, keep.back().data(), m.data, bytes);
  const void* data = keep.back().data();
  const float* scale = nullptr;
  if (m.type == k::dtype::f8_e4m3) {
    const std::size_t count = static_cast<std::size_t>(((m.rows + 127) / 128) * m.scale_cols());
    keep.emplace_back(count * 4);
    cu::copy_to_device(ctx, keep.back().data(), m.scale_inv, count * 4);
    scale = keep.back().as<float>();
  }
  return {data, scale};
}

}  // namespace

TEST_CASE("golden checkpoints' routed experts on the GPU match the CPU reference kernels", "[cuda][gpu][checkpoint]") {
  if (!shoal::test::gpu_present()) return;
  cu::context ctx;
  std::mt19937 rng(21);
  for (const char* name : kModels) {
    const auto weights = load_model(name);
    const auto& c = weights->config();
    int layers_checked = 0;
    for (std::int64_t layer = 0; layer < c.num_hidden_layers; ++layer) {
      const auto& lw = weights->layers()[layer];
      if (!lw.moe) continue;
      const k::dtype type = lw.experts[0].gate.type;
      if (type != k::dtype::bf16 && type != k::dtype::f8_e4m3) continue;
      std::vector<cu::device_buffer> keep;
      std::vector<cu::moe_expert_pointers> table(lw.experts.size());
      for (std::size_t e = 0; e < lw.experts.size(); ++e) {
        const auto gate = upload_matrix(ctx, lw.experts[e].gate, keep);
        const auto up = upload_matrix(ctx, lw.experts[e].up, keep);
        const auto down = upload_matrix(ctx, lw.experts[e].down, keep);
        table[e] = {gate.first, up.first, down.first, gate.second, up.second, down.second};
      }
      auto dtable = upload(ctx, table);
      ++layers_checked;
      for (const std::int64_t tokens : {1, 7, 129}) {
        const std::int64_t hidden = c.hidden_size, top_k = c.num_experts_per_tok;
        const std::int64_t experts = c.n_routed_experts;
        const auto x = random_floats(rng, tokens * hidden);
        // Router logits from the checkpoint's gate, then routing on both sides.
        std::vector<float> logits(tokens * experts);
        k::reference::linear({x.data(), lw.router, logits.data(), tokens});
        std::vector<std::int32_t> indices(tokens * top_k);
        std::vector<float> route_weights(tokens * top_k);
        const k::moe_route_params route{logits.data(), lw.router_bias.data(), tokens, experts,
                                        c.n_group, c.topk_group, top_k, c.norm_topk_prob,
                                        static_cast<float>(c.routed_scaling_factor),
                                        indices.data(), route_weights.data()};
        k::reference::moe_route(route);
        auto dlogits = upload(ctx, logits), dbias = upload(ctx, lw.router_bias);
        cu::device_buffer di(indices.size() * 4), dw(indices.size() * 4);
        cu::moe_route(ctx, {dlogits.as<float>(), dbias.as<float>(), tokens, experts, c.n_group,
                            c.topk_group, top_k, c.norm_topk_prob,
                            static_cast<float>(c.routed_scaling_factor), di.as<std::int32_t>(),
                            dw.as<float>()});
        INFO(name << " layer " << layer << " tokens " << tokens);
        CHECK(download<std::int32_t>(ctx, di, indices.size()) == indices);
        CHECK(relative_error(download<float>(ctx, dw, indices.size()), route_weights) < 1e-5);

        std::vector<float> want(tokens * hidden, 0.0f);
        k::reference::moe_experts({x.data(), tokens, hidden, top_k, indices.data(),
                                   route_weights.data(), lw.experts, want.data()});
        auto dx = upload(ctx, x);
        cu::device_buffer dy(want.size() * 4);
        cu::fill_zero(ctx, dy.data(), dy.bytes());
        cu::device_buffer ws(cu::moe_experts_workspace_bytes(tokens, top_k, experts, hidden,
                                                             c.moe_intermediate_size,
                                                             cu::moe_combine::ordered));
        cu::moe_experts_params p;
        p.x = dx.as<float>();
        p.tokens = tokens;
        p.hidden = hidden;
        p.inter = c.moe_intermediate_size;
        p.experts = experts;
        p.top_k = top_k;
        p.indices = di.as<std::int32_t>();
        p.weights = dw.as<float>();
        p.expert_table = static_cast<const cu::moe_expert_pointers*>(dtable.data());
        p.weight_type = type;
        p.y = dy.as<float>();
        p.workspace = ws.data();
        p.workspace_bytes = ws.bytes();
        cu::moe_experts(ctx, p);
        // bf16 activations and SwiGLU outputs: see kernels_cuda_test. y starts at zero, so
        // this is the experts' own output, checked whole and row by row.
        const auto got = download<float>(ctx, dy, want.size());
        CHECK(relative_error(got, want) < 1e-2);
        CHECK(shoal::test::max_row_relative_error(got, want, static_cast<std::size_t>(hidden)) < 1e-2);
      }
    }
    INFO(name);
    CHECK(layers_checked > 0);  // every model has MoE layers in bf16 or FP8
  }
}

TEST_CASE("MLA with a golden checkpoint's kv_b on the GPU matches the CPU reference kernel",
          "[cuda][gpu][checkpoint]") {
  if (!shoal::test::gpu_present()) return;
  cu::context ctx;
  std::mt19937 rng(22);
  for (const char* name : kModels) {
    const auto weights = load_model(name);
    const auto& c = weights->config();
    const auto& kv_b = weights->layers()[0].kv_b;
    const std::int64_t heads = c.num_attention_heads, nope = c.qk_nope_head_dim,
                       rope = c.qk_rope_head_dim, v_dim = c.v_head_dim, rank = c.kv_lora_rank,
                       dim = rank + rope, page = 8;
    for (const std::int64_t queries : {1, 11}) {
      const std::int64_t len = 53;
      const auto latent = shoal::test::bf16_round(random_floats(rng, len * dim));
      const auto q = random_floats(rng, queries * heads * (nope + rope));
      std::vector<float> want(queries * heads * v_dim);
      k::mla_params ref;
      ref.heads = heads;
      ref.qk_nope_dim = nope;
      ref.qk_rope_dim = rope;
      ref.v_head_dim = v_dim;
      ref.kv_lora_rank = rank;
      ref.softmax_scale = static_cast<float>(c.softmax_scale());
      ref.q = q.data();
      ref.queries = queries;
      ref.first_position = len - queries;
      ref.latent = latent.data();
      ref.kv_b = kv_b;
      ref.out = want.data();
      k::reference::mla_attention(ref);

      std::vector<float> q_abs(queries * heads * dim);
      for (std::int64_t r = 0; r < queries * heads; ++r) {
        const std::int64_t h = r % heads;
        for (std::int64_t col = 0; col < rank; ++col) {
          float sum = 0.0f;
          for (std::int64_t d = 0; d < nope; ++d)
            sum += q[r * (nope + rope) + d] * kv_b.at(h * (nope + v_dim) + d, col);
          q_abs[r * dim + col] = sum;
        }
        for (std::int64_t d = 0; d < rope; ++d) q_abs[r * dim + rank + d] = q[r * (nope + rope) + nope + d];
      }
      const std::int64_t pages = (len + page - 1) / page;
      std::vector<std::int32_t> table(pages);
      std::iota(table.rbegin(), table.rend(), 0);  // pages in reverse order
      std::vector<std::uint16_t> cache(pages * page * dim, 0);
      for (std::int64_t t = 0; t < len; ++t)
        for (std::int64_t d = 0; d < dim; ++d)
          cache[(table[t / page] * page + t % page) * dim + d] = k::f32_to_bf16(latent[t * dim + d]);
      const std::vector<std::int32_t> lens = {static_cast<std::int32_t>(len)};
      auto dq = upload(ctx, q_abs), dcache = upload(ctx, cache), dtable = upload(ctx, table),
           dlens = upload(ctx, lens);
      cu::device_buffer dout(queries * heads * rank * 4);
      cu::device_buffer ws(cu::mla_attention_workspace_bytes(1, queries, heads, rank, 2));
      cu::mla_attention_params p;
      p.batch = 1;
      p.queries = queries;
      p.heads = heads;
      p.kv_lora_rank = rank;
      p.rope_dim = rope;
      p.softmax_scale = ref.softmax_scale;
      p.q = dq.as<float>();
      p.cache = dcache.as<std::uint16_t>();
      p.page_size = page;
      p.block_table = dtable.as<std::int32_t>();
      p.max_pages = pages;
      p.seq_lens = dlens.as<std::int32_t>();
      p.max_seq_len = len;
      p.out = dout.as<float>();
      p.splits = 2;
      p.workspace = ws.data();
      p.workspace_bytes = ws.bytes();
      cu::mla_attention(ctx, p);
      const auto o = download<float>(ctx, dout, queries * heads * rank);
      std::vector<float> got(want.size());
      for (std::int64_t r = 0; r < queries * heads; ++r) {
        const std::int64_t h = r % heads;
        for (std::int64_t v = 0; v < v_dim; ++v) {
          float sum = 0.0f;
          for (std::int64_t col = 0; col < rank; ++col)
            sum += o[r * rank + col] * kv_b.at(h * (nope + v_dim) + nope + v, col);
          got[r * v_dim + v] = sum;
        }
      }
      INFO(name << " queries " << queries);
      CHECK(relative_error(got, want) < 2e-2);
      CHECK(shoal::test::max_row_relative_error(got, want, static_cast<std::size_t>(v_dim)) < 2e-2);
    }
  }
}
