#include "shoal/transport/message.hpp"

#include "message_impl.hpp"
#include "shoal/base/error.hpp"

#include <limits>

namespace shoal::transport {

std::string_view message_kind_name(message_kind kind) noexcept {
  using W = schema::Envelope::Body::Which;
  switch (kind) {
    case W::JOIN: return "join";
    case W::JOIN_REPLY: return "joinReply";
    case W::HEARTBEAT: return "heartbeat";
    case W::LEAVE: return "leave";
    case W::SPAWN_STAGE: return "spawnStage";
    case W::SPAWN_EXPERT: return "spawnExpert";
    case W::SPAWN_REPLY: return "spawnReply";
    case W::PLACEMENT_TABLE: return "placementTable";
    case W::STEP_BATCH: return "stepBatch";
    case W::ACTIVATIONS: return "activations";
    case W::EXPERT_DISPATCH: return "expertDispatch";
    case W::EXPERT_COMBINE: return "expertCombine";
    case W::SAMPLED_TOKENS: return "sampledTokens";
    case W::GENERATE_REQUEST: return "generateRequest";
    case W::TOKEN_CHUNK: return "tokenChunk";
    case W::CANCEL: return "cancel";
    case W::ERROR: return "error";
    case W::STATUS_REQUEST: return "statusRequest";
    case W::STATUS_REPLY: return "statusReply";
    case W::RETIRE_ACTOR: return "retireActor";
    case W::WEIGHTS_REQUEST: return "weightsRequest";
    case W::WEIGHTS_REPLY: return "weightsReply";
  }
  return "unknown";
}

std::size_t dtype_size(schema::DType dtype) noexcept {
  switch (dtype) {
    case schema::DType::F32: return 4;
    case schema::DType::BF16: return 2;
    case schema::DType::F16: return 2;
    case schema::DType::FP8E4M3: return 1;
    case schema::DType::I32: return 4;
    case schema::DType::I64: return 8;
    case schema::DType::U8: return 1;
    case schema::DType::F64: return 8;
  }
  return 0;
}

namespace {
// Bytes of a dense tensor, or nullopt on overflow or an unknown dtype.
std::optional<std::uint64_t> tensor_bytes(schema::DType dtype,
                                          std::span<const std::uint64_t> shape) {
  std::uint64_t bytes = dtype_size(dtype);
  if (bytes == 0) return std::nullopt;
  for (std::uint64_t extent : shape) {
    if (extent != 0 && bytes > std::numeric_limits<std::uint64_t>::max() / extent)
      return std::nullopt;
    bytes *= extent;
  }
  return bytes;
}
}  // namespace

outgoing_message::outgoing_message() : impl_(std::make_unique<impl>()) {
  impl_->builder.initRoot<schema::Envelope>().setVersion(schema_version);
}
outgoing_message::outgoing_message(outgoing_message&&) noexcept = default;
outgoing_message& outgoing_message::operator=(outgoing_message&&) noexcept = default;
outgoing_message::~outgoing_message() = default;

schema::Envelope::Builder outgoing_message::envelope() {
  return impl_->builder.getRoot<schema::Envelope>();
}

std::uint32_t outgoing_message::attach(bulk_view data) {
  SHOAL_REQUIRE(data.data != nullptr || data.size == 0, "bulk buffer of {} bytes has no data",
                data.size);
  auto env = envelope();
  // Cap'n Proto lists cannot grow in place: rebuild the (short) bulk table on each attach.
  auto old = env.asReader().getBulk();
  std::uint32_t index = old.size();
  std::vector<std::uint64_t> sizes;
  sizes.reserve(index + 1);
  for (auto ref : old) sizes.push_back(ref.getBytes());
  sizes.push_back(data.size);
  auto list = env.initBulk(index + 1);
  for (std::uint32_t i = 0; i <= index; ++i) list[i].setBytes(sizes[i]);
  impl_->bulk.push_back(std::move(data));
  return index;
}

void outgoing_message::attach_tensor(schema::TensorRef::Builder ref, bulk_view data,
                                     schema::DType dtype, std::span<const std::uint64_t> shape) {
  auto bytes = tensor_bytes(dtype, shape);
  if (!bytes || *bytes != data.size)
    fail(errc::invalid_argument, "tensor of {} bytes does not match its dtype and shape ({})",
         data.size, bytes ? fmt::format("{} bytes", *bytes) : std::string("overflow"));
  ref.setBulk(attach(std::move(data)));
  ref.setOffset(0);
  ref.setDtype(dtype);
  auto dims = ref.initShape(shape.size());
  for (std::size_t i = 0; i < shape.size(); ++i) dims.set(i, shape[i]);
}

void outgoing_message::attach_tensor(schema::TensorRef::Builder ref, bulk_view data,
                                     schema::DType dtype,
                                     std::initializer_list<std::uint64_t> shape) {
  attach_tensor(ref, std::move(data), dtype, std::span<const std::uint64_t>(shape));
}

std::span<const bulk_view> outgoing_message::bulk() const noexcept { return impl_->bulk; }

incoming_message::incoming_message(std::unique_ptr<impl> state) noexcept
    : impl_(std::move(state)) {}
incoming_message::incoming_message(incoming_message&&) noexcept = default;
incoming_message& incoming_message::operator=(incoming_message&&) noexcept = default;
incoming_message::~incoming_message() = default;

schema::Envelope::Reader incoming_message::envelope() const { return impl_->root; }

message_kind incoming_message::kind() const { return impl_->root.getBody().which(); }

std::size_t incoming_message::bulk_count() const noexcept { return impl_->bulk.size(); }

std::span<const std::byte> incoming_message::bulk(std::size_t index) const {
  if (index >= impl_->bulk.size())
    fail(errc::invalid_argument, "bulk buffer {} requested, the {} message has {}", index,
         message_kind_name(kind()), impl_->bulk.size());
  if (impl_->taken[index])
    fail(errc::failed_precondition, "bulk buffer {} was already taken", index);
  return impl_->bulk[index].span();
}

byte_buffer incoming_message::take_bulk(std::size_t index) {
  (void)bulk(index);
  impl_->taken[index] = true;
  return std::move(impl_->bulk[index]);
}

std::span<const std::byte> incoming_message::tensor(schema::TensorRef::Reader ref) const {
  auto dims = ref.getShape();
  std::vector<std::uint64_t> shape;
  shape.reserve(dims.size());
  for (std::uint64_t extent : dims) shape.push_back(extent);
  auto bytes = tensor_bytes(ref.getDtype(), shape);
  if (!bytes)
    fail(errc::invalid_argument, "tensor with dtype {} and {} dims has no valid size",
         static_cast<int>(ref.getDtype()), shape.size());
  auto buffer = bulk(ref.getBulk());
  std::uint64_t offset = ref.getOffset();
  if (offset > buffer.size() || *bytes > buffer.size() - offset)
    fail(errc::invalid_argument, "tensor of {} bytes at offset {} exceeds bulk buffer {} ({} bytes)",
         *bytes, offset, ref.getBulk(), buffer.size());
  return buffer.subspan(offset, *bytes);
}

std::size_t incoming_message::envelope_bytes() const noexcept { return impl_->bytes.size(); }

}  // namespace shoal::transport
