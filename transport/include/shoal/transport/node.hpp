#pragma once
/// \file
/// `node`: one per process. Owns the UCX context and worker, a listener on host:port, the
/// endpoints to peers and a progress thread; delivers decoded envelopes with their bulk buffers
/// and reports failed peers through callbacks.
///
/// Wire protocol (private to this library): a connection starts with a hello in each direction
/// (node name, schema version and a fresh random nonce; another version is refused). With a
/// join secret the dialer then proves that it holds the secret, and the listener proves it
/// back: each sends HMAC-SHA256(secret, direction, the other's nonce, its own nonce, both
/// names). No message of a peer is delivered before both proofs passed; a peer that fails is
/// refused, logged and counted (`node_stats::peers_refused`). Each message is one UCX active
/// message carrying the Cap'n Proto envelope, followed by one active message per bulk buffer.
/// Bulk buffers up to `node_options::eager_bulk_max` go eagerly to peers whose active-message
/// lane is shared memory; other large ones go by rendezvous (zero-copy over RDMA and shared
/// memory where the transport supports it). The receiver assembles each envelope with its
/// buffers and delivers messages of one peer in the order that peer sent them.
///
/// Threading:
///  - All UCX calls happen on the node's progress thread; the worker runs in single-thread mode.
///  - `connect`, `send`, `disconnect`, `peer_name`, `in_flight` and `stop` are thread-safe.
///    `send` only queues and wakes the progress thread (called from a callback it skips the
///    queue). Messages sent to one peer from one thread arrive in that order.
///  - Callbacks run on the progress thread, one at a time. They must not block (hand the message
///    to an actor and return); they may call `send` and `disconnect`, but not `connect` or
///    `stop`. An exception escaping a callback is logged and swallowed.
///  - The progress thread spins briefly after activity, then sleeps on the worker's event fd.
///
/// Failures: endpoints use UCX peer error handling; a peer whose process dies or whose link
/// drops is reported once through `on_peer_failed` and forgotten (its `peer_id` is never reused).
/// A peer that sends malformed bytes is treated as failed too (`errc::invalid_argument`).

#include <shoal/base/error.hpp>
#include <shoal/transport/codec.hpp>
#include <shoal/transport/message.hpp>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <filesystem>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace shoal::transport {

/// The bytes of a join secret file, trailing whitespace dropped. Refuses (naming the file)
/// one that cannot be read (`not_found`), that users other than its owner may read or write
/// (`failed_precondition`: chmod 600), that is empty or shorter than 32 bytes
/// (`invalid_argument`).
std::string read_join_secret(const std::filesystem::path& file);

/// A connection to another node, local to this node; never reused within a node's life.
using peer_id = std::uint64_t;

/// How a node starts.
struct node_options {
  /// Name announced to peers in the hello (the node name from the cluster config).
  std::string name = "node";
  /// Address to listen on; empty means do not listen (a pure client).
  std::string listen_host = "127.0.0.1";
  /// Port to listen on; 0 picks a free one (see `node::port()`).
  std::uint16_t listen_port = 0;
  /// Hosts of the peers this node will dial (the cluster config's nodes, a client's heads).
  /// UCX's network transports then use only the interfaces this machine's routing table takes
  /// toward them, plus the one holding `listen_host` (and every RDMA port), unless
  /// UCX_NET_DEVICES is set. By default UCX opens a lane on every interface and tells peers to
  /// reach it at each interface's address: a `docker0` bridge with the same address on every
  /// host then sends lanes to the wrong machine, and an interface that comes and goes (a
  /// container's veth) carries lanes that fail. Peers on loopback keep it all on `lo`.
  std::vector<std::string> peer_hosts;
  /// UCX transports (the value of UCX_TLS, e.g. "tcp" or "sm,self,tcp"); empty keeps UCX's
  /// default or the UCX_TLS environment variable.
  std::string transports;
  /// How long `connect` waits for the peer's hello.
  std::chrono::milliseconds connect_timeout{10000};
  /// How long the progress thread keeps polling UCX after the last activity before it sleeps
  /// on the worker's event fd: a reply that comes within this window is seen without a
  /// wakeup (which costs 8-40 us more per message on a 2-vCPU VM). It spins only after
  /// activity, so an idle node costs no CPU. 0: sleep as soon as there is nothing to do. The
  /// environment variable SHOAL_TRANSPORT_SPIN_US, when set, overrides it.
  std::chrono::microseconds spin{50};
  /// Bulk buffers up to this many bytes go eagerly to peers whose active-message lane is
  /// shared memory: through UCX's shared-memory FIFO, assembled in UCX memory on the receiver
  /// and handed over without a further copy. Larger buffers, and all buffers to other peers,
  /// go by rendezvous, which the receiver paces and which is zero-copy where the transport
  /// supports it. 0: always rendezvous.
  std::size_t eager_bulk_max = std::size_t{8} << 20;
  /// Whether the progress thread yields its core while spinning (kinder to other threads on
  /// an oversubscribed machine; costs throughput when cores are free).
  bool spin_yield = true;
  /// Limits applied to every received envelope.
  decode_limits limits;
  /// The cluster's shared secret (see `read_join_secret`). Non-empty: every connection, in
  /// both directions, must prove it holds the same secret before any message is delivered.
  /// Empty: no proof is asked for, and a listener that asks for one is refused (this node
  /// could not tell it from an impostor).
  std::string join_secret;
};

/// What a node reports. Every callback may be empty. All run on the progress thread.
struct node_callbacks {
  /// A connection finished its hello (both for `connect` and for accepted connections).
  std::function<void(peer_id peer, const std::string& peer_name)> on_peer_connected;
  /// A complete message (envelope plus all its bulk buffers) from `peer`.
  std::function<void(peer_id peer, incoming_message message)> on_message;
  /// `peer` failed (process died, link dropped, protocol violation); `reason.code()` is
  /// `unavailable` for lost peers and `invalid_argument` for malformed traffic.
  std::function<void(peer_id peer, const error& reason)> on_peer_failed;
  /// `peer` closed the connection in an orderly way (`disconnect` or node destruction).
  std::function<void(peer_id peer)> on_peer_closed;
};

/// Counters since the node started; read with `node::stats()`.
struct node_stats {
  std::uint64_t messages_sent = 0;      ///< Envelopes whose sends completed.
  std::uint64_t messages_received = 0;  ///< Envelopes delivered to `on_message`.
  std::uint64_t bulk_bytes_sent = 0;    ///< Bulk payload bytes whose sends completed.
  std::uint64_t bulk_bytes_received = 0;///< Bulk payload bytes delivered.
  /// Bulk buffers whose sends completed that went eagerly (see `node_options::eager_bulk_max`).
  std::uint64_t bulk_sent_eager = 0;
  std::uint64_t messages_rejected = 0;  ///< Malformed messages that failed their peer.
  /// Connections refused because the other end did not prove it holds the join secret
  /// (a peer dialing in without it or with another one, or a listener dialed out to).
  std::uint64_t peers_refused = 0;
};

/// One per process: see the file comment for the threading and failure model.
class node {
 public:
  /// Creates the UCX context and worker, starts listening (unless `listen_host` is empty) and
  /// starts the progress thread. Throws `error(unavailable)` when UCX cannot start or the
  /// address cannot be bound, `error(invalid_argument)` for a bad address.
  node(node_options options, node_callbacks callbacks);
  /// Stops (see `stop`).
  ~node();
  node(const node&) = delete;
  node& operator=(const node&) = delete;

  /// The name given in the options.
  const std::string& name() const noexcept;
  /// The port the listener is bound to (0 when not listening).
  std::uint16_t port() const noexcept;

  /// Connects to a node listening on host:port and waits for its hello. Thread-safe; must not
  /// be called from a callback. Throws `error(unavailable)` when the peer cannot be reached
  /// within `connect_timeout`, `error(failed_precondition)` when it speaks another schema
  /// version or either end refused the other's join secret, `error(invalid_argument)` for a
  /// bad address.
  peer_id connect(std::string_view host, std::uint16_t port);

  /// Queues `message` for `peer` and returns at once. Bulk buffers are read in place and their
  /// owners released when the send completes. Throws `error(unavailable)` when `peer` is not
  /// connected (unknown, failed or closed); failures after queueing are reported through
  /// `on_peer_failed`.
  void send(peer_id peer, outgoing_message message);

  /// Closes the connection to `peer` after flushing queued sends; no callback reports it
  /// locally, the peer sees `on_peer_closed`. Unknown peers are ignored.
  void disconnect(peer_id peer);

  /// Name the peer announced in its hello; throws `error(not_found)` for unknown peers.
  std::string peer_name(peer_id peer) const;

  /// UCX's account of the connection to `peer`: the transports and devices of each lane
  /// (e.g. `am(sysv/memory tcp/lo)`), for operators and tests. Throws `error(not_found)` for
  /// unknown peers; not from a node callback.
  std::string peer_lanes(peer_id peer) const;

  /// Messages queued or being sent (all peers), for flow control by the caller.
  std::size_t in_flight() const noexcept;

  /// Counters since start.
  node_stats stats() const noexcept;

  /// Closes all connections (orderly, bounded in time), stops the progress thread and releases
  /// UCX. Idempotent; no callback runs after it returns. Must not be called from a callback.
  void stop();

 private:
  struct impl;
  std::unique_ptr<impl> impl_;
};

}  // namespace shoal::transport
