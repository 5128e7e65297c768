# Placement: the supervisor tells nodes which stages and experts to run.
@0x8941528f671264b4;

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("shoal::transport::schema");

using Common = import "common.capnp";

# Supervisor -> node agent: start a pipeline stage over layers [firstLayer, endLayer).
struct SpawnStage {
  actor @0 :UInt64;           # Actor id the node must give it.
  stage @1 :UInt32;           # Position in the pipeline, from 0.
  stageCount @2 :UInt32;      # The first stage embeds, the last samples.
  firstLayer @3 :UInt32;
  endLayer @4 :UInt32;        # Exclusive.
  device @5 :Common.Device;
  modelPath @6 :Text;
  kvBlocks @7 :UInt32;        # Latent-cache blocks to allocate for its layers (as many as the router's scheduler has).
  blockTokens @8 :UInt32;     # Positions per block.
}

# Supervisor -> node agent: start an expert actor holding `experts` of every MoE layer in
# [firstLayer, endLayer).
struct SpawnExpert {
  actor @0 :UInt64;
  experts @1 :List(UInt32);   # Routed expert ids.
  firstLayer @2 :UInt32;
  endLayer @3 :UInt32;        # Exclusive.
  device @4 :Common.Device;
  modelPath @5 :Text;
  source @6 :Common.ActorAddress;  # A running actor holding all of `experts` to stream their
                                   # weights from; empty node: load from modelPath.
}

# Node agent -> node agent: part `part` of the weights of `experts` (every MoE layer) held by
# the receiving node's expert actor `actor`.
struct WeightsRequest {
  actor @0 :UInt64;
  experts @1 :List(UInt32);
  part @2 :UInt32;
}

# The answer: some (layer, expert) pairs' tensors as one safetensors file (checkpoint names and
# dtypes) in a U8 bulk buffer, and the config.json they were checked against.
struct WeightsReply {
  status @0 :Common.Status;
  part @1 :UInt32;
  parts @2 :UInt32;
  configJson @3 :Text;
  tensors @4 :Common.TensorRef;
}

# Node agent -> supervisor: the result of SpawnStage/SpawnExpert.
struct SpawnReply {
  actor @0 :UInt64;
  status @1 :Common.Status;
}

struct StagePlacement {
  stage @0 :UInt32;
  firstLayer @1 :UInt32;
  endLayer @2 :UInt32;        # Exclusive.
  address @3 :Common.ActorAddress;
}

struct ExpertPlacement {
  experts @0 :List(UInt32);   # Routed expert ids this actor serves (replicas may overlap).
  firstLayer @1 :UInt32;
  endLayer @2 :UInt32;        # Exclusive.
  address @3 :Common.ActorAddress;
}

# Supervisor -> everyone: the placement valid for `epoch`. Data messages of epochs older than
# `fence` (the epoch in which a node was last declared dead) are refused; a change that loses
# no node (an expert copied or dropped) moves the epoch but not the fence, so steps in flight
# finish.
struct PlacementTable {
  epoch @0 :UInt64;
  stages @1 :List(StagePlacement);
  experts @2 :List(ExpertPlacement);
  fence @3 :UInt64;
}

# Supervisor -> node agent: stop the actor `actor` and free what it holds (an expert copy
# that the placement no longer routes to). The reply is a SpawnReply.
struct RetireActor {
  actor @0 :UInt64;
}
