#include "shoal/transport/codec.hpp"

#include "message_impl.hpp"
#include "schema_check.hpp"
#include "shoal/base/error.hpp"

#include <capnp/any.h>
#include <capnp/dynamic.h>
#include <kj/exception.h>

#include <cstring>
#include <limits>

namespace shoal::transport {

byte_buffer encode_envelope(const outgoing_message& message) {
  // Building a reader of the output segments does not modify the message; Cap'n Proto just
  // lacks a const accessor.
  auto& builder = const_cast<outgoing_message&>(message).internals().builder;
  auto segments = builder.getSegmentsForOutput();
  // Standard flat framing: (segment count - 1), each segment's size in words, padding to a
  // word, then the segments back to back.
  std::size_t table_words = (segments.size() + 2) / 2;
  std::size_t words = table_words;
  for (auto segment : segments) words += segment.size();
  byte_buffer out(words * sizeof(capnp::word));
  auto* table = reinterpret_cast<std::uint32_t*>(out.data());
  table[0] = static_cast<std::uint32_t>(segments.size() - 1);
  for (std::size_t i = 0; i < segments.size(); ++i)
    table[i + 1] = static_cast<std::uint32_t>(segments[i].size());
  if (segments.size() % 2 == 0) table[segments.size() + 1] = 0;
  std::byte* cursor = out.data() + table_words * sizeof(capnp::word);
  for (auto segment : segments) {
    std::memcpy(cursor, segment.begin(), segment.size() * sizeof(capnp::word));
    cursor += segment.size() * sizeof(capnp::word);
  }
  return out;
}

incoming_message decode_envelope(byte_buffer bytes, const decode_limits& limits) {
  if (bytes.size() > limits.max_envelope_bytes)
    fail(errc::invalid_argument, "envelope of {} bytes exceeds the limit of {}", bytes.size(),
         limits.max_envelope_bytes);
  if (bytes.size() < sizeof(capnp::word) || bytes.size() % sizeof(capnp::word) != 0)
    fail(errc::invalid_argument, "envelope of {} bytes is not a whole number of 8-byte words",
         bytes.size());
  if (reinterpret_cast<std::uintptr_t>(bytes.data()) % alignof(capnp::word) != 0) {
    byte_buffer aligned(bytes.size());
    std::memcpy(aligned.data(), bytes.data(), bytes.size());
    bytes = std::move(aligned);
  }

  auto state = std::make_unique<incoming_message::impl>();
  state->bytes = std::move(bytes);
  kj::ArrayPtr<const capnp::word> words(
      reinterpret_cast<const capnp::word*>(state->bytes.data()),
      state->bytes.size() / sizeof(capnp::word));
  try {
    {
      // Walk every pointer once under the limits: this bounds-checks the whole message and
      // catches amplification (many pointers to the same data), so the application's reads
      // below cannot fail or run away.
      capnp::ReaderOptions checked;
      checked.traversalLimitInWords = limits.traversal_words;
      checked.nestingLimit = limits.nesting;
      capnp::FlatArrayMessageReader probe(words, checked);
      if (probe.getEnd() != words.end())
        fail(errc::invalid_argument, "envelope has {} trailing bytes after the message",
             (words.end() - probe.getEnd()) * sizeof(capnp::word));
      probe.getRoot<capnp::AnyPointer>().targetSize();
    }
    // The application may read fields any number of times; the traversal limit would count
    // every read, so the lasting reader only keeps the nesting limit.
    capnp::ReaderOptions lasting;
    lasting.traversalLimitInWords = std::numeric_limits<std::uint64_t>::max() / 2;
    lasting.nestingLimit = limits.nesting;
    state->reader.emplace(words, lasting);
    state->root = state->reader->getRoot<schema::Envelope>();

    auto root = state->root;
    if (root.getVersion() != schema_version)
      fail(errc::failed_precondition, "peer speaks schema version {}, this node {}",
           root.getVersion(), schema_version);
    auto which = static_cast<std::uint16_t>(root.getBody().which());
    // The last kind of the union (envelope.capnp): a newer peer's kinds are refused here.
    if (which > static_cast<std::uint16_t>(schema::Envelope::Body::Which::WEIGHTS_REPLY))
      fail(errc::invalid_argument, "envelope has unknown body kind {}", which);
    auto bulk = root.getBulk();
    if (bulk.size() > limits.max_bulk)
      fail(errc::invalid_argument, "envelope references {} bulk buffers, limit {}", bulk.size(),
           limits.max_bulk);
    for (std::uint32_t i = 0; i < bulk.size(); ++i) {
      if (bulk[i].getBytes() > limits.max_bulk_bytes)
        fail(errc::invalid_argument, "bulk buffer {} of {} bytes exceeds the limit of {}", i,
             bulk[i].getBytes(), limits.max_bulk_bytes);
    }
    {
      // The schema walk reads lists element by element, so it runs under the traversal limit
      // too: a list of zero-sized elements occupies no words (targetSize() is 0) yet can claim
      // 2^29 elements; Cap'n Proto charges a word per element against the limit.
      capnp::ReaderOptions walked;
      walked.traversalLimitInWords = limits.traversal_words;
      walked.nestingLimit = limits.nesting;
      capnp::FlatArrayMessageReader walk(words, walked);
      detail::check_fields(walk.getRoot<capnp::AnyStruct>(), capnp::Schema::from<schema::Envelope>());
    }
  } catch (const kj::Exception& e) {
    fail(errc::invalid_argument, "malformed envelope: {}", e.getDescription().cStr());
  }
  return incoming_message(std::move(state));
}

incoming_message decode_envelope(std::span<const std::byte> bytes, const decode_limits& limits) {
  if (bytes.size() > limits.max_envelope_bytes)
    fail(errc::invalid_argument, "envelope of {} bytes exceeds the limit of {}", bytes.size(),
         limits.max_envelope_bytes);
  byte_buffer copy(bytes.size());
  if (!bytes.empty()) std::memcpy(copy.data(), bytes.data(), bytes.size());
  return decode_envelope(std::move(copy), limits);
}

incoming_message loopback(const outgoing_message& message, const decode_limits& limits) {
  auto decoded = decode_envelope(encode_envelope(message), limits);
  auto& state = decoded.internals();
  for (const auto& view : message.bulk()) {
    byte_buffer copy(view.size);
    if (view.size != 0) std::memcpy(copy.data(), view.data, view.size);
    state.bulk.push_back(std::move(copy));
    state.taken.push_back(false);
  }
  return decoded;
}

}  // namespace shoal::transport
