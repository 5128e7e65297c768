#!/usr/bin/env bash
# Installs the Debian packages Shoal needs.
#   install-deps.sh run    to build and run shoal (what tools/quickstart.sh needs)
#   install-deps.sh test   that, plus what only the test suite and benchmarks need
# Idempotent: packages already present are left alone. Run as root (or with sudo available).
set -euo pipefail

purpose=${1:-test}
case "$purpose" in
  run | test) ;;
  *)
    echo "usage: $0 run|test" >&2
    exit 2
    ;;
esac

# Building and running shoal.
packages=(
  build-essential cmake ninja-build ccache pkg-config git
  libcaf-dev                      # actors (CAF 0.17)
  libucx-dev                      # transport
  capnproto libcapnp-dev          # wire schemas
  libboost-dev                    # Asio/Beast for the HTTP gateway
  libssl-dev                      # TLS, hashing
  libjwt-dev                      # JWT bearer tokens (signature checks; OpenSSL flavour)
  nlohmann-json3-dev              # JSON: config.json, safetensors headers, HTTP API
  libyaml-cpp-dev                 # cluster configs
  libpcre2-dev                    # tokenizer pre-tokenizer regexes (Unicode properties)
  libopenblas-dev                 # prefill GEMMs on the CPU
  libspdlog-dev libfmt-dev        # logging
  libcli11-dev                    # command line
  curl                            # the quick start's request to the server
)
if [ "$purpose" = test ]; then
  packages+=(
    catch2                        # tests (v2)
    python3-jinja2 python3-numpy  # chat-template cross-check against Jinja2; EPLB port (numpy)
    iproute2                      # network-namespace cluster tests
    openssl                       # test certificates and RSA keys, made at test time
    ucx-utils                     # ucx_perftest for the transport benchmark
    nodejs                        # the OpenAI Node SDK test of the HTTP gateway
    clang libclang-rt-14-dev      # the sanitizer build and libFuzzer targets of tools/test.sh
    prometheus                    # deploy/prometheus: its rules loaded by a real Prometheus scraping shoal serve
  )
  # npm comes inside NodeSource's nodejs but is a package of its own in Debian's.
  command -v npm >/dev/null 2>&1 || packages+=(npm)
fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#packages[@]} packages for '$purpose' already installed"
  exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
echo "install-deps: updating the package lists"
$SUDO apt-get update -q
echo "install-deps: installing ${missing[*]} (with what they depend on)"
# apt's own lines (Get:, Unpacking, Setting up) show progress; nothing is hidden.
$SUDO apt-get install -y --no-install-recommends -o Dpkg::Use-Pty=0 "${missing[@]}"
echo "install-deps: done"
