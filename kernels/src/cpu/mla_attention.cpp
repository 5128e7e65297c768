#include "shoal/kernels/mla_attention.hpp"

#include "shoal/kernels/thread_pool.hpp"

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

// Every query's outputs are the same whatever other queries share the call (prefill, decode,
// a sequence recomputed after a node failure, chunked prefill): each score is one
// `detail::dot`, each weighted sum one chain of `detail::axpy` steps from zero, and the tiles
// below only reorder whole dots and chains for reuse from registers, bit for bit. (A BLAS path
// for many queries differed from the direct one by ~1e-7; the BF16 parts of the next linear
// layer can turn such a difference into one of 2^-16 and change a greedy token.)

#if defined(__x86_64__)
#define SHOAL_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,fma")))
// Fully unrolled: the accumulator arrays stay in registers (GCC at -O2 keeps them in memory).
#define SHOAL_UNROLL _Pragma("GCC unroll 16")

// out[i * a_step + j * b_step] = detail::dot(a[i], b[j], n) for an A x B tile, with dot_avx512's
// two accumulators and order.
template <int A, int B>
SHOAL_AVX512 void dot_tile(const float* const* a, const float* const* b, std::int64_t n, float* out,
                           std::int64_t a_step, std::int64_t b_step) {
  __m512 acc0[A][B], acc1[A][B];
  SHOAL_UNROLL for (int i = 0; i < A; ++i)
    SHOAL_UNROLL for (int j = 0; j < B; ++j) acc0[i][j] = acc1[i][j] = _mm512_setzero_ps();
  std::int64_t c = 0;
  for (; c + 32 <= n; c += 32) {
    __m512 b0[B], b1[B];
    SHOAL_UNROLL for (int j = 0; j < B; ++j) {
      b0[j] = _mm512_loadu_ps(b[j] + c);
      b1[j] = _mm512_loadu_ps(b[j] + c + 16);
    }
    SHOAL_UNROLL for (int i = 0; i < A; ++i) {
      const __m512 a0 = _mm512_loadu_ps(a[i] + c), a1 = _mm512_loadu_ps(a[i] + c + 16);
      SHOAL_UNROLL for (int j = 0; j < B; ++j) {
        acc0[i][j] = _mm512_fmadd_ps(a0, b0[j], acc0[i][j]);
        acc1[i][j] = _mm512_fmadd_ps(a1, b1[j], acc1[i][j]);
      }
    }
  }
  for (; c < n; c += 16) {
    const __mmask16 mask = static_cast<__mmask16>(n - c >= 16 ? 0xffff : (1u << (n - c)) - 1u);
    SHOAL_UNROLL for (int i = 0; i < A; ++i) {
      const __m512 a0 = _mm512_maskz_loadu_ps(mask, a[i] + c);
      SHOAL_UNROLL for (int j = 0; j < B; ++j) acc0[i][j] = _mm512_fmadd_ps(a0, _mm512_maskz_loadu_ps(mask, b[j] + c), acc0[i][j]);
    }
  }
  SHOAL_UNROLL for (int i = 0; i < A; ++i)
    SHOAL_UNROLL for (int j = 0; j < B; ++j) out[i * a_step + j * b_step] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[i][j], acc1[i][j]));
}

template <int A, int B = 1>
void dot_tile_b(const float* const* a, const float* const* b, std::int64_t n, float* out, std::int64_t a_step,
                std::int64_t b_step, int nb) {
  if constexpr (B < 4) {
    if (nb != B) return dot_tile_b<A, B + 1>(a, b, n, out, a_step, b_step, nb);
  }
  dot_tile<A, B>(a, b, n, out, a_step, b_step);
}

// Columns [c, c + 64) of out[q] = sum over t < count[q] of coef[q][t] * rows[t], for 4 or fewer
// q: per element the chain of fused multiply-adds axpy_avx512 makes, from zero, in t order.
template <int Q>
SHOAL_AVX512 void weighted_sum_tile(const float* const* coef, const std::int64_t* count, const float* const* rows,
                                    std::int64_t c, std::int64_t width, float* const* out) {
  constexpr int kVectors = 4;
  __mmask16 mask[kVectors];
  SHOAL_UNROLL for (int k = 0; k < kVectors; ++k) {
    const std::int64_t left = std::clamp<std::int64_t>(width - c - 16 * k, 0, 16);
    mask[k] = static_cast<__mmask16>((1u << left) - 1u);
  }
  __m512 acc[Q][kVectors];
  std::int64_t shortest = count[0], longest = 0;
  SHOAL_UNROLL for (int q = 0; q < Q; ++q) {
    shortest = std::min(shortest, count[q]);
    longest = std::max(longest, count[q]);
    SHOAL_UNROLL for (int k = 0; k < kVectors; ++k) acc[q][k] = _mm512_setzero_ps();
  }
  std::int64_t t = 0;
  for (; t < shortest; ++t) {
    __m512 row[kVectors];
    SHOAL_UNROLL for (int k = 0; k < kVectors; ++k) row[k] = _mm512_maskz_loadu_ps(mask[k], rows[t] + c + 16 * k);
    SHOAL_UNROLL for (int q = 0; q < Q; ++q) {
      const __m512 weight = _mm512_set1_ps(coef[q][t]);
      SHOAL_UNROLL for (int k = 0; k < kVectors; ++k) acc[q][k] = _mm512_fmadd_ps(weight, row[k], acc[q][k]);
    }
  }
  for (; t < longest; ++t) {  // the causal edge: queries whose rows have ended skip the rest
    __m512 row[kVectors];
    SHOAL_UNROLL for (int k = 0; k < kVectors; ++k) row[k] = _mm512_maskz_loadu_ps(mask[k], rows[t] + c + 16 * k);
    SHOAL_UNROLL for (int q = 0; q < Q; ++q) {
      if (t >= count[q]) continue;
      const __m512 weight = _mm512_set1_ps(coef[q][t]);
      SHOAL_UNROLL for (int k = 0; k < kVectors; ++k) acc[q][k] = _mm512_fmadd_ps(weight, row[k], acc[q][k]);
    }
  }
  SHOAL_UNROLL for (int q = 0; q < Q; ++q)
    SHOAL_UNROLL for (int k = 0; k < kVectors; ++k) _mm512_mask_storeu_ps(out[q] + c + 16 * k, mask[k], acc[q][k]);
}
#endif  // __x86_64__

// out[i * a_step + j * b_step] = detail::dot(a[i], b[j], n) for i < na and j < limit(i) (at
// least; whole tiles are computed).
template <typename Limit>
void dots(const float* const* a, std::int64_t na, const float* const* b, std::int64_t n, float* out,
          std::int64_t a_step, std::int64_t b_step, const Limit& limit) {
#if defined(__x86_64__)
  if (detail::cpu_has_avx512()) {
    constexpr std::int64_t kA = 2, kB = 4;
    for (std::int64_t i0 = 0; i0 < na; i0 += kA) {
      const int rows = static_cast<int>(std::min(kA, na - i0));
      std::int64_t nb = 0;
      for (int i = 0; i < rows; ++i) nb = std::max(nb, limit(i0 + i));
      for (std::int64_t j0 = 0; j0 < nb; j0 += kB) {
        const int cols = static_cast<int>(std::min(kB, nb - j0));
        float* o = out + i0 * a_step + j0 * b_step;
        if (rows == 2)
          dot_tile_b<2>(a + i0, b + j0, n, o, a_step, b_step, cols);
        else
          dot_tile_b<1>(a + i0, b + j0, n, o, a_step, b_step, cols);
      }
    }
    return;
  }
#endif
  for (std::int64_t i = 0; i < na; ++i)
    for (std::int64_t j = 0; j < limit(i); ++j) out[i * a_step + j * b_step] = detail::dot(a[i], b[j], n);
}

// out[q][:width] = sum over t < count[q] of coef[q][t] * rows[t], as detail::axpy applied for
// t = 0, 1, ... to a zeroed out[q].
void weighted_sums(const float* const* coef, const std::int64_t* count, std::int64_t nq, const float* const* rows,
                   std::int64_t width, float* const* out) {
#if defined(__x86_64__)
  if (detail::cpu_has_avx512()) {
    constexpr std::int64_t kQ = 4;
    for (std::int64_t q0 = 0; q0 < nq; q0 += kQ)
      for (std::int64_t c = 0; c < width; c += 64) {
        switch (std::min(kQ, nq - q0)) {
          case 1: weighted_sum_tile<1>(coef + q0, count + q0, rows, c, width, out + q0); break;
          case 2: weighted_sum_tile<2>(coef + q0, count + q0, rows, c, width, out + q0); break;
          case 3: weighted_sum_tile<3>(coef + q0, count + q0, rows, c, width, out + q0); break;
          default: weighted_sum_tile<4>(coef + q0, count + q0, rows, c, width, out + q0); break;
        }
      }
    return;
  }
#endif
  for (std::int64_t q = 0; q < nq; ++q) {
    std::fill(out[q], out[q] + width, 0.0f);
    for (std::int64_t t = 0; t < count[q]; ++t) detail::axpy(out[q], coef[q][t], rows[t], width);
  }
}

struct head_buffers {
  std::vector<float> w_head, q_cat, scores, o_latent;
  std::vector<const float*> a, b;
  std::vector<float*> out;
  std::vector<std::int64_t> count;
};

// One head, all queries in chunks: absorb W_k into the queries, attend over the latents,
// decompress with W_v.
void absorbed_head(const mla_params& p, std::int64_t head, head_buffers& buf) {
  const std::int64_t rank = p.kv_lora_rank;
  const std::int64_t rope = p.qk_rope_dim;
  const std::int64_t latent_stride = rank + rope;
  const std::int64_t qk_dim = p.qk_nope_dim + rope;
  const std::int64_t head_rows = p.qk_nope_dim + p.v_head_dim;

  // Exact fp32 copy of this head's [k rows; v rows] x rank slice of kv_b.
  buf.w_head.resize(static_cast<std::size_t>(head_rows * rank));
  for (std::int64_t r = 0; r < head_rows; ++r)
    dequantize_row(p.kv_b, head * head_rows + r, 0, rank, buf.w_head.data() + r * rank);
  const float* w_k = buf.w_head.data();
  const float* w_v = buf.w_head.data() + p.qk_nope_dim * rank;

  for (std::int64_t q0 = 0; q0 < p.queries; q0 += kQueryChunk) {
    const std::int64_t nq = std::min(kQueryChunk, p.queries - q0);
    const std::int64_t visible_max = p.first_position + q0 + nq;
    const std::int64_t rows = std::max({visible_max, p.qk_nope_dim, p.v_head_dim, nq});
    buf.q_cat.resize(static_cast<std::size_t>(nq * latent_stride));
    buf.scores.resize(static_cast<std::size_t>(nq * visible_max));
    buf.o_latent.resize(static_cast<std::size_t>(nq * rank));
    buf.a.resize(static_cast<std::size_t>(rows));
    buf.b.resize(static_cast<std::size_t>(rows));
    buf.out.resize(static_cast<std::size_t>(nq));
    buf.count.resize(static_cast<std::size_t>(nq));
    const auto q_head = [&](std::int64_t i) { return p.q + ((q0 + i) * p.heads + head) * qk_dim; };

    // q_cat[i][:rank] = sum_d q_nope[i][d] * W_k[d] ; q_cat[i][rank:] = q_pe[i].
    for (std::int64_t i = 0; i < nq; ++i) {
      buf.a[i] = q_head(i);
      buf.count[i] = p.qk_nope_dim;
      buf.out[i] = buf.q_cat.data() + i * latent_stride;
      std::copy_n(q_head(i) + p.qk_nope_dim, rope, buf.out[i] + rank);
    }
    for (std::int64_t d = 0; d < p.qk_nope_dim; ++d) buf.b[d] = w_k + d * rank;
    weighted_sums(buf.a.data(), buf.count.data(), nq, buf.b.data(), rank, buf.out.data());

    // Scores over the visible latents, softmax.
    for (std::int64_t i = 0; i < nq; ++i) {
      buf.a[i] = buf.q_cat.data() + i * latent_stride;
      buf.count[i] = p.first_position + q0 + i + 1;
    }
    for (std::int64_t t = 0; t < visible_max; ++t) buf.b[t] = mla_latent_row(p, t);
    dots(buf.a.data(), nq, buf.b.data(), latent_stride, buf.scores.data(), visible_max, 1,
         [&](std::int64_t i) { return buf.count[i]; });
    for (std::int64_t i = 0; i < nq; ++i) {
      float* row = buf.scores.data() + i * visible_max;
      for (std::int64_t t = 0; t < buf.count[i]; ++t) row[t] *= p.softmax_scale;
      softmax_causal_row(row, buf.count[i]);
    }

    // o_latent[i] = sum_t score[i][t] * latent[t][:rank].
    for (std::int64_t i = 0; i < nq; ++i) {
      buf.a[i] = buf.scores.data() + i * visible_max;
      buf.out[i] = buf.o_latent.data() + i * rank;
    }
    weighted_sums(buf.a.data(), buf.count.data(), nq, buf.b.data(), rank, buf.out.data());

    // out[i][j] = W_v[j] . o_latent[i].
    for (std::int64_t j = 0; j < p.v_head_dim; ++j) buf.a[j] = w_v + j * rank;
    for (std::int64_t i = 0; i < nq; ++i) buf.b[i] = buf.o_latent.data() + i * rank;
    dots(buf.a.data(), p.v_head_dim, buf.b.data(), rank, p.out + (q0 * p.heads + head) * p.v_head_dim, 1,
         p.heads * p.v_head_dim, [&](std::int64_t) { return nq; });
  }
}

}  // namespace

void mla_attention(thread_pool& pool, const mla_params& params) {
  const auto heads = [&](std::int64_t begin, std::int64_t end) {
    thread_local head_buffers buf;
    for (std::int64_t h = begin; h < end; ++h) absorbed_head(params, h, buf);
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
