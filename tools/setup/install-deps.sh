#!/usr/bin/env bash
# Installs every Debian package Shoal needs to build, test and benchmark.
# Idempotent: packages already present are left alone. Run as root (or with sudo available).
set -euo pipefail

packages=(
  build-essential cmake ninja-build ccache pkg-config git
  libcaf-dev                      # actors (CAF 0.17)
  libucx-dev ucx-utils            # transport; ucx_perftest for the transport benchmark
  capnproto libcapnp-dev          # wire schemas
  libboost-dev                    # Asio/Beast for the HTTP gateway
  catch2                          # tests (v2)
  libssl-dev                      # TLS, hashing
  nlohmann-json3-dev              # JSON: config.json, safetensors headers, HTTP API
  libyaml-cpp-dev                 # cluster configs
  libpcre2-dev                    # tokenizer pre-tokenizer regexes (Unicode properties)
  libopenblas-dev                 # prefill GEMMs on the CPU
  libspdlog-dev libfmt-dev        # logging
  libcli11-dev                    # command line
  python3-jinja2 python3-numpy    # chat-template cross-check in tests
  iproute2                        # network-namespace cluster tests
  curl
  nodejs                          # the OpenAI Node SDK test of the HTTP gateway
)
# npm comes inside NodeSource's nodejs but is a package of its own in Debian's.
command -v npm >/dev/null 2>&1 || packages+=(npm)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#packages[@]} packages already installed"
  exit 0
fi
echo "install-deps: installing ${missing[*]}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
