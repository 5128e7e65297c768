// API keys and JWT bearer tokens. Signatures are checked by libjwt (Debian's libjwt 1.10.2,
// OpenSSL flavour); which algorithm a key may verify is decided here, before libjwt sees the
// token, because libjwt 1.10 takes the algorithm from the token's header: given an RS256
// public key and a token that says HS256 it would use the key's PEM bytes as an HMAC secret.
// Claims (exp, nbf, aud, iss, scope) are checked here on the payload libjwt decoded.

#include "shoal/gateway/security.hpp"

#include "audit_log.hpp"
#include "shoal/base/error.hpp"
#include "shoal/base/hex.hpp"

#include <fmt/format.h>
#include <jwt.h>
#include <nlohmann/json.hpp>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cstdlib>
#include <fstream>
#include <map>
#include <mutex>
#include <sstream>
#include <vector>

namespace shoal::gateway {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

constexpr std::size_t kSaltBytes = 16;
constexpr std::size_t kKeyBytes = 32;
constexpr std::string_view kKeyPrefix = "shoal-";
constexpr std::string_view kKeysHeader = "# shoal api keys v1: NAME SCOPE SALT SHA256(SALT || KEY)";
constexpr std::size_t kMaxTokenBytes = 16 * 1024;

struct bio_free {
  void operator()(BIO* b) const { BIO_free(b); }
};
struct pkey_free {
  void operator()(EVP_PKEY* k) const { EVP_PKEY_free(k); }
};
struct x509_free {
  void operator()(X509* x) const { X509_free(x); }
};
struct jwt_deleter {
  void operator()(jwt_t* j) const { jwt_free(j); }
};
struct c_free {
  void operator()(char* p) const { std::free(p); }
};

std::optional<std::vector<unsigned char>> from_hex(std::string_view s) {
  if (s.size() % 2) return std::nullopt;
  auto nibble = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
  };
  std::vector<unsigned char> out(s.size() / 2);
  for (std::size_t i = 0; i < out.size(); ++i) {
    const int hi = nibble(s[2 * i]), lo = nibble(s[2 * i + 1]);
    if (hi < 0 || lo < 0) return std::nullopt;
    out[i] = static_cast<unsigned char>(hi * 16 + lo);
  }
  return out;
}

std::vector<unsigned char> random_bytes(std::size_t n) {
  std::vector<unsigned char> out(n);
  SHOAL_REQUIRE(RAND_bytes(out.data(), static_cast<int>(n)) == 1, "OpenSSL's random generator failed");
  return out;
}

std::array<unsigned char, 32> salted_sha256(const std::vector<unsigned char>& salt, std::string_view key) {
  std::array<unsigned char, 32> digest{};
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx(EVP_MD_CTX_new(), &EVP_MD_CTX_free);
  unsigned int len = 0;
  SHOAL_REQUIRE(ctx && EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) == 1 &&
                    EVP_DigestUpdate(ctx.get(), salt.data(), salt.size()) == 1 &&
                    EVP_DigestUpdate(ctx.get(), key.data(), key.size()) == 1 &&
                    EVP_DigestFinal_ex(ctx.get(), digest.data(), &len) == 1 && len == digest.size(),
                "SHA-256 failed");
  return digest;
}

bool valid_key_name(std::string_view name) {
  if (name.empty() || name.size() > 64) return false;
  for (const char c : name)
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '.' && c != '_' && c != '@' && c != '-') return false;
  return true;
}

struct key_entry {
  std::string name;
  bool admin = false;
  std::vector<unsigned char> salt;
  std::array<unsigned char, 32> hash{};
};

// The keys of `text` (the file `file`); a malformed line is refused naming file and line.
std::vector<key_entry> parse_keys(const std::string& text, const fs::path& file) {
  std::vector<key_entry> keys;
  std::istringstream in(text);
  std::string line;
  int number = 0;
  while (std::getline(in, line)) {
    ++number;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    const auto first = line.find_first_not_of(" \t");
    if (first == std::string::npos || line[first] == '#') continue;
    std::istringstream fields(line);
    std::string name, scope, salt, hash, extra;
    fields >> name >> scope >> salt >> hash;
    auto bad = [&](std::string_view why) {
      shoal::fail(errc::invalid_argument, "{}:{}: {} (expected NAME SCOPE SALT HASH as `shoal keys new` writes them)",
                  file.string(), number, why);
    };
    if (hash.empty()) bad("fewer than 4 fields");
    if (fields >> extra) bad("more than 4 fields");
    if (!valid_key_name(name)) bad(fmt::format("key name '{}' is not 1-64 of [A-Za-z0-9._@-]", name.substr(0, 80)));
    if (scope != "model" && scope != "admin") bad("the scope must be 'model' or 'admin'");
    const auto salt_bytes = from_hex(salt);
    if (!salt_bytes || salt_bytes->size() != kSaltBytes) bad("the salt must be 32 lower-case hex characters");
    const auto hash_bytes = from_hex(hash);
    if (!hash_bytes || hash_bytes->size() != 32) bad("the hash must be 64 lower-case hex characters");
    for (const auto& k : keys)
      if (k.name == name) bad(fmt::format("the key name '{}' appears twice", name));
    key_entry e;
    e.name = name;
    e.admin = scope == "admin";
    e.salt = *salt_bytes;
    std::copy(hash_bytes->begin(), hash_bytes->end(), e.hash.begin());
    keys.push_back(std::move(e));
  }
  return keys;
}

std::string read_file(const fs::path& path, std::string_view what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) shoal::fail(errc::invalid_argument, "{} {}: cannot be read", what, path.string());
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

// base64url without padding, as JWS uses it; nothing on a character outside the alphabet.
std::optional<std::string> base64url_decode(std::string_view in) {
  std::string out;
  std::uint32_t acc = 0;
  int bits = 0;
  for (const char c : in) {
    int v;
    if (c >= 'A' && c <= 'Z') v = c - 'A';
    else if (c >= 'a' && c <= 'z') v = c - 'a' + 26;
    else if (c >= '0' && c <= '9') v = c - '0' + 52;
    else if (c == '-') v = 62;
    else if (c == '_') v = 63;
    else return std::nullopt;
    acc = (acc << 6) | static_cast<std::uint32_t>(v);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out.push_back(static_cast<char>((acc >> bits) & 0xff));
    }
  }
  if (bits >= 6) return std::nullopt;  // a lone trailing character
  return out;
}

auth_result refuse(std::string message, std::string code) {
  auth_result r;
  r.status = 401;
  r.message = std::move(message);
  r.code = std::move(code);
  return r;
}

}  // namespace

struct security::impl {
  security_settings settings;
  std::vector<key_entry> keys;
  std::string hs256_secret;
  std::string rs256_pem;
  std::unique_ptr<audit_log> audit;
  mutable std::mutex failures_mutex;
  mutable std::map<std::string, std::uint64_t> failures;  // by code

  auth_result check_key(std::string_view key) const;
  auth_result check_jwt(std::string_view token) const;
  void count_failure(const std::string& code) const {
    std::lock_guard lock(failures_mutex);
    ++failures[code];
  }
};

security::security() : impl_(std::make_unique<impl>()) {}
security::~security() = default;

const security_settings& security::settings() const noexcept { return impl_->settings; }

bool security::requires_auth() const noexcept {
  return !impl_->keys.empty() || !impl_->hs256_secret.empty() || !impl_->rs256_pem.empty();
}

bool security::tls() const noexcept { return !impl_->settings.tls_cert_file.empty(); }

std::shared_ptr<security> security::load(const security_settings& s) {
  std::shared_ptr<security> result(new security());
  auto& i = *result->impl_;
  i.settings = s;
  if (!s.api_keys_file.empty()) {
    i.keys = parse_keys(read_file(s.api_keys_file, "--api-keys"), s.api_keys_file);
    if (i.keys.empty())
      shoal::fail(errc::invalid_argument, "--api-keys {}: holds no key; add one with `shoal keys new --file {} --name NAME`",
                  s.api_keys_file, s.api_keys_file);
  }
  if (!s.jwt_hs256_secret_file.empty()) {
    i.hs256_secret = read_file(s.jwt_hs256_secret_file, "--jwt-hs256-secret-file");
    if (!i.hs256_secret.empty() && i.hs256_secret.back() == '\n') i.hs256_secret.pop_back();
    if (!i.hs256_secret.empty() && i.hs256_secret.back() == '\r') i.hs256_secret.pop_back();
    // RFC 7518 3.2: an HS256 key must be at least as long as the hash.
    if (i.hs256_secret.size() < 32)
      shoal::fail(errc::invalid_argument, "--jwt-hs256-secret-file {}: the secret has {} bytes; HS256 needs at least 32",
                  s.jwt_hs256_secret_file, i.hs256_secret.size());
  }
  if (!s.jwt_rs256_public_key_file.empty()) {
    i.rs256_pem = read_file(s.jwt_rs256_public_key_file, "--jwt-rs256-public-key");
    std::unique_ptr<BIO, bio_free> bio(BIO_new_mem_buf(i.rs256_pem.data(), static_cast<int>(i.rs256_pem.size())));
    std::unique_ptr<EVP_PKEY, pkey_free> key(bio ? PEM_read_bio_PUBKEY(bio.get(), nullptr, nullptr, nullptr) : nullptr);
    if (!key || EVP_PKEY_base_id(key.get()) != EVP_PKEY_RSA)
      shoal::fail(errc::invalid_argument, "--jwt-rs256-public-key {}: not a PEM RSA public key (BEGIN PUBLIC KEY)",
                  s.jwt_rs256_public_key_file);
    if (EVP_PKEY_bits(key.get()) < 2048)
      shoal::fail(errc::invalid_argument, "--jwt-rs256-public-key {}: a {}-bit RSA key; RS256 needs at least 2048 bits",
                  s.jwt_rs256_public_key_file, EVP_PKEY_bits(key.get()));
  }
  if (s.tls_cert_file.empty() != s.tls_key_file.empty())
    shoal::fail(errc::invalid_argument, "--tls-cert and --tls-key go together");
  if (!s.tls_cert_file.empty()) {
    const auto cert_pem = read_file(s.tls_cert_file, "--tls-cert");
    const auto key_pem = read_file(s.tls_key_file, "--tls-key");
    std::unique_ptr<BIO, bio_free> cb(BIO_new_mem_buf(cert_pem.data(), static_cast<int>(cert_pem.size())));
    std::unique_ptr<X509, x509_free> cert(cb ? PEM_read_bio_X509(cb.get(), nullptr, nullptr, nullptr) : nullptr);
    if (!cert) shoal::fail(errc::invalid_argument, "--tls-cert {}: no PEM certificate in it", s.tls_cert_file);
    std::unique_ptr<BIO, bio_free> kb(BIO_new_mem_buf(key_pem.data(), static_cast<int>(key_pem.size())));
    std::unique_ptr<EVP_PKEY, pkey_free> key(kb ? PEM_read_bio_PrivateKey(kb.get(), nullptr, nullptr, nullptr) : nullptr);
    if (!key) shoal::fail(errc::invalid_argument, "--tls-key {}: no unencrypted PEM private key in it", s.tls_key_file);
    if (X509_check_private_key(cert.get(), key.get()) != 1)
      shoal::fail(errc::invalid_argument, "--tls-key {} is not the key of the certificate in --tls-cert {}", s.tls_key_file,
                  s.tls_cert_file);
  }
  const bool jwt = !i.hs256_secret.empty() || !i.rs256_pem.empty();
  if (s.metrics_need_key && i.keys.empty() && !jwt)
    shoal::fail(errc::invalid_argument, "--metrics-need-key needs --api-keys or a --jwt-* key to check");
  if ((!s.jwt_audience.empty() || !s.jwt_issuer.empty()) && !jwt)
    shoal::fail(errc::invalid_argument,
                "--jwt-audience and --jwt-issuer need --jwt-hs256-secret-file or --jwt-rs256-public-key");
  if (s.audit_prompts && s.audit_log_file.empty()) shoal::fail(errc::invalid_argument, "--audit-prompts needs --audit-log");
  if (!s.audit_log_file.empty()) i.audit = std::make_unique<audit_log>(s);
  return result;
}

auth_result security::authenticate(std::string_view authorization) const {
  auto& i = *impl_;
  auto fail_with = [&i](auth_result r) {
    i.count_failure(r.code);
    return r;
  };
  if (authorization.empty())
    return fail_with(refuse("this server needs an API key or token: send `Authorization: Bearer KEY`", "missing_credentials"));
  constexpr std::string_view scheme = "bearer ";
  if (authorization.size() <= scheme.size() ||
      !std::equal(scheme.begin(), scheme.end(), authorization.begin(),
                  [](char a, char b) { return a == std::tolower(static_cast<unsigned char>(b)); }))
    return fail_with(refuse("the Authorization header must be `Bearer KEY`", "invalid_authorization"));
  auto credential = authorization.substr(scheme.size());
  while (!credential.empty() && (credential.front() == ' ' || credential.front() == '\t')) credential.remove_prefix(1);
  while (!credential.empty() && (credential.back() == ' ' || credential.back() == '\t')) credential.remove_suffix(1);
  auth_result r;
  if (credential.starts_with(kKeyPrefix) && !i.keys.empty()) {
    r = i.check_key(credential);
  } else if (std::count(credential.begin(), credential.end(), '.') == 2 &&
             (!i.hs256_secret.empty() || !i.rs256_pem.empty())) {
    r = i.check_jwt(credential);
  } else {
    r = refuse("invalid API key or token", "invalid_api_key");
  }
  return r.who ? r : fail_with(std::move(r));
}

auth_result security::impl::check_key(std::string_view key) const {
  // Every entry is hashed and compared in constant time, so the time taken says nothing about
  // which entry, or how much of one, matched.
  const key_entry* found = nullptr;
  for (const auto& e : keys) {
    const auto digest = salted_sha256(e.salt, key);
    if (CRYPTO_memcmp(digest.data(), e.hash.data(), digest.size()) == 0) found = &e;
  }
  if (!found) return refuse("invalid API key", "invalid_api_key");
  auth_result r;
  r.who = principal{found->name, "api-key", true, found->admin};
  r.status = 200;
  return r;
}

auth_result security::impl::check_jwt(std::string_view token) const {
  if (token.size() > kMaxTokenBytes) return refuse("the token is too long", "invalid_token");
  const auto dot = token.find('.');
  const auto header_text = base64url_decode(token.substr(0, dot));
  json header;
  if (header_text) header = json::parse(*header_text, nullptr, false);
  if (!header_text || !header.is_object() || !header.contains("alg") || !header["alg"].is_string())
    return refuse("malformed token: its header is not base64url JSON with an `alg`", "invalid_token");
  // The algorithm decides the key, and each key verifies one algorithm only: `none`, any other
  // algorithm, and an HS256 token where only an RS256 public key is configured are refused
  // before a signature is looked at.
  // RFC 7515 4.1.11: extensions marked critical must be understood; this server knows none.
  if (header.contains("crit")) return refuse("the token's header has `crit` extensions this server does not know", "invalid_token");
  const auto alg = header["alg"].get<std::string>();
  const std::string* key = nullptr;
  jwt_alg_t expected = JWT_ALG_INVAL;
  if (alg == "HS256" && !hs256_secret.empty()) {
    key = &hs256_secret;
    expected = JWT_ALG_HS256;
  } else if (alg == "RS256" && !rs256_pem.empty()) {
    key = &rs256_pem;
    expected = JWT_ALG_RS256;
  } else {
    std::string accepted;
    if (!hs256_secret.empty()) accepted = "HS256";
    if (!rs256_pem.empty()) accepted += accepted.empty() ? "RS256" : " or RS256";
    return refuse(fmt::format("token algorithm '{}' is not accepted here (only {})", alg.substr(0, 20), accepted),
                  "invalid_token");
  }
  const std::string text(token);
  jwt_t* raw = nullptr;
  const int rc = jwt_decode(&raw, text.c_str(), reinterpret_cast<const unsigned char*>(key->data()),
                            static_cast<int>(key->size()));
  std::unique_ptr<jwt_t, jwt_deleter> decoded(raw);
  if (rc != 0 || !decoded) return refuse("invalid token: bad signature or malformed", "invalid_token");
  if (jwt_get_alg(decoded.get()) != expected) return refuse("invalid token: algorithm mismatch", "invalid_token");
  std::unique_ptr<char, c_free> grants(jwt_get_grants_json(decoded.get(), nullptr));
  const json claims = grants ? json::parse(grants.get(), nullptr, false) : json();
  if (!claims.is_object()) return refuse("malformed token: its payload is not a JSON object", "invalid_token");

  const double now =
      std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
  const double leeway = static_cast<double>(settings.jwt_leeway.count());
  if (!claims.contains("exp") || !claims["exp"].is_number())
    return refuse("the token has no numeric `exp`; tokens without an expiry are refused", "invalid_token");
  if (claims["exp"].get<double>() + leeway < now) return refuse("the token has expired", "token_expired");
  if (claims.contains("nbf")) {
    if (!claims["nbf"].is_number()) return refuse("malformed token: `nbf` is not a number", "invalid_token");
    if (claims["nbf"].get<double>() - leeway > now) return refuse("the token is not valid yet (nbf)", "token_not_yet_valid");
  }
  if (!settings.jwt_issuer.empty()) {
    if (!claims.contains("iss") || !claims["iss"].is_string() || claims["iss"].get<std::string>() != settings.jwt_issuer)
      return refuse("the token's issuer (iss) is not the one this server accepts", "invalid_issuer");
  }
  if (!settings.jwt_audience.empty()) {
    bool ok = false;
    if (claims.contains("aud")) {
      const auto& aud = claims["aud"];
      if (aud.is_string()) ok = aud.get<std::string>() == settings.jwt_audience;
      if (aud.is_array())
        for (const auto& a : aud) ok = ok || (a.is_string() && a.get<std::string>() == settings.jwt_audience);
    }
    if (!ok) return refuse("the token's audience (aud) does not include this server", "invalid_audience");
  }
  principal who;
  who.method = "jwt";
  who.name = claims.contains("sub") && claims["sub"].is_string() ? claims["sub"].get<std::string>() : std::string("-");
  if (who.name.size() > 256) who.name.resize(256);
  auto grant = [&who](std::string_view s) {
    if (s == "admin") who.admin = who.model = true;
    if (s == "model") who.model = true;
  };
  if (claims.contains("scope")) {
    const auto& scope = claims["scope"];
    if (scope.is_string()) {
      std::istringstream words(scope.get<std::string>());
      std::string w;
      while (words >> w) grant(w);
    } else if (scope.is_array()) {
      for (const auto& s : scope)
        if (s.is_string()) grant(s.get<std::string>());
    }
  }
  auth_result r;
  r.who = std::move(who);
  r.status = 200;
  return r;
}

void security::audit(const audit_record& r) noexcept {
  if (impl_->audit) impl_->audit->push(r);
}

std::string security::metrics_text() const {
  std::string out;
  {
    std::lock_guard lock(impl_->failures_mutex);
    if (!impl_->failures.empty()) {
      out += "# HELP shoal_http_auth_failures_total Requests refused for a missing or bad credential, by reason.\n";
      out += "# TYPE shoal_http_auth_failures_total counter\n";
      for (const auto& [code, n] : impl_->failures)
        out += fmt::format("shoal_http_auth_failures_total{{reason=\"{}\"}} {}\n", code, n);
    }
  }
  if (impl_->audit) {
    out += "# HELP shoal_audit_lines_total Audit log lines written.\n# TYPE shoal_audit_lines_total counter\n";
    out += fmt::format("shoal_audit_lines_total {}\n", impl_->audit->written());
    out += "# HELP shoal_audit_dropped_total Audit log lines dropped because the writer fell behind or the file "
           "could not be written.\n# TYPE shoal_audit_dropped_total counter\n";
    out += fmt::format("shoal_audit_dropped_total {}\n", impl_->audit->dropped());
  }
  return out;
}

new_api_key make_api_key(std::string_view name, bool admin) {
  if (!valid_key_name(name))
    shoal::fail(errc::invalid_argument, "key name '{}' is not 1-64 of [A-Za-z0-9._@-]", name.substr(0, 80));
  const auto secret = random_bytes(kKeyBytes);
  const auto salt = random_bytes(kSaltBytes);
  new_api_key k;
  k.key = std::string(kKeyPrefix) + to_hex(secret.data(), secret.size());
  const auto digest = salted_sha256(salt, k.key);
  k.line = fmt::format("{} {} {} {}", name, admin ? "admin" : "model", to_hex(salt.data(), salt.size()),
                       to_hex(digest.data(), digest.size()));
  return k;
}

std::string add_api_key(const std::filesystem::path& file, std::string_view name, bool admin) {
  auto k = make_api_key(name, admin);
  const int fd = ::open(file.c_str(), O_RDWR | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
  if (fd < 0) shoal::fail(errc::invalid_argument, "--file {}: cannot be opened for writing", file.string());
  struct closer {
    int fd;
    ~closer() { ::close(fd); }
  } guard{fd};
  // Two `keys new` at once must not both pass the duplicate check.
  ::flock(fd, LOCK_EX);
  std::string text;
  char buf[4096];
  ssize_t n;
  while ((n = ::pread(fd, buf, sizeof buf, static_cast<off_t>(text.size()))) > 0) text.append(buf, static_cast<std::size_t>(n));
  for (const auto& e : parse_keys(text, file))
    if (e.name == name) shoal::fail(errc::invalid_argument, "{}: a key named '{}' exists already", file.string(), name);
  std::string out;
  if (text.empty()) out = std::string(kKeysHeader) + "\n";
  else if (text.back() != '\n') out = "\n";
  out += k.line + "\n";
  if (::write(fd, out.data(), out.size()) != static_cast<ssize_t>(out.size()) || ::fsync(fd) != 0)
    shoal::fail(errc::unavailable, "{}: writing the key failed", file.string());
  return std::move(k.key);
}

}  // namespace shoal::gateway
