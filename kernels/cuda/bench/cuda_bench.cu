// Benchmarks the CUDA kernels at DeepSeek-V3 shapes next to ceilings measured in the same run
// (device-to-device copy, a read-only sweep, cuBLAS BF16 and FP8 GEMMs at 8192^3). Every timed
// iteration starts with a cold L2 (a 256 MiB buffer is overwritten first), so small working sets
// are not flattered by the 50 MB cache. Usage: shoal_cuda_bench [--dump DIR] [--quick]
// --dump writes the MoE routing of each batch so the PyTorch baseline runs the same choices.

#include "check.cuh"
#include "device_common.cuh"
#include "shoal/kernels/cuda/context.hpp"
#include "shoal/kernels/cuda/gemm.hpp"
#include "shoal/kernels/cuda/mla_attention.hpp"
#include "shoal/kernels/cuda/moe.hpp"
#include "shoal/kernels/cuda/rmsnorm.hpp"
#include "shoal/kernels/cuda/sampling.hpp"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <functional>
#include <set>
#include <string>
#include <vector>

namespace cu = shoal::kernels::cuda;
using shoal::kernels::dtype;

namespace {

constexpr std::int64_t kHidden = 7168, kInter = 2048, kExperts = 256, kTopK = 8, kGroups = 8,
                       kTopGroups = 4, kHeads = 128, kRank = 512, kRope = 64, kVocab = 129280;

__global__ void fill_kernel(std::uint8_t* p, std::size_t bytes, std::uint32_t seed, int mode) {
  for (std::size_t i = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x; i < bytes;
       i += std::size_t{gridDim.x} * blockDim.x) {
    std::uint32_t h = static_cast<std::uint32_t>(i) * 2654435761u ^ seed;
    h ^= h >> 15;
    h *= 2246822519u;
    h ^= h >> 13;
    if (mode == 0) p[i] = static_cast<std::uint8_t>(h & 0xb7);  // FP8: no NaN, |v| <= 2^-1 ish
    else if (mode == 1 && i % 2 == 0)                            // bf16: small normal values
      *reinterpret_cast<__nv_bfloat16*>(p + i) = __float2bfloat16((static_cast<float>(h % 2001) - 1000.0f) * 2e-5f);
    else if (mode == 2 && i % 4 == 0)                            // f32 in [-1, 1]
      *reinterpret_cast<float*>(p + i) = (static_cast<float>(h % 2001) - 1000.0f) * 1e-3f;
  }
}

__global__ void read_kernel(const uint4* p, std::size_t count, unsigned* sink) {
  unsigned acc = 0;
  for (std::size_t i = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x; i < count;
       i += std::size_t{gridDim.x} * blockDim.x) {
    const uint4 v = __ldcs(p + i);
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x12345678u) *sink = acc;  // keeps the loads alive
}

enum fill_mode { fp8_values = 0, bf16_values = 1, f32_values = 2 };

void fill(cu::device_buffer& b, fill_mode mode, std::uint32_t seed) {
  fill_kernel<<<4096, 256>>>(b.as<std::uint8_t>(), b.bytes(), seed, mode);
  SHOAL_CUDA_CHECK_LAUNCH();
}

struct timer {
  cu::context& ctx;
  cu::device_buffer flush{std::size_t{256} << 20};
  cudaEvent_t start{}, stop{};
  explicit timer(cu::context& c) : ctx(c) {
    SHOAL_CUDA_CHECK(cudaEventCreate(&start));
    SHOAL_CUDA_CHECK(cudaEventCreate(&stop));
  }
  // Median of `reps` cold-L2 runs, in seconds.
  double run(const std::function<void()>& body, int reps = 10) {
    const cudaStream_t s = static_cast<cudaStream_t>(ctx.stream());
    body();  // warm-up: code, cuBLAS heuristics
    std::vector<double> times;
    for (int r = 0; r < reps; ++r) {
      SHOAL_CUDA_CHECK(cudaMemsetAsync(flush.data(), r, flush.bytes(), s));
      SHOAL_CUDA_CHECK(cudaEventRecord(start, s));
      body();
      SHOAL_CUDA_CHECK(cudaEventRecord(stop, s));
      SHOAL_CUDA_CHECK(cudaEventSynchronize(stop));
      float ms = 0.0f;
      SHOAL_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
      times.push_back(ms * 1e-3);
    }
    std::sort(times.begin(), times.end());
    return times[times.size() / 2];
  }
};

struct ceilings {
  double copy_gbs = 0, read_gbs = 0, bf16_tflops = 0, fp8_tflops = 0;
};

double fp8_gemm_tflops(cu::context& ctx, timer& t, std::int64_t n) {
  cu::device_buffer a(n * n), b(n * n), c(n * n * 2);
  fill(a, fp8_values, 1);
  fill(b, fp8_values, 2);
  const auto lt = static_cast<cublasLtHandle_t>(ctx.cublas_lt());
  cublasLtMatmulDesc_t desc;
  SHOAL_CUBLAS_CHECK(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t tr = CUBLAS_OP_T, nt = CUBLAS_OP_N;
  SHOAL_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &tr, sizeof(tr)));
  SHOAL_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &nt, sizeof(nt)));
  cublasLtMatrixLayout_t la, lb, lc;
  SHOAL_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&la, CUDA_R_8F_E4M3, n, n, n));
  SHOAL_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&lb, CUDA_R_8F_E4M3, n, n, n));
  SHOAL_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&lc, CUDA_R_16BF, n, n, n));
  cublasLtMatmulPreference_t pref;
  SHOAL_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  const std::size_t ws = ctx.lt_workspace_bytes();
  SHOAL_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
  cublasLtMatmulHeuristicResult_t h{};
  int found = 0;
  SHOAL_CUBLAS_CHECK(cublasLtMatmulAlgoGetHeuristic(lt, desc, la, lb, lc, lc, pref, 1, &h, &found));
  const float alpha = 1.0f, beta = 0.0f;
  const double s = t.run([&] {
    SHOAL_CUBLAS_CHECK(cublasLtMatmul(lt, desc, &alpha, a.data(), la, b.data(), lb, &beta, c.data(), lc,
                                      c.data(), lc, &h.algo, ctx.lt_workspace(), ws,
                                      static_cast<cudaStream_t>(ctx.stream())));
  });
  cublasLtMatmulPreferenceDestroy(pref);
  cublasLtMatrixLayoutDestroy(la);
  cublasLtMatrixLayoutDestroy(lb);
  cublasLtMatrixLayoutDestroy(lc);
  cublasLtMatmulDescDestroy(desc);
  return 2.0 * n * n * n / s * 1e-12;
}

ceilings measure_ceilings(cu::context& ctx, timer& t) {
  ceilings c;
  const std::size_t bytes = std::size_t{2} << 30;
  cu::device_buffer src(bytes), dst(bytes), sink(4);
  const cudaStream_t s = static_cast<cudaStream_t>(ctx.stream());
  double sec = t.run([&] { SHOAL_CUDA_CHECK(cudaMemcpyAsync(dst.data(), src.data(), bytes, cudaMemcpyDeviceToDevice, s)); });
  c.copy_gbs = 2.0 * bytes / sec * 1e-9;  // read + write
  sec = t.run([&] {
    read_kernel<<<ctx.multiprocessors() * 8, 512, 0, s>>>(src.as<uint4>(), bytes / 16, sink.as<unsigned>());
  });
  c.read_gbs = bytes / sec * 1e-9;
  const std::int64_t n = 8192;
  cu::device_buffer a(n * n * 2), b(n * n * 2), out(n * n * 2);
  fill(a, bf16_values, 3);
  fill(b, bf16_values, 4);
  cu::gemm_params g;
  g.x = a.as<std::uint16_t>();
  g.w = b.as<std::uint16_t>();
  g.y = out.data();
  g.output = cu::gemm_output::bf16;
  g.m = g.n = g.k = n;
  sec = t.run([&] { cu::gemm(ctx, g); });
  c.bf16_tflops = 2.0 * n * n * n / sec * 1e-12;
  c.fp8_tflops = fp8_gemm_tflops(ctx, t, n);
  return c;
}

void print_ceilings(const char* when, const ceilings& c) {
  std::printf("ceilings (%s): d2d copy %.0f GB/s | read %.0f GB/s | cuBLAS bf16 8192^3 %.0f TFLOP/s | cuBLASLt fp8 8192^3 %.0f TFLOP/s\n",
              when, c.copy_gbs, c.read_gbs, c.bf16_tflops, c.fp8_tflops);
}

void row(const char* kernel, const std::string& shape, double sec, double flops, double bytes,
         const ceilings& c, double peak_tflops) {
  const double tflops = flops / sec * 1e-12, gbs = bytes / sec * 1e-9;
  std::printf("| %-22s | %-28s | %9.1f | %8.1f | %6.1f%% | %7.0f | %6.1f%% |\n", kernel, shape.c_str(),
              sec * 1e6, tflops, 100.0 * tflops / peak_tflops, gbs, 100.0 * gbs / c.read_gbs);
}

void header() {
  std::printf("| %-22s | %-28s | %9s | %8s | %7s | %7s | %7s |\n", "kernel", "shape", "time us",
              "TFLOP/s", "%peak", "GB/s", "%read");
  std::printf("|%s|%s|%s|%s|%s|%s|%s|\n", std::string(24, '-').c_str(), std::string(30, '-').c_str(),
              std::string(11, '-').c_str(), std::string(10, '-').c_str(), std::string(9, '-').c_str(),
              std::string(9, '-').c_str(), std::string(9, '-').c_str());
}

void bench_moe(cu::context& ctx, timer& t, const ceilings& c, bool quick, const char* dump) {
  for (const dtype type : {dtype::f8_e4m3, dtype::bf16}) {
    const bool fp8 = type == dtype::f8_e4m3;
    const std::size_t elem = fp8 ? 1 : 2;
    const std::size_t mat = std::size_t{kInter} * kHidden * elem;
    cu::device_buffer weights(3 * kExperts * mat);
    fill(weights, fp8 ? fp8_values : bf16_values, 5);
    const std::size_t scale_count = (kInter / 128) * (kHidden / 128);
    cu::device_buffer scales(fp8 ? 3 * kExperts * scale_count * 4 : 4);
    if (fp8) fill(scales, f32_values, 6);
    std::vector<cu::moe_expert_pointers> table(kExperts);
    for (std::int64_t e = 0; e < kExperts; ++e) {
      const auto* base = weights.as<std::uint8_t>() + 3 * e * mat;
      const float* sc = fp8 ? scales.as<float>() + 3 * e * scale_count : nullptr;
      table[e] = {base, base + mat, base + 2 * mat, sc, fp8 ? sc + scale_count : nullptr,
                  fp8 ? sc + 2 * scale_count : nullptr};
    }
    cu::device_buffer dtable(table.size() * sizeof(table[0]));
    cu::copy_to_device(ctx, dtable.data(), table.data(), dtable.bytes());
    std::vector<std::int64_t> batches = {1, 8, 32, 64, 128, 256, 4096};
    if (quick) batches = {1, 64, 4096};
    for (const std::int64_t tokens : batches) {
      cu::device_buffer x(tokens * kHidden * 4), y(tokens * kHidden * 4), logits(tokens * kExperts * 4),
          bias(kExperts * 4), idx(tokens * kTopK * 4), w(tokens * kTopK * 4);
      fill(x, f32_values, 7);
      fill(logits, f32_values, static_cast<std::uint32_t>(8 + tokens));
      cu::fill_zero(ctx, bias.data(), bias.bytes());
      cu::moe_route_params route{logits.as<float>(), bias.as<float>(), tokens, kExperts, kGroups,
                                 kTopGroups, kTopK, true, 2.5f, idx.as<std::int32_t>(), w.as<float>()};
      const double route_s = t.run([&] { cu::moe_route(ctx, route); });
      std::vector<std::int32_t> chosen(tokens * kTopK);
      cu::copy_to_host(ctx, chosen.data(), idx.data(), chosen.size() * 4);
      if (dump && fp8) {
        const std::string path = std::string(dump) + "/moe_indices_" + std::to_string(tokens) + ".bin";
        if (FILE* f = std::fopen(path.c_str(), "wb")) {
          std::fwrite(chosen.data(), 4, chosen.size(), f);
          std::fclose(f);
        }
      }
      const std::set<std::int32_t> used(chosen.begin(), chosen.end());
      cu::device_buffer ws(cu::moe_experts_workspace_bytes(tokens, kTopK, kExperts, kHidden, kInter, cu::moe_combine::ordered));
      cu::moe_experts_params p;
      p.x = x.as<float>();
      p.tokens = tokens;
      p.hidden = kHidden;
      p.inter = kInter;
      p.experts = kExperts;
      p.top_k = kTopK;
      p.indices = idx.as<std::int32_t>();
      p.weights = w.as<float>();
      p.expert_table = dtable.as<cu::moe_expert_pointers>();
      p.weight_type = type;
      p.y = y.as<float>();
      p.workspace = ws.data();
      p.workspace_bytes = ws.bytes();
      // Bytes a step must touch: the chosen experts' weights and scales, x once, y twice.
      const double weight_bytes = static_cast<double>(used.size()) * 3 * (mat + (fp8 ? scale_count * 4 : 0));
      const double act_bytes = static_cast<double>(tokens) * kHidden * 4 * 3;
      const double flops = 2.0 * tokens * kTopK * 3 * kHidden * kInter;
      const double peak = fp8 ? c.fp8_tflops : c.bf16_tflops;
      const std::string name = std::string("moe_experts ") + (fp8 ? "fp8" : "bf16");
      for (const auto combine : {cu::moe_combine::ordered, cu::moe_combine::atomic}) {
        p.combine = combine;
        const double s = t.run([&] { cu::moe_experts(ctx, p); });
        row((name + (combine == cu::moe_combine::ordered ? " ord" : " atom")).c_str(),
            "T=" + std::to_string(tokens) + " experts used " + std::to_string(used.size()), s, flops,
            weight_bytes + act_bytes, c, peak);
      }
      if (fp8) row("moe_route", "T=" + std::to_string(tokens), route_s, 0, tokens * kExperts * 4.0, c, 1);
    }
  }
}

void bench_mla(cu::context& ctx, timer& t, const ceilings& c, bool quick) {
  const std::int64_t dim = kRank + kRope, page = 64, context_len = 4096;
  std::vector<std::int64_t> batches = {1, 8, 32, 64, 128, 256};
  if (quick) batches = {1, 64};
  struct shape { std::int64_t batch, queries, len; };
  std::vector<shape> shapes;
  for (auto b : batches) shapes.push_back({b, 1, context_len});
  shapes.push_back({1, 4096, 4096});  // causal prefill of a 4k prompt
  for (const shape s : shapes) {
    const std::int64_t pages_per_seq = (s.len + page - 1) / page;
    cu::device_buffer cache(s.batch * pages_per_seq * page * dim * 2);
    fill(cache, bf16_values, 11);
    std::vector<std::int32_t> table(s.batch * pages_per_seq), lens(s.batch, static_cast<std::int32_t>(s.len));
    for (std::size_t i = 0; i < table.size(); ++i) table[i] = static_cast<std::int32_t>((i * 7919) % table.size());
    cu::device_buffer dtable(table.size() * 4), dlens(lens.size() * 4);
    cu::copy_to_device(ctx, dtable.data(), table.data(), dtable.bytes());
    cu::copy_to_device(ctx, dlens.data(), lens.data(), dlens.bytes());
    cu::device_buffer q(s.batch * s.queries * kHeads * dim * 4), out(s.batch * s.queries * kHeads * kRank * 4);
    fill(q, f32_values, 12);
    const std::int64_t splits = cu::mla_attention_splits(ctx.multiprocessors(), s.batch, s.queries, kHeads, s.len);
    cu::device_buffer ws(cu::mla_attention_workspace_bytes(s.batch, s.queries, kHeads, kRank, splits));
    cu::mla_attention_params p;
    p.batch = s.batch;
    p.queries = s.queries;
    p.heads = kHeads;
    p.kv_lora_rank = kRank;
    p.rope_dim = kRope;
    p.softmax_scale = 0.1f;
    p.q = q.as<float>();
    p.cache = cache.as<std::uint16_t>();
    p.page_size = page;
    p.block_table = dtable.as<std::int32_t>();
    p.max_pages = pages_per_seq;
    p.seq_lens = dlens.as<std::int32_t>();
    p.max_seq_len = s.len;
    p.out = out.as<float>();
    p.splits = splits;
    p.workspace = ws.data();
    p.workspace_bytes = ws.bytes();
    const double sec = t.run([&] { cu::mla_attention(ctx, p); });
    // Visible (query, key) pairs: all of them for decode, the causal triangle for prefill.
    const double pairs = s.queries == 1 ? static_cast<double>(s.len)
                                        : static_cast<double>(s.queries) * (s.queries + 1) / 2.0;
    const double flops = 2.0 * s.batch * kHeads * pairs * (dim + kRank);
    const double bytes = s.batch * (s.len * dim * 2.0 + s.queries * kHeads * (dim + kRank) * 4.0);
    row(s.queries == 1 ? "mla decode" : "mla prefill (absorbed)",
        "B=" + std::to_string(s.batch) + " q=" + std::to_string(s.queries) + " ctx=" +
            std::to_string(s.len) + " splits=" + std::to_string(splits),
        sec, flops, bytes, c, c.bf16_tflops);
  }
}

void bench_small(cu::context& ctx, timer& t, const ceilings& c) {
  for (const std::int64_t rows : {1, 64, 4096}) {
    cu::device_buffer x(rows * kHidden * 4), res(rows * kHidden * 4), w(kHidden * 4), y(rows * kHidden * 4);
    fill(x, f32_values, 13);
    fill(res, f32_values, 14);
    fill(w, f32_values, 15);
    const double s = t.run([&] {
      cu::rmsnorm(ctx, {x.as<float>(), res.as<float>(), w.as<float>(), y.as<float>(), nullptr, rows, kHidden});
    });
    row("rmsnorm + residual", "rows=" + std::to_string(rows) + " dim=7168", s, 0, rows * kHidden * 16.0, c, 1);
  }
  for (const std::int64_t batch : {1, 64, 256}) {
    cu::device_buffer logits(batch * kVocab * 4), tok(batch * 4);
    fill(logits, f32_values, 16);
    std::vector<float> temp(batch, 0.7f), top_p(batch, 0.9f), u(batch, 0.5f);
    std::vector<std::int32_t> top_k(batch, 0);
    cu::device_buffer dt(batch * 4), dk(batch * 4), dp(batch * 4), du(batch * 4);
    cu::copy_to_device(ctx, dt.data(), temp.data(), batch * 4);
    cu::copy_to_device(ctx, dk.data(), top_k.data(), batch * 4);
    cu::copy_to_device(ctx, dp.data(), top_p.data(), batch * 4);
    cu::copy_to_device(ctx, du.data(), u.data(), batch * 4);
    const double s = t.run([&] {
      cu::sample(ctx, {logits.as<float>(), batch, kVocab, dt.as<float>(), dk.as<std::int32_t>(),
                       dp.as<float>(), du.as<float>(), tok.as<std::int32_t>()});
    });
    // Each row is swept about seven times (max, sum, four radix passes, gather).
    row("sample top-p 0.9", "B=" + std::to_string(batch) + " vocab=129280", s, 0, batch * kVocab * 4.0, c, 1);
  }
}

}  // namespace

int main(int argc, char** argv) {
  const char* dump = nullptr;
  bool quick = false;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--dump") && i + 1 < argc) dump = argv[++i];
    else if (!std::strcmp(argv[i], "--quick")) quick = true;
  }
  if (!cu::device_available()) {
    std::fprintf(stderr, "shoal_cuda_bench: no CUDA device\n");
    return 2;
  }
  try {
    cu::context ctx;
    timer t(ctx);
    std::printf("device: %s\n", cu::device_description(ctx.device()).c_str());
    const ceilings before = measure_ceilings(ctx, t);
    print_ceilings("before", before);
    std::printf("%%peak: of the cuBLAS GEMM of the same dtype; %%read: of the read sweep; median of 10 cold-L2 runs\n\n");
    header();
    bench_moe(ctx, t, before, quick, dump);
    bench_mla(ctx, t, before, quick);
    bench_small(ctx, t, before);
    std::printf("\n");
    print_ceilings("after", measure_ceilings(ctx, t));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "shoal_cuda_bench: %s\n", e.what());
    return 1;
  }
  return 0;
}
