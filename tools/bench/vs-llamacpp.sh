#!/usr/bin/env bash
# Shoal against llama.cpp on the CPU, on the same weights, in the same minutes.
#
#   tools/bench/vs-llamacpp.sh [options] [LLAMACPP_SOURCE]
#
# LLAMACPP_SOURCE is a llama.cpp source tree or a bare git directory (a snapshot of
# github.com/ngxson/llama.cpp or ggml-org/llama.cpp); it may be left out once WORK holds a build.
#
# Steps (each skipped when its output is already in WORK):
#   1. build llama.cpp (CPU only, -march=native) with the shared baseline recipe
#      (build_llamacpp.sh of the llama.cpp harness);
#   2. write the bench-small checkpoint with `shoal make-model` (BF16, and FP8 unless --no-fp8);
#   3. convert that same BF16 directory with llama.cpp's convert_hf_to_gguf.py (through the
#      harness's convert.sh and its transformers shim) to BF16 and Q8_0 GGUFs;
#   4. ROUNDS times, alternating which side goes first: the harness's triad.c (built with
#      -march=native as its recipe says, and for the baseline x86-64 ISA as Shoal's triad is)
#      and `shoal bench --bandwidth-only` back to back, then `shoal bench` (BF16 and FP8 models)
#      and llama-bench (BF16 and Q8_0 GGUFs, weights in anonymous memory);
#   5. one table: best of the rounds per side, the same-run ratio, decode as a percentage of the
#      roofline (the faster triad.c build's bandwidth in the same round / bytes a decode token
#      reads), and the triads side by side.
#
# Options:
#   --work DIR        where everything goes (default $LLAMACPP_WORK, else /tmp/shoal-vs-llamacpp);
#                     needs about 20 GB; never inside the repository
#   --build-dir DIR   Shoal build holding tools/shoal (default $SHOAL_BUILD_DIR, else build/)
#   --harness DIR     llama.cpp baseline harness (default $LLAMACPP_HARNESS, else
#                     ../shared/baselines/llamacpp next to the repository)
#   --python PATH     python3 with numpy and torch for the converter (default: the first of
#                     python3, /usr/bin/python3 that imports both)
#   --rounds N        interleaved rounds (default 3)
#   --threads N       the multi-threaded column (default: all cores); 1 thread is always measured
#   --prompt N        prefill length (default 512)
#   --decode N        decode length (default 64); llama.cpp decodes at a context depth of the
#                     prompt length (llama-bench -d) when its llama-bench knows -d, as Shoal does
#   --no-fp8          BF16 only (no FP8 checkpoint, no Q8_0 GGUF)
#   --jobs N          compile jobs for llama.cpp (default 1; the build is niced)
#   -h, --help        this text
#
# Results (raw JSON per round, logs) stay in WORK/results/<UTC time>/; the table goes to stdout
# and to table.md there.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
die() { echo "vs-llamacpp.sh: $*" >&2; exit 2; }
say() { echo "[vs-llamacpp $(date -u +%H:%M:%S)] $*" >&2; }

work=${LLAMACPP_WORK:-/tmp/shoal-vs-llamacpp}
build=${SHOAL_BUILD_DIR:-$root/build}
harness=${LLAMACPP_HARNESS:-$root/../shared/baselines/llamacpp}
python=""
rounds=3
threads=$(nproc)
prompt=512
decode=64
fp8=1
jobs=1
source_in=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --work) work="$2"; shift 2 ;;
    --build-dir) build="$2"; shift 2 ;;
    --harness) harness="$2"; shift 2 ;;
    --python) python="$2"; shift 2 ;;
    --rounds) rounds="$2"; shift 2 ;;
    --threads) threads="$2"; shift 2 ;;
    --prompt) prompt="$2"; shift 2 ;;
    --decode) decode="$2"; shift 2 ;;
    --no-fp8) fp8=0; shift ;;
    --jobs) jobs="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) [[ -z "$source_in" ]] || die "only one LLAMACPP_SOURCE may be given"; source_in="$1"; shift ;;
  esac
done
for n in rounds threads prompt decode jobs; do
  [[ "${!n}" =~ ^[1-9][0-9]*$ ]] || die "--$n takes a positive integer, not '${!n}'"
done

# --- inputs ----------------------------------------------------------------------------------
shoal="$build/tools/shoal"
[[ -x "$shoal" ]] || die "$shoal not found: build Shoal first (cmake --build build) or pass --build-dir"
harness=$(cd "$harness" 2>/dev/null && pwd) || die "llama.cpp harness not found at $harness (pass --harness)"
for f in build_llamacpp.sh convert.sh triad.c gguf_decode_bytes.py shim/convert_hf_to_gguf_shim.py; do
  [[ -e "$harness/$f" ]] || die "the harness $harness lacks $f"
done
work=$(realpath -m "$work")
case "$work/" in "$root"/*) die "--work $work is inside the repository; give a directory outside it" ;; esac
mkdir -p "$work" || die "cannot create the work directory $work"
if [[ -z "$python" ]]; then
  for p in python3 /usr/bin/python3; do
    if command -v "$p" >/dev/null && "$p" -c 'import numpy, torch' 2>/dev/null; then python=$(command -v "$p"); break; fi
  done
  [[ -n "$python" ]] || die "no python3 imports numpy and torch (Debian: apt-get install python3-numpy python3-torch python3-yaml python3-sentencepiece), or pass --python"
else
  "$python" -c 'import numpy, torch' 2>/dev/null || die "$python cannot import numpy and torch"
fi
command -v gcc >/dev/null || die "gcc is needed to build the harness's triad.c"

llama="$work/llamacpp"
bin="$llama/build/bin"
if [[ -n "$source_in" ]]; then
  [[ -e "$source_in" ]] || die "LLAMACPP_SOURCE $source_in does not exist"
  if [[ -f "$source_in/CMakeLists.txt" ]]; then
    want=$(git -C "$source_in" rev-parse HEAD 2>/dev/null || cat "$source_in/COMMIT" 2>/dev/null || echo unknown)
  elif want=$(git --git-dir="$source_in" rev-parse HEAD 2>/dev/null); then :
  else die "$source_in is neither a llama.cpp source tree nor a bare git directory"
  fi
  if [[ -f "$llama/COMMIT" && "$want" != unknown && "$(cat "$llama/COMMIT")" != "$want" ]]; then
    die "$llama holds llama.cpp $(cat "$llama/COMMIT"), not $want: remove it or use another --work"
  fi
elif [[ ! -x "$bin/llama-bench" ]]; then
  die "no llama.cpp build in $llama: give a llama.cpp source tree or bare git directory (see --help)"
fi

# --- 1. llama.cpp --------------------------------------------------------------------------------
if [[ ! -x "$bin/llama-bench" || ! -x "$bin/llama-quantize" ]]; then
  say "building llama.cpp into $llama ($jobs job(s); about 8 min on 2 cores with 2 jobs; log: $llama/build.log)"
  mkdir -p "$llama"
  if ! JOBS=$jobs TARGETS="llama-bench llama-quantize" nice -n 10 "$harness/build_llamacpp.sh" "$llama" "$source_in" \
      >"$llama/build.log" 2>&1; then
    tail -30 "$llama/build.log" >&2
    die "the llama.cpp build failed (whole log: $llama/build.log)"
  fi
fi
commit=$(cat "$llama/COMMIT" 2>/dev/null || echo unknown)
say "llama.cpp $commit in $bin"

# --- 2. checkpoints --------------------------------------------------------------------------------
models="$work/models"
mkdir -p "$models"
make_model() {  # make_model NAME [--fp8]
  local name=$1; shift
  # The stamp is written only after make-model succeeded: a half-written directory is redone.
  if [[ -f "$models/$name.done" ]]; then return; fi
  say "shoal make-model --preset bench-small $* --out $models/$name (about 1 min, 3-6 GB)"
  rm -rf "${models:?}/$name"
  "$shoal" make-model --preset bench-small "$@" --out "$models/$name" >"$models/$name.log" 2>&1 ||
    { tail -20 "$models/$name.log" >&2; die "make-model failed (log: $models/$name.log)"; }
  touch "$models/$name.done"
}
make_model bench-small
[[ $fp8 == 1 ]] && make_model bench-small-fp8 --fp8

# --- 3. GGUF -----------------------------------------------------------------------------------------
gguf="$work/gguf"
mkdir -p "$gguf"
if [[ ! -f "$gguf/bench-small.done" ]]; then
  say "converting $models/bench-small with llama.cpp's convert_hf_to_gguf.py (BF16 about 2 min, Q8_0 about 30 s; log: $gguf/convert.log)"
  if ! LLAMACPP_SRC="$llama/src" LLAMA_BIN_DIR="$bin" PYTHON="$python" FORCE=1 \
      "$harness/convert.sh" "$models/bench-small" "$gguf" >"$gguf/convert.log" 2>&1; then
    tail -30 "$gguf/convert.log" >&2
    die "conversion failed (whole log: $gguf/convert.log)"
  fi
  touch "$gguf/bench-small.done"
fi
bf16_gguf="$gguf/bench-small-BF16.gguf"
q8_gguf="$gguf/bench-small-Q8_0.gguf"
gguf_bytes() {
  LLAMACPP_SRC="$llama/src" "$python" "$harness/gguf_decode_bytes.py" "$1" |
    sed -n 's/^decode bytes\/token: \([0-9,]*\).*/\1/p' | tr -d ,
}
bf16_bytes=$(gguf_bytes "$bf16_gguf")
q8_bytes=$(gguf_bytes "$q8_gguf")

# --- 4. interleaved rounds -----------------------------------------------------------------------------
# triad.c twice: as the harness's recipe builds it (-march=native), and for the baseline x86-64
# ISA that Shoal's own triad is compiled for. On AVX-512 CPUs the two can differ by 15% (the
# native build measured 15% lower on the EPYC these figures come from), so the roofline is the
# faster of the two in each round: the bandwidth the memory was seen to deliver.
triad="$work/triad"
triad_baseline="$work/triad-baseline"
if [[ ! -x "$triad" || "$harness/triad.c" -nt "$triad" ]]; then
  gcc -O3 -march=native -fopenmp "$harness/triad.c" -o "$triad" || die "cannot build $harness/triad.c"
fi
if [[ ! -x "$triad_baseline" || "$harness/triad.c" -nt "$triad_baseline" ]]; then
  gcc -O3 -fopenmp "$harness/triad.c" -o "$triad_baseline" || die "cannot build $harness/triad.c"
fi
results="$work/results/$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$results"
shoal_models=(--model "$models/bench-small")
llama_models=(-m "$bf16_gguf")
if [[ $fp8 == 1 ]]; then
  shoal_models+=(--model "$models/bench-small-fp8")
  llama_models+=(-m "$q8_gguf")
fi
thread_list=1
[[ $threads -gt 1 ]] && thread_list="1,$threads"
llama_load=(--load-mode none)
"$bin/llama-bench" --help 2>&1 | grep -q -- '--load-mode' || llama_load=(-mmp 0)
llama_depth=()
"$bin/llama-bench" --help 2>&1 | grep -qE -- '(^| )-d,' && llama_depth=(-d "0,$prompt")

run_triads() {  # run_triads ROUND: the two yardsticks back to back, order alternating
  local r=$1
  if (( r % 2 )); then
    "$triad" 0 "$thread_list" >"$results/triad-$r.txt"
    "$triad_baseline" 0 "$thread_list" >"$results/triad-baseline-$r.txt"
    "$shoal" bench --bandwidth-only --threads "$threads" --json >"$results/shoal-triad-$r.json"
  else
    "$shoal" bench --bandwidth-only --threads "$threads" --json >"$results/shoal-triad-$r.json"
    "$triad_baseline" 0 "$thread_list" >"$results/triad-baseline-$r.txt"
    "$triad" 0 "$thread_list" >"$results/triad-$r.txt"
  fi
}
run_shoal() {
  "$shoal" bench "${shoal_models[@]}" --threads "$threads" --repeats 1 --prompt-tokens "$prompt" \
    --decode-tokens "$decode" --json >"$results/shoal-$1.json" 2>"$results/shoal-$1.log" ||
    { tail -20 "$results/shoal-$1.log" >&2; die "shoal bench failed (log: $results/shoal-$1.log)"; }
}
run_llama() {
  # Prefill from an empty context; decode after a prompt-long context, as Shoal measures both.
  "$bin/llama-bench" "${llama_models[@]}" -t "$thread_list" -r 1 "${llama_load[@]}" -p "$prompt" -n 0 -o json \
    >"$results/llama-pp-$1.json" 2>"$results/llama-$1.log" ||
    { tail -20 "$results/llama-$1.log" >&2; die "llama-bench failed (log: $results/llama-$1.log)"; }
  local depth=()
  [[ ${#llama_depth[@]} -gt 0 ]] && depth=(-d "$prompt")
  "$bin/llama-bench" "${llama_models[@]}" -t "$thread_list" -r 1 "${llama_load[@]}" -p 0 -n "$decode" "${depth[@]}" \
    -o json >"$results/llama-tg-$1.json" 2>>"$results/llama-$1.log" ||
    { tail -20 "$results/llama-$1.log" >&2; die "llama-bench failed (log: $results/llama-$1.log)"; }
}

{
  echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "shoal: $shoal, checkout $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$root" diff --quiet 2>/dev/null || echo ' (with local changes)')"
  echo "llama.cpp: $commit"
  echo "cpu: $(sed -n 's/^model name[^:]*: //p' /proc/cpuinfo | head -1), $(nproc) cores"
} >"$results/info.txt"
say "results go to $results; load average $(cut -d' ' -f1-3 /proc/loadavg)"
for (( r = 1; r <= rounds; ++r )); do
  cut -d' ' -f1 /proc/loadavg >"$results/load-$r.txt"
  say "round $r/$rounds: triad.c and shoal's triad"
  run_triads "$r"
  if (( r % 2 )); then
    say "round $r/$rounds: shoal bench (about 1-2 min)"; run_shoal "$r"
    say "round $r/$rounds: llama-bench (about 2-3 min)"; run_llama "$r"
  else
    say "round $r/$rounds: llama-bench (about 2-3 min)"; run_llama "$r"
    say "round $r/$rounds: shoal bench (about 1-2 min)"; run_shoal "$r"
  fi
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$results/info.txt"

# --- 5. the table -------------------------------------------------------------------------------------------
python3 - "$results" "$rounds" "$fp8" "$bf16_bytes" "$q8_bytes" "$prompt" "$decode" "$threads" \
  <<'EOF' | tee "$results/table.md"
import json, os, re, sys
res, rounds, fp8, bf16_bytes, q8_bytes, prompt, decode, threads = sys.argv[1:9]
rounds, fp8, prompt, decode, threads = int(rounds), fp8 == "1", int(prompt), int(decode), int(threads)
gguf_bytes = {"bf16": int(bf16_bytes), "q8": int(q8_bytes)}

def triad_c(r, build="triad"):  # threads -> (triad GB/s, read-only GB/s)
    out = {}
    for line in open(f"{res}/{build}-{r}.txt"):
        m = re.match(r"\s*(\d+)\s+([\d.]+)\s+([\d.]+)", line)
        if m: out[int(m.group(1))] = (float(m.group(2)), float(m.group(3)))
    return out

def shoal_triad(r):
    return {row["threads"]: row["triad_gbps"] for row in json.load(open(f"{res}/shoal-triad-{r}.json"))["rows"]}

def llama(r, kind):
    out = {}
    for row in json.load(open(f"{res}/llama-{kind}-{r}.json")):
        key = "q8" if os.path.basename(row["model_filename"]).endswith("-Q8_0.gguf") else "bf16"
        out[(key, row["n_threads"])] = row["avg_ts"]
    return out

pairs = [("bf16", "BF16", "BF16")] + ([("q8", "FP8 (block 128x128)", "Q8_0")] if fp8 else [])
tcounts = [1] + ([threads] if threads > 1 else [])
best = {}
per_round = {}
shoal_bytes = {}
triads = []
for r in range(1, rounds + 1):
    tc, tb, ts = triad_c(r), triad_c(r, "triad-baseline"), shoal_triad(r)
    triads.append((r, tc, tb, ts))
    srows = json.load(open(f"{res}/shoal-{r}.json"))["rows"]
    pp, tg = llama(r, "pp"), llama(r, "tg")
    for key, _, _ in pairs:
        for t in tcounts:
            fp8_row = lambda x: os.path.basename(x["model"].rstrip("/")) == "bench-small-fp8"
            row = next(x for x in srows if x["threads"] == t and fp8_row(x) == (key == "q8"))
            shoal_bytes[key] = row["decode_bytes"]
            vals = {"s_pp": row["prefill_tokens_per_s"], "s_tg": row["decode_tokens_per_s"],
                    "l_pp": pp[(key, t)], "l_tg": tg[(key, t)],
                    "bw": max(tc.get(t, (0.0, 0.0))[0], tb.get(t, (0.0, 0.0))[0])}
            per_round.setdefault((key, t), []).append(vals)
            b = best.setdefault((key, t), {k: 0.0 for k in vals})
            for k, v in vals.items(): b[k] = max(b[k], v)

info = open(f"{res}/info.txt").read().strip().splitlines()
print("\n".join(f"- {line}" for line in info))
print(f"- prefill {prompt} tokens from an empty context; decode {decode} tokens after a {prompt}-token context"
      f" (llama.cpp: llama-bench -p {prompt} -n 0, then -p 0 -n {decode} -d {prompt}); {rounds} round(s), sides alternating"
      " which goes first; best of the rounds; weights in anonymous memory on both sides")
print(f"- decode bytes per token: Shoal BF16 {shoal_bytes['bf16']/1e6:.1f} MB"
      + (f", Shoal FP8 {shoal_bytes['q8']/1e6:.1f} MB" if fp8 else "")
      + f"; llama.cpp BF16 {gguf_bytes['bf16']/1e6:.1f} MB" + (f", Q8_0 {gguf_bytes['q8']/1e6:.1f} MB" if fp8 else "")
      + " (roofline = the faster triad.c build's triad GB/s of the same round / these bytes; the best decode is set"
      " against its round's triad)")
print()
print("| weights (Shoal / llama.cpp) | threads | prefill Shoal | prefill llama.cpp | ratio (range over rounds) "
      "| decode Shoal | decode llama.cpp | ratio (range over rounds) | decode % of roofline, Shoal / llama.cpp |")
print("|---|---|---|---|---|---|---|---|---|")
for key, sname, lname in pairs:
    for t in tcounts:
        b, rs = best[(key, t)], per_round[(key, t)]
        pr = [x["s_pp"] / x["l_pp"] for x in rs]
        dr = [x["s_tg"] / x["l_tg"] for x in rs]
        def roof(side, nbytes):
            i = max(range(len(rs)), key=lambda i: rs[i][side])
            return 100.0 * rs[i][side] / (rs[i]["bw"] * 1e9 / nbytes) if rs[i]["bw"] else float("nan")
        print(f"| {sname} / {lname} | {t} | {b['s_pp']:.1f} | {b['l_pp']:.1f} | {b['s_pp']/b['l_pp']:.2f}x "
              f"({min(pr):.2f}-{max(pr):.2f}) | {b['s_tg']:.2f} | {b['l_tg']:.2f} | {b['s_tg']/b['l_tg']:.2f}x "
              f"({min(dr):.2f}-{max(dr):.2f}) | {roof('s_tg', shoal_bytes[key]):.0f}% / {roof('l_tg', gguf_bytes[key]):.0f}% |")
print()
print("Bandwidth yardsticks, back to back in each round (GB/s): STREAM triad of triad.c built with -march=native"
      " (the harness's recipe) and for the baseline x86-64 ISA (as Shoal's triad is), triad.c's read-only sum"
      " (decode reads its weights only), and `shoal bench --bandwidth-only`:")
print()
print("| round | load average at its start | threads | triad.c native | triad.c baseline | read-only native / baseline"
      " | shoal triad | shoal / triad.c native | shoal / triad.c baseline |")
print("|---|---|---|---|---|---|---|---|---|")
for r, tc, tb, ts in triads:
    load = open(f"{res}/load-{r}.txt").read().strip()
    for t in tcounts:
        if t in tc and t in tb and t in ts:
            print(f"| {r} | {load} | {t} | {tc[t][0]:.1f} | {tb[t][0]:.1f} | {tc[t][1]:.1f} / {tb[t][1]:.1f} | {ts[t]:.1f}"
                  f" | {ts[t]/tc[t][0]:.2f} | {ts[t]/tb[t][0]:.2f} |")
print()
print("On a machine with other work running (load average above its core count), the 2-thread rows and the"
      " percentages of the roofline say little: read the ranges over rounds.")
EOF
say "done: $results/table.md"
