// The gateway's security as an operator and a client meet it: keys made with `shoal keys new`,
// tokens signed here with OpenSSL (keys and certificates made with the openssl command at test
// time, none committed), real `shoal serve` processes on loopback driven with raw HTTP and
// curl, and the checkpoint manifest checked by `shoal verify` and by loading. After every
// refusal the same server must still answer a valid request.

#include "free_port.hpp"
#include "raw_http.hpp"
#include "serve_process.hpp"
#include "skip.hpp"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/pem.h>

#include <sys/stat.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <regex>
#include <string>

namespace fs = std::filesystem;
using json = nlohmann::json;
using namespace std::chrono_literals;
using namespace shoal::gateway::testing;

namespace {

const fs::path& work() {
  static const fs::path dir = [] {
    const fs::path d = fs::path(SHOAL_GATEWAY_WORK_DIR);
    fs::create_directories(d);
    return d;
  }();
  return dir;
}

// Runs `command`; stdout alone (stderr to `err`, when given).
std::string stdout_of(const std::string& command, int* exit_code, const fs::path& err = "/dev/null") {
  std::string out;
  FILE* p = ::popen((command + " 2>" + err.string()).c_str(), "r");
  REQUIRE(p != nullptr);
  char buf[4096];
  std::size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  const int status = ::pclose(p);
  *exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return out;
}

std::string shoal_cmd(const std::string& args) { return std::string(SHOAL_BINARY) + " " + args; }

void openssl(const std::string& args) {
  const auto r = run("openssl " + args, 120);
  INFO("openssl " << args << "\n" << r.out);
  REQUIRE(r.exit_code == 0);
}

// ---- tokens, signed here ----

std::string b64url(std::string_view data) {
  std::string out(4 * ((data.size() + 2) / 3) + 1, '\0');
  const int n = EVP_EncodeBlock(reinterpret_cast<unsigned char*>(out.data()),
                                reinterpret_cast<const unsigned char*>(data.data()), static_cast<int>(data.size()));
  out.resize(static_cast<std::size_t>(n));
  while (!out.empty() && out.back() == '=') out.pop_back();
  for (auto& c : out) c = c == '+' ? '-' : c == '/' ? '_' : c;
  return out;
}

std::string hmac_sha256(const std::string& secret, const std::string& input) {
  unsigned char mac[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  REQUIRE(HMAC(EVP_sha256(), secret.data(), static_cast<int>(secret.size()),
               reinterpret_cast<const unsigned char*>(input.data()), input.size(), mac, &len) != nullptr);
  return std::string(reinterpret_cast<char*>(mac), len);
}

std::string rsa_sha256(const std::string& private_pem, const std::string& input) {
  BIO* bio = BIO_new_mem_buf(private_pem.data(), static_cast<int>(private_pem.size()));
  EVP_PKEY* key = PEM_read_bio_PrivateKey(bio, nullptr, nullptr, nullptr);
  BIO_free(bio);
  REQUIRE(key != nullptr);
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  std::size_t len = 0;
  REQUIRE(EVP_DigestSignInit(ctx, nullptr, EVP_sha256(), nullptr, key) == 1);
  REQUIRE(EVP_DigestSign(ctx, nullptr, &len, reinterpret_cast<const unsigned char*>(input.data()), input.size()) == 1);
  std::string sig(len, '\0');
  REQUIRE(EVP_DigestSign(ctx, reinterpret_cast<unsigned char*>(sig.data()), &len,
                         reinterpret_cast<const unsigned char*>(input.data()), input.size()) == 1);
  sig.resize(len);
  EVP_MD_CTX_free(ctx);
  EVP_PKEY_free(key);
  return sig;
}

std::int64_t now_s() {
  return std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}

constexpr const char* kAudience = "shoal-test";
constexpr const char* kIssuer = "https://issuer.test";

// Claims that the servers below accept (scope model, one hour left).
json good_claims(const std::string& subject = "carol") {
  return {{"sub", subject}, {"aud", kAudience}, {"iss", kIssuer}, {"exp", now_s() + 3600}, {"iat", now_s()},
          {"scope", "model"}};
}

std::string hs256_token(const std::string& secret, const json& claims, json header = {{"alg", "HS256"}, {"typ", "JWT"}}) {
  const auto input = b64url(header.dump()) + "." + b64url(claims.dump());
  return input + "." + b64url(hmac_sha256(secret, input));
}

std::string rs256_token(const std::string& private_pem, const json& claims) {
  const auto input = b64url(json{{"alg", "RS256"}, {"typ", "JWT"}}.dump()) + "." + b64url(claims.dump());
  return input + "." + b64url(rsa_sha256(private_pem, input));
}

// ---- the operator's files ----

struct credentials {
  std::string model_key;  // scope model, name alice
  std::string admin_key;  // scope admin, name ops
  std::string hs_secret;
  std::string rsa_private;
  std::string rsa_public;
  fs::path keys, hs_file, rsa_public_file, cert, cert_key;
};

const credentials& creds() {
  static const credentials c = [] {
    credentials c;
    c.keys = work() / "keys";
    fs::remove(c.keys);
    int rc = -1;
    c.model_key = stdout_of(shoal_cmd("keys new --file " + c.keys.string() + " --name alice"), &rc);
    REQUIRE(rc == 0);
    c.admin_key = stdout_of(shoal_cmd("keys new --file " + c.keys.string() + " --name ops --scope admin"), &rc);
    REQUIRE(rc == 0);
    for (auto* k : {&c.model_key, &c.admin_key}) {
      REQUIRE(k->ends_with("\n"));
      k->pop_back();
    }
    c.hs_file = work() / "hs256.secret";
    c.hs_secret = "an HS256 secret of the test, longer than 32 bytes";
    std::ofstream(c.hs_file) << c.hs_secret << "\n";
    const auto rsa_private_file = work() / "rsa.key";
    c.rsa_public_file = work() / "rsa.pub";
    openssl("genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out " + rsa_private_file.string());
    openssl("pkey -in " + rsa_private_file.string() + " -pubout -out " + c.rsa_public_file.string());
    c.rsa_private = slurp(rsa_private_file);
    c.rsa_public = slurp(c.rsa_public_file);
    c.cert = work() / "cert.pem";
    c.cert_key = work() / "cert.key";
    openssl("req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=localhost -addext subjectAltName=IP:127.0.0.1,DNS:localhost"
            " -keyout " + c.cert_key.string() + " -out " + c.cert.string());
    return c;
  }();
  return c;
}

std::map<std::string, std::string> tiny_cache() {
  return {{"XDG_CACHE_HOME", (work() / "cache").string()}};
}

std::string chat_body() {
  return json{{"model", "shoal-tiny"},
              {"messages", {{{"role", "user"}, {"content", "A secret prompt about the merger"}}}},
              {"max_tokens", 4},
              {"temperature", 0}}
      .dump();
}

std::string bearer(const std::string& credential) { return "Authorization: Bearer " + credential + "\r\n"; }

raw_response chat(std::uint16_t port, const std::string& credential) {
  return request(port, post("/v1/chat/completions", chat_body(), credential.empty() ? "" : bearer(credential)), 60s);
}

raw_response get_with(std::uint16_t port, const std::string& path, const std::string& credential) {
  return request(port, "GET " + path + " HTTP/1.1\r\nHost: localhost\r\n" + (credential.empty() ? "" : bearer(credential)) + "\r\n");
}

// The status and OpenAI error code of a refusal.
void check_refused(const raw_response& r, int status, const std::string& code) {
  INFO(r.body);
  REQUIRE(r.complete);
  CHECK(r.status == status);
  const auto j = json::parse(r.body);
  CHECK(j["error"]["code"] == code);
  CHECK(j["error"]["message"].is_string());
  CHECK(j["error"]["type"] == (status == 401 ? "invalid_request_error" : "permission_error"));
  if (status == 401) CHECK(r.headers.count("www-authenticate"));
}

void check_serves(std::uint16_t port, const std::string& credential) {
  const auto r = chat(port, credential);
  INFO(r.body);
  REQUIRE(r.status == 200);
  CHECK(json::parse(r.body)["usage"]["completion_tokens"].get<int>() >= 1);
}

// `path`, with what a previous run left there removed.
fs::path fresh(const fs::path& path) {
  fs::remove(path);
  return path;
}

// Keys, both JWT algorithms, audience and issuer, /metrics behind a key, an audit log.
serve_process& guarded() {
  const auto& c = creds();
  static serve_process p(
      "security-guarded",
      {"serve", "--port", std::to_string(shoal::testing::free_port()), "--threads", "2", "--cache-mb", "64", "--api-keys",
       c.keys.string(), "--jwt-hs256-secret-file", c.hs_file.string(), "--jwt-rs256-public-key", c.rsa_public_file.string(),
       "--jwt-audience", kAudience, "--jwt-issuer", kIssuer, "--metrics-need-key", "--audit-log",
       fresh(work() / "audit.jsonl").string()},
      tiny_cache());
  return p;
}

// HTTPS, RS256 tokens only.
serve_process& tls_rs256() {
  const auto& c = creds();
  static serve_process p("security-tls",
                         {"serve", "--port", std::to_string(shoal::testing::free_port()), "--threads", "2", "--cache-mb", "64",
                          "--tls-cert", c.cert.string(), "--tls-key", c.cert_key.string(), "--jwt-rs256-public-key",
                          c.rsa_public_file.string(), "--jwt-audience", kAudience},
                         tiny_cache());
  return p;
}

}  // namespace

TEST_CASE("keys new prints the key alone and stores only its salted hash", "[gateway][security]") {
  const auto& c = creds();
  CHECK(std::regex_match(c.model_key, std::regex("shoal-[0-9a-f]{64}")));
  CHECK(c.model_key != c.admin_key);
  const auto text = slurp(c.keys);
  CHECK(text.find(c.model_key) == std::string::npos);
  CHECK(text.find(c.model_key.substr(6)) == std::string::npos);
  CHECK(std::regex_search(text, std::regex("\nalice model [0-9a-f]{32} [0-9a-f]{64}\n")));
  CHECK(std::regex_search(text, std::regex("\nops admin [0-9a-f]{32} [0-9a-f]{64}\n")));
  struct stat st {};
  REQUIRE(::stat(c.keys.c_str(), &st) == 0);
  CHECK((st.st_mode & 0777) == 0600);

  // A second key of the same name, a bad name, a bad scope: refused, the file unchanged.
  const auto dup = run(shoal_cmd("keys new --file " + c.keys.string() + " --name alice"));
  CHECK(dup.exit_code == 2);
  CHECK(dup.out.find("exists already") != std::string::npos);
  CHECK(run(shoal_cmd("keys new --file " + c.keys.string() + " --name 'a b'")).exit_code == 2);
  CHECK(run(shoal_cmd("keys new --file " + c.keys.string() + " --name bob --scope root")).exit_code == 2);
  CHECK(slurp(c.keys) == text);
}

TEST_CASE("a malformed keys file is refused at start, naming file and line", "[gateway][security]") {
  const auto bad = work() / "bad-keys";
  std::ofstream(bad) << "# comment\n\nalice model 00112233445566778899aabbccddeeff "
                     << std::string(64, 'a') << "\nbob model nothex " << std::string(64, 'a') << "\n";
  const auto r = run(shoal_cmd("serve --port " + std::to_string(shoal::testing::free_port()) + " --api-keys " + bad.string()));
  INFO(r.out);
  CHECK(r.exit_code == 2);
  CHECK(r.out.find(bad.string() + ":4: the salt") != std::string::npos);
  CHECK(r.out.find("listening") == std::string::npos);

  const auto r2 = run(shoal_cmd("serve --port 0 --api-keys " + (work() / "no-such-keys").string()));
  CHECK(r2.exit_code == 2);
  const auto r3 = run(shoal_cmd("serve --port 0 --jwt-hs256-secret-file /dev/null"));
  CHECK(r3.exit_code == 2);
  CHECK(r3.out.find("at least 32") != std::string::npos);
  // Options that would leave a hole, or a certificate without its key, stop the start too.
  const auto& c = creds();
  for (const auto& [args, says] : std::vector<std::pair<std::string, std::string>>{
           {"--metrics-need-key", "--metrics-need-key needs"},
           {"--jwt-audience x", "need --jwt-hs256-secret-file"},
           {"--audit-prompts", "--audit-prompts needs --audit-log"},
           {"--tls-cert " + c.cert.string(), "go together"},
           {"--tls-cert " + c.cert.string() + " --tls-key " + (work() / "rsa.key").string(), "is not the key of"},
           {"--jwt-rs256-public-key " + c.cert.string(), "not a PEM RSA public key"}}) {
    const auto r = run(shoal_cmd("serve --port 0 " + args));
    INFO(args << "\n" << r.out);
    CHECK(r.exit_code == 2);
    CHECK(r.out.find(says) != std::string::npos);
    CHECK(r.out.find("listening") == std::string::npos);
  }
}

TEST_CASE("API keys: no key, wrong key, wrong scope refused; the server keeps serving", "[gateway][security]") {
  const auto& c = creds();
  auto& s = guarded();
  const auto port = s.port();

  check_refused(chat(port, ""), 401, "missing_credentials");
  check_serves(port, c.model_key);
  check_refused(chat(port, "shoal-" + std::string(64, '0')), 401, "invalid_api_key");
  check_serves(port, c.model_key);
  check_refused(chat(port, c.model_key.substr(0, c.model_key.size() - 1) + "x"), 401, "invalid_api_key");
  check_serves(port, c.model_key);
  check_refused(request(port, post("/v1/chat/completions", chat_body(), "Authorization: Basic " + c.model_key + "\r\n")), 401,
                "invalid_authorization");
  check_serves(port, c.model_key);
  check_refused(get_with(port, "/v1/models", ""), 401, "missing_credentials");
  check_refused(get_with(port, "/no/such/route", ""), 401, "missing_credentials");

  // Scope: a model key cannot use the admin route; an admin key can do both.
  check_refused(get_with(port, "/admin/status", c.model_key), 403, "insufficient_scope");
  check_serves(port, c.model_key);
  const auto status = get_with(port, "/admin/status", c.admin_key);
  CHECK(status.status == 200);
  CHECK(json::parse(status.body).contains("cache_blocks_total"));
  check_serves(port, c.admin_key);
  CHECK(get_with(port, "/v1/models", c.model_key).status == 200);

  // Probes stay open; /metrics needs a key here (--metrics-need-key).
  CHECK(get_with(port, "/health", "").status == 200);
  CHECK(get_with(port, "/ready", "").status == 200);
  check_refused(get_with(port, "/metrics", ""), 401, "missing_credentials");
  const auto metrics = get_with(port, "/metrics", c.model_key);
  REQUIRE(metrics.status == 200);
  CHECK(metrics.body.find("shoal_http_auth_failures_total{reason=\"invalid_api_key\"}") != std::string::npos);
  CHECK(metrics.body.find("shoal_audit_dropped_total 0") != std::string::npos);
}

TEST_CASE("JWT: every bad token is refused with 401 and the server keeps serving", "[gateway][security]") {
  const auto& c = creds();
  auto& s = guarded();
  const auto port = s.port();

  check_serves(port, hs256_token(c.hs_secret, good_claims()));
  check_serves(port, rs256_token(c.rsa_private, good_claims()));
  // An audience array containing ours, and an nbf just passed, are fine.
  auto claims = good_claims();
  claims["aud"] = json::array({"other", kAudience});
  claims["nbf"] = now_s() - 5;
  check_serves(port, hs256_token(c.hs_secret, claims));

  struct bad_token {
    std::string what, token, code;
  };
  std::vector<bad_token> cases;
  auto with = [&](const char* key, json value) {
    auto j = good_claims();
    j[key] = std::move(value);
    return j;
  };
  cases.push_back({"expired", hs256_token(c.hs_secret, with("exp", now_s() - 3600)), "token_expired"});
  cases.push_back({"not yet valid", hs256_token(c.hs_secret, with("nbf", now_s() + 3600)), "token_not_yet_valid"});
  cases.push_back({"wrong audience", hs256_token(c.hs_secret, with("aud", "someone-else")), "invalid_audience"});
  cases.push_back({"wrong issuer", rs256_token(c.rsa_private, with("iss", "https://evil.test")), "invalid_issuer"});
  auto no_exp = good_claims();
  no_exp.erase("exp");
  cases.push_back({"no exp", hs256_token(c.hs_secret, no_exp), "invalid_token"});
  const auto unsigned_input = b64url(R"({"alg":"none","typ":"JWT"})") + "." + b64url(good_claims().dump());
  cases.push_back({"alg none", unsigned_input + ".", "invalid_token"});
  cases.push_back({"alg none, signature kept", unsigned_input + "." + b64url(hmac_sha256(c.hs_secret, unsigned_input)),
                   "invalid_token"});
  cases.push_back({"alg HS512", hs256_token(c.hs_secret, good_claims(), {{"alg", "HS512"}}), "invalid_token"});
  auto forged = hs256_token(c.hs_secret, good_claims());
  forged.back() = forged.back() == 'A' ? 'B' : 'A';
  cases.push_back({"bad signature", forged, "invalid_token"});
  cases.push_back({"signed with another secret", hs256_token("another secret, also longer than 32 bytes", good_claims()),
                   "invalid_token"});
  // The payload swapped under a valid signature.
  const auto valid = hs256_token(c.hs_secret, good_claims());
  auto admin = good_claims();
  admin["scope"] = "admin";
  const auto dot1 = valid.find('.'), dot2 = valid.rfind('.');
  cases.push_back({"payload swapped", valid.substr(0, dot1 + 1) + b64url(admin.dump()) + valid.substr(dot2), "invalid_token"});
  cases.push_back({"unknown crit extension",
                   hs256_token(c.hs_secret, good_claims(), {{"alg", "HS256"}, {"crit", {"exp-ext"}}, {"exp-ext", 1}}),
                   "invalid_token"});
  cases.push_back({"garbage", "abc.def.ghi", "invalid_token"});
  cases.push_back({"header not JSON", b64url("not json") + "." + b64url("{}") + ".c2ln", "invalid_token"});
  cases.push_back({"alg not a string", b64url(R"({"alg":5})") + "." + b64url(good_claims().dump()) + ".c2ln", "invalid_token"});
  cases.push_back({"payload not JSON", hs256_token(c.hs_secret, "x"), "invalid_token"});
  for (const auto& bad : cases) {
    INFO(bad.what);
    check_refused(chat(port, bad.token), 401, bad.code);
    check_serves(port, c.model_key);
  }

  // Scope: no model scope, no model use; model scope, no admin route; admin scope, both.
  check_refused(chat(port, hs256_token(c.hs_secret, with("scope", "read write"))), 403, "insufficient_scope");
  auto no_scope = good_claims();
  no_scope.erase("scope");
  check_refused(chat(port, hs256_token(c.hs_secret, no_scope)), 403, "insufficient_scope");
  check_refused(get_with(port, "/admin/status", hs256_token(c.hs_secret, good_claims())), 403, "insufficient_scope");
  CHECK(get_with(port, "/admin/status", hs256_token(c.hs_secret, admin)).status == 200);
  CHECK(get_with(port, "/admin/status", rs256_token(c.rsa_private, with("scope", json::array({"admin"})))).status == 200);
  check_serves(port, hs256_token(c.hs_secret, good_claims()));
}

TEST_CASE("algorithm confusion: an HS256 token keyed with the RS256 public key is refused", "[gateway][security][tls]") {
  const auto& c = creds();
  auto& s = guarded();
  // Both the PEM text and its DER body as HMAC secret, on a server with both kinds of key...
  for (const auto& key : {c.rsa_public, c.rsa_public.substr(0, c.rsa_public.size() - 1)}) {
    check_refused(chat(s.port(), hs256_token(key, good_claims())), 401, "invalid_token");
    check_serves(s.port(), c.model_key);
  }
  // ...and on one that has only the RS256 key (over HTTPS).
  auto& t = tls_rs256();
  const auto url = "https://127.0.0.1:" + std::to_string(t.port());
  auto curl = [&](const std::string& token) {
    std::ofstream(work() / "tls-body.json") << chat_body();
    return run("curl -sS -m 60 -o " + (work() / "tls-out.json").string() + " -w '%{http_code}' --cacert " + c.cert.string() +
               " " + url + "/v1/chat/completions -H 'Content-Type: application/json' -H 'Authorization: Bearer " + token +
               "' -d @" + (work() / "tls-body.json").string());
  };
  const auto ok = curl(rs256_token(c.rsa_private, good_claims()));
  INFO(ok.out << slurp(work() / "tls-out.json"));
  REQUIRE(ok.exit_code == 0);
  CHECK(ok.out == "200");
  for (const auto& key : {c.rsa_public, c.hs_secret}) {
    const auto r = curl(hs256_token(key, good_claims()));
    CHECK(r.out == "401");
    CHECK(json::parse(slurp(work() / "tls-out.json"))["error"]["code"] == "invalid_token");
    CHECK(curl(rs256_token(c.rsa_private, good_claims())).out == "200");
  }
}

TEST_CASE("TLS: HTTPS only, TLS 1.2 or later; plain HTTP to the TLS port is refused harmlessly", "[gateway][security][tls]") {
  const auto& c = creds();
  auto& t = tls_rs256();
  const auto url = "https://127.0.0.1:" + std::to_string(t.port());
  const auto token = rs256_token(c.rsa_private, good_claims());
  auto models = [&](const std::string& extra) {
    return run("curl -sS -m 30 " + extra + " --cacert " + c.cert.string() + " " + url +
               "/v1/models -H 'Authorization: Bearer " + token + "'");
  };
  const auto ok = models("");
  INFO(ok.out);
  REQUIRE(ok.exit_code == 0);
  CHECK(json::parse(ok.out)["data"][0]["id"] == "shoal-tiny");
  CHECK(models("--tlsv1.2 --tls-max 1.2").exit_code == 0);
  // Keep-alive over TLS: a whole answer, a streamed one, then another, on one connection.
  {
    std::ofstream(work() / "tls-chat.json") << chat_body();
    auto streamed = json::parse(chat_body());
    streamed["stream"] = true;
    std::ofstream(work() / "tls-stream.json") << streamed.dump();
    std::string cmd = "curl -sS -v -m 60";
    const char* separator = "";
    for (const char* body : {"tls-chat.json", "tls-stream.json", "tls-chat.json"}) {
      cmd += std::string(separator) + " --cacert " + c.cert.string() + " " + url +
             "/v1/chat/completions -H 'Content-Type: application/json' -H 'Authorization: Bearer " + token + "' -d @" +
             (work() / body).string();
      separator = " --next";
    }
    const auto r = run(cmd);
    INFO(r.out);
    CHECK(r.exit_code == 0);
    CHECK(r.out.find("Re-using existing connection") != std::string::npos);
    CHECK(r.out.find("data: [DONE]") != std::string::npos);
    std::size_t oks = 0;
    for (auto pos = r.out.find("< HTTP/1.1 200"); pos != std::string::npos; pos = r.out.find("< HTTP/1.1 200", pos + 1)) ++oks;
    CHECK(oks == 3);
  }
  CHECK(models("--tlsv1.3").exit_code == 0);
  // An unverified certificate is the client's business; this one is refused by curl itself.
  CHECK(run("curl -sS -m 30 " + url + "/health").exit_code != 0);
  // TLS 1.1 and 1.0: no handshake (OpenSSL's client may refuse to even try; either way, no answer).
  CHECK(run("curl -sS -m 30 --tlsv1.0 --tls-max 1.1 --cacert " + c.cert.string() + " " + url + "/health").exit_code != 0);
  CHECK(models("").exit_code == 0);

  // Plain HTTP: a plain 400 saying so, and the connection closed.
  {
    raw_connection plain(t.port());
    plain.send(get("/health"));
    const auto r = plain.read_response(5s);
    INFO(r.body);
    CHECK(r.status == 400);
    CHECK(r.body.find("https_required") != std::string::npos);
    CHECK(plain.closed_within(5s));
  }
  // Garbage, and a client that opens a connection and says nothing, then goes away.
  {
    raw_connection junk(t.port());
    junk.send(std::string(300, '\x16'));
    CHECK(junk.closed_within(15s));
    raw_connection silent(t.port());
  }
  CHECK(models("").exit_code == 0);
  CHECK(run("curl -sS -m 30 --cacert " + c.cert.string() + " " + url + "/health").out.find("ok") != std::string::npos);
  const auto metrics = run("curl -sS -m 30 --cacert " + c.cert.string() + " " + url + "/metrics");
  CHECK(metrics.out.find("shoal_tls_handshake_failures_total") != std::string::npos);
}

TEST_CASE("the audit log: one line per request, principal named, no key, no prompt", "[gateway][security]") {
  const auto& c = creds();
  auto& s = guarded();
  check_serves(s.port(), c.model_key);
  check_refused(chat(s.port(), "shoal-" + std::string(64, '1')), 401, "invalid_api_key");
  check_serves(s.port(), hs256_token(c.hs_secret, good_claims("dave")));
  const auto path = work() / "audit.jsonl";
  // The writer thread appends shortly after the response.
  std::string text;
  for (int i = 0; i < 50; ++i) {
    text = slurp(path);
    if (text.find("\"dave\"") != std::string::npos) break;
    std::this_thread::sleep_for(100ms);
  }
  INFO(text);
  bool saw_alice = false, saw_dave = false, saw_refusal = false;
  std::istringstream lines(text);
  for (std::string line; std::getline(lines, line);) {
    const auto j = json::parse(line);  // every line is one JSON object
    for (const char* field : {"time", "principal", "auth", "route", "model", "status", "latency_ms", "client"})
      CHECK(j.contains(field));
    CHECK(j["client"].get<std::string>().starts_with("127.0.0.1:"));
    if (j["principal"] == "alice" && j["route"] == "/v1/chat/completions" && j["status"] == 200) {
      saw_alice = true;
      CHECK(j["auth"] == "api-key");
      CHECK(j["model"] == "shoal-tiny");
      CHECK(j["prompt_tokens"].get<int>() > 0);
      CHECK(j["completion_tokens"].get<int>() >= 1);
    }
    if (j["principal"] == "dave") saw_dave = j["auth"] == "jwt";
    if (j["status"] == 401 && j["principal"].is_null()) saw_refusal = true;
    CHECK(!j.contains("prompt"));
  }
  struct stat st {};
  REQUIRE(::stat(path.c_str(), &st) == 0);
  CHECK((st.st_mode & 0777) == 0600);
  CHECK(saw_alice);
  CHECK(saw_dave);
  CHECK(saw_refusal);
  // Neither the audit log nor the server's own log holds a key, a token or the prompt.
  for (const auto& log : {text, s.log()}) {
    CHECK(log.find(c.model_key) == std::string::npos);
    CHECK(log.find(c.admin_key) == std::string::npos);
    CHECK(log.find(c.model_key.substr(6, 16)) == std::string::npos);
    CHECK(log.find("secret prompt") == std::string::npos);
    CHECK(log.find(hs256_token(c.hs_secret, good_claims()).substr(0, 30)) == std::string::npos);
  }
}

TEST_CASE("the audit log rotates by size, keeps N files, and records prompts when asked", "[gateway][security]") {
  const auto dir = work() / "rotation";
  fs::remove_all(dir);
  fs::create_directories(dir);
  const auto path = dir / "audit.jsonl";
  serve_process s("security-audit",
                  {"serve", "--port", std::to_string(shoal::testing::free_port()), "--threads", "2", "--cache-mb", "64",
                   "--audit-log", path.string(), "--audit-log-max-mb", "0.004", "--audit-log-keep", "2", "--audit-prompts"},
                  tiny_cache());
  check_serves(s.port(), "");
  for (int i = 0; i < 120; ++i) REQUIRE(get_with(s.port(), "/health", "").status == 200);
  std::this_thread::sleep_for(500ms);
  CHECK(fs::exists(path));
  CHECK(fs::exists(dir / "audit.jsonl.1"));
  CHECK(fs::exists(dir / "audit.jsonl.2"));
  CHECK(!fs::exists(dir / "audit.jsonl.3"));
  for (const auto& f : {path, dir / "audit.jsonl.1", dir / "audit.jsonl.2"}) CHECK(fs::file_size(f) <= 4200);
  check_serves(s.port(), "");
  std::this_thread::sleep_for(300ms);
  const auto text = slurp(path);
  INFO(text);
  CHECK(text.find("A secret prompt about the merger") != std::string::npos);
  CHECK(s.terminate(30s) == 0);
}

TEST_CASE("an audit log that cannot be written drops lines, counts them, and slows nothing",
          "[gateway][security][audit-full]") {
  // /dev/full takes the open and fails every write with ENOSPC.
  if (!fs::is_character_file("/dev/full")) {
    shoal::testing::skip("this machine has no /dev/full to stand for a full disk");
    return;
  }
  serve_process s("security-audit-full",
                  {"serve", "--port", std::to_string(shoal::testing::free_port()), "--threads", "2", "--cache-mb", "64",
                   "--audit-log", "/dev/full"},
                  tiny_cache());
  for (int i = 0; i < 3; ++i) check_serves(s.port(), "");
  std::this_thread::sleep_for(300ms);
  const auto metrics = get_with(s.port(), "/metrics", "");
  REQUIRE(metrics.status == 200);
  INFO(metrics.body);
  std::smatch m;
  const auto body = metrics.body;
  REQUIRE(std::regex_search(body, m, std::regex("shoal_audit_dropped_total ([0-9]+)")));
  CHECK(std::stoi(m[1]) >= 3);
  CHECK(body.find("shoal_audit_lines_total 0") != std::string::npos);
  CHECK(fs::is_character_file("/dev/full"));  // never rotated away
  CHECK(s.terminate(30s) == 0);
}

TEST_CASE("shoal verify writes and checks the manifest; loading refuses a tampered file", "[gateway][security][manifest]") {
  const auto model = work() / "manifest-model";
  fs::remove_all(model);
  REQUIRE(run(shoal_cmd("make-model --preset tiny --out " + model.string()), 300).exit_code == 0);
  const auto write = run(shoal_cmd("verify --model " + model.string() + " --write"));
  INFO(write.out);
  REQUIRE(write.exit_code == 0);
  const auto manifest = json::parse(slurp(model / "shoal-manifest.json"));
  CHECK(manifest["files"].contains("config.json"));
  CHECK(manifest["files"].contains("tokenizer.json"));
  std::string shard;
  for (const auto& [name, entry] : manifest["files"].items())
    if (name.ends_with(".safetensors")) shard = name;
  REQUIRE(!shard.empty());
  CHECK(run(shoal_cmd("verify --model " + model.string())).exit_code == 0);

  // One byte changed in the middle of a shard (same size, so only the hash tells).
  const auto shard_path = model / shard;
  const auto size = fs::file_size(shard_path);
  char original = 0;
  {
    std::fstream f(shard_path, std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(static_cast<std::streamoff>(size / 2));
    f.get(original);
    f.seekp(static_cast<std::streamoff>(size / 2));
    f.put(static_cast<char>(original ^ 0x01));
  }
  const auto bad = run(shoal_cmd("verify --model " + model.string()));
  INFO(bad.out);
  CHECK(bad.exit_code == 2);
  CHECK(bad.out.find(shard_path.string() + ": SHA-256") != std::string::npos);
  const auto serve = run(shoal_cmd("serve --model " + model.string() + " --port " + std::to_string(shoal::testing::free_port())), 120);
  INFO(serve.out);
  CHECK(serve.exit_code == 2);
  CHECK(serve.out.find(shard) != std::string::npos);
  CHECK(serve.out.find("does not match") != std::string::npos);
  CHECK(serve.out.find("listening") == std::string::npos);
  const auto eval = run(shoal_cmd("eval --model " + model.string() + " --tokens 0,1 --json"));
  CHECK(eval.exit_code == 2);
  CHECK(eval.out.find(shard) != std::string::npos);

  // Restored: it loads and serves again. A stray shard the manifest does not list is refused.
  {
    std::fstream f(shard_path, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(static_cast<std::streamoff>(size / 2));
    f.put(original);
  }
  fs::copy_file(shard_path, model / "extra.safetensors");
  const auto stray = run(shoal_cmd("verify --model " + model.string()));
  CHECK(stray.exit_code == 2);
  CHECK(stray.out.find("extra.safetensors: not listed") != std::string::npos);
  fs::remove(model / "extra.safetensors");
  // A file of another size is named by its size, before any hashing.
  std::ofstream(model / "config.json", std::ios::app) << "\n";
  const auto grown = run(shoal_cmd("verify --model " + model.string()));
  CHECK(grown.exit_code == 2);
  CHECK(grown.out.find("config.json: ") != std::string::npos);
  CHECK(grown.out.find("bytes") != std::string::npos);
  REQUIRE(run(shoal_cmd("verify --model " + model.string() + " --write")).exit_code == 0);

  serve_process s("security-manifest",
                  {"serve", "--model", model.string(), "--name", "shoal-tiny", "--port",
                   std::to_string(shoal::testing::free_port()), "--threads", "2", "--cache-mb", "64"});
  CHECK(s.log().find("match shoal-manifest.json") != std::string::npos);
  check_serves(s.port(), "");
}
