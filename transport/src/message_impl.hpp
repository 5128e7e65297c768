#pragma once
// State behind outgoing_message / incoming_message, shared by the codec and the node.

#include "shoal/transport/message.hpp"

#include <capnp/message.h>
#include <capnp/serialize.h>

#include <optional>
#include <vector>

namespace shoal::transport {

struct outgoing_message::impl {
  // 1 KiW first segment: control messages fit in one segment, so encoding is a single copy.
  capnp::MallocMessageBuilder builder{1024};
  std::vector<bulk_view> bulk;
};

struct incoming_message::impl {
  byte_buffer bytes;  // The encoded envelope the reader points into (8-byte aligned).
  std::optional<capnp::FlatArrayMessageReader> reader;
  schema::Envelope::Reader root;
  std::vector<byte_buffer> bulk;
  std::vector<bool> taken;
};

}  // namespace shoal::transport
