#pragma once
/// \file
/// The C++ client API: submit requests to a router and receive tokens as they are generated.
/// No CAF in this header.

#include "shoal/actors/messages.hpp"

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace shoal {

namespace actors {
class local_cluster;
}
namespace runtime {
struct sampling_params;
}

/// How tokens are chosen: temperature, top-k, top-p, min-p, repetition/frequency/presence
/// penalties and a seed, with the meaning of `runtime::sampling_params` (and of the HTTP API's
/// fields of the same names). The defaults decode greedily.
using sampling_options = actors::sampling_spec;

/// `p` as a cluster takes it: the same fields, the seed (if any) with `has_seed`; ids at or
/// above `id_limit` (the tokenizer's, when the vocabulary is padded beyond it) are never
/// chosen, 0: no limit.
sampling_options to_sampling_options(const runtime::sampling_params& p, std::uint32_t id_limit = 0);

/// What to generate.
struct generate_options {
  std::vector<std::int32_t> prompt;          ///< Prompt token ids.
  sampling_options sampling;                 ///< Token choice (greedy by default).
  std::uint32_t max_tokens = 16;             ///< Tokens to generate at most.
  std::vector<std::int32_t> stop_tokens;     ///< Stop after one of these.
  bool want_logits = false;                  ///< Also return the logits each token was sampled from.
  std::chrono::milliseconds deadline{0};     ///< From submission; 0: none.
};

/// Tokens of one request, as they arrive.
using token_event = actors::token_chunk;

/// A finished request.
struct generate_result {
  std::vector<std::int32_t> tokens;          ///< Generated tokens.
  std::vector<float> logits;                 ///< `[tokens][vocab]` when wanted.
  actors::finish_reason finish = actors::finish_reason::none; ///< Why it ended.
};

/// The secret of a cluster's join secret file, for `client::connect`. Throws, naming the
/// file, when it cannot be read (`not_found`), others than its owner may read or write it
/// (`failed_precondition`), or it holds fewer than 32 bytes (`invalid_argument`).
std::string read_join_secret(const std::filesystem::path& file);

/// Where a head node listens (`host:port` of its node in the cluster config).
struct head_endpoint {
  std::string host;
  std::uint16_t port = 0;
};

/// A connection to a router. Thread-safe; requests are independent streams.
class client {
 public:
  /// A client of the router of a cluster in this process.
  explicit client(actors::local_cluster& cluster);
  /// A client of the router of the cluster whose head node listens on `host:port`
  /// (`shoal launch` prints it). A cluster with a `join_secret_file` needs its secret
  /// (`read_join_secret`) in `join_secret`, and the head must prove it holds the same one.
  /// Throws `unavailable` when it cannot connect within `timeout`, `failed_precondition`
  /// when the head speaks another schema version or either side refused the other's secret.
  static std::unique_ptr<client> connect(const std::string& host, std::uint16_t port,
                                         std::chrono::milliseconds timeout = std::chrono::seconds(10),
                                         const std::string& join_secret = {});
  /// A client of a cluster with a standby head: `heads` lists the head and the standby. It
  /// connects to the one in charge; when that one's connection fails, or it answers no ping
  /// for `failover_after`, the client finds the one in charge now and resubmits every
  /// unfinished request there with the tokens it already received, so each stream goes on
  /// where it was: no token missing or repeated, greedy output identical (sampled requests
  /// carry a seed fixed at submission). Throws like the other `connect` when no head answers.
  /// While no head answers, a cancelled request ends at once, a request whose deadline passes
  /// ends with `deadline_exceeded`, and after `no_head_limit` without even a ping answer from
  /// a head every request ends with `unavailable` (later ones too, until a head answers again).
  static std::unique_ptr<client> connect(const std::vector<head_endpoint>& heads,
                                         std::chrono::milliseconds timeout = std::chrono::seconds(10),
                                         const std::string& join_secret = {},
                                         std::chrono::milliseconds failover_after = std::chrono::seconds(3),
                                         std::chrono::milliseconds no_head_limit = std::chrono::seconds(60));
  /// Times this client moved its requests to another head (or to the same one after its
  /// connection failed).
  std::uint64_t failovers() const;
  ~client();
  client(const client&) = delete;
  client& operator=(const client&) = delete;

  /// Submits a request; returns its id. Tokens then arrive through `next`.
  std::uint64_t submit(const generate_options& options);
  /// Submits a request whose chunks are passed to `on_chunk` as they arrive, in order, on a
  /// thread of the client (keep it short; it must not call `next`). The last call has
  /// `finish != none`. It may run before `submit` returns.
  std::uint64_t submit(const generate_options& options, std::function<void(const token_event&)> on_chunk);
  /// The next chunk of request `id`, or nothing when none arrived within `timeout`. The last
  /// chunk has `finish != none`.
  std::optional<token_event> next(std::uint64_t id, std::chrono::milliseconds timeout);
  /// Cancels request `id`; its stream ends with `finish_reason::cancelled` (idempotent).
  void cancel(std::uint64_t id);
  /// The cluster's status as JSON: membership (nodes down, restarts), placement, the epoch,
  /// whether it serves and why not ("degraded"), and the router's scheduler counters under
  /// "scheduler". Throws `unavailable` when the head does not answer within `timeout`.
  std::string status(std::chrono::milliseconds timeout = std::chrono::seconds(15));
  /// An operator's command to the supervisor (`drain NODE`, `undrain NODE`) with the
  /// cluster's admin token; returns its JSON summary. Throws the supervisor's refusal
  /// (`invalid_argument` for a wrong token, `resource_exhausted` when nothing has room).
  std::string admin(const std::string& command, const std::vector<std::string>& args, const std::string& token,
                    std::chrono::milliseconds timeout = std::chrono::seconds(15));
  /// Submits and collects until the request finishes. Throws `shoal::error` with the
  /// router's error, or `deadline_exceeded` naming the wait when no chunk came in `timeout`.
  generate_result generate(const generate_options& options, std::chrono::milliseconds timeout);

  class impl;

 private:
  explicit client(std::unique_ptr<impl> state);
  std::unique_ptr<impl> impl_;
};

}  // namespace shoal
