// The gateway's check of an `Authorization` header on any bytes, with API keys, an HS256
// secret and an RS256 public key all configured. It answers with a principal or a 401 that
// has a code and a message, never throws, and never repeats the credential in its message.
// The seed corpus holds tokens signed with the secret below (valid until 2100, expired, with
// `alg: none`, ...), so that mutations reach the claim checks behind the signature.

#include "fuzz_check.hpp"

#include "shoal/gateway/security.hpp"

#include <openssl/evp.h>
#include <openssl/pem.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <string_view>

namespace {

std::shared_ptr<shoal::gateway::security> checker;

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  namespace fs = std::filesystem;
  char dir_template[] = "/tmp/shoal-fuzz-bearer-XXXXXX";
  const fs::path dir = ::mkdtemp(dir_template);
  shoal::gateway::security_settings s;
  s.api_keys_file = (dir / "keys").string();
  shoal::gateway::add_api_key(s.api_keys_file, "fuzz", false);
  s.jwt_hs256_secret_file = (dir / "hs256").string();
  std::ofstream(s.jwt_hs256_secret_file) << "the bearer_token fuzzer's HS256 secret, 32+ bytes";
  EVP_PKEY* key = EVP_RSA_gen(2048);
  SHOAL_FUZZ_CHECK(key != nullptr);
  s.jwt_rs256_public_key_file = (dir / "rs256.pem").string();
  FILE* f = std::fopen(s.jwt_rs256_public_key_file.c_str(), "w");
  SHOAL_FUZZ_CHECK(f && PEM_write_PUBKEY(f, key) == 1);
  std::fclose(f);
  EVP_PKEY_free(key);
  s.jwt_audience = "shoal-fuzz";
  s.jwt_issuer = "fuzz-issuer";
  checker = shoal::gateway::security::load(s);
  fs::remove_all(dir);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view header(reinterpret_cast<const char*>(data), size);
  try {
    const auto r = checker->authenticate(header);
    if (r.who) {
      SHOAL_FUZZ_CHECK(r.who->method == "jwt" || r.who->method == "api-key");
      SHOAL_FUZZ_CHECK(r.who->name.size() <= 256);
      SHOAL_FUZZ_CHECK(!r.who->admin || r.who->model);
    } else {
      SHOAL_FUZZ_CHECK(r.status == 401);
      SHOAL_FUZZ_CHECK(!r.code.empty() && !r.message.empty());
      // A credential long enough to be a secret never comes back in the message.
      if (size > 40 && header.starts_with("Bearer "))
        SHOAL_FUZZ_CHECK(r.message.find(header.substr(7)) == std::string::npos);
    }
  } catch (...) {
    SHOAL_FUZZ_CHECK(false && "authenticate threw");
  }
  return 0;
}
