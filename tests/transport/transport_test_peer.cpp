// A peer process for the transport tests: connects to a node and echoes every message back
// with its bulk buffers and a checksum of them, so integrity is checked in both directions
// across a process boundary. The tests also SIGKILL it to play a peer that dies.
//
// Usage: transport_test_peer PORT TRANSPORTS

#include "shoal/transport/node.hpp"

#include <fmt/core.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>

namespace tp = shoal::transport;

namespace {
std::uint64_t fnv1a(std::span<const std::byte> bytes, std::uint64_t hash) {
  for (std::byte b : bytes) {
    hash ^= static_cast<std::uint8_t>(b);
    hash *= 1099511628211ull;
  }
  return hash;
}
}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s PORT TRANSPORTS\n", argv[0]);
    return 2;
  }
  std::atomic<bool> done{false};
  tp::node* self = nullptr;
  tp::node_callbacks callbacks;
  callbacks.on_message = [&](tp::peer_id peer, tp::incoming_message in) {
    tp::outgoing_message out;
    auto env = out.envelope();
    env.setRequestId(in.envelope().getRequestId());
    std::uint64_t hash = 14695981039346656037ull;
    for (std::size_t i = 0; i < in.bulk_count(); ++i) {
      hash = fnv1a(in.bulk(i), hash);
      out.attach(tp::make_bulk_view(in.take_bulk(i)));
    }
    env.setBatchId(hash);
    env.getBody().initHeartbeat().setSequence(in.envelope().getBody().getHeartbeat().getSequence());
    self->send(peer, std::move(out));
  };
  callbacks.on_peer_failed = [&](tp::peer_id, const shoal::error&) { done = true; };
  callbacks.on_peer_closed = [&](tp::peer_id) { done = true; };
  try {
    tp::node_options options;
    options.name = "test-peer";
    options.listen_host.clear();
    options.transports = argv[2];
    tp::node node(options, callbacks);
    self = &node;
    node.connect("127.0.0.1", static_cast<std::uint16_t>(std::atoi(argv[1])));
    // Bounded: the parent test finishes (or kills us) well within this.
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
    while (!done && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    node.stop();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "transport_test_peer: %s\n", e.what());
    return 1;
  }
  return 0;
}
