# Client <-> router: requests in, tokens out.
@0xf6b3f6b2469a64cb;

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("shoal::transport::schema");

using Common = import "common.capnp";

struct SamplingOptions {
  temperature @0 :Float32;            # 0 = greedy.
  topP @1 :Float32 = 1.0;
  topK @2 :UInt32;                    # 0 = no top-k cut.
  seed @3 :UInt64;
  maxTokens @4 :UInt32 = 256;
  stopTokens @5 :List(Int32);
  stop @6 :List(Text);                # Stop strings (applied where the text is: the gateway).
  minP @7 :Float32;
  repetitionPenalty @8 :Float32 = 1.0;
  frequencyPenalty @9 :Float32;
  presencePenalty @10 :Float32;
  hasSeed @11 :Bool;                  # Without a seed the last stage draws one.
  idLimit @12 :UInt32;                # Ids at or above are never sampled; 0 = none.
}

struct ChatMessage {
  role @0 :Text;                      # "system", "user", "assistant".
  content @1 :Text;
}

struct GenerateRequest {
  requestId @0 :UInt64;               # Chosen by the client, unique per connection.
  prompt :union {
    text @1 :Text;
    tokens @2 :List(Int32);
    chat @3 :List(ChatMessage);
  }
  sampling @4 :SamplingOptions;
  deadlineUnixMs @5 :UInt64;          # 0 = no deadline.
  model @6 :Text;                     # "" = the default model.
  wantLogits @7 :Bool;                # Return each token's logits with it (tests, eval).
  resumeTokens @8 :List(Int32);       # Tokens of it already delivered (a client resuming after a head failover).
}

enum FinishReason {
  none @0;                            # More chunks follow.
  stop @1;
  length @2;
  cancelled @3;
  error @4;
}

# Router -> client: tokens as they are generated.
struct TokenChunk {
  requestId @0 :UInt64;
  tokens @1 :List(Int32);
  text @2 :Text;                      # Detokenized text of `tokens`.
  finish @3 :FinishReason;
  hasLogits @4 :Bool;
  logits @5 :Common.TensorRef;        # [tokens, vocab] f32 when the request wanted logits.
  cachedPromptTokens @6 :UInt32;      # Prompt tokens served from the router's prefix cache.
}

struct Cancel {
  requestId @0 :UInt64;
  reason @1 :Text;
}

# Router -> client: the request failed; `status.code` says whether to retry.
struct Error {
  requestId @0 :UInt64;
  status @1 :Common.Status;
}

# Client -> head (supervisor): the cluster's status for operators and gateways.
struct StatusRequest {
  reason @0 :Text;                      # Who asks (for traces); may be empty.
  command @1 :Text;                     # Empty: the status. Else an admin command (drain, undrain) ...
  args @2 :List(Text);                  # ... its arguments ...
  token @3 :Text;                       # ... and the cluster's admin token.
}

# Head -> client: answer to StatusRequest.
struct StatusReply {
  status @0 :Common.Status;             # ok, or why there is no status.
  json @1 :Text;                        # Membership, placement and scheduler counters (JSON object).
}
