#pragma once
/// \file
/// Messages as the application sees them: an `outgoing_message` is built and handed to
/// `node::send`; an `incoming_message` is what `node` delivers (or `decode_envelope` returns).
/// Both hold a Cap'n Proto `schema::Envelope` plus bulk buffers referenced from it by index
/// (`Envelope.bulk`, `TensorRef.bulk`). Bulk bytes are never copied into the envelope.
///
/// Building a message:
/// \code
///   transport::outgoing_message msg;
///   auto env = msg.envelope();
///   env.setEpoch(epoch);
///   auto dispatch = env.getBody().initExpertDispatch();
///   dispatch.setLayer(layer);
///   msg.attach_tensor(dispatch.initHidden(), transport::make_bulk_view(std::move(rows)),
///                     schema::DType::BF16, {n_rows, hidden_size});
///   node.send(peer, std::move(msg));
/// \endcode

#include <shoal/transport/buffer.hpp>
#include <shoal/transport/schema.hpp>

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <span>

namespace shoal::transport {

/// Bytes per element of `dtype` (fp8 = 1, bf16 = 2, ...).
std::size_t dtype_size(schema::DType dtype) noexcept;

/// A message being built. Move-only; not thread-safe (build it on one thread, then send it).
class outgoing_message {
 public:
  /// An empty envelope whose `version` is already `schema_version`.
  outgoing_message();
  outgoing_message(outgoing_message&&) noexcept;
  outgoing_message& operator=(outgoing_message&&) noexcept;
  ~outgoing_message();

  /// The envelope to fill: addresses, ids, epoch and exactly one `body` member. Do not edit
  /// `bulk` directly; `attach` maintains it.
  schema::Envelope::Builder envelope();

  /// Appends a bulk buffer sent after the envelope as its own transport message and records its
  /// size in `Envelope.bulk`. Returns its index (for `TensorRef.bulk`).
  std::uint32_t attach(bulk_view data);

  /// Attaches `data` as a whole tensor and fills `ref` (bulk index, offset 0, dtype, shape).
  /// Throws `error(invalid_argument)` when the shape and dtype do not match `data.size`.
  void attach_tensor(schema::TensorRef::Builder ref, bulk_view data, schema::DType dtype,
                     std::span<const std::uint64_t> shape);
  /// Same, with the shape as a braced list.
  void attach_tensor(schema::TensorRef::Builder ref, bulk_view data, schema::DType dtype,
                     std::initializer_list<std::uint64_t> shape);

  /// The attached bulk buffers, in index order.
  std::span<const bulk_view> bulk() const noexcept;

  /// Implementation detail shared with the codec and the node.
  struct impl;
  /// Implementation detail shared with the codec and the node.
  impl& internals() noexcept { return *impl_; }
  /// Implementation detail shared with the codec and the node.
  const impl& internals() const noexcept { return *impl_; }

 private:
  std::unique_ptr<impl> impl_;
};

/// A received, validated message. Move-only. Reading the envelope is safe: the decoder already
/// bounds-checked the whole message within `decode_limits`. Readers returned by `envelope()`
/// are valid while this object lives.
class incoming_message {
 public:
  /// Implementation detail shared with the codec and the node.
  struct impl;
  /// Adopts decoded state; used by the codec.
  explicit incoming_message(std::unique_ptr<impl> state) noexcept;
  incoming_message(incoming_message&&) noexcept;
  incoming_message& operator=(incoming_message&&) noexcept;
  ~incoming_message();

  /// The envelope.
  schema::Envelope::Reader envelope() const;
  /// The envelope's body kind.
  message_kind kind() const;

  /// Number of bulk buffers (equals `envelope().getBulk().size()`).
  std::size_t bulk_count() const noexcept;
  /// Bytes of bulk buffer `index`; throws `error(invalid_argument)` when out of range or
  /// already taken.
  std::span<const std::byte> bulk(std::size_t index) const;
  /// Moves bulk buffer `index` out (to keep it without copying); later `bulk(index)` throws.
  byte_buffer take_bulk(std::size_t index);

  /// The bytes of a tensor referenced from this envelope, after checking its bulk index,
  /// offset, dtype and shape against the buffer; throws `error(invalid_argument)` saying what
  /// does not fit. Untrusted peers cannot make this read out of bounds.
  std::span<const std::byte> tensor(schema::TensorRef::Reader ref) const;

  /// Size of the encoded envelope in bytes (without bulk data).
  std::size_t envelope_bytes() const noexcept;

  /// Implementation detail shared with the codec and the node.
  impl& internals() noexcept { return *impl_; }

 private:
  std::unique_ptr<impl> impl_;
};

}  // namespace shoal::transport
