# Compares `shoal admin plan` with DeepSeek's EPLB (the NumPy port in eplb_reference.py) on
# generated expert loads: Zipf, lognormal, one very hot expert, uniform, and a skew that
# changes from layer to layer, each with a fixed seed, on DeepSeek-V3's shape (58 MoE layers x
# 256 experts in 8 groups) and a small one, under EPLB's group-per-node and global policies.
#
# Checks, for every layer of every input: Shoal's imbalance (heaviest device / mean device,
# an expert's load split evenly over its copies) is at most EPLB's; every expert has a copy;
# the slots are laid out as asked; the copies of each expert group are on no more nodes than
# EPLB puts them. And over all inputs Shoal is better on average. Exits 1 on a failed check.
#
# Usage: planner_vs_eplb.py --shoal PATH [--table]
#   --table: also print a Markdown table of the imbalances (docs/admin.md) and time one plan
#            of the largest input.
# Run with Debian's /usr/bin/python3 (python3-numpy).

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import eplb_reference  # noqa: E402

# (name, layers, experts, slots, nodes, gpus, groups)
CONFIGS = [
    ("v3-4x8", 58, 256, 320, 4, 32, 8),     # group per node: 2 groups per node, 10 slots per GPU
    ("v3-8x8", 58, 256, 320, 8, 64, 8),     # group per node: 1 group per node, 5 slots per GPU
    ("v3-global", 58, 256, 288, 3, 36, 8),  # 8 groups on 3 nodes: EPLB's global policy
    ("small", 8, 12, 16, 2, 8, 4),          # the shape of EPLB's README example
]


def zipf(rng, layers, experts, exponent=1.1):
    ranks = np.arange(1, experts + 1, dtype=np.float64)
    rows = [rng.permutation(1e6 / ranks ** exponent) for _ in range(layers)]
    return np.round(np.array(rows))


def lognormal(rng, layers, experts):
    return rng.lognormal(0.0, 1.0, size=(layers, experts)) * 1000.0


def hot(rng, layers, experts):
    loads = np.round(rng.lognormal(0.0, 0.3, size=(layers, experts)) * 1000.0)
    for layer in range(layers):
        loads[layer, rng.integers(experts)] *= 40.0
    return loads


def uniform(rng, layers, experts):
    return np.round(rng.uniform(900.0, 1100.0, size=(layers, experts)))


def skew(rng, layers, experts):
    # From near uniform in the first layer to steep Zipf in the last.
    ranks = np.arange(1, experts + 1, dtype=np.float64)
    rows = [rng.permutation(1e6 / ranks ** (2.0 * layer / max(layers - 1, 1))) for layer in range(layers)]
    return np.round(np.array(rows))


FAMILIES = [("zipf", zipf, 1), ("lognormal", lognormal, 2), ("hot", hot, 3), ("uniform", uniform, 4),
            ("skew", skew, 5)]


def imbalance(loads, slots, gpus):
    slots = np.asarray(slots)
    copies = np.bincount(slots, minlength=len(loads))
    per_slot = np.asarray(loads, dtype=np.float64)[slots] / copies[slots]
    devices = per_slot.reshape(gpus, -1).sum(-1)
    mean = devices.mean()
    return float(devices.max() / mean) if mean > 0 else 1.0


def nodes_per_group(slots, experts, nodes, groups):
    slots = np.asarray(slots)
    node_of_slot = np.arange(len(slots)) // (len(slots) // nodes)
    group_of_slot = slots // (experts // groups)
    return max(len(set(node_of_slot[group_of_slot == g])) for g in range(groups))


def run_shoal(shoal, path):
    proc = subprocess.run([shoal, "admin", "plan", "--loads", path, "--json"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"shoal admin plan failed ({proc.returncode}): {proc.stderr}")
    return json.loads(proc.stdout)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shoal", required=True)
    parser.add_argument("--table", action="store_true")
    args = parser.parse_args()
    if eplb_reference.self_test() != 0:
        return 1
    failures = []
    rows = []
    all_ours, all_eplb = [], []
    largest = None
    with tempfile.TemporaryDirectory() as tmp:
        for config, layers, experts, slots, nodes, gpus, groups in CONFIGS:
            for family, generate, seed in FAMILIES:
                loads = generate(np.random.default_rng(seed), layers, experts)
                spec = {"loads": loads.tolist(), "slots": slots, "nodes": nodes, "gpus": gpus, "groups": groups}
                path = os.path.join(tmp, f"{config}-{family}.json")
                with open(path, "w") as f:
                    json.dump(spec, f)
                if largest is None:
                    largest = path
                ours = run_shoal(args.shoal, path)
                eplb, _, _ = eplb_reference.rebalance_experts(loads, slots, groups, nodes, gpus)
                name = f"{config}/{family}"
                if len(ours["layers"]) != layers:
                    failures.append(f"{name}: {len(ours['layers'])} layers, expected {layers}")
                    continue
                ours_imb, eplb_imb = [], []
                for layer in range(layers):
                    plan = ours["layers"][layer]["slots"]
                    where = f"{name} layer {layer}"
                    if len(plan) != slots or min(plan) < 0 or max(plan) >= experts:
                        failures.append(f"{where}: {len(plan)} slots, ids {min(plan)}..{max(plan)}")
                        continue
                    if len(set(plan)) != experts:
                        failures.append(f"{where}: {experts - len(set(plan))} experts without a copy")
                    a = imbalance(loads[layer], plan, gpus)
                    b = imbalance(loads[layer], eplb[layer], gpus)
                    ours_imb.append(a)
                    eplb_imb.append(b)
                    if abs(a - ours["layers"][layer]["imbalance"]) > 1e-9 * a:
                        failures.append(f"{where}: reports imbalance {ours['layers'][layer]['imbalance']}, is {a}")
                    if a > b * (1 + 1e-12):
                        failures.append(f"{where}: imbalance {a:.6f} > EPLB's {b:.6f}")
                    ours_nodes = nodes_per_group(plan, experts, nodes, groups)
                    eplb_nodes = nodes_per_group(eplb[layer], experts, nodes, groups)
                    if ours_nodes > eplb_nodes:
                        failures.append(f"{where}: a group spans {ours_nodes} nodes, EPLB's {eplb_nodes}")
                rows.append((config, family, float(np.mean(eplb_imb)), float(np.mean(ours_imb)),
                             float(np.max(eplb_imb)), float(np.max(ours_imb)),
                             sum(a < b * (1 - 1e-9) for a, b in zip(ours_imb, eplb_imb)), layers))
                all_ours += ours_imb
                all_eplb += eplb_imb
        if np.mean(all_ours) >= np.mean(all_eplb):
            failures.append(f"not better on average: {np.mean(all_ours):.6f} vs EPLB's {np.mean(all_eplb):.6f}")
        if args.table:
            print("| shape | loads | EPLB mean | Shoal mean | EPLB worst | Shoal worst | layers better |")
            print("|---|---|---|---|---|---|---|")
            for config, family, em, om, ex, ox, better, layers in rows:
                print(f"| {config} | {family} | {em:.4f} | {om:.4f} | {ex:.4f} | {ox:.4f} | {better}/{layers} |")
            print(f"| all | all | {np.mean(all_eplb):.4f} | {np.mean(all_ours):.4f} | {np.max(all_eplb):.4f} "
                  f"| {np.max(all_ours):.4f} | {sum(r[6] for r in rows)}/{sum(r[7] for r in rows)} |")
            start = time.perf_counter()
            proc = subprocess.run([args.shoal, "admin", "plan", "--loads", largest], capture_output=True, text=True)
            wall = time.perf_counter() - start
            print(f"\n`shoal admin plan` on {os.path.basename(largest)}: {wall:.3f} s wall, process and JSON included; "
                  + proc.stdout.strip().splitlines()[-1])
    for failure in failures:
        print("FAIL " + failure)
    print(f"planner_vs_eplb: {len(rows)} inputs, {len(all_ours)} layers, mean imbalance Shoal {np.mean(all_ours):.4f}, "
          f"EPLB {np.mean(all_eplb):.4f}; {len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
