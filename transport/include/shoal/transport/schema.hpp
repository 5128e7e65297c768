#pragma once
/// \file
/// The Cap'n Proto message types of Shoal (generated from transport/schemas/*.capnp), in
/// `shoal::transport::schema`. Include this only where messages are built or read; the node API
/// (node.hpp) goes through `outgoing_message` / `incoming_message` from message.hpp.

#include <shoal/transport/schemas/client.capnp.h>     // IWYU pragma: export
#include <shoal/transport/schemas/common.capnp.h>     // IWYU pragma: export
#include <shoal/transport/schemas/data.capnp.h>       // IWYU pragma: export
#include <shoal/transport/schemas/envelope.capnp.h>   // IWYU pragma: export
#include <shoal/transport/schemas/membership.capnp.h> // IWYU pragma: export
#include <shoal/transport/schemas/placement.capnp.h>  // IWYU pragma: export

#include <string_view>

namespace shoal::transport {

/// The kind of an envelope: the discriminant of its `body` union.
using message_kind = schema::Envelope::Body::Which;

/// The schema version this binary speaks; peers with another version are refused.
inline constexpr std::uint16_t schema_version = schema::SCHEMA_VERSION;

/// Name of a message kind ("join", "expertDispatch", ...), or "unknown".
std::string_view message_kind_name(message_kind kind) noexcept;

}  // namespace shoal::transport
