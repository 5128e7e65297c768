#!/usr/bin/env bash
# Soak test (not run in CI): mixed traffic for N minutes against `shoal serve --cluster` on the
# tiny model served by four node processes (the topology of config/examples/local-4.yaml: two
# pipeline stages, two expert nodes), then a SIGTERM drain. Reports requests by outcome, every
# 5xx other than the intended 503/429, and RSS and open descriptors of every process (the
# gateway and each node) at the start and at the end.
#
#   tools/bench/soak.sh [--minutes N] [--concurrency C] [--build-dir DIR] [--keep]
#
# Traffic, from C client threads (default 6) plus one burst thread (requests under way when
# the N minutes end are finished, which can add a minute): streamed and whole chat
# answers, completions, malformed requests (expected 400), clients that disconnect mid-stream,
# clients that read slowly, and bursts of more requests than the server queues (the excess is
# expected to get 429). The model (shoal make-model --preset tiny) and the cluster config are
# written under $SOAK_DIR (default: a new directory in /tmp, removed at the end unless --keep).
# Exit status: 0 when no unexpected 5xx, no failed valid request and a clean drain; 1 otherwise.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
minutes=10
concurrency=6
build="$root/build"
keep=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --minutes) minutes="$2"; shift 2 ;;
    --concurrency) concurrency="$2"; shift 2 ;;
    --build-dir) build="$2"; shift 2 ;;
    --keep) keep=1; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "soak.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
shoal="$build/tools/shoal"
[[ -x "$shoal" ]] || { echo "soak.sh: $shoal not found; build first (or pass --build-dir)" >&2; exit 2; }
# Debian's python3: the traffic needs nothing beyond its standard library.
python=/usr/bin/python3
[[ -x "$python" ]] || python="$(command -v python3)"

dir="${SOAK_DIR:-$(mktemp -d /tmp/shoal-soak-XXXXXX)}"
mkdir -p "$dir"
server_pid=""
cleanup() {
  if [[ -n "$server_pid" ]] && kill -0 "$server_pid" 2>/dev/null; then
    kill -KILL "$server_pid" 2>/dev/null || true
  fi
  [[ "$keep" == 1 ]] || rm -rf "$dir"
}
trap cleanup EXIT

if [[ ! -f "$dir/tiny/tokenizer.json" ]]; then
  "$shoal" make-model --preset tiny --out "$dir/tiny" >"$dir/make-model.log" 2>&1
fi
# Four free loopback ports, chosen by the kernel.
read -r -a ports <<<"$("$python" - <<'EOF'
import socket
socks = [socket.socket() for _ in range(4)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
)"
cat >"$dir/cluster.yaml" <<EOF
# Written by tools/bench/soak.sh: config/examples/local-4.yaml's topology for the tiny preset
# (4 layers, 16 routed experts).
model: $dir/tiny
threads: 1
ready_timeout_s: 120
nodes:
  - {name: stage0, host: 127.0.0.1, port: ${ports[0]}}
  - {name: stage1, host: 127.0.0.1, port: ${ports[1]}}
  - {name: experts0, host: 127.0.0.1, port: ${ports[2]}}
  - {name: experts1, host: 127.0.0.1, port: ${ports[3]}}
head: stage0
plan:
  stages:
    - {node: stage0, layers: 0-1}
    - {node: stage1, layers: 2-3}
  experts:
    - {node: experts0, experts: 0-7}
    - {node: experts1, experts: 8-15}
EOF

# A small queue (4 running + 8 waiting) so that the bursts reach the 429 limit.
"$shoal" serve --cluster "$dir/cluster.yaml" --transports tcp --port 0 --name tiny --max-running 4 \
  --max-waiting 8 --drain-seconds 30 >"$dir/serve.log" 2>&1 &
server_pid=$!
port=""
for _ in $(seq 1 600); do
  if grep -q "ready in" "$dir/serve.log" 2>/dev/null; then
    port="$(sed -n 's/.*listening on http:\/\/127\.0\.0\.1:\([0-9]*\).*/\1/p' "$dir/serve.log" | head -1)"
    break
  fi
  kill -0 "$server_pid" 2>/dev/null || break
  sleep 0.2
done
if [[ -z "$port" ]]; then
  echo "soak.sh: shoal serve did not get ready; its log:" >&2
  cat "$dir/serve.log" >&2
  exit 1
fi
echo "soak.sh: shoal serve --cluster (pid $server_pid) on port $port; $minutes min of traffic, $concurrency clients"

set +e
"$python" - "$port" "$minutes" "$concurrency" "$server_pid" <<'EOF'
import http.client, json, os, random, socket, sys, threading, time

port, minutes, concurrency, server_pid = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
deadline = time.monotonic() + minutes * 60
lock = threading.Lock()
outcomes = {}      # (scenario, outcome) -> count
unexpected = []    # descriptions of 5xx other than 503/429 and of failed valid requests
failed_valid = 0

def count(scenario, outcome, note=None):
    global failed_valid
    with lock:
        outcomes[(scenario, outcome)] = outcomes.get((scenario, outcome), 0) + 1
        if note:
            if len(unexpected) < 50:
                unexpected.append(f"{scenario}: {outcome}: {note}")
            if scenario in ("stream", "whole", "completion"):
                failed_valid += 1

def processes():
    # The gateway and the nodes it started (its children, of any thread).
    pids = [server_pid]
    for task in os.listdir(f"/proc/{server_pid}/task"):
        try:
            pids += [int(p) for p in open(f"/proc/{server_pid}/task/{task}/children").read().split()]
        except OSError:
            pass
    out = {}
    for pid in pids:
        try:
            cmd = open(f"/proc/{pid}/cmdline").read().split("\0")
            name = cmd[cmd.index("--name") + 1] if "--name" in cmd and "node" in cmd else "gateway"
            rss = next(int(l.split()[1]) for l in open(f"/proc/{pid}/status") if l.startswith("VmRSS:"))
            out[name] = (pid, rss, len(os.listdir(f"/proc/{pid}/fd")))
        except (OSError, StopIteration, ValueError):
            pass
    return out

def chat(stream, max_tokens):
    return json.dumps({"model": "tiny", "messages": [{"role": "user", "content": random.choice(
        ["Tell me about the sea.", "Hello!", "Write a poem about rust.", "What is 2+2?"])}],
        "max_tokens": max_tokens, "temperature": random.choice([0, 0.7]), "stream": stream})

def classify(scenario, status, body=""):
    if status >= 500 and status not in (503,):
        count(scenario, f"http {status}", body[:200])
    elif status == 429 or status == 503:
        count(scenario, f"http {status}")
    elif scenario == "malformed":
        count(scenario, f"http {status}", None if status == 400 else f"expected 400: {body[:200]}")
    else:
        count(scenario, f"http {status}", None if status == 200 else body[:200])

def post(scenario, path, body, timeout=120):
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        c.request("POST", path, body, {"Content-Type": "application/json"})
        r = c.getresponse()
        data = r.read().decode(errors="replace")
        c.close()
        if r.status == 200 and '"stream": true' in body:
            events = [l[6:] for l in data.split("\n") if l.startswith("data: {")]
            errors = [e for e in events if "error" in json.loads(e)]
            if not data.rstrip().endswith("data: [DONE]") or errors:
                return count(scenario, "stream broken", (errors[0] if errors else data[-300:])[:300])
        classify(scenario, r.status, data)
    except Exception as e:  # a reset or a timeout: never expected for a valid request
        count(scenario, "connection error", repr(e))

def raw_stream(rcvbuf=None):
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    # A stream may wait its turn in the queue; longer than this is reported as an error.
    s.settimeout(30)
    s.connect(("127.0.0.1", port))
    body = chat(True, 400)
    s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
    return s

def refused(got):
    # A complete status line other than 200 (429 when the queue is full): the answer is whole
    # and the connection stays open for another request, so stop reading.
    return b"\r\n" in got and not got.startswith(b"HTTP/1.1 200")

def disconnect():
    started = time.monotonic()
    try:
        s = raw_stream()
        got = b""
        while got.count(b"data: ") < random.randint(1, 10):
            chunk = s.recv(4096)
            if not chunk:
                break
            got += chunk
            if refused(got):
                break
        s.close()
        status = got[9:12].decode(errors="replace") if got.startswith(b"HTTP/1.1 ") else "none"
        count("disconnect", f"left mid-stream (status {status})" if status == "200" else f"http {status}")
    except Exception as e:
        count("disconnect", "connection error", f"{e!r} after {time.monotonic() - started:.1f} s")

def slow_reader():
    started = time.monotonic()
    got = b""
    try:
        s = raw_stream(rcvbuf=4096)
        end = time.monotonic() + random.uniform(2, 6)
        while time.monotonic() < end:
            chunk = s.recv(256)
            if not chunk:
                break
            got += chunk
            if refused(got):
                break
            time.sleep(0.2)
        s.close()
        status = got[9:12].decode(errors="replace") if got.startswith(b"HTTP/1.1 ") else "none"
        count("slow reader", "read slowly, then left" if status == "200" else f"http {status}")
    except Exception as e:
        count("slow reader", "connection error",
              f"{e!r} after {time.monotonic() - started:.1f} s, {len(got)} bytes received ({got[:12]!r})")

MALFORMED = ['{', '{"messages": 3}', '{"model":"tiny","messages":[{"role":"user","content":"x"}],"max_tokens":-1}',
             '{"model":"tiny","messages":[{"role":"user","content":"x"}],"temperature":"hot"}',
             '{"model":"tiny","prompt":"x","logprobs":3}', '[]', '{"model":"tiny","messages":[]}']

def client():
    while time.monotonic() < deadline:
        r = random.random()
        if r < 0.35:
            post("stream", "/v1/chat/completions", chat(True, random.randint(8, 48)))
        elif r < 0.55:
            post("whole", "/v1/chat/completions", chat(False, random.randint(4, 32)))
        elif r < 0.65:
            post("completion", "/v1/completions",
                 json.dumps({"model": "tiny", "prompt": "The sea", "max_tokens": random.randint(4, 24)}))
        elif r < 0.80:
            post("malformed", random.choice(["/v1/chat/completions", "/v1/completions"]), random.choice(MALFORMED))
        elif r < 0.90:
            disconnect()
        else:
            slow_reader()

def burst():
    # Every 20 s: 24 requests at once against 12 queue places: the excess must get 429.
    while time.monotonic() < deadline:
        threads = [threading.Thread(target=post, args=("burst", "/v1/chat/completions", chat(False, 16)))
                   for _ in range(24)]
        for t in threads: t.start()
        for t in threads: t.join()
        time.sleep(min(20, max(0, deadline - time.monotonic())))

# A little traffic first, so that "start" is measured warm.
for _ in range(3):
    post("warm-up", "/v1/chat/completions", chat(False, 4))
start = processes()
t0 = time.monotonic()
threads = [threading.Thread(target=client) for _ in range(concurrency)] + [threading.Thread(target=burst)]
for t in threads: t.start()
for t in threads: t.join()
elapsed = time.monotonic() - t0
time.sleep(2)  # let cancellations and closes settle
end = processes()

total = sum(outcomes.values())
print(f"\n{total} requests in {elapsed:.0f} s ({total / elapsed:.1f}/s), {concurrency} clients + 1 burst thread\n")
print("| scenario | outcome | requests |\n|---|---|---:|")
for (scenario, outcome), n in sorted(outcomes.items()):
    print(f"| {scenario} | {outcome} | {n} |")
print("\n| process | pid | RSS start (MiB) | RSS end (MiB) | fds start | fds end |\n|---|---:|---:|---:|---:|---:|")
for name in sorted(set(start) | set(end)):
    s, e = start.get(name, (0, 0, 0)), end.get(name, (0, 0, 0))
    print(f"| {name} | {e[0] or s[0]} | {s[1] / 1024:.1f} | {e[1] / 1024:.1f} | {s[2]} | {e[2]} |")
print()
if unexpected:
    print("unexpected (5xx other than 503/429, failed valid requests, malformed not answered 400):")
    for u in unexpected:
        print("  " + u)
else:
    print("no unexpected 5xx; every valid request answered 200 or, when over the limit, 429")
sys.exit(1 if unexpected else 0)
EOF
traffic=$?
set -e

kill -TERM "$server_pid"
drained=0
for _ in $(seq 1 600); do
  kill -0 "$server_pid" 2>/dev/null || { drained=1; break; }
  sleep 0.1
done
set +e
wait "$server_pid"
code=$?
set -e
server_pid=""
echo "drain: shoal serve exited $code after SIGTERM$([[ $drained == 1 ]] || echo ' (not within 60 s)')"
grep -E "slow|drain ran out|refused|internal error" "$dir/serve.log" | grep -v "POST\|GET" | tail -5 || true
[[ "$traffic" == 0 && "$code" == 0 && "$drained" == 1 ]]
