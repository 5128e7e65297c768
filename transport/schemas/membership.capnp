# Membership: nodes join the supervisor, prove they are alive, and leave.
@0xe5fdae14d38d67c2;

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("shoal::transport::schema");

using Common = import "common.capnp";

# Node -> supervisor, first message after connecting.
struct Join {
  node @0 :Text;                        # Name from the cluster config.
  host @1 :Text;                        # Address other nodes use to reach it.
  port @2 :UInt16;
  pid @3 :UInt32;
  devices @4 :List(Common.Device);
  schemaVersion @5 :UInt16;             # Common.schemaVersion of the joining binary.
  memoryBytes @6 :UInt64;               # Memory it offers for placement (0: unknown).
  epoch @7 :UInt64;                     # Newest placement epoch it has seen (a new head starts above it).
}

# Supervisor -> node, answer to Join.
struct JoinReply {
  status @0 :Common.Status;             # ok, or why the node is refused.
  epoch @1 :UInt64;                     # Current placement epoch.
  heartbeatIntervalMs @2 :UInt32;       # How often the node must send Heartbeat.
}

# Supervisor -> node, periodically (the envelope carries the supervisor's epoch); the node
# answers with a Heartbeat of its own under the same call id. A node that misses a few is
# declared dead and fenced.
struct Heartbeat {
  node @0 :Text;                        # Sender.
  sequence @1 :UInt64;                  # Increments by one per heartbeat.
  sentUnixNanos @2 :UInt64;
  load @3 :Float32;                     # Busy fraction in [0, 1] since the previous heartbeat (unused).
  evicted @4 :List(Text);               # Nodes declared dead in this epoch: drop connections to them.
  routedIndex @5 :List(UInt32);         # Answer: layer * experts + expert of nonzero counts ...
  routedCount @6 :List(UInt64);         # ... and the tokens this node's stages routed there so far.
  fence @7 :UInt64;                     # Data messages of older epochs are refused (see PlacementTable).
  servedActor @8 :List(UInt64);         # Answer: this node's expert actors ...
  servedRows @9 :List(UInt64);          # ... and the rows each computed so far.
  headState @10 :Text;                  # To the standby only: the head's placement (JSON), to take over with.
  answer @11 :Bool;                     # Set in an answer: a ping and an answer can carry the same call id (each side numbers its own calls).
}

# Node -> supervisor, before an orderly shutdown (drain finished).
struct Leave {
  node @0 :Text;
  reason @1 :Text;
}
