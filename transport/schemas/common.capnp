# Types shared by every Shoal message: actor addresses, references to bulk tensors, statuses.
@0x8ebd146b4b7c5f90;

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("shoal::transport::schema");

# Bumped on every incompatible change; a peer that speaks another version is refused.
const schemaVersion :UInt16 = 9;  # 2: steps carry block tables; stages keep no per-request caches. 4: join-secret nonces. 5: fences, RetireActor. 6: epochs in joins, head state in heartbeats. 7: the last stage answers the router directly. 8: expert weights stream between nodes. 9: heartbeat answers say so.
                                  # 6: joins carry the epoch the node has seen (standby head takeover); requests resume.
                                  # 3: the supervisor sends heartbeats (with evictions), nodes answer.
                                  # 4: the transport's hello carries nonces for the join-secret proof.

# Where a message goes or comes from: an actor inside a named node.
struct ActorAddress {
  node @0 :Text;     # Node name, unique within the cluster ("" = the local node).
  actor @1 :UInt64;  # Actor id within that node; 0 is the node agent.
}

# Element types of tensors carried in bulk messages.
enum DType {
  f32 @0;
  bf16 @1;
  f16 @2;
  fp8e4m3 @3;
  i32 @4;
  i64 @5;
  u8 @6;
  f64 @7;
}

# A tensor whose bytes travel as a separate transport message (never inside the envelope).
struct TensorRef {
  bulk @0 :UInt32;          # Index into Envelope.bulk.
  offset @1 :UInt64;        # Byte offset of the first element inside that bulk buffer.
  dtype @2 :DType;
  shape @3 :List(UInt64);   # Row-major, contiguous.
}

# Mirrors shoal::errc: the code tells the receiver how to react.
enum ErrorCode {
  ok @0;
  invalidArgument @1;
  notFound @2;
  failedPrecondition @3;
  unavailable @4;
  aborted @5;
  resourceExhausted @6;
  deadlineExceeded @7;
  cancelled @8;
  internal @9;
}

struct Status {
  code @0 :ErrorCode;
  message @1 :Text;  # What went wrong and where, for a human.
}

# A compute device of a node.
struct Device {
  kind @0 :Text;          # "cpu" or "cuda".
  index @1 :UInt32;       # CUDA ordinal; 0 for the CPU.
  memoryBytes @2 :UInt64; # Memory the node offers on it.
}
