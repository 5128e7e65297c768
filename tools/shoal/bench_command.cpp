// shoal bench: prefill and decode speed of the CPU model next to the memory roofline measured
// in the same run.

#include "commands.hpp"

#include "shoal/base/error.hpp"
#include "shoal/kernels/linear.hpp"
#include "shoal/kernels/thread_pool.hpp"
#include "shoal/runtime/model.hpp"
#include "shoal/runtime/weights.hpp"

#include <CLI/CLI.hpp>
#include <fmt/core.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <unistd.h>

#if defined(__x86_64__)
#include <immintrin.h>
// GCC 12 flags its own AVX-512 intrinsic headers (an undefined-vector idiom) as uninitialized use.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace shoal::tools {
namespace {

using clock_type = std::chrono::steady_clock;

double seconds_since(clock_type::time_point start) {
  return std::chrono::duration<double>(clock_type::now() - start).count();
}

// The triad's inner loop, vectorized whatever the build's optimization level (the arrays do
// not alias); a scalar or alias-checked loop measures the core, not the memory.
__attribute__((noinline, optimize("O3"))) void triad_slice(float* __restrict a, const float* __restrict b,
                                                          const float* __restrict c, std::size_t begin,
                                                          std::size_t end) {
  for (std::size_t i = begin; i < end; ++i) a[i] = b[i] + 3.0f * c[i];
}

// Bytes of each triad array by default: 4 x the last-level cache, at least 256 MiB, as
// STREAM asks (and as ../shared/baselines/llamacpp/triad.c sizes them).
std::size_t default_triad_bytes() {
  long llc = ::sysconf(_SC_LEVEL3_CACHE_SIZE);
  if (llc <= 0) llc = ::sysconf(_SC_LEVEL2_CACHE_SIZE);
  if (llc <= 0) llc = 32L << 20;
  return std::max<std::size_t>(4 * static_cast<std::size_t>(llc), std::size_t{256} << 20);
}

// STREAM triad a = b + s*c, counted as STREAM counts it (3 arrays, write-allocate traffic not
// counted), best of 7 passes. Each of `threads` threads owns a fixed slice, first-touched by
// itself, so that the measure is the memory's and not the thread pool's scheduling.
double triad_bandwidth(int threads, std::size_t bytes_per_array) {
  const std::size_t n = bytes_per_array / sizeof(float);
  const auto a = std::make_unique_for_overwrite<float[]>(n);
  const auto b = std::make_unique_for_overwrite<float[]>(n);
  const auto c = std::make_unique_for_overwrite<float[]>(n);
  const auto slice = [&](int t) {
    return std::pair{n * static_cast<std::size_t>(t) / static_cast<std::size_t>(threads),
                     n * static_cast<std::size_t>(t + 1) / static_cast<std::size_t>(threads)};
  };
  auto on_every_thread = [&](auto&& work) {
    std::vector<std::thread> pool;
    for (int t = 1; t < threads; ++t) pool.emplace_back([&, t] { work(t); });
    work(0);
    for (auto& th : pool) th.join();
  };
  on_every_thread([&](int t) {
    const auto [begin, end] = slice(t);
    for (std::size_t i = begin; i < end; ++i) a[i] = 0.0f, b[i] = 1.0f, c[i] = 2.0f;
  });
  double best = 0.0;
  for (int pass = 0; pass < 7; ++pass) {
    const auto start = clock_type::now();
    on_every_thread([&](int t) {
      const auto [begin, end] = slice(t);
      triad_slice(a.get(), b.get(), c.get(), begin, end);
    });
    const double seconds = seconds_since(start);
    best = std::max(best, 3.0 * static_cast<double>(n * sizeof(float)) / seconds / 1e9);
  }
  if (a[n / 2] != 7.0f) fmt::print(stderr, "triad check failed\n");
  return best;
}

// Bytes one decode step must read, counted as BENCHMARKING.md asks: lm_head, every attention
// projection, dense MLPs, per MoE layer the gate, shared experts and top_k average experts, one
// embedding row, and the latent cache at the given context length.
double decode_bytes(const runtime::model_weights& w, std::int64_t context) {
  const auto& c = w.config();
  double bytes = static_cast<double>(w.lm_head().bytes()) +
                 static_cast<double>(w.embedding().bytes()) / static_cast<double>(c.vocab_size);
  for (const auto& layer : w.layers()) {
    for (const auto* m : {&layer.q_a, &layer.q_b, &layer.kv_a, &layer.kv_b, &layer.o})
      if (m->data) bytes += static_cast<double>(m->bytes());
    bytes += 4.0 * static_cast<double>(context * c.latent_dim());
    const auto mlp_bytes = [](const kernels::expert_weights& e) {
      return static_cast<double>(e.gate.bytes() + e.up.bytes() + e.down.bytes());
    };
    if (!layer.moe) {
      bytes += mlp_bytes(layer.dense);
      continue;
    }
    bytes += static_cast<double>(layer.router.bytes()) + mlp_bytes(layer.shared);
    double experts = 0.0;
    for (const auto& e : layer.experts) experts += mlp_bytes(e);
    bytes += experts / static_cast<double>(layer.experts.size()) * static_cast<double>(c.num_experts_per_tok);
  }
  return bytes;
}

// Multiply-adds of a prefill of `tokens` tokens: every weight a token touches (routed experts
// at top_k of their average size), plus causal absorbed attention over the latents.
double prefill_flops(const runtime::model_weights& w, std::int64_t tokens) {
  const auto& c = w.config();
  const auto elements = [](const kernels::matrix_view& m) { return static_cast<double>(m.rows * m.cols); };
  const auto mlp = [&](const kernels::expert_weights& e) { return elements(e.gate) + elements(e.up) + elements(e.down); };
  double per_token = elements(w.lm_head()) / static_cast<double>(tokens);  // logits of the last token only
  double attention = 0.0;
  const double n = static_cast<double>(tokens);
  for (const auto& layer : w.layers()) {
    for (const auto* m : {&layer.q_a, &layer.q_b, &layer.kv_a, &layer.o}) per_token += elements(*m);
    const double heads = static_cast<double>(c.num_attention_heads);
    attention += heads * n * static_cast<double>(c.qk_nope_head_dim + c.v_head_dim) * static_cast<double>(c.kv_lora_rank);
    attention += heads * n * (n + 1) / 2.0 * static_cast<double>(c.latent_dim() + c.kv_lora_rank);
    if (!layer.moe) {
      per_token += mlp(layer.dense);
      continue;
    }
    double experts = 0.0;
    for (const auto& e : layer.experts) experts += mlp(e);
    per_token += elements(layer.router) + mlp(layer.shared) +
                 experts / static_cast<double>(layer.experts.size()) * static_cast<double>(c.num_experts_per_tok);
  }
  return 2.0 * (per_token * n + attention);
}

// FP32 GEMM rate of this machine through the same OpenBLAS the prefill uses, one tile per
// thread, as the ceiling prefill is compared with.
double gemm_gflops(kernels::thread_pool& pool) {
  constexpr std::int64_t kSize = 1024;
  std::vector<float> a(kSize * kSize, 0.5f), b(kSize * kSize * pool.size(), 0.25f), c(kSize * kSize * pool.size());
  double best = 0.0;
  for (int pass = 0; pass < 3; ++pass) {
    const auto start = clock_type::now();
    pool.run([&](int t) {
      kernels::linear_params p;
      p.x = a.data();
      p.tokens = kSize;
      p.weight = {kernels::dtype::f32, kSize, kSize, b.data() + t * kSize * kSize, nullptr};
      p.y = c.data() + t * kSize * kSize;
      kernels::linear_serial(p);
    });
    best = std::max(best, 2.0 * kSize * kSize * kSize * pool.size() / seconds_since(start) / 1e9);
  }
  return best;
}

#if defined(__x86_64__)
// 12 independent accumulators: more than latency x throughput of `vdpbf16ps` on current cores.
__attribute__((target("avx512f,avx512bf16"), noinline)) float bf16_dot_loop(std::int64_t iterations) {
  constexpr int kChains = 12;
  __m512 acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = _mm512_setzero_ps();
  __m512bh a = reinterpret_cast<__m512bh>(_mm512_set1_epi16(0x3f80));  // 1.0
  const __m512bh b = reinterpret_cast<__m512bh>(_mm512_set1_epi16(0x3c00));  // 2^-7
  for (std::int64_t n = 0; n < iterations; ++n) {
#pragma GCC unroll 12
    for (int i = 0; i < kChains; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], a, b);
    __asm__ volatile("" : "+v"(a));  // keeps the loop from being folded
  }
  __m512 sum = acc[0];
  for (int i = 1; i < kChains; ++i) sum = _mm512_add_ps(sum, acc[i]);
  return _mm512_reduce_add_ps(sum);
}
#endif

// BF16 multiply-add peak of this machine: every pool thread runs independent `vdpbf16ps`
// (32 multiply-adds each) from registers; 0 where the CPU has no AVX512-BF16. Prefill is
// compared with it.
double bf16_peak_gflops(kernels::thread_pool& pool) {
#if defined(__x86_64__)
  if (!__builtin_cpu_supports("avx512bf16")) return 0.0;
  constexpr std::int64_t kIterations = 20'000'000;  // ~65 ms per thread at 3.7 GHz
  double best = 0.0;
  std::vector<float> sink(static_cast<std::size_t>(pool.size()));
  for (int pass = 0; pass < 3; ++pass) {
    const auto start = clock_type::now();
    pool.run([&](int t) { sink[static_cast<std::size_t>(t)] = bf16_dot_loop(kIterations); });
    best = std::max(best, 12.0 * 64.0 * kIterations * pool.size() / seconds_since(start) / 1e9);
  }
  return best;
#else
  (void)pool;
  return 0.0;
#endif
}

// The triad alone, on each thread count, for comparing this yardstick with other STREAM-like
// probes run back to back with it.
void print_bandwidth(const std::vector<int>& thread_counts, std::size_t bytes_per_array, bool json) {
  nlohmann::json out{{"triad_bytes_per_array", bytes_per_array}, {"rows", nlohmann::json::array()}};
  if (!json) fmt::print("triad, 3 arrays of {} MiB, best of 7\n| threads | triad GB/s |\n|---|---|\n", bytes_per_array >> 20);
  for (int threads : thread_counts) {
    const double gbps = triad_bandwidth(threads, bytes_per_array);
    if (json)
      out["rows"].push_back({{"threads", threads}, {"triad_gbps", gbps}});
    else
      fmt::print("| {} | {:.1f} |\n", threads, gbps);
  }
  if (json) fmt::print("{}\n", out.dump());
}

struct speed {
  double prefill_tokens_per_s = 0;
  double decode_tokens_per_s = 0;
};

speed run_model(runtime::model& net, const std::vector<std::int32_t>& prompt, int decode_tokens) {
  runtime::latent_cache cache(net.config(), static_cast<std::int64_t>(prompt.size()) + decode_tokens);
  runtime::sequence_step step{&cache, prompt};
  auto start = clock_type::now();
  auto logits = net.forward(std::span(&step, 1));
  speed s;
  s.prefill_tokens_per_s = static_cast<double>(prompt.size()) / seconds_since(start);
  std::int32_t token = runtime::argmax(logits);
  start = clock_type::now();
  for (int i = 0; i < decode_tokens; ++i) {
    step.tokens = std::span(&token, 1);
    logits = net.forward(std::span(&step, 1));
    token = runtime::argmax(logits);
  }
  s.decode_tokens_per_s = decode_tokens / seconds_since(start);
  return s;
}

}  // namespace

void add_bench_command(CLI::App& app) {
  struct options {
    std::vector<std::string> models;
    int prompt_tokens = 512;
    int decode_tokens = 64;
    int threads = 0;
    int repeats = 2;
    std::size_t triad_mb = 0;
    std::string cluster;
    std::string transports;
    std::string key_file;
    bool json = false;
    bool bandwidth_only = false;
  };
  auto o = std::make_shared<options>();
  auto* cmd = app.add_subcommand("bench", "Prefill and decode speed against the memory roofline of this machine, or "
                                          "(--cluster) the cost of distributing a model over processes");
  auto* model_option =
      cmd->add_option("--model", o->models, "Checkpoint directory; repeat to compare models in one run (runs interleave)");
  auto* cluster_option = cmd->add_option(
      "--cluster", o->cluster,
      "Cluster config (YAML): decode in one process and on the config's nodes, started on this machine, in the same run");
  model_option->excludes(cluster_option);
  cmd->add_option("--transports", o->transports, "With --cluster: UCX transports, e.g. tcp")->needs(cluster_option);
  add_weights_key_option(*cmd, o->key_file);
  cmd->add_flag("--json", o->json, "One JSON object on stdout instead of the table");
  cmd->add_flag("--bandwidth-only", o->bandwidth_only,
                "Only the STREAM triad on 1 thread and on --threads threads (no model is loaded)")
      ->excludes(model_option)
      ->excludes(cluster_option);
  cmd->add_option("--prompt-tokens", o->prompt_tokens, "Prefill length")->capture_default_str()->check(CLI::Range(1, 1 << 16));
  cmd->add_option("--decode-tokens", o->decode_tokens, "Tokens decoded after the prompt")
      ->capture_default_str()->check(CLI::Range(1, 1 << 16));
  cmd->add_option("--threads", o->threads, "Threads for the multi-threaded rows (0: all cores)");
  cmd->add_option("--repeats", o->repeats, "Interleaved rounds per configuration (best is reported)")
      ->capture_default_str()->check(CLI::Range(1, 100));
  cmd->add_option("--triad-mb", o->triad_mb,
                  "Size of each triad array in MiB (0: 4 x the last-level cache, at least 256 MiB)")
      ->capture_default_str();
  cmd->callback([o, cmd] {
    if (!o->cluster.empty()) {
      // Short defaults: the point is the per-step messaging cost, not long-context speed.
      bench_cluster({.config = o->cluster,
                     .transports = o->transports,
                     .prompt_tokens = cmd->count("--prompt-tokens") ? o->prompt_tokens : 16,
                     .decode_tokens = cmd->count("--decode-tokens") ? o->decode_tokens : 32,
                     .json = o->json,
                     .key_file = o->key_file});
      return;
    }
    const int all = o->threads > 0 ? o->threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    std::vector<int> thread_counts = {1};
    if (all > 1) thread_counts.push_back(all);
    const std::size_t triad_bytes = o->triad_mb > 0 ? o->triad_mb << 20 : default_triad_bytes();
    if (o->bandwidth_only) {
      print_bandwidth(thread_counts, triad_bytes, o->json);
      return;
    }
    if (o->models.empty()) throw CLI::RequiredError("--model, --cluster or --bandwidth-only");
    std::vector<std::unique_ptr<runtime::model_weights>> weights;
    for (const auto& dir : o->models) {
      fmt::print(stderr, "[bench] loading {} into memory\n", dir);
      weights.push_back(runtime::model_weights::load(dir, {}, runtime::weight_residency::copy, {},
                                                     weights_key_from(o->key_file).get()));
    }
    std::mt19937 rng(1);
    struct row {
      std::string model;
      int threads;
      double bytes;
      speed best;
      double bandwidth_before = 0, bandwidth_after = 0;
      double flops = 0, gemm_gflops = 0, bf16_peak_gflops = 0;
    };
    std::vector<row> rows;
    for (int threads : thread_counts) {
      kernels::thread_pool pool(threads);
      fmt::print(stderr, "[bench] {} thread(s): measuring memory bandwidth\n", threads);
      const double before = triad_bandwidth(threads, triad_bytes);
      fmt::print(stderr, "[bench] {} thread(s): measuring the FP32 GEMM rate\n", threads);
      const double gemm = gemm_gflops(pool);
      fmt::print(stderr, "[bench] {} thread(s): measuring the BF16 multiply-add peak\n", threads);
      const double bf16_peak = bf16_peak_gflops(pool);
      std::vector<std::unique_ptr<runtime::model>> nets;
      std::vector<row> these;
      for (std::size_t m = 0; m < weights.size(); ++m) {
        nets.push_back(std::make_unique<runtime::model>(*weights[m], pool));
        these.push_back({o->models[m], threads, decode_bytes(*weights[m], o->prompt_tokens + o->decode_tokens / 2), {},
                         before, 0, prefill_flops(*weights[m], o->prompt_tokens), gemm, bf16_peak});
      }
      // A B A B: bandwidth drifts over minutes, so variants alternate instead of running in blocks.
      for (int round = 0; round < o->repeats; ++round)
        for (std::size_t m = 0; m < nets.size(); ++m) {
          std::vector<std::int32_t> prompt(o->prompt_tokens);
          for (auto& t : prompt) t = static_cast<std::int32_t>(rng() % weights[m]->config().vocab_size);
          fmt::print(stderr, "[bench] {} thread(s), round {}: {}\n", threads, round + 1, o->models[m]);
          const speed s = run_model(*nets[m], prompt, o->decode_tokens);
          these[m].best.prefill_tokens_per_s = std::max(these[m].best.prefill_tokens_per_s, s.prefill_tokens_per_s);
          these[m].best.decode_tokens_per_s = std::max(these[m].best.decode_tokens_per_s, s.decode_tokens_per_s);
        }
      const double after = triad_bandwidth(threads, triad_bytes);
      for (auto& r : these) {
        r.bandwidth_after = after;
        rows.push_back(r);
      }
    }
    if (o->json) {
      nlohmann::json out{{"prompt_tokens", o->prompt_tokens}, {"decode_tokens", o->decode_tokens}, {"rows", nlohmann::json::array()}};
      for (const auto& r : rows) {
        const double bandwidth = (r.bandwidth_before + r.bandwidth_after) / 2.0;
        out["rows"].push_back({{"model", r.model},
                               {"threads", r.threads},
                               {"prefill_tokens_per_s", r.best.prefill_tokens_per_s},
                               {"prefill_gflops", r.flops * r.best.prefill_tokens_per_s / o->prompt_tokens / 1e9},
                               {"gemm_gflops", r.gemm_gflops},
                               {"bf16_peak_gflops", r.bf16_peak_gflops},
                               {"decode_tokens_per_s", r.best.decode_tokens_per_s},
                               {"decode_bytes", r.bytes},
                               {"triad_gbps_before", r.bandwidth_before},
                               {"triad_gbps_after", r.bandwidth_after},
                               {"decode_roofline_tokens_per_s", bandwidth * 1e9 / r.bytes}});
      }
      fmt::print("{}\n", out.dump());
      return;
    }
    fmt::print("\nprefill {} tokens, decode {} tokens after it; decode roofline = triad bandwidth / bytes a decode "
               "step reads; prefill is compared with the FP32 GEMM rate (OpenBLAS) and the BF16 multiply-add peak "
               "(vdpbf16ps from registers) of the same run\n\n",
               o->prompt_tokens, o->decode_tokens);
    fmt::print("| model | threads | prefill tok/s | prefill GFLOP/s | GEMM GFLOP/s | % of GEMM | BF16 peak GFLOP/s | % of BF16 peak | decode tok/s | MB read "
               "per token | triad GB/s (before/after) | decode roofline tok/s | % of roofline |\n");
    fmt::print("|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for (const auto& r : rows) {
      const double bandwidth = (r.bandwidth_before + r.bandwidth_after) / 2.0;
      const double roofline = bandwidth * 1e9 / r.bytes;
      const double prefill_gflops = r.flops * r.best.prefill_tokens_per_s / o->prompt_tokens / 1e9;
      fmt::print("| {} | {} | {:.1f} | {:.1f} | {:.1f} | {:.0f}% | {:.1f} | {:.0f}% | {:.2f} | {:.1f} | {:.1f} / {:.1f} | "
                 "{:.2f} | {:.0f}% |\n",
                 r.model, r.threads, r.best.prefill_tokens_per_s, prefill_gflops, r.gemm_gflops,
                 100.0 * prefill_gflops / r.gemm_gflops, r.bf16_peak_gflops,
                 r.bf16_peak_gflops > 0 ? 100.0 * prefill_gflops / r.bf16_peak_gflops : 0.0,
                 r.best.decode_tokens_per_s, r.bytes / 1e6,
                 r.bandwidth_before, r.bandwidth_after, roofline, 100.0 * r.best.decode_tokens_per_s / roofline);
    }
    if (rows.size() >= 2 && weights.size() >= 2) {
      fmt::print("\nsame-run decode ratios against the first model:\n");
      for (const auto& r : rows)
        for (const auto& base : rows)
          if (base.threads == r.threads && base.model == o->models[0] && r.model != base.model)
            fmt::print("  {} threads: {} / {} = {:.2f}x\n", r.threads, r.model, base.model,
                       r.best.decode_tokens_per_s / base.best.decode_tokens_per_s);
    }
  });
}

}  // namespace shoal::tools
