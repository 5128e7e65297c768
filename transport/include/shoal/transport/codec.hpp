#pragma once
/// \file
/// The envelope codec: Cap'n Proto flat encoding of `Envelope` and a decoder for untrusted
/// bytes. The decoder never crashes or reads out of bounds on garbage: it checks the segment
/// table, walks the whole message under a traversal and nesting limit, and checks the schema
/// version, the body kind and the bulk table; anything else is `error(invalid_argument)`
/// (`failed_precondition` for a peer speaking another schema version).

#include <shoal/base/error.hpp>
#include <shoal/transport/buffer.hpp>
#include <shoal/transport/message.hpp>

#include <cstddef>
#include <cstdint>
#include <span>

namespace shoal::transport {

/// Bounds on what a decoder accepts from the wire.
struct decode_limits {
  std::size_t max_envelope_bytes = 16u << 20;      ///< Encoded envelope size.
  std::uint64_t traversal_words = 4u << 20;        ///< Cap'n Proto traversal limit (8-byte words).
  int nesting = 32;                                ///< Cap'n Proto pointer nesting limit.
  std::uint32_t max_bulk = 256;                    ///< Bulk buffers per envelope.
  std::uint64_t max_bulk_bytes = 16ull << 30;      ///< Bytes per bulk buffer.
};

/// Encodes the envelope of `message` (not its bulk data) as Cap'n Proto flat bytes.
byte_buffer encode_envelope(const outgoing_message& message);

/// Validates and decodes `bytes`. Bulk buffers are attached afterwards by the node; a decoded
/// message has `bulk_count() == 0` until then. Throws `error` as described in the file comment.
incoming_message decode_envelope(std::span<const std::byte> bytes,
                                 const decode_limits& limits = {});

/// Same, adopting `bytes` (no copy when it is 8-byte aligned, as byte_buffer always is).
incoming_message decode_envelope(byte_buffer bytes, const decode_limits& limits = {});

/// Turns an outgoing message into the incoming message a peer would receive, without a network
/// (encodes, decodes, copies the bulk buffers). For single-process runs and tests.
incoming_message loopback(const outgoing_message& message, const decode_limits& limits = {});

}  // namespace shoal::transport
