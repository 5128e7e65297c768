#!/usr/bin/env python3
"""PyTorch baselines for the Shoal CUDA kernels at DeepSeek-V3 shapes.

Runs on the GPU machine next to shoal_cuda_bench (same shapes; MoE uses the routing the Shoal
benchmark dumped with --dump, so both run the same expert choices). Prints the same columns:
time, TFLOP/s and GB/s, with ceilings measured in this process.

  python3 tools/bench/torch_baseline.py [--dump DIR] [--quick]
"""
import argparse
import os

import torch

HIDDEN, INTER, EXPERTS, TOP_K = 7168, 2048, 256, 8
HEADS, RANK, ROPE, NOPE, V_DIM = 128, 512, 64, 128, 128


def timed(fn, reps=10):
    """Median seconds of `reps` runs, each after overwriting a 256 MiB buffer (cold L2)."""
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    fn()
    times = []
    for r in range(reps):
        flush.fill_(r)
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) * 1e-3)
    times.sort()
    return times[len(times) // 2]


def row(kernel, shape, sec, flops, nbytes, ceil, peak):
    tflops, gbs = flops / sec * 1e-12, nbytes / sec * 1e-9
    print(f"| {kernel:<22} | {shape:<28} | {sec * 1e6:9.1f} | {tflops:8.1f} | "
          f"{100 * tflops / peak:6.1f}% | {gbs:7.0f} | {100 * gbs / ceil['read']:6.1f}% |")


def ceilings():
    n = 2 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    c = {"copy": 2 * n / timed(lambda: dst.copy_(src)) * 1e-9}
    f = src.view(torch.float32)
    c["read"] = n / timed(lambda: f.sum()) * 1e-9
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    c["bf16"] = 2 * 8192 ** 3 / timed(lambda: a @ b.t()) * 1e-12
    try:
        a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
        one = torch.ones((), device="cuda")
        c["fp8"] = 2 * 8192 ** 3 / timed(
            lambda: torch._scaled_mm(a8, b8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)) * 1e-12
    except Exception as e:  # older torch: no _scaled_mm
        print(f"fp8 ceiling unavailable: {e}")
        c["fp8"] = float("nan")
    return c


def routing(tokens, dump):
    path = os.path.join(dump, f"moe_indices_{tokens}.bin") if dump else None
    if path and os.path.exists(path):
        idx = torch.from_file(path, size=tokens * TOP_K, dtype=torch.int32).view(tokens, TOP_K)
        return idx.cuda().long(), "shoal routing"
    g = torch.Generator(device="cpu").manual_seed(tokens)
    return torch.stack([torch.randperm(EXPERTS, generator=g)[:TOP_K] for _ in range(tokens)]).cuda(), "random routing"


def bench_moe(ceil, quick, dump):
    w13 = torch.randn(EXPERTS, 2 * INTER, HIDDEN, device="cuda", dtype=torch.bfloat16) * 0.02
    w2 = torch.randn(EXPERTS, HIDDEN, INTER, device="cuda", dtype=torch.bfloat16) * 0.02
    for tokens in ([1, 64, 4096] if quick else [1, 8, 32, 64, 128, 256, 4096]):
        idx, source = routing(tokens, dump)
        x = torch.randn(tokens, HIDDEN, device="cuda", dtype=torch.bfloat16)
        weights = torch.rand(tokens, TOP_K, device="cuda")
        used = torch.unique(idx)
        flat = idx.flatten()
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=EXPERTS)
        xs = x[order // TOP_K]
        flops = 2 * tokens * TOP_K * 3 * HIDDEN * INTER
        nbytes = used.numel() * 3 * HIDDEN * INTER * 2 + tokens * HIDDEN * 2 * 3

        def loop():
            y = torch.zeros(tokens, HIDDEN, device="cuda", dtype=torch.float32)
            for e in used.tolist():
                tok, k = (idx == e).nonzero(as_tuple=True)
                h = x[tok] @ w13[e].t()
                a = torch.nn.functional.silu(h[:, :INTER]) * h[:, INTER:]
                y.index_add_(0, tok, (a @ w2[e].t()).float() * weights[tok, k, None])
            return y

        row("torch loop bf16", f"T={tokens} {source}", timed(loop, reps=5), flops, nbytes, ceil, ceil["bf16"])
        if hasattr(torch, "_grouped_mm"):
            offs = torch.cumsum(counts, 0).to(torch.int32)

            def grouped():
                h = torch._grouped_mm(xs, w13.transpose(1, 2), offs=offs)
                a = torch.nn.functional.silu(h[:, :INTER]) * h[:, INTER:]
                out = torch._grouped_mm(a, w2.transpose(1, 2), offs=offs)
                y = torch.zeros(tokens, HIDDEN, device="cuda", dtype=torch.float32)
                y.index_add_(0, order // TOP_K, out.float() * weights.flatten()[order, None])
                return y

            try:
                row("torch _grouped_mm bf16", f"T={tokens} {source}", timed(grouped), flops, nbytes, ceil, ceil["bf16"])
            except Exception as e:
                print(f"_grouped_mm failed at T={tokens}: {e}")


def bench_mla(ceil, quick):
    ctx = 4096
    for batch in ([1, 64] if quick else [1, 8, 32, 64, 128, 256]):
        cache = torch.randn(batch, ctx, RANK + ROPE, device="cuda", dtype=torch.bfloat16)
        q = torch.randn(batch, HEADS, RANK + ROPE, device="cuda", dtype=torch.bfloat16)

        def absorbed():
            s = torch.einsum("bhd,btd->bht", q, cache) * 0.1
            p = torch.softmax(s.float(), dim=-1).to(torch.bfloat16)
            return torch.einsum("bht,btc->bhc", p, cache[..., :RANK])

        flops = 2 * batch * HEADS * ctx * (2 * RANK + ROPE)
        nbytes = batch * ctx * (RANK + ROPE) * 2
        row("torch mla absorbed", f"B={batch} ctx={ctx}", timed(absorbed), flops, nbytes, ceil, ceil["bf16"])
        if batch <= 32:  # decompressed K/V: 128 heads x 4096 x 320 values per sequence
            k = torch.randn(batch, HEADS, ctx, NOPE + ROPE, device="cuda", dtype=torch.bfloat16)
            v = torch.randn(batch, HEADS, ctx, V_DIM, device="cuda", dtype=torch.bfloat16)
            qn = torch.randn(batch, HEADS, 1, NOPE + ROPE, device="cuda", dtype=torch.bfloat16)
            sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(qn, k, v)
            row("torch sdpa decompressed", f"B={batch} ctx={ctx}", timed(sdpa),
                2 * batch * HEADS * ctx * (NOPE + ROPE + V_DIM), (k.numel() + v.numel()) * 2, ceil, ceil["bf16"])
    # Prefill: causal SDPA on decompressed K/V of a 4k prompt.
    n = 4096
    q = torch.randn(1, HEADS, n, NOPE + ROPE, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, HEADS, n, NOPE + ROPE, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, HEADS, n, V_DIM, device="cuda", dtype=torch.bfloat16)
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    row("torch sdpa prefill", f"q={n} ctx={n} causal", timed(sdpa),
        2 * HEADS * n * (n + 1) / 2 * (NOPE + ROPE + V_DIM), (q.numel() + k.numel() + v.numel()) * 2, ceil, ceil["bf16"])


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dump", help="directory with shoal_cuda_bench --dump routing files")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name()} torch {torch.__version__}")
    ceil = ceilings()
    print(f"ceilings: d2d copy {ceil['copy']:.0f} GB/s | read {ceil['read']:.0f} GB/s | "
          f"bf16 8192^3 {ceil['bf16']:.0f} TFLOP/s | fp8 8192^3 {ceil['fp8']:.0f} TFLOP/s\n")
    print(f"| {'kernel':<22} | {'shape':<28} | {'time us':>9} | {'TFLOP/s':>8} | {'%peak':>7} | {'GB/s':>7} | {'%read':>7} |")
    bench_moe(ceil, args.quick, args.dump)
    bench_mla(ceil, args.quick)


if __name__ == "__main__":
    main()
