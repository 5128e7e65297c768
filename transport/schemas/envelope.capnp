# The envelope: every message that crosses a process boundary is one of these.
@0xeb18b5729f1dcedf;

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("shoal::transport::schema");

using Common = import "common.capnp";
using Membership = import "membership.capnp";
using Placement = import "placement.capnp";
using Data = import "data.capnp";
using Client = import "client.capnp";

# A bulk buffer that follows the envelope as its own transport message.
struct BulkRef {
  bytes @0 :UInt64;
}

struct Envelope {
  version @0 :UInt16;                 # Common.schemaVersion of the sender.
  sender @1 :Common.ActorAddress;
  receiver @2 :Common.ActorAddress;
  requestId @3 :UInt64;               # 0 = not about one request.
  batchId @4 :UInt64;                 # 0 = not about one batch.
  epoch @5 :UInt64;                   # Placement epoch the sender acted on.
  bulk @6 :List(BulkRef);             # Buffers delivered with this envelope, in order.

  # The kind of message is the union's discriminant.
  body :union {
    join @7 :Membership.Join;
    joinReply @8 :Membership.JoinReply;
    heartbeat @9 :Membership.Heartbeat;
    leave @10 :Membership.Leave;
    spawnStage @11 :Placement.SpawnStage;
    spawnExpert @12 :Placement.SpawnExpert;
    spawnReply @13 :Placement.SpawnReply;
    placementTable @14 :Placement.PlacementTable;
    stepBatch @15 :Data.StepBatch;
    activations @16 :Data.Activations;
    expertDispatch @17 :Data.ExpertDispatch;
    expertCombine @18 :Data.ExpertCombine;
    sampledTokens @19 :Data.SampledTokens;
    generateRequest @20 :Client.GenerateRequest;
    tokenChunk @21 :Client.TokenChunk;
    cancel @22 :Client.Cancel;
    error @23 :Client.Error;
    statusRequest @24 :Client.StatusRequest;
    statusReply @25 :Client.StatusReply;
    retireActor @26 :Placement.RetireActor;
    weightsRequest @27 :Placement.WeightsRequest;
    weightsReply @28 :Placement.WeightsReply;
  }
}
