#include "remote.hpp"

#include "client_impl.hpp"

#include <shoal/transport/schema.hpp>

#include <nlohmann/json.hpp>

#include <caf/actor_cast.hpp>
#include <caf/event_based_actor.hpp>
#include <caf/exit_reason.hpp>
#include <caf/response_promise.hpp>
#include <caf/scoped_actor.hpp>
#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/spdlog.h>

#include <cstdlib>
#include <cstring>
#include <thread>
#include <unistd.h>

namespace shoal::actors {
namespace {

namespace schema = transport::schema;
using reply_atom = caf::atom_constant<caf::atom("reply")>;
using lost_atom = caf::atom_constant<caf::atom("lost")>;

// Logs go to stderr: stdout of `shoal node` carries the ready line that launch waits for.
spdlog::logger& wire_log() {
  static const std::shared_ptr<spdlog::logger> logger = [] {
    if (auto existing = spdlog::get("shoal.wire")) return existing;
    return spdlog::stderr_logger_mt("shoal.wire");
  }();
  return *logger;
}

static_assert(schema_version == transport::schema_version, "actors and transport must speak one schema version");

// Who sent an envelope, to whom, and the call it belongs to.
struct inbound {
  std::uint64_t peer = 0;  // 0: not the connection it came in on; answer by node name
  actor_address sender;
  std::uint64_t receiver = 0;
  std::uint64_t correlation = 0;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, inbound& x) {
  return f(x.peer, x.sender, x.receiver, x.correlation);
}

// Answers an envelope: on the connection it came in on, or by node name.
void send_back(remote_fabric& book, const inbound& in, transport::outgoing_message message) {
  if (in.peer == 0)
    book.send_to(in.sender.node, std::move(message));
  else
    book.send_to_peer(in.peer, std::move(message));
}

// --- Encoding -------------------------------------------------------------------------------

template <class T>
transport::bulk_view bulk_of(std::vector<T> values) {
  auto owner = std::make_shared<std::vector<T>>(std::move(values));
  return {owner->data(), owner->size() * sizeof(T), owner};
}

transport::outgoing_message envelope(const actor_address& from, const actor_address& to, std::uint64_t correlation,
                                     std::uint64_t epoch) {
  transport::outgoing_message m;
  auto env = m.envelope();
  env.getSender().setNode(from.node);
  env.getSender().setActor(from.actor);
  env.getReceiver().setNode(to.node);
  env.getReceiver().setActor(to.actor);
  // The batch id doubles as the call id: a reply carries the id of the call it answers.
  env.setBatchId(correlation);
  env.setEpoch(epoch);
  return m;
}

void set_status(schema::Status::Builder s, errc code, const std::string& message) {
  s.setCode(static_cast<schema::ErrorCode>(static_cast<std::uint16_t>(code) + 1));
  s.setMessage(message);
}

shoal::error status_error(schema::Status::Reader s) {
  const auto code = static_cast<std::uint16_t>(s.getCode());
  return shoal::error(code == 0 ? errc::internal : static_cast<errc>(code - 1), std::string(s.getMessage().cStr()));
}

// Both schemas' sampling structs (client SamplingOptions, data SamplingParams) name their
// fields alike.
template <class Builder>
void set_sampling(Builder b, const sampling_spec& x) {
  b.setTemperature(x.temperature);
  b.setTopK(x.top_k);
  b.setTopP(x.top_p);
  b.setMinP(x.min_p);
  b.setRepetitionPenalty(x.repetition_penalty);
  b.setFrequencyPenalty(x.frequency_penalty);
  b.setPresencePenalty(x.presence_penalty);
  b.setHasSeed(x.has_seed);
  b.setSeed(x.seed);
  b.setIdLimit(x.id_limit);
}

template <class Reader>
sampling_spec get_sampling(Reader r) {
  return {.temperature = r.getTemperature(),
          .top_k = r.getTopK(),
          .top_p = r.getTopP(),
          .min_p = r.getMinP(),
          .repetition_penalty = r.getRepetitionPenalty(),
          .frequency_penalty = r.getFrequencyPenalty(),
          .presence_penalty = r.getPresencePenalty(),
          .has_seed = r.getHasSeed(),
          .seed = r.getSeed(),
          .id_limit = r.getIdLimit()};
}

template <class Builder>
void set_entries(Builder b, const std::vector<batch_entry>& entries) {
  auto list = b.initEntries(static_cast<unsigned>(entries.size()));
  auto sampling = b.initSampling(static_cast<unsigned>(entries.size()));
  for (unsigned i = 0; i < entries.size(); ++i) {
    list[i].setRequestId(entries[i].request);
    auto tokens = list[i].initTokens(static_cast<unsigned>(entries[i].tokens.size()));
    for (unsigned t = 0; t < entries[i].tokens.size(); ++t) tokens.set(t, entries[i].tokens[t]);
    list[i].setPosition(entries[i].position);
    list[i].setSampleAfter(entries[i].sample_after);
    list[i].setPromptTokens(entries[i].prompt_tokens);
    auto blocks = list[i].initBlocks(static_cast<unsigned>(entries[i].blocks.size()));
    for (unsigned k = 0; k < entries[i].blocks.size(); ++k) blocks.set(k, entries[i].blocks[k]);
    list[i].setFresh(entries[i].fresh);
    auto history = list[i].initHistory(static_cast<unsigned>(entries[i].history.size()));
    for (unsigned k = 0; k < entries[i].history.size(); ++k) history.set(k, entries[i].history[k]);
    set_sampling(sampling[i], entries[i].sampling);
  }
}

template <class Builder>
void set_return(Builder s, const step_batch& b) {
  if (b.return_call == 0) return;
  s.getReturnTo().setNode(b.return_to.node);
  s.getReturnTo().setActor(b.return_to.actor);
  s.setReturnCall(b.return_call);
}

void encode(transport::outgoing_message& m, step_batch b) {
  auto body = m.envelope().getBody();
  if (b.hidden.empty()) {
    auto s = body.initStepBatch();
    s.setStep(b.step);
    set_entries(s, b.entries);
    s.setWantLogits(b.want_logits);
    set_return(s, b);
    return;
  }
  auto a = body.initActivations();
  a.setStep(b.step);
  a.setNextLayer(b.next_layer);
  set_entries(a, b.entries);
  a.setWantLogits(b.want_logits);
  set_return(a, b);
  std::uint64_t rows = 0;
  for (const auto& e : b.entries) rows += e.tokens.size();
  const std::uint64_t width = rows ? b.hidden.size() / rows : 0;
  m.attach_tensor(a.initHidden(), bulk_of(std::move(b.hidden)), schema::DType::F32, {rows, width});
}

void encode(transport::outgoing_message& m, sampled_batch b) {
  auto s = m.envelope().getBody().initSampledTokens();
  s.setStep(b.step);
  auto list = s.initTokens(static_cast<unsigned>(b.tokens.size()));
  for (unsigned i = 0; i < b.tokens.size(); ++i) {
    list[i].setRequestId(b.tokens[i].request);
    list[i].setToken(b.tokens[i].token);
  }
  s.setHasLogits(!b.logits.empty());
  if (!b.logits.empty()) {
    const std::uint64_t n = b.tokens.size();
    const std::uint64_t vocab = b.logits.size() / n;
    m.attach_tensor(s.initLogits(), bulk_of(std::move(b.logits)), schema::DType::F32, {n, vocab});
  }
}

void encode(transport::outgoing_message& m, expert_dispatch d) {
  auto x = m.envelope().getBody().initExpertDispatch();
  x.setStep(d.step);
  x.setLayer(d.layer);
  const std::uint64_t rows = d.expert_ids.size();
  const std::uint64_t width = rows ? d.hidden.size() / rows : 0;
  m.attach_tensor(x.initHidden(), bulk_of(std::move(d.hidden)), schema::DType::F32, {rows, width});
  m.attach_tensor(x.initExpertIds(), bulk_of(std::move(d.expert_ids)), schema::DType::I32, {rows, 1});
  // One choice per row, weighted later by the stage: the weights are all one.
  m.attach_tensor(x.initWeights(), bulk_of(std::vector<float>(rows, 1.0f)), schema::DType::F32, {rows, 1});
}

void encode(transport::outgoing_message& m, expert_combine c) {
  auto x = m.envelope().getBody().initExpertCombine();
  x.setStep(c.step);
  x.setLayer(c.layer);
  set_status(x.initStatus(), errc::internal, "");
  x.getStatus().setCode(schema::ErrorCode::OK);
  const std::uint64_t width = 0;
  (void)width;
  const std::uint64_t values = c.output.size();
  m.attach_tensor(x.initOutput(), bulk_of(std::move(c.output)), schema::DType::F32, {values});
}

void encode(transport::outgoing_message& m, const placement_table& t) {
  auto p = m.envelope().getBody().initPlacementTable();
  p.setEpoch(t.epoch);
  p.setFence(t.fence);
  auto stages = p.initStages(static_cast<unsigned>(t.stages.size()));
  for (unsigned i = 0; i < t.stages.size(); ++i) {
    stages[i].setStage(t.stages[i].stage);
    stages[i].setFirstLayer(t.stages[i].first_layer);
    stages[i].setEndLayer(t.stages[i].end_layer);
    stages[i].getAddress().setNode(t.stages[i].address.node);
    stages[i].getAddress().setActor(t.stages[i].address.actor);
  }
  auto experts = p.initExperts(static_cast<unsigned>(t.experts.size()));
  for (unsigned i = 0; i < t.experts.size(); ++i) {
    auto ids = experts[i].initExperts(static_cast<unsigned>(t.experts[i].experts.size()));
    for (unsigned k = 0; k < t.experts[i].experts.size(); ++k) ids.set(k, t.experts[i].experts[k]);
    experts[i].getAddress().setNode(t.experts[i].address.node);
    experts[i].getAddress().setActor(t.experts[i].address.actor);
  }
}

void encode(transport::outgoing_message& m, const spawn_stage_cmd& c) {
  auto s = m.envelope().getBody().initSpawnStage();
  s.setActor(c.actor);
  s.setStage(c.stage);
  s.setStageCount(c.stage_count);
  s.setFirstLayer(c.first_layer);
  s.setEndLayer(c.end_layer);
  s.initDevice().setKind("cpu");
  s.setModelPath(c.model_path);
  s.setKvBlocks(c.cache_blocks);
  s.setBlockTokens(c.block_tokens);
}

void encode(transport::outgoing_message& m, const spawn_expert_cmd& c) {
  auto s = m.envelope().getBody().initSpawnExpert();
  s.setActor(c.actor);
  auto ids = s.initExperts(static_cast<unsigned>(c.experts.size()));
  for (unsigned k = 0; k < c.experts.size(); ++k) ids.set(k, c.experts[k]);
  s.initDevice().setKind("cpu");
  s.setModelPath(c.model_path);
  if (!c.source.node.empty()) {
    s.getSource().setNode(c.source.node);
    s.getSource().setActor(c.source.actor);
  }
}

void encode(transport::outgoing_message& m, const weights_request& r) {
  auto s = m.envelope().getBody().initWeightsRequest();
  s.setActor(r.actor);
  auto ids = s.initExperts(static_cast<unsigned>(r.experts.size()));
  for (unsigned k = 0; k < r.experts.size(); ++k) ids.set(k, r.experts[k]);
  s.setPart(r.part);
}

void encode(transport::outgoing_message& m, weights_part&& p) {
  auto r = m.envelope().getBody().initWeightsReply();
  r.initStatus().setCode(schema::ErrorCode::OK);
  r.setPart(p.part);
  r.setParts(p.parts);
  r.setConfigJson(p.config_json);
  const std::uint64_t size = p.tensors.size();
  m.attach_tensor(r.initTensors(), bulk_of(std::move(p.tensors)), schema::DType::U8, {size});
}

void encode_spawn_reply(transport::outgoing_message& m, std::uint64_t actor, const std::optional<shoal::error>& e) {
  auto r = m.envelope().getBody().initSpawnReply();
  r.setActor(actor);
  if (e)
    set_status(r.initStatus(), e->code(), e->what());
  else
    r.initStatus().setCode(schema::ErrorCode::OK);
}

void encode(transport::outgoing_message& m, const join_request& j) {
  auto s = m.envelope().getBody().initJoin();
  s.setNode(j.node);
  s.setHost(j.host);
  s.setPort(j.port);
  s.setPid(j.pid);
  s.setSchemaVersion(j.schema_version);
  s.setMemoryBytes(j.memory_bytes);
  s.setEpoch(j.epoch);
}

void encode(transport::outgoing_message& m, const heartbeat& h, const std::string& from) {
  auto b = m.envelope().getBody().initHeartbeat();
  b.setNode(from);
  b.setSequence(h.sequence);
  b.setSentUnixNanos(static_cast<std::uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::system_clock::now().time_since_epoch()).count()));
  auto evicted = b.initEvicted(static_cast<unsigned>(h.evicted.size()));
  for (unsigned i = 0; i < h.evicted.size(); ++i) evicted.set(i, h.evicted[i]);
  auto index = b.initRoutedIndex(static_cast<unsigned>(h.routed_index.size()));
  for (unsigned i = 0; i < h.routed_index.size(); ++i) index.set(i, h.routed_index[i]);
  auto count = b.initRoutedCount(static_cast<unsigned>(h.routed_count.size()));
  for (unsigned i = 0; i < h.routed_count.size(); ++i) count.set(i, h.routed_count[i]);
  b.setFence(h.fence);
  auto actors = b.initServedActor(static_cast<unsigned>(h.served_actor.size()));
  for (unsigned i = 0; i < h.served_actor.size(); ++i) actors.set(i, h.served_actor[i]);
  auto rows = b.initServedRows(static_cast<unsigned>(h.served_rows.size()));
  for (unsigned i = 0; i < h.served_rows.size(); ++i) rows.set(i, h.served_rows[i]);
  b.setHeadState(h.head_state);
}

void encode(transport::outgoing_message& m, const retire_actor_cmd& c) {
  m.envelope().getBody().initRetireActor().setActor(c.actor);
}

void encode(transport::outgoing_message& m, const generate_request& g) {
  auto s = m.envelope().getBody().initGenerateRequest();
  s.setRequestId(g.request);
  auto prompt = s.getPrompt().initTokens(static_cast<unsigned>(g.prompt.size()));
  for (unsigned i = 0; i < g.prompt.size(); ++i) prompt.set(i, g.prompt[i]);
  auto sampling = s.initSampling();
  set_sampling(sampling, g.sampling);
  sampling.setMaxTokens(g.max_tokens);
  auto stops = sampling.initStopTokens(static_cast<unsigned>(g.stop_tokens.size()));
  for (unsigned i = 0; i < g.stop_tokens.size(); ++i) stops.set(i, g.stop_tokens[i]);
  s.setDeadlineUnixMs(g.deadline_unix_ms);
  s.setWantLogits(g.want_logits);
  auto resume = s.initResumeTokens(static_cast<unsigned>(g.resume.size()));
  for (unsigned i = 0; i < g.resume.size(); ++i) resume.set(i, g.resume[i]);
}

void encode(transport::outgoing_message& m, token_chunk c) {
  auto body = m.envelope().getBody();
  if (c.finish == finish_reason::error) {
    auto e = body.initError();
    e.setRequestId(c.request);
    set_status(e.initStatus(), static_cast<errc>(c.error_code), c.error);
    return;
  }
  auto t = body.initTokenChunk();
  t.setRequestId(c.request);
  auto tokens = t.initTokens(static_cast<unsigned>(c.tokens.size()));
  for (unsigned i = 0; i < c.tokens.size(); ++i) tokens.set(i, c.tokens[i]);
  t.setFinish(static_cast<schema::FinishReason>(static_cast<std::uint16_t>(c.finish)));
  t.setCachedPromptTokens(c.cached_prompt_tokens);
  t.setHasLogits(!c.logits.empty());
  if (!c.logits.empty() && !c.tokens.empty()) {
    const std::uint64_t n = c.tokens.size();
    const std::uint64_t vocab = c.logits.size() / n;
    m.attach_tensor(t.initLogits(), bulk_of(std::move(c.logits)), schema::DType::F32, {n, vocab});
  }
}

void encode_cancel(transport::outgoing_message& m, request_id id, const char* reason) {
  auto c = m.envelope().getBody().initCancel();
  c.setRequestId(id);
  c.setReason(reason);
}

void encode_error(transport::outgoing_message& m, const shoal::error& e) {
  auto x = m.envelope().getBody().initError();
  x.setRequestId(0);
  set_status(x.initStatus(), e.code(), e.what());
}

// --- Decoding (peers are untrusted: tensors are checked by the transport, sizes here) -----

template <class T>
std::vector<T> tensor_values(const transport::incoming_message& m, schema::TensorRef::Reader ref, schema::DType dtype,
                             const char* what) {
  if (ref.getDtype() != dtype) shoal::fail(errc::invalid_argument, "{}: unexpected tensor dtype", what);
  const auto bytes = m.tensor(ref);
  std::vector<T> values(bytes.size() / sizeof(T));
  std::memcpy(values.data(), bytes.data(), values.size() * sizeof(T));
  return values;
}

template <class Reader>
std::vector<batch_entry> get_entries(Reader r) {
  std::vector<batch_entry> entries;
  const auto sampling = r.getSampling();
  if (sampling.size() != 0 && sampling.size() != r.getEntries().size())
    shoal::fail(errc::invalid_argument, "step {}: {} sampling parameters for {} entries", r.getStep(), sampling.size(),
                r.getEntries().size());
  unsigned i = 0;
  for (auto e : r.getEntries()) {
    batch_entry b;
    b.request = e.getRequestId();
    for (auto t : e.getTokens()) b.tokens.push_back(t);
    b.position = e.getPosition();
    b.sample_after = e.getSampleAfter();
    b.prompt_tokens = e.getPromptTokens();
    for (auto block : e.getBlocks()) b.blocks.push_back(block);
    b.fresh = e.getFresh();
    for (auto t : e.getHistory()) b.history.push_back(t);
    if (sampling.size() != 0) b.sampling = get_sampling(sampling[i]);
    entries.push_back(std::move(b));
    ++i;
  }
  return entries;
}

actor_address get_address(schema::ActorAddress::Reader r) { return {std::string(r.getNode().cStr()), r.getActor()}; }

// --- Proxy: a remote actor as a local one -----------------------------------------------------

struct proxy_state {
  static inline const char* name = "shoal.proxy";
  std::map<std::uint64_t, caf::response_promise> pending;
};

caf::behavior make_proxy(caf::stateful_actor<proxy_state>* self, std::shared_ptr<remote_fabric> book,
                         actor_address target) {
  // Sends a call and keeps the promise until the reply (or the peer's failure) arrives.
  auto call = [self, book, target](auto&& fill) {
    auto rp = self->make_response_promise();
    const auto correlation = book->next_correlation();
    auto m = envelope({book->options().node, 0}, target, correlation, book->epoch());
    fill(m);
    book->track(correlation, caf::actor_cast<caf::actor>(self));
    try {
      book->send_to(target.node, std::move(m));
      self->state.pending.emplace(correlation, rp);
    } catch (const shoal::error& e) {
      book->untrack(correlation);
      rp.deliver(to_caf_error(e));
    }
  };
  auto tell = [book, target](const actor_address& from, auto&& fill) {
    auto m = envelope(from, target, 0, book->epoch());
    fill(m);
    try {
      book->send_to(target.node, std::move(m));
    } catch (const shoal::error& e) {
      wire_log().warn("message to {}/{} dropped: {}", target.node, target.actor, e.what());
    }
  };
  auto answer = [self, book](std::uint64_t correlation, auto&& value) {
    book->untrack(correlation);
    const auto it = self->state.pending.find(correlation);
    if (it == self->state.pending.end()) return;  // the caller gave up already
    it->second.deliver(std::forward<decltype(value)>(value));
    self->state.pending.erase(it);
  };
  return {
      [self, call, book, target](step_batch& b) {
        // A step that came from another node (the router's) goes on with the call that began
        // it: the last stage answers that call itself, and this stage is done once it is sent.
        // Not when the next stage lives on the node that began it (a node does not call itself).
        if (b.return_call == 0 || b.return_to.node == target.node)
          return call([&](auto& m) { encode(m, std::move(b)); });
        auto rp = self->make_response_promise();
        const auto step = b.step;
        auto m = envelope({book->options().node, 0}, target, 0, book->epoch());
        encode(m, std::move(b));
        try {
          book->send_to(target.node, std::move(m));
          rp.deliver(sampled_batch{.step = step, .tokens = {}, .logits = {}, .forwarded = true});
        } catch (const shoal::error& e) {
          rp.deliver(to_caf_error(e));
        }
      },
      [call](expert_dispatch& d) { call([&](auto& m) { encode(m, std::move(d)); }); },
      [call, book](wire_atom, placement_table& t) {
        book->observe_epoch(t.epoch, t.fence);
        call([&](auto& m) { encode(m, t); });
      },
      [call](spawn_stage_cmd& c) { call([&](auto& m) { encode(m, c); }); },
      [call](spawn_expert_cmd& c) { call([&](auto& m) { encode(m, c); }); },
      [call](retire_actor_cmd& c) { call([&](auto& m) { encode(m, c); }); },
      [call](weights_request& r) { call([&](auto& m) { encode(m, r); }); },
      [call, book](heartbeat& h) { call([&](auto& m) { encode(m, h, book->options().node); }); },
      [call](status_atom) { call([&](auto& m) { m.envelope().getBody().initStatusRequest(); }); },
      [call](admin_atom, admin_request& r) {
        call([&](auto& m) {
          auto q = m.envelope().getBody().initStatusRequest();
          q.setCommand(r.command);
          auto args = q.initArgs(static_cast<unsigned>(r.args.size()));
          for (unsigned i = 0; i < r.args.size(); ++i) args.set(i, r.args[i]);
          q.setToken(r.token);
        });
      },
      [call](join_atom, join_request& j, node_agent_actor&) { call([&](auto& m) { encode(m, j); }); },
      [tell, book](release_atom, std::vector<request_id>& ids) {
        for (auto id : ids) tell({book->options().node, 0}, [&](auto& m) { encode_cancel(m, id, "finished"); });
      },
      [tell, book](generate_request& g, token_sink_actor& sink) {
        tell(book->address_of(caf::actor_cast<caf::actor>(sink)), [&](auto& m) { encode(m, g); });
      },
      [tell, book](cancel_atom, request_id id, token_sink_actor& sink) {
        tell(book->address_of(caf::actor_cast<caf::actor>(sink)), [&](auto& m) { encode_cancel(m, id, "client"); });
      },
      [tell, book](token_chunk& c) { tell({book->options().node, actor_ids::router}, [&](auto& m) { encode(m, std::move(c)); }); },
      [answer](reply_atom, std::uint64_t correlation, sampled_batch& b) { answer(correlation, std::move(b)); },
      [answer](reply_atom, std::uint64_t correlation, expert_combine& c) { answer(correlation, std::move(c)); },
      [answer](reply_atom, std::uint64_t correlation, ok_atom) { answer(correlation, ok_atom::value); },
      [answer](reply_atom, std::uint64_t correlation, std::uint64_t epoch) { answer(correlation, epoch); },
      [answer](reply_atom, std::uint64_t correlation, std::string& json) { answer(correlation, std::move(json)); },
      [answer](reply_atom, std::uint64_t correlation, heartbeat& h) { answer(correlation, std::move(h)); },
      [answer](reply_atom, std::uint64_t correlation, weights_part& p) { answer(correlation, std::move(p)); },
      [answer](reply_atom, std::uint64_t correlation, caf::error& e) { answer(correlation, std::move(e)); },
      [self, book, target](lost_atom, std::string& reason) {
        for (auto& [correlation, rp] : self->state.pending) {
          book->untrack(correlation);
          rp.deliver(to_caf_error(errc::unavailable, reason));
        }
        self->state.pending.clear();
        self->quit(to_caf_error(errc::unavailable, reason));
      },
  };
}

// --- Bridge: envelopes for local actors -------------------------------------------------------

caf::behavior make_bridge(caf::event_based_actor* self, std::weak_ptr<remote_fabric> weak) {
  const auto timeout = weak.lock()->options().call_timeout;
  const auto control_timeout = weak.lock()->options().control_timeout;
  // Replies go back on the connection the call came in on, from the actor it was sent to.
  auto reply = [weak](const inbound& in, auto&& fill) {
    auto book = weak.lock();
    if (!book) return;
    auto m = envelope({book->options().node, in.receiver}, in.sender, in.correlation, book->epoch());
    fill(m);
    try {
      send_back(*book, in, std::move(m));
    } catch (const shoal::error& e) {
      wire_log().warn("reply to {}/{} dropped: {}", in.sender.node, in.sender.actor, e.what());
    }
  };
  auto local = [weak](const inbound& in) {
    auto book = weak.lock();
    return book ? book->resolve({book->options().node, in.receiver}) : caf::actor();
  };
  auto missing = [reply, weak](const inbound& in) {
    if (auto book = weak.lock()) book->count_refusal(remote_fabric::refusal::unknown_receiver);
    reply(in, [&](auto& m) {
      encode_error(m, shoal::error(errc::not_found, fmt::format("no actor {} on this node", in.receiver)));
    });
  };
  // A local actor that finds a remote request's content wrong (a tensor of the wrong size, a
  // block outside the cache) refuses it with invalid_argument: counted like a malformed one.
  auto fail_reply = [reply, weak](const inbound& in) {
    return [reply, weak, in](caf::error& e) {
      const auto err = from_caf_error(e);
      if (auto book = weak.lock(); book && err.code() == errc::invalid_argument)
        book->count_refusal(remote_fabric::refusal::malformed);
      reply(in, [&](auto& m) { encode_error(m, err); });
    };
  };
  // Spawn and retire commands for the node agent; its answer (or refusal) as a SpawnReply.
  auto to_agent = [=](const inbound& in, auto command) {
    auto target = caf::actor_cast<node_agent_actor>(local(in));
    if (!target) return missing(in);
    const auto actor = command.actor;
    self->request(target, control_timeout, std::move(command))
        .then([reply, in, actor](ok_atom) { reply(in, [&](auto& m) { encode_spawn_reply(m, actor, std::nullopt); }); },
              [reply, in, actor](caf::error& e) {
                reply(in, [&](auto& m) { encode_spawn_reply(m, actor, from_caf_error(e)); });
              });
  };
  // Status and admin requests: the supervisor's JSON answer, or its refusal, as StatusReply.
  auto ask_supervisor = [=](const inbound& in, auto... message) {
    auto target = caf::actor_cast<supervisor_actor>(local(in));
    if (!target) return missing(in);
    auto answer = [reply, in](const std::string& json, std::optional<shoal::error> e) {
      reply(in, [&](auto& m) {
        auto r = m.envelope().getBody().initStatusReply();
        if (e)
          set_status(r.initStatus(), e->code(), e->what());
        else
          r.initStatus().setCode(schema::ErrorCode::OK);
        r.setJson(json);
      });
    };
    self->request(target, control_timeout, std::move(message)...)
        .then([answer](std::string& json) { answer(json, std::nullopt); },
              [answer](caf::error& e) { answer({}, from_caf_error(e)); });
  };
  return {
      [=](inbound& in, step_batch& b) {
        auto target = caf::actor_cast<stage_actor>(local(in));
        if (!target) return missing(in);
        // `in` is the call that began the step (on_message resolved a forwarded one).
        b.return_to = in.sender;
        b.return_call = in.correlation;
        self->request(target, timeout, std::move(b))
            .then(
                [reply, in](sampled_batch& s) {
                  if (!s.forwarded) reply(in, [&](auto& m) { encode(m, std::move(s)); });
                },
                fail_reply(in));
      },
      [=](inbound& in, expert_dispatch& d) {
        auto target = caf::actor_cast<expert_actor>(local(in));
        if (!target) return missing(in);
        self->request(target, timeout, std::move(d))
            .then([reply, in](expert_combine& c) { reply(in, [&](auto& m) { encode(m, std::move(c)); }); }, fail_reply(in));
      },
      [=](inbound& in, placement_table& t) {
        if (auto book = weak.lock()) book->observe_epoch(t.epoch, t.fence);
        auto target = local(in);
        if (!target) return missing(in);
        auto spawn_reply = [reply, in](std::optional<shoal::error> e) {
          reply(in, [&](auto& m) { encode_spawn_reply(m, in.receiver, e); });
        };
        auto on_error = [spawn_reply](caf::error& e) { spawn_reply(from_caf_error(e)); };
        if (in.receiver == actor_ids::router)
          self->request(caf::actor_cast<router_actor>(target), control_timeout, wire_atom::value, std::move(t))
              .then([spawn_reply](ok_atom) { spawn_reply(std::nullopt); }, on_error);
        else
          self->request(caf::actor_cast<stage_actor>(target), control_timeout, wire_atom::value, std::move(t))
              .then([spawn_reply](ok_atom) { spawn_reply(std::nullopt); }, on_error);
      },
      [=](inbound& in, spawn_stage_cmd& c) { to_agent(in, std::move(c)); },
      [=](inbound& in, spawn_expert_cmd& c) { to_agent(in, std::move(c)); },
      [=](inbound& in, retire_actor_cmd& c) { to_agent(in, std::move(c)); },
      [=](inbound& in, weights_request& r) {
        auto target = caf::actor_cast<node_agent_actor>(local(in));
        if (!target) return missing(in);
        self->request(target, control_timeout, std::move(r))
            .then([reply, in](weights_part& p) { reply(in, [&](auto& m) { encode(m, std::move(p)); }); },
                  [reply, in](caf::error& e) {
                    reply(in, [&](auto& m) {
                      const auto err = from_caf_error(e);
                      set_status(m.envelope().getBody().initWeightsReply().initStatus(), err.code(), err.what());
                    });
                  });
      },
      [=](inbound& in, join_request& j) {
        auto book = weak.lock();
        auto target = caf::actor_cast<supervisor_actor>(local(in));
        if (!book || !target) return missing(in);
        auto agent = caf::actor_cast<node_agent_actor>(book->resolve({in.sender.node, actor_ids::node_agent}));
        auto join_reply = [reply, in](std::uint64_t epoch, std::optional<shoal::error> e) {
          reply(in, [&](auto& m) {
            auto r = m.envelope().getBody().initJoinReply();
            if (e)
              set_status(r.initStatus(), e->code(), e->what());
            else
              r.initStatus().setCode(schema::ErrorCode::OK);
            r.setEpoch(epoch);
          });
        };
        self->request(target, control_timeout, join_atom::value, std::move(j), agent)
            .then([join_reply](std::uint64_t epoch) { join_reply(epoch, std::nullopt); },
                  [join_reply](caf::error& e) { join_reply(0, from_caf_error(e)); });
      },
      [=](inbound& in, generate_request& g) {
        auto book = weak.lock();
        auto target = caf::actor_cast<router_actor>(local(in));
        if (!book || !target) return missing(in);
        self->send(target, std::move(g), caf::actor_cast<token_sink_actor>(book->resolve(in.sender)));
      },
      [=](inbound& in, cancel_atom, request_id id) {
        auto book = weak.lock();
        auto target = local(in);
        if (!book || !target) return;
        if (in.receiver == actor_ids::router)
          self->send(caf::actor_cast<router_actor>(target), cancel_atom::value, id,
                     caf::actor_cast<token_sink_actor>(book->resolve(in.sender)));
        else
          self->send(caf::actor_cast<stage_actor>(target), release_atom::value, std::vector<request_id>{id});
      },
      [=](inbound& in, token_chunk& c) {
        if (auto target = local(in)) self->send(caf::actor_cast<token_sink_actor>(target), std::move(c));
      },
      [=](inbound& in, status_atom) { ask_supervisor(in, status_atom::value); },
      [=](inbound& in, admin_atom, admin_request& r) { ask_supervisor(in, admin_atom::value, std::move(r)); },
  };
}

}  // namespace

// --- remote_fabric --------------------------------------------------------------------------

remote_fabric::remote_fabric(caf::actor_system& system, remote_options options)
    : system_(system), options_(std::move(options)), trace_(std::getenv("SHOAL_TRACE_WIRE") != nullptr) {}

remote_fabric::~remote_fabric() { stop(); }

void remote_fabric::start() {
  bridge_ = system_.spawn(make_bridge, weak_from_this());
  transport::node_options o;
  o.name = options_.node;
  o.listen_host = options_.listen_host;
  o.listen_port = options_.listen_port;
  o.peer_hosts = options_.dial_hosts;
  for (const auto& [node, address] : options_.addresses) o.peer_hosts.push_back(address.first);
  o.transports = options_.transports;
  o.connect_timeout = options_.connect_timeout;
  o.join_secret = options_.join_secret;
  transport::node_callbacks cb;
  std::weak_ptr<remote_fabric> weak = weak_from_this();
  cb.on_peer_connected = [weak](transport::peer_id peer, const std::string& name) {
    if (auto self = weak.lock()) {
      std::lock_guard lock(self->mutex_);
      self->names_[peer] = name;
      self->peers_.emplace(name, peer);  // keeps an existing connection if there is one
    }
  };
  cb.on_message = [weak](transport::peer_id peer, transport::incoming_message message) {
    if (auto self = weak.lock()) self->on_message(peer, std::move(message));
  };
  cb.on_peer_failed = [weak](transport::peer_id peer, const shoal::error& reason) {
    if (auto self = weak.lock()) self->on_peer_lost(peer, reason, false);
  };
  cb.on_peer_closed = [weak](transport::peer_id peer) {
    if (auto self = weak.lock()) self->on_peer_lost(peer, shoal::error(errc::unavailable, "connection closed"), true);
  };
  node_ = std::make_unique<transport::node>(std::move(o), std::move(cb));
}

void remote_fabric::stop() {
  if (node_) {
    node_->stop();
    std::lock_guard lock(node_mutex_);
    node_.reset();
  }
  std::map<std::pair<std::string, std::uint64_t>, caf::actor> proxies;
  {
    std::lock_guard lock(mutex_);
    proxies.swap(proxies_);
    pending_.clear();
  }
  for (auto& [key, proxy] : proxies) caf::anon_send_exit(proxy, caf::exit_reason::user_shutdown);
  if (bridge_) caf::anon_send_exit(bridge_, caf::exit_reason::user_shutdown);
  bridge_ = nullptr;
}

std::string remote_fabric::connect(const std::string& host, std::uint16_t port) {
  std::lock_guard connect_lock(connect_mutex_);
  if (!node_) shoal::fail(errc::failed_precondition, "the transport is stopped");
  const auto peer = node_->connect(host, port);
  const auto name = node_->peer_name(peer);
  std::lock_guard lock(mutex_);
  names_[peer] = name;
  peers_[name] = peer;
  return name;
}

bool remote_fabric::connected(const std::string& node) {
  std::lock_guard lock(mutex_);
  return peers_.count(node) > 0;
}

std::string remote_fabric::head_state() {
  std::lock_guard lock(mutex_);
  return head_state_;
}

std::optional<std::uint64_t> supervisor_epoch(caf::actor_system& system, remote_fabric& remote, const std::string& node,
                                              std::chrono::milliseconds timeout) {
  caf::scoped_actor self{system};
  auto target = caf::actor_cast<supervisor_actor>(remote.resolve({node, actor_ids::supervisor}));
  std::optional<std::uint64_t> epoch;
  self->request(target, timeout, status_atom::value)
      .receive(
          [&](std::string& status) {
            const auto j = nlohmann::json::parse(status, nullptr, false);
            epoch = j.is_object() ? j.value("epoch", std::uint64_t{0}) : 0;
          },
          [&](caf::error&) {});
  return epoch;
}

void remote_fabric::set_head(const std::string& node) {
  std::lock_guard lock(mutex_);
  head_now_ = node;
}

std::optional<std::chrono::steady_clock::time_point> remote_fabric::last_heard(const std::string& node) {
  std::lock_guard lock(mutex_);
  const auto it = heard_.find(node);
  if (it == heard_.end()) return std::nullopt;
  return it->second;
}

caf::actor remote_fabric::resolve(const actor_address& address) {
  if (address.node.empty() || address.node == options_.node) return find_local(address);
  std::lock_guard lock(mutex_);
  auto& proxy = proxies_[{address.node, address.actor}];
  if (!proxy) proxy = system_.spawn(make_proxy, shared_from_this(), address);
  return proxy;
}

void remote_fabric::track(std::uint64_t correlation, caf::actor proxy) {
  std::lock_guard lock(mutex_);
  pending_[correlation] = std::move(proxy);
}

void remote_fabric::untrack(std::uint64_t correlation) {
  std::lock_guard lock(mutex_);
  pending_.erase(correlation);
}

transport::peer_id remote_fabric::peer_for(const std::string& node) {
  {
    std::lock_guard lock(mutex_);
    if (const auto it = peers_.find(node); it != peers_.end()) return it->second;
  }
  const auto it = options_.addresses.find(node);
  if (it == options_.addresses.end())
    shoal::fail(errc::unavailable, "node {} is not connected and has no address in the cluster config", node);
  std::lock_guard connect_lock(connect_mutex_);
  {
    std::lock_guard lock(mutex_);
    if (const auto p = peers_.find(node); p != peers_.end()) return p->second;
  }
  if (!node_) shoal::fail(errc::unavailable, "the transport is stopped");
  const auto peer = node_->connect(it->second.first, it->second.second);
  const auto name = node_->peer_name(peer);
  if (name != node)
    shoal::fail(errc::failed_precondition, "{}:{} answered as node '{}', expected '{}'", it->second.first,
                it->second.second, name, node);
  std::lock_guard lock(mutex_);
  names_[peer] = name;
  peers_[name] = peer;
  return peer;
}

void remote_fabric::send_to(const std::string& node, transport::outgoing_message message) {
  const auto peer = peer_for(node);
  if (trace_)
    wire_log().info("[{}] -> {} (peer {}): {} call {}", options_.node, node, peer,
                 transport::message_kind_name(message.envelope().getBody().which()), message.envelope().getBatchId());
  if (!node_) shoal::fail(errc::unavailable, "the transport is stopped");
  node_->send(peer, std::move(message));
}

void remote_fabric::send_to_peer(transport::peer_id peer, transport::outgoing_message message) {
  if (trace_)
    wire_log().info("[{}] -> peer {}: {} call {}", options_.node, peer,
                 transport::message_kind_name(message.envelope().getBody().which()), message.envelope().getBatchId());
  if (!node_) shoal::fail(errc::unavailable, "the transport is stopped");
  node_->send(peer, std::move(message));
}

actor_address remote_fabric::address_of(const caf::actor& handle) {
  for (const auto& [key, actor] : local_actors())
    if (actor == handle) return {key.first, key.second};
  actor_address address;
  {
    std::lock_guard lock(mutex_);
    address = {options_.node, next_local_id_++};
  }
  register_actor(address, handle);
  return address;
}

bool remote_fabric::remote(const std::string& node) const { return node != options_.node; }

std::uint64_t remote_fabric::refused_peers() const {
  std::lock_guard lock(node_mutex_);
  return node_ ? node_->stats().peers_refused : 0;
}

void remote_fabric::evict(const std::string& node, std::uint64_t epoch) {
  std::vector<transport::peer_id> peers;
  {
    std::lock_guard lock(mutex_);
    if (!evictions_.emplace(node, epoch).second) return;
    for (const auto& [peer, name] : names_)
      if (name == node) peers.push_back(peer);
  }
  wire_log().warn("[{}] node {} was declared dead in placement epoch {}: dropping its connections", options_.node,
                  node, epoch);
  for (auto peer : peers) {
    if (node_) node_->disconnect(peer);
    on_peer_lost(peer, shoal::error(errc::unavailable, fmt::format("declared dead in placement epoch {}", epoch)),
                 false);
  }
}

bool remote_fabric::is_head_or_standby(const std::string& node) const {
  // A peer that announced no name is neither, also where the config names no standby.
  return !node.empty() && (node == options_.head || node == options_.standby);
}

std::string remote_fabric::announced_name(transport::peer_id peer) {
  std::lock_guard lock(mutex_);
  const auto it = names_.find(peer);
  return it == names_.end() ? std::string() : it->second;
}

void remote_fabric::observe_epoch(std::uint64_t epoch, std::uint64_t fence) noexcept {
  auto raise = [](std::atomic<std::uint64_t>& value, std::uint64_t to) {
    auto current = value.load();
    while (to > current && !value.compare_exchange_weak(current, to)) {
    }
  };
  raise(epoch_, epoch);
  raise(fence_, fence);
}

void remote_fabric::on_peer_lost(transport::peer_id peer, const shoal::error& reason, bool orderly) {
  std::string name;
  std::vector<caf::actor> lost;
  {
    std::lock_guard lock(mutex_);
    const auto it = names_.find(peer);
    if (it == names_.end()) return;
    name = it->second;
    names_.erase(it);
    if (const auto p = peers_.find(name); p != peers_.end() && p->second == peer) peers_.erase(p);
    // Another connection to the same node may remain (each side may have dialed).
    for (const auto& [other, other_name] : names_)
      if (other_name == name) {
        peers_[name] = other;
        return;
      }
    for (auto it2 = proxies_.begin(); it2 != proxies_.end();) {
      if (it2->first.first == name) {
        lost.push_back(it2->second);
        it2 = proxies_.erase(it2);
      } else {
        ++it2;
      }
    }
  }
  const auto message = fmt::format("node {} failed: {}", name, reason.what());
  // An orderly close (a node stopping) is not worth a warning; calls pending on it still fail.
  if (!orderly || trace_) wire_log().warn("{}", message);
  for (auto& proxy : lost) caf::anon_send(proxy, lost_atom::value, message);
  if (options_.on_node_lost) options_.on_node_lost(name);
}

void remote_fabric::on_message(transport::peer_id peer, transport::incoming_message message) {
  // Runs on the transport's progress thread: decode, hand to an actor, return.
  try {
    const auto env = message.envelope();
    inbound in{.peer = peer, .sender = get_address(env.getSender()), .receiver = env.getReceiver().getActor(),
               .correlation = env.getBatchId()};
    const auto body = env.getBody();
    {
      std::lock_guard lock(mutex_);
      if (const auto it = names_.find(peer); it != names_.end()) heard_[it->second] = std::chrono::steady_clock::now();
    }
    // A step another stage forwarded belongs to the call that began it: its answer, or its
    // refusal, goes there (by node name: it did not come in on that connection).
    std::uint64_t return_call = 0;
    schema::ActorAddress::Reader return_to;
    if (body.which() == schema::Envelope::Body::STEP_BATCH) {
      return_call = body.getStepBatch().getReturnCall();
      return_to = body.getStepBatch().getReturnTo();
    } else if (body.which() == schema::Envelope::Body::ACTIVATIONS) {
      return_call = body.getActivations().getReturnCall();
      return_to = body.getActivations().getReturnTo();
    }
    if (return_call != 0) {
      in.sender = get_address(return_to);
      in.correlation = return_call;
      in.peer = 0;
    }
    if (trace_)
      wire_log().info("[{}] <- {} (peer {}): {} call {}", options_.node, in.sender.node, peer,
                   transport::message_kind_name(body.which()), in.correlation);
    auto answer = [&](auto&& value) {
      caf::actor proxy;
      {
        std::lock_guard lock(mutex_);
        if (const auto it = pending_.find(in.correlation); it != pending_.end()) proxy = it->second;
      }
      if (proxy) caf::anon_send(proxy, reply_atom::value, in.correlation, std::forward<decltype(value)>(value));
    };
    const bool data = body.which() == schema::Envelope::Body::STEP_BATCH ||
                      body.which() == schema::Envelope::Body::ACTIVATIONS ||
                      body.which() == schema::Envelope::Body::EXPERT_DISPATCH;
    // Without node authentication the name is what the peer announced in its hello; checking
    // it still keeps a stray or misconfigured process from re-placing or spawning here.
    const auto kind = body.which();
    const bool control = kind == schema::Envelope::Body::PLACEMENT_TABLE ||
                         kind == schema::Envelope::Body::SPAWN_STAGE || kind == schema::Envelope::Body::SPAWN_EXPERT ||
                         kind == schema::Envelope::Body::RETIRE_ACTOR;
    // Weights leave a node only for nodes of the cluster config (a client may reach any port).
    const bool weights = kind == schema::Envelope::Body::WEIGHTS_REQUEST;
    if (!options_.head.empty() && (control || weights || kind == schema::Envelope::Body::JOIN)) {
      const auto announced = announced_name(peer);
      std::string why;
      if (announced != in.sender.node)
        why = fmt::format("sent as node '{}' on the connection of node '{}'", in.sender.node, announced);
      else if (control && !is_head_or_standby(in.sender.node))
        why = fmt::format("node '{}' is not the head ('{}'); only the head places and spawns actors", in.sender.node,
                          options_.head);
      else if ((kind == schema::Envelope::Body::JOIN || weights) && !options_.addresses.contains(in.sender.node))
        why = fmt::format("node '{}' is not in the cluster config", in.sender.node);
      if (!why.empty()) {
        count_refusal(refusal::not_permitted);
        wire_log().warn("[{}] refused a {} from peer {}: {}", options_.node, transport::message_kind_name(kind), peer,
                        why);
        auto m = envelope({options_.node, in.receiver}, in.sender, in.correlation, epoch());
        if (kind == schema::Envelope::Body::JOIN) {
          auto r = m.envelope().getBody().initJoinReply();
          set_status(r.initStatus(), errc::failed_precondition, why);
        } else if (weights) {
          set_status(m.envelope().getBody().initWeightsReply().initStatus(), errc::failed_precondition, why);
        } else {
          encode_spawn_reply(m, in.receiver, shoal::error(errc::failed_precondition, why));
        }
        send_to_peer(peer, std::move(m));
        return;
      }
    }
    if (data && env.getEpoch() < fence()) {
      // Fencing: the sender acted on a placement that included a node since declared dead (or
      // before the first placement).
      count_refusal(refusal::stale_epoch);
      auto m = envelope({options_.node, in.receiver}, in.sender, in.correlation, epoch());
      encode_error(m, shoal::error(errc::aborted, fmt::format("message of placement epoch {} arrived after the fence of epoch {}",
                                                               env.getEpoch(), fence())));
      send_back(*this, in, std::move(m));
      return;
    }
    switch (body.which()) {
      case schema::Envelope::Body::STEP_BATCH: {
        const auto s = body.getStepBatch();
        step_batch b{.step = s.getStep(), .next_layer = 0, .entries = get_entries(s), .hidden = {},
                     .want_logits = s.getWantLogits(), .return_to = {}, .return_call = s.getReturnCall()};
        if (b.return_call != 0) b.return_to = get_address(s.getReturnTo());
        caf::anon_send(bridge_, std::move(in), std::move(b));
        return;
      }
      case schema::Envelope::Body::ACTIVATIONS: {
        const auto a = body.getActivations();
        step_batch b{.step = a.getStep(), .next_layer = a.getNextLayer(), .entries = get_entries(a),
                     .hidden = tensor_values<float>(message, a.getHidden(), schema::DType::F32, "activations"),
                     .want_logits = a.getWantLogits(), .return_to = {}, .return_call = a.getReturnCall()};
        if (b.return_call != 0) b.return_to = get_address(a.getReturnTo());
        caf::anon_send(bridge_, std::move(in), std::move(b));
        return;
      }
      case schema::Envelope::Body::EXPERT_DISPATCH: {
        const auto d = body.getExpertDispatch();
        expert_dispatch x{.step = d.getStep(), .layer = d.getLayer(),
                          .hidden = tensor_values<float>(message, d.getHidden(), schema::DType::F32, "expert dispatch"),
                          .expert_ids = tensor_values<std::int32_t>(message, d.getExpertIds(), schema::DType::I32,
                                                                    "expert dispatch")};
        caf::anon_send(bridge_, std::move(in), std::move(x));
        return;
      }
      case schema::Envelope::Body::EXPERT_COMBINE: {
        const auto c = body.getExpertCombine();
        if (c.getStatus().getCode() != schema::ErrorCode::OK)
          return answer(to_caf_error(status_error(c.getStatus())));
        answer(expert_combine{.step = c.getStep(), .layer = c.getLayer(),
                              .output = tensor_values<float>(message, c.getOutput(), schema::DType::F32, "expert combine")});
        return;
      }
      case schema::Envelope::Body::SAMPLED_TOKENS: {
        const auto s = body.getSampledTokens();
        sampled_batch b;
        b.step = s.getStep();
        for (auto t : s.getTokens()) b.tokens.push_back({t.getRequestId(), t.getToken()});
        if (s.getHasLogits()) b.logits = tensor_values<float>(message, s.getLogits(), schema::DType::F32, "sampled tokens");
        return answer(std::move(b));
      }
      case schema::Envelope::Body::PLACEMENT_TABLE: {
        const auto p = body.getPlacementTable();
        placement_table t;
        t.epoch = p.getEpoch();
        t.fence = p.getFence();
        for (auto s : p.getStages())
          t.stages.push_back({.stage = s.getStage(), .first_layer = s.getFirstLayer(), .end_layer = s.getEndLayer(),
                              .address = get_address(s.getAddress())});
        for (auto e : p.getExperts()) {
          expert_placement x;
          for (auto id : e.getExperts()) x.experts.push_back(id);
          x.address = get_address(e.getAddress());
          t.experts.push_back(std::move(x));
        }
        caf::anon_send(bridge_, std::move(in), std::move(t));
        return;
      }
      case schema::Envelope::Body::SPAWN_STAGE: {
        const auto s = body.getSpawnStage();
        spawn_stage_cmd c{.actor = s.getActor(), .stage = s.getStage(), .stage_count = s.getStageCount(),
                          .first_layer = s.getFirstLayer(), .end_layer = s.getEndLayer(),
                          .hold_experts = options_.stages_hold_experts, .model_path = s.getModelPath().cStr(),
                          .cache_blocks = s.getKvBlocks(), .block_tokens = s.getBlockTokens()};
        caf::anon_send(bridge_, std::move(in), std::move(c));
        return;
      }
      case schema::Envelope::Body::SPAWN_EXPERT: {
        const auto s = body.getSpawnExpert();
        spawn_expert_cmd c{.actor = s.getActor(), .experts = {}, .model_path = s.getModelPath().cStr(), .source = {}};
        for (auto id : s.getExperts()) c.experts.push_back(id);
        if (s.hasSource()) c.source = get_address(s.getSource());
        caf::anon_send(bridge_, std::move(in), std::move(c));
        return;
      }
      case schema::Envelope::Body::RETIRE_ACTOR: {
        caf::anon_send(bridge_, std::move(in), retire_actor_cmd{.actor = body.getRetireActor().getActor()});
        return;
      }
      case schema::Envelope::Body::WEIGHTS_REQUEST: {
        const auto r = body.getWeightsRequest();
        weights_request w{.actor = r.getActor(), .experts = {}, .part = r.getPart()};
        for (auto id : r.getExperts()) w.experts.push_back(id);
        caf::anon_send(bridge_, std::move(in), std::move(w));
        return;
      }
      case schema::Envelope::Body::WEIGHTS_REPLY: {
        const auto r = body.getWeightsReply();
        if (r.getStatus().getCode() != schema::ErrorCode::OK) return answer(to_caf_error(status_error(r.getStatus())));
        return answer(weights_part{.part = r.getPart(), .parts = r.getParts(), .config_json = r.getConfigJson().cStr(),
                                   .tensors = tensor_values<std::uint8_t>(message, r.getTensors(), schema::DType::U8,
                                                                          "weights reply")});
      }
      case schema::Envelope::Body::SPAWN_REPLY: {
        const auto r = body.getSpawnReply();
        if (r.getStatus().getCode() != schema::ErrorCode::OK) return answer(to_caf_error(status_error(r.getStatus())));
        return answer(ok_atom::value);
      }
      case schema::Envelope::Body::JOIN: {
        const auto j = body.getJoin();
        join_request r{.node = j.getNode().cStr(), .host = j.getHost().cStr(), .port = j.getPort(), .pid = j.getPid(),
                       .schema_version = j.getSchemaVersion(), .memory_bytes = j.getMemoryBytes(), .epoch = j.getEpoch()};
        if (r.node != in.sender.node)
          shoal::fail(errc::invalid_argument, "join for node '{}' sent by node '{}'", r.node, in.sender.node);
        caf::anon_send(bridge_, std::move(in), std::move(r));
        return;
      }
      case schema::Envelope::Body::JOIN_REPLY: {
        const auto r = body.getJoinReply();
        if (r.getStatus().getCode() != schema::ErrorCode::OK) return answer(to_caf_error(status_error(r.getStatus())));
        return answer(static_cast<std::uint64_t>(r.getEpoch()));
      }
      case schema::Envelope::Body::GENERATE_REQUEST: {
        const auto g = body.getGenerateRequest();
        if (!g.getPrompt().isTokens())
          shoal::fail(errc::invalid_argument, "generate request {}: only token prompts are supported here", g.getRequestId());
        generate_request r;
        r.request = g.getRequestId();
        for (auto t : g.getPrompt().getTokens()) r.prompt.push_back(t);
        r.sampling = get_sampling(g.getSampling());
        r.max_tokens = g.getSampling().getMaxTokens();
        for (auto t : g.getSampling().getStopTokens()) r.stop_tokens.push_back(t);
        r.want_logits = g.getWantLogits();
        r.deadline_unix_ms = g.getDeadlineUnixMs();
        for (auto t : g.getResumeTokens()) r.resume.push_back(t);
        caf::anon_send(bridge_, std::move(in), std::move(r));
        return;
      }
      case schema::Envelope::Body::TOKEN_CHUNK: {
        const auto t = body.getTokenChunk();
        token_chunk c;
        c.request = t.getRequestId();
        for (auto x : t.getTokens()) c.tokens.push_back(x);
        c.finish = static_cast<finish_reason>(static_cast<std::uint16_t>(t.getFinish()));
        c.cached_prompt_tokens = t.getCachedPromptTokens();
        if (t.getHasLogits()) c.logits = tensor_values<float>(message, t.getLogits(), schema::DType::F32, "token chunk");
        caf::anon_send(bridge_, std::move(in), std::move(c));
        return;
      }
      case schema::Envelope::Body::CANCEL:
        caf::anon_send(bridge_, std::move(in), cancel_atom::value, static_cast<request_id>(body.getCancel().getRequestId()));
        return;
      case schema::Envelope::Body::ERROR: {
        const auto e = body.getError();
        bool is_reply = false;
        {
          std::lock_guard lock(mutex_);
          is_reply = in.correlation != 0 && pending_.count(in.correlation) > 0;
        }
        if (is_reply) return answer(to_caf_error(status_error(e.getStatus())));
        const auto err = status_error(e.getStatus());
        token_chunk c{.request = e.getRequestId(), .tokens = {}, .logits = {}, .finish = finish_reason::error,
                      .error_code = static_cast<std::uint8_t>(err.code()), .error = err.what(), .cached_prompt_tokens = 0};
        caf::anon_send(bridge_, std::move(in), std::move(c));
        return;
      }
      case schema::Envelope::Body::HEARTBEAT: {
        const auto h = body.getHeartbeat();
        // An answer says so: a peer's ping numbers its call with the peer's own counter, which
        // can equal the id of a call this node is waiting on (a ping taken for that call's
        // answer went unanswered, and the call got a heartbeat for its reply).
        if (h.getAnswer()) {
          heartbeat answered;
          answered.epoch = env.getEpoch();
          answered.sequence = h.getSequence();
          const auto index = h.getRoutedIndex();
          const auto count = h.getRoutedCount();
          if (index.size() != count.size())
            shoal::fail(errc::invalid_argument, "heartbeat with {} routed indices and {} counts", index.size(), count.size());
          for (unsigned i = 0; i < index.size(); ++i) {
            answered.routed_index.push_back(index[i]);
            answered.routed_count.push_back(count[i]);
          }
          const auto actors = h.getServedActor();
          const auto rows = h.getServedRows();
          if (actors.size() != rows.size())
            shoal::fail(errc::invalid_argument, "heartbeat with {} expert actors and {} row counts", actors.size(), rows.size());
          for (unsigned i = 0; i < actors.size(); ++i) {
            answered.served_actor.push_back(actors[i]);
            answered.served_rows.push_back(rows[i]);
          }
          return answer(std::move(answered));
        }
        // A ping from the supervisor, answered here rather than by an actor: it proves this
        // process and its transport make progress, whatever its actors are busy with.
        if (!options_.standby.empty() && is_head_or_standby(in.sender.node)) {
          std::string now;
          {
            std::lock_guard lock(mutex_);
            now = head_now_;
          }
          if (!now.empty() && now != in.sender.node) {
            // A head that was replaced while it was frozen or cut off: its evictions and
            // epochs must not count here, and it must learn that it is not the head.
            count_refusal(refusal::not_permitted);
            auto m = envelope({options_.node, in.receiver}, in.sender, in.correlation, epoch());
            encode_error(m, shoal::error(errc::failed_precondition,
                                         fmt::format("node {} took over as head; {} is not the head any more", now,
                                                     in.sender.node)));
            send_to_peer(peer, std::move(m));
            return;
          }
        }
        // Epochs, fences, evictions and the head's state count only from the head or the
        // standby, as announced on this connection: clients and other nodes ping too, and a
        // client's ping must not make this node drop its connections.
        const bool from_supervisor =
            options_.head.empty() || (is_head_or_standby(in.sender.node) && announced_name(peer) == in.sender.node);
        if (from_supervisor) {
          observe_epoch(env.getEpoch(), h.getFence());
          if (h.getHeadState().size() > 0) {
            std::lock_guard lock(mutex_);
            head_state_ = h.getHeadState().cStr();
          }
          for (auto name : h.getEvicted())
            if (std::string(name.cStr()) != options_.node) evict(name.cStr(), env.getEpoch());
        } else if (h.getEvicted().size() > 0 || h.getHeadState().size() > 0) {
          count_refusal(refusal::not_permitted);
          wire_log().warn("[{}] ignored the evictions and head state in a ping from '{}' (peer {}): only the head "
                          "and the standby send them",
                          options_.node, in.sender.node, peer);
        }
        heartbeat answer_beat;
        answer_beat.epoch = epoch();
        answer_beat.sequence = h.getSequence();
        for (const auto& [address, rows] : served_rows()) {
          answer_beat.served_actor.push_back(address.second);
          answer_beat.served_rows.push_back(rows);
        }
        const auto routed = routed_tokens();
        for (std::size_t i = 0; i < routed.size(); ++i)
          if (routed[i] != 0) {
            answer_beat.routed_index.push_back(static_cast<std::uint32_t>(i));
            answer_beat.routed_count.push_back(routed[i]);
          }
        auto m = envelope({options_.node, in.receiver}, in.sender, in.correlation, epoch());
        encode(m, answer_beat, options_.node);
        m.envelope().getBody().getHeartbeat().setAnswer(true);
        send_to_peer(peer, std::move(m));
        return;
      }
      case schema::Envelope::Body::STATUS_REQUEST: {
        const auto q = body.getStatusRequest();
        if (q.getCommand().size() == 0) {
          caf::anon_send(bridge_, std::move(in), status_atom::value);
          return;
        }
        admin_request r{.command = q.getCommand().cStr(), .args = {}, .token = q.getToken().cStr()};
        for (auto a : q.getArgs()) r.args.emplace_back(a.cStr());
        caf::anon_send(bridge_, std::move(in), admin_atom::value, std::move(r));
        return;
      }
      case schema::Envelope::Body::STATUS_REPLY: {
        const auto r = body.getStatusReply();
        if (r.getStatus().getCode() != schema::ErrorCode::OK) return answer(to_caf_error(status_error(r.getStatus())));
        return answer(std::string(r.getJson().cStr()));
      }
      case schema::Envelope::Body::LEAVE:
        return;
    }
    shoal::fail(errc::invalid_argument, "unknown message kind {}", static_cast<int>(body.which()));
  } catch (const shoal::error& e) {
    count_refusal(refusal::malformed);
    wire_log().warn("[{}] refused a message from peer {}: {}", options_.node, peer, e.what());
    // A request is answered, so that its sender fails the call now instead of at its timeout;
    // replies and notifications are not (an answer to them could bounce back and forth).
    try {
      const auto env = message.envelope();
      const auto kind = env.getBody().which();
      const bool request = kind == schema::Envelope::Body::STEP_BATCH ||
                           kind == schema::Envelope::Body::ACTIVATIONS ||
                           kind == schema::Envelope::Body::EXPERT_DISPATCH ||
                           kind == schema::Envelope::Body::GENERATE_REQUEST ||
                           kind == schema::Envelope::Body::STATUS_REQUEST;
      if (request) {
        auto m = envelope({options_.node, env.getReceiver().getActor()}, get_address(env.getSender()), env.getBatchId(),
                          epoch());
        if (kind == schema::Envelope::Body::GENERATE_REQUEST) {
          auto x = m.envelope().getBody().initError();
          x.setRequestId(env.getBody().getGenerateRequest().getRequestId());
          set_status(x.initStatus(), e.code(), e.what());
        } else {
          encode_error(m, e);
        }
        send_to_peer(peer, std::move(m));
      }
    } catch (const shoal::error& again) {
      wire_log().warn("[{}] could not answer peer {}: {}", options_.node, peer, again.what());
    }
  }
}

std::map<std::string, std::uint64_t> remote_fabric::refused_messages() const {
  return {{"malformed", refused_[0].load()},
          {"stale_epoch", refused_[1].load()},
          {"unknown_receiver", refused_[2].load()},
          {"not_permitted", refused_[3].load()}};
}

}  // namespace shoal::actors

namespace shoal {

std::string read_join_secret(const std::filesystem::path& file) { return transport::read_join_secret(file); }

}  // namespace shoal
