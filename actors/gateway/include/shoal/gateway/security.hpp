#pragma once
/// \file
/// Who may use the gateway, and what it writes down about them: API keys, JWT bearer tokens,
/// TLS settings and the audit log. Plain C++ (OpenSSL, libjwt and the writer thread stay in
/// src/), so including this header costs nothing.
///
/// Keys file (`shoal keys new` writes it; one key a line, `#` comments and blank lines ignored):
///
///     # shoal api keys v1: NAME SCOPE SALT SHA256(SALT || KEY)
///     alice model 3f1c...(32 hex) 9ab0...(64 hex)
///     ops admin   77d2...         c41e...
///
/// NAME is `[A-Za-z0-9._@-]{1,64}` and unique, SCOPE is `model` (may generate and list models)
/// or `admin` (that, plus the admin routes), SALT is 16 random bytes and the last field the
/// SHA-256 of the salt's bytes followed by the key's bytes, both in lower-case hex. A key is
/// `shoal-` and 64 hex characters (32 random bytes); only its salted hash is stored.

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

namespace shoal::gateway {

/// Paths and switches of the gateway's security; every field empty or false: an open server.
struct security_settings {
  std::string api_keys_file;              ///< Keys file (format above); empty: no API keys.
  std::string jwt_hs256_secret_file;      ///< HS256 secret (the file's bytes, a trailing newline dropped).
  std::string jwt_rs256_public_key_file;  ///< RS256 public key, PEM.
  std::string jwt_audience;               ///< Required `aud` (a string, or one of an array); empty: not checked.
  std::string jwt_issuer;                 ///< Required `iss`; empty: not checked.
  std::chrono::seconds jwt_leeway{60};    ///< Clock skew allowed on `exp` and `nbf`.
  bool metrics_need_key = false;          ///< /metrics needs a key or token too (any scope).
  std::string tls_cert_file;              ///< PEM certificate chain; with `tls_key_file`, serve HTTPS.
  std::string tls_key_file;               ///< PEM private key of the certificate.
  std::string audit_log_file;             ///< One JSON line per request; empty: no audit log.
  std::uint64_t audit_log_max_bytes = 100ull << 20;  ///< Rotate when the file would grow past this.
  int audit_log_keep = 5;                 ///< Rotated files kept (FILE.1 newest ... FILE.N).
  bool audit_prompts = false;             ///< Also record the prompt (messages or prompt field).
  std::size_t audit_queue_lines = 8192;   ///< Lines waiting for the writer; more are dropped and counted.
};

/// Who made a request, once authenticated.
struct principal {
  std::string name;    ///< The key's name or the token's `sub`.
  std::string method;  ///< "api-key" or "jwt".
  bool model = false;  ///< May generate and list models.
  bool admin = false;  ///< May use the admin routes.
};

/// The outcome of checking an `Authorization` header. On failure `who` is empty and `status`,
/// `message` and `code` make the OpenAI-style error (401 for a missing or bad credential). The
/// message never contains the credential.
struct auth_result {
  std::optional<principal> who;
  int status = 401;
  std::string message;
  std::string code;
};

/// One line of the audit log.
struct audit_record {
  std::chrono::system_clock::time_point time;
  std::string principal;      ///< Empty: not authenticated.
  std::string auth_method;    ///< "api-key", "jwt" or empty.
  std::string method;         ///< HTTP method.
  std::string route;          ///< Path without the query.
  std::string model;          ///< Model of a generation request; empty otherwise.
  std::int64_t prompt_tokens = -1;      ///< -1: not a generation.
  std::int64_t completion_tokens = -1;  ///< -1: not a generation.
  int status = 0;
  double latency_ms = 0;
  std::string client;         ///< "address:port" of the peer.
  std::optional<std::string> prompt;  ///< JSON of the prompt, only with `audit_prompts`.
};

/// Loaded security: verifiers for keys and tokens, the TLS files, the audit log's writer.
/// Thread-safe after `load`.
class security {
 public:
  /// Reads and checks everything `s` names. Throws `shoal::error` (`invalid_argument`) naming
  /// the file, and for a keys file the line, when anything is missing or malformed; opens the
  /// audit log and starts its writer.
  static std::shared_ptr<security> load(const security_settings& s);
  ~security();
  security(const security&) = delete;
  security& operator=(const security&) = delete;

  const security_settings& settings() const noexcept;
  /// Keys or tokens are configured: every route but /health and /ready needs one.
  bool requires_auth() const noexcept;
  /// A TLS certificate and key are configured.
  bool tls() const noexcept;
  /// Checks `authorization`, the value of the request's `Authorization` header (empty when
  /// the request had none). Compares key hashes in constant time; logs nothing.
  auth_result authenticate(std::string_view authorization) const;
  /// Queues one audit line; never blocks on the file. Without an audit log, nothing.
  void audit(const audit_record& r) noexcept;
  /// Prometheus lines of the audit log (lines written, dropped) and authentication failures.
  std::string metrics_text() const;

 private:
  security();
  struct impl;
  std::unique_ptr<impl> impl_;
};

/// A key made by `make_api_key`: the secret, shown once, and its line for the keys file.
struct new_api_key {
  std::string key;
  std::string line;
};

/// A fresh random key for `name` with scope `admin` or model use; throws `shoal::error`
/// (`invalid_argument`) for a name outside `[A-Za-z0-9._@-]{1,64}`.
new_api_key make_api_key(std::string_view name, bool admin);

/// Appends a fresh key to `file` (created with mode 0600 and a header line when absent) and
/// returns the key. Refuses a malformed file (naming the line) and a name already in it.
std::string add_api_key(const std::filesystem::path& file, std::string_view name, bool admin);

}  // namespace shoal::gateway
