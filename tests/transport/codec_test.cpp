// Envelope codec: round trips of every message family, tensor reference checks, and fuzzing
// the decoder with random and mutated bytes.

#include "shoal/transport/codec.hpp"

#include "schema_check.hpp"

#include <catch2/catch.hpp>
#include <capnp/dynamic.h>
#include <capnp/serialize.h>
#include <kj/string.h>

#include <chrono>
#include <cstring>
#include <fstream>
#include <iterator>
#include <numeric>
#include <optional>
#include <random>
#include <vector>

namespace tp = shoal::transport;
namespace schema = shoal::transport::schema;

namespace {

std::vector<std::byte> to_vector(const tp::byte_buffer& buffer) {
  return {buffer.data(), buffer.data() + buffer.size()};
}

tp::bulk_view bytes_of(std::vector<float> values) {
  auto owner = std::make_shared<std::vector<float>>(std::move(values));
  return {owner->data(), owner->size() * sizeof(float), owner};
}

// A message with most envelope fields and two tensors, as a stage would send to an expert.
tp::outgoing_message make_dispatch() {
  tp::outgoing_message msg;
  auto env = msg.envelope();
  env.getSender().setNode("stage-0");
  env.getSender().setActor(3);
  env.getReceiver().setNode("experts-1");
  env.getReceiver().setActor(7);
  env.setBatchId(42);
  env.setEpoch(5);
  auto dispatch = env.getBody().initExpertDispatch();
  dispatch.setStep(9);
  dispatch.setLayer(3);
  std::vector<float> hidden(4 * 8);
  std::iota(hidden.begin(), hidden.end(), 0.5f);
  msg.attach_tensor(dispatch.initHidden(), bytes_of(hidden), schema::DType::F32, {4, 8});
  msg.attach_tensor(dispatch.initWeights(), bytes_of({0.25f, 0.75f, 1.f, 0.f, 0.5f, 0.5f, 1.f, 0.f}),
                    schema::DType::F32, {4, 2});
  return msg;
}

// Valid envelopes of several kinds (expert dispatch with bulk, placement table, chat request)
// as the bytes a peer sends: seeds for the mutation tests.
std::vector<std::vector<std::byte>> seed_envelopes() {
  std::vector<std::vector<std::byte>> seeds;
  seeds.push_back(to_vector(tp::encode_envelope(make_dispatch())));
  {
    tp::outgoing_message msg;
    auto table = msg.envelope().getBody().initPlacementTable();
    table.initStages(3)[2].getAddress().setNode("node-with-a-name");
    table.initExperts(2)[1].initExperts(16).set(15, 255);
    seeds.push_back(to_vector(tp::encode_envelope(msg)));
  }
  {
    tp::outgoing_message msg;
    auto request = msg.envelope().getBody().initGenerateRequest();
    auto chat = request.getPrompt().initChat(2);
    chat[0].setRole("user");
    chat[1].setContent("tell me about mixture of experts");
    request.getSampling().initStop(2).set(1, "</s>");
    seeds.push_back(to_vector(tp::encode_envelope(msg)));
  }
  return seeds;
}

// Decodes or throws shoal::error; anything else (a crash, another exception) fails the test.
// A decoded message must be fully readable without throwing.
bool decodes(std::span<const std::byte> bytes) {
  try {
    auto message = tp::decode_envelope(bytes);
    kj::String text = kj::str(message.envelope());
    (void)tp::message_kind_name(message.kind());
    return true;
  } catch (const shoal::error&) {
    return false;
  }
}

}  // namespace

TEST_CASE("envelope round trip keeps header fields, body and tensors", "[transport][codec]") {
  auto msg = make_dispatch();
  auto in = tp::loopback(msg);
  auto env = in.envelope();
  CHECK(env.getVersion() == tp::schema_version);
  CHECK(std::string(env.getSender().getNode().cStr()) == "stage-0");
  CHECK(env.getReceiver().getActor() == 7);
  CHECK(env.getBatchId() == 42);
  CHECK(env.getEpoch() == 5);
  REQUIRE(in.kind() == tp::message_kind::EXPERT_DISPATCH);
  CHECK(tp::message_kind_name(in.kind()) == "expertDispatch");
  REQUIRE(in.bulk_count() == 2);
  auto dispatch = env.getBody().getExpertDispatch();
  CHECK(dispatch.getLayer() == 3);
  auto hidden = in.tensor(dispatch.getHidden());
  REQUIRE(hidden.size() == 4 * 8 * sizeof(float));
  float third;
  std::memcpy(&third, hidden.data() + 2 * sizeof(float), sizeof(float));
  CHECK(third == 2.5f);
  auto weights = in.tensor(dispatch.getWeights());
  CHECK(weights.size() == 8 * sizeof(float));
  auto taken = in.take_bulk(1);
  CHECK(taken.size() == 8 * sizeof(float));
  CHECK_THROWS_AS(in.bulk(1), shoal::error);
}

TEST_CASE("every message family encodes and decodes", "[transport][codec]") {
  using W = tp::message_kind;
  std::vector<std::pair<W, std::function<void(schema::Envelope::Body::Builder)>>> cases = {
      {W::JOIN, [](auto b) {
         auto j = b.initJoin();
         j.setNode("n1");
         j.setPort(4100);
         j.setSchemaVersion(tp::schema_version);
         j.initDevices(1)[0].setKind("cpu");
       }},
      {W::HEARTBEAT, [](auto b) { b.initHeartbeat().setSequence(11); }},
      {W::LEAVE, [](auto b) { b.initLeave().setReason("drained"); }},
      {W::SPAWN_STAGE, [](auto b) { b.initSpawnStage().setEndLayer(30); }},
      {W::SPAWN_EXPERT, [](auto b) { b.initSpawnExpert().initExperts(128).set(127, 255); }},
      {W::PLACEMENT_TABLE, [](auto b) {
         auto t = b.initPlacementTable();
         t.setEpoch(3);
         t.initStages(2)[1].getAddress().setNode("n2");
         t.initExperts(1)[0].initExperts(2).set(1, 9);
       }},
      {W::STEP_BATCH, [](auto b) { b.initStepBatch().initEntries(1)[0].initTokens(3).set(2, 77); }},
      {W::SAMPLED_TOKENS, [](auto b) { b.initSampledTokens().initTokens(1)[0].setToken(5); }},
      {W::GENERATE_REQUEST, [](auto b) {
         auto r = b.initGenerateRequest();
         r.setRequestId(99);
         r.getPrompt().setText("hello");
         r.getSampling().setMaxTokens(16);
       }},
      {W::TOKEN_CHUNK, [](auto b) { b.initTokenChunk().setFinish(schema::FinishReason::STOP); }},
      {W::CANCEL, [](auto b) { b.initCancel().setRequestId(4); }},
      {W::ERROR, [](auto b) {
         b.initError().getStatus().setCode(schema::ErrorCode::UNAVAILABLE);
       }},
  };
  for (auto& [kind, fill] : cases) {
    tp::outgoing_message msg;
    fill(msg.envelope().getBody());
    auto encoded = tp::encode_envelope(msg);
    auto in = tp::decode_envelope(encoded.span());
    INFO(tp::message_kind_name(kind));
    CHECK(in.kind() == kind);
    CHECK(in.envelope_bytes() == encoded.size());
  }
  tp::outgoing_message msg;
  msg.envelope().getBody().initGenerateRequest().getSampling();
  auto in = tp::loopback(msg);
  auto sampling = in.envelope().getBody().getGenerateRequest().getSampling();
  CHECK(sampling.getMaxTokens() == 256);  // Schema defaults reach the reader.
  CHECK(sampling.getTopP() == 1.0f);
}

TEST_CASE("tensor references are checked against their buffers", "[transport][codec]") {
  tp::outgoing_message msg;
  auto combine = msg.envelope().getBody().initExpertCombine();
  CHECK_THROWS_AS(msg.attach_tensor(combine.initOutput(), bytes_of({1.f, 2.f, 3.f}),
                                    schema::DType::F32, {2, 2}),
                  shoal::error);
  msg.attach_tensor(combine.initOutput(), bytes_of({1.f, 2.f, 3.f, 4.f}), schema::DType::BF16,
                    {2, 4});
  // A lying sender: the reference runs past the end of the buffer.
  combine.getOutput().setOffset(4);
  auto in = tp::loopback(msg);
  try {
    (void)in.tensor(in.envelope().getBody().getExpertCombine().getOutput());
    FAIL("an out-of-bounds tensor reference was accepted");
  } catch (const shoal::error& e) {
    CHECK(e.code() == shoal::errc::invalid_argument);
  }
  combine.getOutput().setOffset(0);
  combine.getOutput().setBulk(1);
  auto in2 = tp::loopback(msg);
  CHECK_THROWS_AS(in2.tensor(in2.envelope().getBody().getExpertCombine().getOutput()),
                  shoal::error);
  // Shapes whose element count overflows 64 bits.
  combine.getOutput().setBulk(0);
  auto dims = combine.getOutput().initShape(3);
  dims.set(0, 1ull << 40);
  dims.set(1, 1ull << 40);
  dims.set(2, 2);
  auto in3 = tp::loopback(msg);
  CHECK_THROWS_AS(in3.tensor(in3.envelope().getBody().getExpertCombine().getOutput()),
                  shoal::error);
}

TEST_CASE("a peer with another schema version is refused", "[transport][codec]") {
  tp::outgoing_message msg;
  msg.envelope().setVersion(tp::schema_version + 1);
  auto encoded = tp::encode_envelope(msg);
  try {
    (void)tp::decode_envelope(encoded.span());
    FAIL("an envelope of another schema version was accepted");
  } catch (const shoal::error& e) {
    CHECK(e.code() == shoal::errc::failed_precondition);
    CHECK(std::string(e.what()).find("schema version") != std::string::npos);
  }
}

TEST_CASE("decoder limits bound what a peer can make us accept", "[transport][codec]") {
  tp::outgoing_message msg;
  auto spawn = msg.envelope().getBody().initSpawnExpert();
  spawn.initExperts(100000);
  auto encoded = tp::encode_envelope(msg);
  tp::decode_limits small;
  small.max_envelope_bytes = 1024;
  CHECK_THROWS_AS(tp::decode_envelope(encoded.span(), small), shoal::error);
  tp::decode_limits shallow;
  shallow.traversal_words = 1000;
  CHECK_THROWS_AS(tp::decode_envelope(encoded.span(), shallow), shoal::error);
  CHECK_NOTHROW(tp::decode_envelope(encoded.span()));

  tp::outgoing_message many;
  auto bulk = many.envelope().initBulk(1000);
  (void)bulk;
  CHECK_THROWS_AS(tp::decode_envelope(tp::encode_envelope(many).span()), shoal::error);
}

TEST_CASE("garbage bytes are rejected without a crash", "[transport][codec][fuzz]") {
  // Fixed cases first: empty, not whole words, a segment table that lies.
  CHECK_FALSE(decodes({}));
  std::vector<std::byte> seven(7, std::byte{0});
  CHECK_FALSE(decodes(seven));
  std::vector<std::uint32_t> lying = {0, 1000000, 0, 0};  // One segment of 1M words: truncated.
  CHECK_FALSE(decodes(std::as_bytes(std::span(lying))));
  std::vector<std::uint32_t> many_segments = {0xffffffffu, 1, 0, 0};
  CHECK_FALSE(decodes(std::as_bytes(std::span(many_segments))));
  std::vector<std::byte> trailing = to_vector(tp::encode_envelope(make_dispatch()));
  trailing.resize(trailing.size() + 8, std::byte{0});
  CHECK_FALSE(decodes(trailing));

  std::mt19937_64 rng(20240229);
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  int random_rejected = 0;
  for (int i = 0; i < 20000 && std::chrono::steady_clock::now() < deadline; ++i) {
    std::vector<std::byte> bytes(8 * (1 + rng() % 64));
    for (auto& b : bytes) b = static_cast<std::byte>(rng());
    // Plausible segment tables make the decoder go deeper than pure noise would.
    if (i % 2 == 0) {
      std::uint32_t words = static_cast<std::uint32_t>(bytes.size() / 8 - 1);
      std::uint32_t header[2] = {0, words};
      std::memcpy(bytes.data(), header, sizeof(header));
    }
    if (!decodes(bytes)) ++random_rejected;
  }
  CHECK(random_rejected > 0);

  // Mutations of valid envelopes of several kinds: flipped bits, overwritten bytes, truncation.
  auto seeds = seed_envelopes();
  int mutated_ok = 0, mutated_rejected = 0;
  deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  for (int i = 0; i < 60000 && std::chrono::steady_clock::now() < deadline; ++i) {
    auto bytes = seeds[i % seeds.size()];
    int edits = 1 + static_cast<int>(rng() % 4);
    for (int e = 0; e < edits; ++e) {
      std::size_t at = rng() % bytes.size();
      switch (rng() % 4) {
        case 0: bytes[at] ^= static_cast<std::byte>(1u << (rng() % 8)); break;
        case 1: bytes[at] = static_cast<std::byte>(rng()); break;
        case 2: bytes[at] = std::byte{0xff}; break;
        case 3: bytes.resize(std::max<std::size_t>(8, (at / 8) * 8)); break;
      }
    }
    if (decodes(bytes)) ++mutated_ok; else ++mutated_rejected;
  }
  // Both outcomes must occur, or the mutations are not exercising the decoder.
  CHECK(mutated_ok > 0);
  CHECK(mutated_rejected > 0);
}

TEST_CASE("a list of 2^26 zero-sized elements is refused quickly, not walked", "[transport][codec][fuzz]") {
  // Found by the envelope fuzzer: a 224-byte Activations envelope whose `entries` pointer
  // claims 67 million elements of zero words. targetSize() counts no words for them, and the
  // schema walk used to visit each one without a traversal limit (minutes of CPU per message).
  std::ifstream in(std::string(SHOAL_TEST_DATA_DIR) + "/fuzz/envelope/regression-zero-size-list-amplification",
                   std::ios::binary);
  std::vector<char> chars((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  REQUIRE(chars.size() == 224);
  // Recorded under schema version 1: the envelope's version (its first data field, after the
  // segment table and the root pointer) is set to this build's, so that the decoder gets past
  // the version check to the list.
  REQUIRE(chars[16] == 1);
  chars[16] = static_cast<char>(tp::schema_version & 0xff);
  chars[17] = static_cast<char>(tp::schema_version >> 8);
  const auto start = std::chrono::steady_clock::now();
  try {
    tp::decode_envelope(std::as_bytes(std::span(chars)));
    FAIL("decoded an envelope that claims 2^26 list elements in 224 bytes");
  } catch (const shoal::error& e) {
    CHECK(e.code() == shoal::errc::invalid_argument);
    CHECK_THAT(e.what(), Catch::Contains("malformed envelope") && Catch::Contains("traversal limit"));
  }
  CHECK(std::chrono::steady_clock::now() - start < std::chrono::seconds(2));
}

TEST_CASE("the planned field check accepts and refuses exactly what the dynamic walk does", "[transport][codec][fuzz]") {
  // Whether a check throws, for the same bytes under the same limits; nullopt when the message
  // does not get that far (its segment table or bounds are already wrong).
  const auto outcome = [](const std::vector<std::byte>& bytes, bool planned) -> std::optional<bool> {
    if (bytes.size() < 8 || bytes.size() % 8 != 0) return std::nullopt;
    std::vector<capnp::word> words(bytes.size() / 8);
    std::memcpy(words.data(), bytes.data(), bytes.size());
    capnp::ReaderOptions options;
    options.traversalLimitInWords = tp::decode_limits{}.traversal_words;
    options.nestingLimit = tp::decode_limits{}.nesting;
    try {
      capnp::FlatArrayMessageReader probe(kj::arrayPtr(words.data(), words.size()), options);
      probe.getRoot<capnp::AnyPointer>().targetSize();
    } catch (const kj::Exception&) {
      return std::nullopt;
    }
    try {
      capnp::FlatArrayMessageReader walk(kj::arrayPtr(words.data(), words.size()), options);
      if (planned) {
        tp::detail::check_fields(walk.getRoot<capnp::AnyStruct>(), capnp::Schema::from<schema::Envelope>());
      } else {
        tp::detail::check_fields_reference(capnp::toDynamic(walk.getRoot<schema::Envelope>()));
      }
      return true;
    } catch (const kj::Exception&) {
      return false;
    }
  };
  auto seeds = seed_envelopes();
  {
    tp::outgoing_message msg;
    auto beat = msg.envelope().getBody().initHeartbeat();
    beat.setNode("node-a");
    beat.initEvicted(2).set(0, "node-b");
    beat.initRoutedIndex(3).set(2, 7);
    seeds.push_back(to_vector(tp::encode_envelope(msg)));
  }
  std::mt19937_64 rng(20261128);
  int accepted = 0, refused = 0;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  for (int i = 0; i < 40000 && std::chrono::steady_clock::now() < deadline; ++i) {
    auto bytes = seeds[i % seeds.size()];
    if (i >= static_cast<int>(seeds.size())) {
      const int edits = 1 + static_cast<int>(rng() % 4);
      for (int e = 0; e < edits; ++e) {
        std::size_t at = rng() % bytes.size();
        switch (rng() % 3) {
          case 0: bytes[at] ^= static_cast<std::byte>(1u << (rng() % 8)); break;
          case 1: bytes[at] = static_cast<std::byte>(rng()); break;
          case 2: bytes[at] = std::byte{0xff}; break;
        }
      }
    }
    const auto reference = outcome(bytes, false);
    if (!reference) continue;
    const auto planned = outcome(bytes, true);
    REQUIRE(planned.has_value());
    if (*planned != *reference) {
      CAPTURE(i, *reference);
      FAIL("the planned check and the dynamic walk disagree");
    }
    if (*reference) ++accepted; else ++refused;
  }
  // Both outcomes must occur, or the mutations are not reaching the field checks.
  CHECK(accepted > 100);
  CHECK(refused > 100);
}
