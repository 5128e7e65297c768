#pragma once
/// \file
/// An HTTP load generator for OpenAI-compatible servers: concurrent streaming clients, each
/// on one keep-alive connection, sending chat requests back to back; it times the first token
/// and the gaps between tokens as a client sees them.

#include <chrono>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace shoal::gateway {

/// A parsed `http://host:port` address.
struct http_address {
  std::string host = "127.0.0.1";
  std::uint16_t port = 8000;
};

/// Parses "http://host:port[/]" (scheme and port optional; https is refused). Throws
/// `shoal::error` (`invalid_argument`).
http_address parse_http_url(std::string_view url);

/// A whole (non-streaming) HTTP response.
struct http_reply {
  int status = 0;
  std::string body;
};

/// One blocking HTTP/1.1 request on a fresh connection. Throws `shoal::error` (`unavailable`)
/// on connection failures or when no complete answer arrives within `timeout`.
http_reply http_call(const http_address& address, std::string_view method, std::string_view target,
                     std::string_view body = {}, std::chrono::milliseconds timeout = std::chrono::seconds(30));

/// What to send and for how long.
struct load_options {
  http_address address;
  std::string model;                 ///< Empty: the first model of /v1/models.
  int concurrency = 8;               ///< Clients, each with one request at a time.
  std::int64_t requests = 0;         ///< Stop after this many requests in all (0: use `duration`).
  std::chrono::milliseconds duration{10'000};  ///< Stop starting requests after this long.
  std::int64_t max_tokens = 32;      ///< Per request.
  bool ignore_eos = true;            ///< Every request generates exactly `max_tokens`.
  std::string system_prompt;         ///< Shared by all requests (prefix-cache workload); empty: none.
  std::chrono::milliseconds request_timeout{120'000};  ///< A slower request counts as failed.
};

/// What the clients saw.
struct load_result {
  std::int64_t succeeded = 0;
  std::int64_t failed = 0;
  std::vector<std::string> errors;       ///< The first few failures, for the report.
  std::int64_t prompt_tokens = 0;        ///< From `usage` of the responses.
  std::int64_t cached_tokens = 0;        ///< usage.prompt_tokens_details.cached_tokens.
  std::int64_t generated_tokens = 0;     ///< usage.completion_tokens.
  double seconds = 0;                    ///< From the first request sent to the last answer.
  std::vector<double> ttft;              ///< Seconds to the first token, per request.
  std::vector<double> itl;               ///< Seconds between consecutive streamed tokens.
  /// Generated tokens per second over `seconds`.
  double tokens_per_second() const { return seconds > 0 ? static_cast<double>(generated_tokens) / seconds : 0; }
};

/// Runs the clients until `requests` or `duration` is reached and every request has ended.
load_result run_load(const load_options& options);

/// The `p`-th percentile (0..100, nearest rank) of `values`; 0 when empty.
double percentile(std::vector<double> values, double p);

}  // namespace shoal::gateway
