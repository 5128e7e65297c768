#include "shoal/kernels/mla_attention.hpp"

#include "shoal/kernels/thread_pool.hpp"

#include "blas.hpp"
#include "simd.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace shoal::kernels {
namespace {

// Queries processed together per head in the absorbed path; bounds the score buffer.
constexpr std::int64_t kQueryChunk = 256;

void softmax_causal_row(float* scores, std::int64_t visible) {
  float max_score = -std::numeric_limits<float>::infinity();
  for (std::int64_t t = 0; t < visible; ++t) max_score = std::max(max_score, scores[t]);
  float sum = 0.0f;
  for (std::int64_t t = 0; t < visible; ++t) {
    scores[t] = std::exp(scores[t] - max_score);
    sum += scores[t];
  }
  const float inv = 1.0f / sum;
  for (std::int64_t t = 0; t < visible; ++t) scores[t] *= inv;
}

// One head, all queries: absorb W_k into the queries, attend over latents, decompress with W_v.
void absorbed_head(const mla_params& p, std::int64_t head, std::vector<float>& w_head,
                   std::vector<float>& q_cat, std::vector<float>& scores,
                   std::vector<float>& o_latent) {
  const std::int64_t rank = p.kv_lora_rank;
  const std::int64_t rope = p.qk_rope_dim;
  const std::int64_t latent_stride = rank + rope;
  const std::int64_t qk_dim = p.qk_nope_dim + rope;
  const std::int64_t head_rows = p.qk_nope_dim + p.v_head_dim;

  // Exact fp32 copy of this head's [k rows; v rows] x rank slice of kv_b.
  w_head.resize(static_cast<std::size_t>(head_rows * rank));
  for (std::int64_t r = 0; r < head_rows; ++r)
    dequantize_row(p.kv_b, head * head_rows + r, 0, rank, w_head.data() + r * rank);
  const float* w_k = w_head.data();
  const float* w_v = w_head.data() + p.qk_nope_dim * rank;

  for (std::int64_t q0 = 0; q0 < p.queries; q0 += kQueryChunk) {
    const std::int64_t nq = std::min(kQueryChunk, p.queries - q0);
    const std::int64_t visible_max = p.first_position + q0 + nq;
    q_cat.resize(static_cast<std::size_t>(nq * latent_stride));
    scores.resize(static_cast<std::size_t>(nq * visible_max));
    o_latent.resize(static_cast<std::size_t>(nq * rank));
    const float* q_head = p.q + (q0 * p.heads + head) * qk_dim;
    const std::int64_t q_stride = p.heads * qk_dim;
    // q_cat[:, :rank] = q_nope W_k ; q_cat[:, rank:] = q_pe.
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<int>(nq),
                static_cast<int>(rank), static_cast<int>(p.qk_nope_dim), 1.0f, q_head,
                static_cast<int>(q_stride), w_k, static_cast<int>(rank), 0.0f, q_cat.data(),
                static_cast<int>(latent_stride));
    for (std::int64_t i = 0; i < nq; ++i)
      std::copy_n(q_head + i * q_stride + p.qk_nope_dim, rope,
                  q_cat.data() + i * latent_stride + rank);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(nq),
                static_cast<int>(visible_max), static_cast<int>(latent_stride), p.softmax_scale,
                q_cat.data(), static_cast<int>(latent_stride), p.latent,
                static_cast<int>(latent_stride), 0.0f, scores.data(),
                static_cast<int>(visible_max));
    for (std::int64_t i = 0; i < nq; ++i) {
      float* row = scores.data() + i * visible_max;
      const std::int64_t visible = p.first_position + q0 + i + 1;
      softmax_causal_row(row, visible);
      std::fill(row + visible, row + visible_max, 0.0f);
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<int>(nq),
                static_cast<int>(rank), static_cast<int>(visible_max), 1.0f, scores.data(),
                static_cast<int>(visible_max), p.latent, static_cast<int>(latent_stride), 0.0f,
                o_latent.data(), static_cast<int>(rank));
    float* out = p.out + (q0 * p.heads + head) * p.v_head_dim;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(nq),
                static_cast<int>(p.v_head_dim), static_cast<int>(rank), 1.0f, o_latent.data(),
                static_cast<int>(rank), w_v, static_cast<int>(rank), 0.0f, out,
                static_cast<int>(p.heads * p.v_head_dim));
  }
}

// Decode: a few queries against a long cache. BLAS would pack the whole cache for a
// one-row product, reading it twice; direct dot products and axpys read it once.
void absorbed_head_decode(const mla_params& p, std::int64_t head, std::vector<float>& row,
                          std::vector<float>& q_cat, std::vector<float>& scores, std::vector<float>& o_latent) {
  const std::int64_t rank = p.kv_lora_rank;
  const std::int64_t rope = p.qk_rope_dim;
  const std::int64_t latent_stride = rank + rope;
  const std::int64_t qk_dim = p.qk_nope_dim + rope;
  const std::int64_t head_rows = p.qk_nope_dim + p.v_head_dim;
  const std::int64_t nq = p.queries;
  row.resize(static_cast<std::size_t>(rank));
  q_cat.assign(static_cast<std::size_t>(nq * latent_stride), 0.0f);
  o_latent.assign(static_cast<std::size_t>(nq * rank), 0.0f);
  // q_cat[i][:rank] = sum_d q_nope[i][d] * W_k[d]: each key row is dequantized once.
  for (std::int64_t d = 0; d < p.qk_nope_dim; ++d) {
    dequantize_row(p.kv_b, head * head_rows + d, 0, rank, row.data());
    for (std::int64_t i = 0; i < nq; ++i)
      detail::axpy(q_cat.data() + i * latent_stride, p.q[(i * p.heads + head) * qk_dim + d], row.data(), rank);
  }
  for (std::int64_t i = 0; i < nq; ++i) {
    const float* q_head = p.q + (i * p.heads + head) * qk_dim;
    std::copy_n(q_head + p.qk_nope_dim, rope, q_cat.data() + i * latent_stride + rank);
    const std::int64_t visible = p.first_position + i + 1;
    scores.resize(static_cast<std::size_t>(visible));
    for (std::int64_t t = 0; t < visible; ++t)
      scores[t] = detail::dot(q_cat.data() + i * latent_stride, mla_latent_row(p, t), latent_stride) *
                  p.softmax_scale;
    softmax_causal_row(scores.data(), visible);
    float* o = o_latent.data() + i * rank;
    for (std::int64_t t = 0; t < visible; ++t) detail::axpy(o, scores[t], mla_latent_row(p, t), rank);
  }
  // out[i][j] = W_v[j] . o_latent[i]
  for (std::int64_t j = 0; j < p.v_head_dim; ++j) {
    dequantize_row(p.kv_b, head * head_rows + p.qk_nope_dim + j, 0, rank, row.data());
    for (std::int64_t i = 0; i < nq; ++i)
      p.out[(i * p.heads + head) * p.v_head_dim + j] = detail::dot(row.data(), o_latent.data() + i * rank, rank);
  }
}

// Up to this many queries per sequence take the direct path.
constexpr std::int64_t kDecodeMaxQueries = 4;

}  // namespace

void mla_attention(thread_pool& pool, const mla_params& paged) {
  detail::ensure_blas_single_threaded();
  // The GEMM path wants the visible cache rows contiguous; a paged cache is gathered once per
  // call (decode reads rows in place).
  mla_params params = paged;
  thread_local std::vector<float> gathered;
  if (paged.block_table && paged.queries > kDecodeMaxQueries) {
    const std::int64_t stride = paged.kv_lora_rank + paged.qk_rope_dim;
    const std::int64_t rows = paged.first_position + paged.queries;
    gathered.resize(static_cast<std::size_t>(rows * stride));
    for (std::int64_t t = 0; t < rows; ++t)
      std::copy_n(mla_latent_row(paged, t), stride, gathered.data() + t * stride);
    params.latent = gathered.data();
    params.block_table = nullptr;
  }
  const auto heads = [&](std::int64_t begin, std::int64_t end) {
    thread_local std::vector<float> w_head, q_cat, scores, o_latent;
    for (std::int64_t h = begin; h < end; ++h) {
      if (params.queries <= kDecodeMaxQueries)
        absorbed_head_decode(params, h, w_head, q_cat, scores, o_latent);
      else
        absorbed_head(params, h, w_head, q_cat, scores, o_latent);
    }
  };
  // Small problems (tiny models, short contexts) are cheaper on one thread.
  const std::int64_t work = params.heads * (params.queries * (params.first_position + params.queries) +
                                            (params.qk_nope_dim + params.v_head_dim) * (params.queries + 1)) *
                            (params.kv_lora_rank + params.qk_rope_dim);
  if (work < (1 << 16))
    heads(0, params.heads);
  else
    pool.parallel_for(params.heads, heads);
}

namespace reference {
void mla_attention(const mla_params& p) {
  const std::int64_t rank = p.kv_lora_rank;
  const std::int64_t rope = p.qk_rope_dim;
  const std::int64_t qk_dim = p.qk_nope_dim + rope;
  const std::int64_t head_rows = p.qk_nope_dim + p.v_head_dim;
  const std::int64_t context = p.first_position + p.queries;
  // Decompress per-head keys and values for every cached position.
  std::vector<float> keys(static_cast<std::size_t>(context * p.heads * p.qk_nope_dim));
  std::vector<float> values(static_cast<std::size_t>(context * p.heads * p.v_head_dim));
  for (std::int64_t t = 0; t < context; ++t) {
    const float* latent = mla_latent_row(p, t);
    for (std::int64_t h = 0; h < p.heads; ++h)
      for (std::int64_t r = 0; r < head_rows; ++r) {
        float sum = 0.0f;
        for (std::int64_t c = 0; c < rank; ++c) sum += p.kv_b.at(h * head_rows + r, c) * latent[c];
        if (r < p.qk_nope_dim)
          keys[(t * p.heads + h) * p.qk_nope_dim + r] = sum;
        else
          values[(t * p.heads + h) * p.v_head_dim + (r - p.qk_nope_dim)] = sum;
      }
  }
  std::vector<float> scores(static_cast<std::size_t>(context));
  for (std::int64_t i = 0; i < p.queries; ++i) {
    const std::int64_t visible = p.first_position + i + 1;
    for (std::int64_t h = 0; h < p.heads; ++h) {
      const float* q = p.q + (i * p.heads + h) * qk_dim;
      for (std::int64_t t = 0; t < visible; ++t) {
        const float* k = keys.data() + (t * p.heads + h) * p.qk_nope_dim;
        const float* k_pe = mla_latent_row(p, t) + rank;
        float dot = 0.0f;
        for (std::int64_t d = 0; d < p.qk_nope_dim; ++d) dot += q[d] * k[d];
        for (std::int64_t d = 0; d < rope; ++d) dot += q[p.qk_nope_dim + d] * k_pe[d];
        scores[t] = dot * p.softmax_scale;
      }
      softmax_causal_row(scores.data(), visible);
      float* out = p.out + (i * p.heads + h) * p.v_head_dim;
      for (std::int64_t d = 0; d < p.v_head_dim; ++d) {
        float sum = 0.0f;
        for (std::int64_t t = 0; t < visible; ++t)
          sum += scores[t] * values[(t * p.heads + h) * p.v_head_dim + d];
        out[d] = sum;
      }
    }
  }
}
}  // namespace reference

}  // namespace shoal::kernels
