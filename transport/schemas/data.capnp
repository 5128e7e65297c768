# Data path of one decode/prefill iteration: router -> stages -> experts -> stages -> router.
@0x86cda6794e1d1646;

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("shoal::transport::schema");

using Common = import "common.capnp";

# One request's share of an iteration.
struct BatchEntry {
  requestId @0 :UInt64;
  tokens @1 :List(Int32);     # New tokens to process (a prefill chunk, or one decode token).
  position @2 :UInt32;        # Sequence position of tokens[0].
  sampleAfter @3 :Bool;       # Whether the last stage samples a token after this chunk.
  promptTokens @4 :UInt32;    # How many tokens of the whole sequence are the prompt (the rest are output).
  blocks @5 :List(Int32);     # Latent-cache block table of the sequence, covering every position up to the chunk's end.
  fresh @6 :Bool;             # First chunk since (re)admission: per-request sampler state is rebuilt.
  history @7 :List(Int32);    # When fresh and sampling is not greedy: the tokens before `position`.
}

# Router -> first stage: an iteration's batch.
struct StepBatch {
  step @0 :UInt64;
  entries @1 :List(BatchEntry);
  sampling @2 :List(SamplingParams);  # Parallel to entries.
  wantLogits @3 :Bool;                # The last stage returns the logits it sampled from.
  returnTo @4 :Common.ActorAddress;   # With returnCall: who began the step (its node answers
  returnCall @5 :UInt64;              # call returnCall); the last stage replies there directly.
}

# Per-request sampling parameters carried with the batch to the last stage.
struct SamplingParams {
  temperature @0 :Float32;    # 0 = greedy.
  topP @1 :Float32 = 1.0;
  topK @2 :UInt32;            # 0 = no top-k cut.
  seed @3 :UInt64;
  minP @4 :Float32;
  repetitionPenalty @5 :Float32 = 1.0;
  frequencyPenalty @6 :Float32;
  presencePenalty @7 :Float32;
  hasSeed @8 :Bool;           # Without a seed the last stage draws one.
  idLimit @9 :UInt32;         # Ids at or above are never sampled (the tokenizer's limit); 0 = none.
}

# Stage i -> stage i+1: hidden states after the sender's last layer.
struct Activations {
  step @0 :UInt64;
  nextLayer @1 :UInt32;
  hidden @2 :Common.TensorRef;        # [tokens, hidden_size].
  entries @3 :List(BatchEntry);       # Layout of the token rows, as in StepBatch.
  sampling @4 :List(SamplingParams);
  wantLogits @5 :Bool;                # As in StepBatch.
  returnTo @6 :Common.ActorAddress;   # As in StepBatch.
  returnCall @7 :UInt64;
}

# Stage -> expert actor: only the token rows routed to that actor's experts in one layer.
struct ExpertDispatch {
  step @0 :UInt64;
  layer @1 :UInt32;
  hidden @2 :Common.TensorRef;        # [rows, hidden_size] inputs of the experts.
  expertIds @3 :Common.TensorRef;     # [rows, k] i32 routed expert ids; -1 = not this actor.
  weights @4 :Common.TensorRef;       # [rows, k] f32 gate weights.
}

# Expert actor -> stage: the weighted sum of its experts' outputs per dispatched row.
struct ExpertCombine {
  step @0 :UInt64;
  layer @1 :UInt32;
  output @2 :Common.TensorRef;        # [rows, hidden_size], rows as in ExpertDispatch.
  status @3 :Common.Status;
}

struct SampledToken {
  requestId @0 :UInt64;
  token @1 :Int32;
  logprob @2 :Float32;
}

# Last stage -> router: the tokens sampled in one iteration.
struct SampledTokens {
  step @0 :UInt64;
  tokens @1 :List(SampledToken);
  hasLogits @2 :Bool;
  logits @3 :Common.TensorRef;        # [sampled, vocab] f32 when hasLogits (tests, eval).
}
