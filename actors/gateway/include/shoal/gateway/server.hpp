#pragma once
/// \file
/// The OpenAI-compatible HTTP/1.1 server (Boost.Beast behind a pimpl, so that including this
/// header costs nothing). Routes:
///
///   POST /v1/chat/completions, POST /v1/completions   generation, JSON or server-sent events
///   GET  /v1/models                                    the served model
///   GET  /health                                       200 while the process serves HTTP
///   GET  /ready                                        200 when the engine demonstrably makes progress
///   GET  /metrics                                      Prometheus text
///   GET  /admin/status                                 engine queue and cache (admin scope)
///
/// With keys or tokens configured (`server_options::security`), every route but /health and
/// /ready (and /metrics unless `metrics_need_key`) needs `Authorization: Bearer ...`: 401
/// without a valid one, 403 when its scope does not cover the route. With a certificate it
/// serves HTTPS (TLS 1.2+) instead; plain HTTP to that port gets a plain 400 and is closed.
///
/// Every refusal is an OpenAI error object with the status that tells the client what to do:
/// 400 bad input, 404 unknown model or route, 405 wrong method, 408 a request that did not
/// arrive in time, 413 body too large, 429 too much queued, 503 shutting down (draining) or not
/// ready.
/// A client that disconnects has its request cancelled in the backend, and so has one that
/// reads so slowly that its unsent stream passes `max_write_queue_bytes`.

#include "shoal/gateway/backend.hpp"
#include "shoal/gateway/security.hpp"
#include "shoal/runtime/tokenizer.hpp"

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

namespace shoal::gateway {

/// Listening address, limits and timeouts.
struct server_options {
  std::string host = "127.0.0.1";
  std::uint16_t port = 8000;                         ///< 0: any free port (see `server::port`).
  std::string model_name = "shoal";                  ///< The `model` clients name.
  int io_threads = 1;                                ///< Threads running the sockets.
  std::size_t max_body_bytes = 1 << 20;              ///< Larger bodies get 413.
  std::int64_t max_in_flight = 512;                  ///< Generation requests at once; more get 429.
  std::int64_t default_max_tokens = 1024;            ///< When a request names none (capped by the context).
  std::chrono::milliseconds read_timeout{10'000};    ///< A request must arrive within this (408).
  std::chrono::milliseconds idle_timeout{60'000};    ///< Keep-alive connections idle longer are closed.
  std::chrono::milliseconds write_timeout{30'000};   ///< A client not reading for this long is dropped.
  /// Response bytes one connection may hold unsent beyond the write in progress: a client that
  /// reads slower than its stream is produced has its request cancelled and its connection
  /// closed past this (counted as shoal_http_slow_client_disconnects_total).
  std::size_t max_write_queue_bytes = 1 << 20;
  /// The kernel's send buffer of each connection (SO_SNDBUF; Linux doubles it for its own
  /// bookkeeping). Fixed rather than autotuned (up to net.ipv4.tcp_wmem's 4 MiB) so that what
  /// a client that stops reading can make the server hold is known: this plus
  /// `max_write_queue_bytes`. 0: the kernel's autotuning.
  std::size_t socket_send_buffer_bytes = 256 << 10;
  std::chrono::milliseconds request_deadline{600'000};  ///< Engine deadline of one generation.
  std::chrono::milliseconds stall_timeout{5'000};    ///< /ready: work held this long with no step is a hang.
  std::chrono::milliseconds probe_interval{10'000};  ///< /ready: idle longer than this, run a one-token probe.
  std::chrono::milliseconds probe_timeout{3'000};    ///< /ready: a probe slower than this is a hang.
  std::int64_t experts_per_layer = 0;                ///< Splits per-expert metrics into layer/expert labels.
  /// Keys, tokens, TLS and the audit log (see security.hpp); null: an open HTTP server.
  std::shared_ptr<gateway::security> security;
  /// One line per finished request (method, path, status, tokens, time); none if empty.
  std::function<void(const std::string&)> log;
};

/// A running server. Construction binds and starts serving; `shutdown` stops it.
///
/// Lifetime: a generation's event handler keeps its connection alive until its final event,
/// so the backend must have delivered or dropped every event handler (an engine shut down and
/// destroyed) before the server is destroyed.
class server {
 public:
  /// Binds `options.host:port` and starts the I/O threads. `back` and `tok` must outlive the
  /// server. Throws `shoal::error` (`unavailable`) when the address cannot be bound.
  server(backend& back, const runtime::tokenizer& tok, server_options options);
  ~server();
  server(const server&) = delete;
  server& operator=(const server&) = delete;

  /// The bound port (the chosen one when `options.port` was 0).
  std::uint16_t port() const;
  /// Generation requests being served.
  std::int64_t in_flight() const;
  /// Drains, then stops: closes idle connections and answers every new generation request
  /// 503 (`Retry-After`, code `unavailable`; new connections are still accepted for that)
  /// while generations in flight finish for up to `grace`; then cancels the rest, stops
  /// listening and stops the I/O threads. Returns how many generations were still running
  /// when `grace` ran out (cancelled); 0 on every call after the first.
  std::int64_t shutdown(std::chrono::milliseconds grace);

 private:
  struct impl;
  std::unique_ptr<impl> impl_;
};

}  // namespace shoal::gateway
