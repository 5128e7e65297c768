#include "shoal/runtime/weights_crypto.hpp"

#include "shoal/base/error.hpp"
#include "shoal/runtime/manifest.hpp"

#include <fmt/core.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <fstream>
#include <iterator>
#include <vector>

namespace shoal::runtime {
namespace {

constexpr char kMagic[8] = {'S', 'H', 'O', 'A', 'L', 'E', 'N', 'C'};
constexpr std::uint32_t kVersion = 1;
constexpr std::size_t kHeaderBytes = 64;
constexpr std::size_t kTagBytes = 16;
constexpr std::uint32_t kMinChunkBytes = 4u << 10;
constexpr std::uint32_t kMaxChunkBytes = 64u << 20;
constexpr std::string_view kAadLabel = "shoal weights v1";
constexpr std::string_view kFileKeyLabel = "shoal weights v1 file key";

struct cipher_ctx_deleter {
  void operator()(EVP_CIPHER_CTX* ctx) const noexcept { EVP_CIPHER_CTX_free(ctx); }
};
using cipher_ctx_ptr = std::unique_ptr<EVP_CIPHER_CTX, cipher_ctx_deleter>;

struct fd_owner {
  int fd = -1;
  ~fd_owner() {
    if (fd >= 0) ::close(fd);
  }
};

void put_le(unsigned char* at, std::uint64_t value, int bytes) {
  for (int i = 0; i < bytes; ++i) at[i] = static_cast<unsigned char>(value >> (8 * i));
}

std::uint64_t get_le(const unsigned char* at, int bytes) {
  std::uint64_t value = 0;
  for (int i = bytes - 1; i >= 0; --i) value = (value << 8) | at[i];
  return value;
}

std::array<unsigned char, 32> file_key(const weights_key& key, const unsigned char* salt) {
  std::string message(kFileKeyLabel);
  message.append(reinterpret_cast<const char*>(salt), 32);
  std::array<unsigned char, 32> out{};
  unsigned int length = 0;
  if (HMAC(EVP_sha256(), key.bytes.data(), static_cast<int>(key.bytes.size()),
           reinterpret_cast<const unsigned char*>(message.data()), message.size(), out.data(), &length) == nullptr ||
      length != out.size())
    shoal::fail(errc::internal, "OpenSSL's HMAC-SHA256 failed");
  return out;
}

std::array<unsigned char, 12> chunk_nonce(std::uint64_t index) {
  std::array<unsigned char, 12> nonce{};
  for (int i = 0; i < 8; ++i) nonce[11 - i] = static_cast<unsigned char>(index >> (8 * i));
  return nonce;
}

std::string chunk_aad(const std::array<unsigned char, 64>& header, const std::string& name, std::uint64_t index,
                      bool final) {
  std::string aad(kAadLabel);
  aad.append(reinterpret_cast<const char*>(header.data()), header.size());
  aad += name;
  unsigned char tail[9];
  put_le(tail, index, 8);
  tail[8] = final ? 1 : 0;
  aad.append(reinterpret_cast<const char*>(tail), sizeof(tail));
  return aad;
}

std::uint64_t chunk_count(std::uint64_t plain_size, std::uint32_t chunk_bytes) {
  return plain_size == 0 ? 1 : (plain_size + chunk_bytes - 1) / chunk_bytes;
}

// Writes all of `data` or throws naming `path`.
void write_all(int fd, const void* data, std::size_t size, const std::filesystem::path& path) {
  const auto* p = static_cast<const char*>(data);
  while (size > 0) {
    const auto n = ::write(fd, p, size);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) shoal::fail(errc::unavailable, "{}: cannot write: {}", path.string(), std::strerror(errno));
    p += n;
    size -= static_cast<std::size_t>(n);
  }
}

// Reads exactly `size` bytes at `offset` or throws naming `path`.
void read_at(int fd, void* data, std::size_t size, std::uint64_t offset, const std::filesystem::path& path) {
  auto* p = static_cast<char*>(data);
  while (size > 0) {
    const auto n = ::pread(fd, p, size, static_cast<off_t>(offset));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) shoal::fail(errc::unavailable, "{}: cannot read: {}", path.string(), std::strerror(errno));
    if (n == 0) shoal::fail(errc::invalid_argument, "{}: the encrypted file ends early (truncated)", path.string());
    p += n;
    size -= static_cast<std::size_t>(n);
    offset += static_cast<std::uint64_t>(n);
  }
}

bool hidden(const std::filesystem::path& p) { return p.filename().string().starts_with("."); }

}  // namespace

weights_key read_weights_key(const std::filesystem::path& file) {
  const auto name = file.string();
  struct stat info {};
  if (::stat(name.c_str(), &info) != 0)
    shoal::fail(errc::not_found, "{}: cannot read the weights key file: {}", name, std::strerror(errno));
  if ((info.st_mode & 077) != 0)
    shoal::fail(errc::failed_precondition,
                "{}: the weights key file may be read or written by other users (mode {:04o}); run chmod 600 {}", name,
                info.st_mode & 07777, name);
  std::ifstream in(file, std::ios::binary);
  if (!in) shoal::fail(errc::not_found, "{}: cannot read the weights key file", name);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const auto first = text.find_first_not_of(" \t\r\n");
  const auto last = text.find_last_not_of(" \t\r\n");
  text = first == std::string::npos ? std::string() : text.substr(first, last - first + 1);
  if (text.size() != 64)
    shoal::fail(errc::invalid_argument,
                "{}: a weights key file holds 64 hex characters (32 bytes), this one holds {} characters "
                "(`shoal keys new-weights-key --file FILE` writes one)",
                name, text.size());
  weights_key key;
  for (std::size_t i = 0; i < 32; ++i) {
    unsigned value = 0;
    for (std::size_t j = 0; j < 2; ++j) {
      const char c = text[2 * i + j];
      unsigned digit = 0;
      if (c >= '0' && c <= '9')
        digit = static_cast<unsigned>(c - '0');
      else if (c >= 'a' && c <= 'f')
        digit = static_cast<unsigned>(c - 'a' + 10);
      else if (c >= 'A' && c <= 'F')
        digit = static_cast<unsigned>(c - 'A' + 10);
      else
        shoal::fail(errc::invalid_argument, "{}: character {} of the weights key is not a hex digit", name,
                    2 * i + j + 1);
      value = value * 16 + digit;
    }
    key.bytes[i] = static_cast<unsigned char>(value);
  }
  return key;
}

bool is_encrypted_weights_file(const std::filesystem::path& file) {
  std::ifstream in(file, std::ios::binary);
  char magic[sizeof(kMagic)] = {};
  return in.read(magic, sizeof(magic)) && std::memcmp(magic, kMagic, sizeof(kMagic)) == 0;
}

void encrypt_weights_file(const std::filesystem::path& source, const std::filesystem::path& target,
                          const weights_key& key, std::uint32_t chunk_bytes) {
  if (chunk_bytes < kMinChunkBytes || chunk_bytes > kMaxChunkBytes)
    shoal::fail(errc::invalid_argument, "chunks of {} bytes: between {} and {} are allowed", chunk_bytes,
                kMinChunkBytes, kMaxChunkBytes);
  fd_owner in{::open(source.c_str(), O_RDONLY | O_CLOEXEC)};
  if (in.fd < 0) shoal::fail(errc::not_found, "{}: cannot open: {}", source.string(), std::strerror(errno));
  struct stat info {};
  if (::fstat(in.fd, &info) != 0 || !S_ISREG(info.st_mode))
    shoal::fail(errc::invalid_argument, "{}: not a regular file", source.string());
  const auto plain_size = static_cast<std::uint64_t>(info.st_size);
  fd_owner out{::open(target.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600)};
  if (out.fd < 0) shoal::fail(errc::invalid_argument, "{}: cannot create: {}", target.string(), std::strerror(errno));

  std::array<unsigned char, 64> header{};
  std::memcpy(header.data(), kMagic, sizeof(kMagic));
  put_le(header.data() + 8, kVersion, 4);
  put_le(header.data() + 12, chunk_bytes, 4);
  put_le(header.data() + 16, plain_size, 8);
  if (RAND_bytes(header.data() + 24, 32) != 1) shoal::fail(errc::internal, "OpenSSL's random generator failed");
  const auto subkey = file_key(key, header.data() + 24);
  write_all(out.fd, header.data(), header.size(), target);

  const auto name = target.filename().string();
  const auto chunks = chunk_count(plain_size, chunk_bytes);
  std::vector<unsigned char> plain(chunk_bytes), sealed(chunk_bytes + kTagBytes);
  cipher_ctx_ptr ctx(EVP_CIPHER_CTX_new());
  if (!ctx) shoal::fail(errc::resource_exhausted, "OpenSSL could not allocate a cipher context");
  for (std::uint64_t i = 0; i < chunks; ++i) {
    const auto length = static_cast<std::size_t>(std::min<std::uint64_t>(chunk_bytes, plain_size - i * chunk_bytes));
    read_at(in.fd, plain.data(), length, i * chunk_bytes, source);
    const auto nonce = chunk_nonce(i);
    const auto aad = chunk_aad(header, name, i, i + 1 == chunks);
    int n = 0, tail = 0;
    if (EVP_EncryptInit_ex(ctx.get(), EVP_aes_256_gcm(), nullptr, subkey.data(), nonce.data()) != 1 ||
        EVP_EncryptUpdate(ctx.get(), nullptr, &n, reinterpret_cast<const unsigned char*>(aad.data()),
                          static_cast<int>(aad.size())) != 1 ||
        EVP_EncryptUpdate(ctx.get(), sealed.data(), &n, plain.data(), static_cast<int>(length)) != 1 ||
        EVP_EncryptFinal_ex(ctx.get(), sealed.data() + n, &tail) != 1 ||
        EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_GCM_GET_TAG, kTagBytes, sealed.data() + length) != 1)
      shoal::fail(errc::internal, "{}: OpenSSL's AES-256-GCM failed on chunk {}", source.string(), i);
    write_all(out.fd, sealed.data(), length + kTagBytes, target);
  }
  OPENSSL_cleanse(plain.data(), plain.size());
  if (::fsync(out.fd) != 0) shoal::fail(errc::unavailable, "{}: cannot sync: {}", target.string(), std::strerror(errno));
}

encrypted_weights_reader::encrypted_weights_reader(const std::filesystem::path& file, const weights_key& key)
    : path_(file) {
  fd_ = ::open(file.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd_ < 0) shoal::fail(errc::not_found, "{}: cannot open: {}", file.string(), std::strerror(errno));
  // A refused file must not keep its descriptor: the destructor does not run when the
  // constructor throws.
  try {
    check_header(file, key);
  } catch (...) {
    ::close(fd_);
    fd_ = -1;
    throw;
  }
}

void encrypted_weights_reader::check_header(const std::filesystem::path& file, const weights_key& key) {
  struct stat info {};
  if (::fstat(fd_, &info) != 0) shoal::fail(errc::invalid_argument, "{}: cannot stat", file.string());
  const auto size = static_cast<std::uint64_t>(info.st_size);
  if (size < kHeaderBytes)
    shoal::fail(errc::invalid_argument, "{}: an encrypted weights file of only {} bytes (truncated)", file.string(), size);
  read_at(fd_, header_.data(), header_.size(), 0, path_);
  if (std::memcmp(header_.data(), kMagic, sizeof(kMagic)) != 0)
    shoal::fail(errc::invalid_argument, "{}: not an encrypted weights file", file.string());
  const auto version = get_le(header_.data() + 8, 4);
  if (version != kVersion)
    shoal::fail(errc::invalid_argument, "{}: encrypted weights format version {}, this build reads {}", file.string(),
                version, kVersion);
  chunk_bytes_ = static_cast<std::uint32_t>(get_le(header_.data() + 12, 4));
  plain_size_ = get_le(header_.data() + 16, 8);
  if (chunk_bytes_ < kMinChunkBytes || chunk_bytes_ > kMaxChunkBytes)
    shoal::fail(errc::invalid_argument, "{}: chunks of {} bytes in the header", file.string(), chunk_bytes_);
  // Checked before multiplying: a forged size must not overflow the expected length.
  if (plain_size_ > (std::uint64_t{1} << 50))
    shoal::fail(errc::invalid_argument, "{}: a plaintext size of {} bytes in the header", file.string(), plain_size_);
  chunks_ = chunk_count(plain_size_, chunk_bytes_);
  const auto expected = kHeaderBytes + plain_size_ + chunks_ * kTagBytes;
  if (size < expected)
    shoal::fail(errc::invalid_argument, "{}: the encrypted file is truncated ({} bytes, its header says {})",
                file.string(), size, expected);
  if (size > expected)
    shoal::fail(errc::invalid_argument, "{}: the encrypted file has {} bytes more than its header says", file.string(),
                size - expected);
  file_key_ = file_key(key, header_.data() + 24);
  buffer_ = std::make_unique<std::byte[]>(chunk_bytes_ + kTagBytes);
}

encrypted_weights_reader::~encrypted_weights_reader() {
  OPENSSL_cleanse(file_key_.data(), file_key_.size());
  if (fd_ >= 0) ::close(fd_);
}

void encrypted_weights_reader::decrypt_chunk(std::uint64_t index, std::byte* out) {
  SHOAL_REQUIRE(index < chunks_, "chunk {} of a file of {} chunks", index, chunks_);
  const auto length =
      static_cast<std::size_t>(std::min<std::uint64_t>(chunk_bytes_, plain_size_ - index * chunk_bytes_));
  read_at(fd_, buffer_.get(), length + kTagBytes, kHeaderBytes + index * (std::uint64_t{chunk_bytes_} + kTagBytes),
          path_);
  const auto nonce = chunk_nonce(index);
  const auto aad = chunk_aad(header_, path_.filename().string(), index, index + 1 == chunks_);
  cipher_ctx_ptr ctx(EVP_CIPHER_CTX_new());
  if (!ctx) shoal::fail(errc::resource_exhausted, "OpenSSL could not allocate a cipher context");
  auto* sealed = reinterpret_cast<unsigned char*>(buffer_.get());
  int n = 0, tail = 0;
  if (EVP_DecryptInit_ex(ctx.get(), EVP_aes_256_gcm(), nullptr, file_key_.data(), nonce.data()) != 1 ||
      EVP_DecryptUpdate(ctx.get(), nullptr, &n, reinterpret_cast<const unsigned char*>(aad.data()),
                        static_cast<int>(aad.size())) != 1 ||
      EVP_DecryptUpdate(ctx.get(), reinterpret_cast<unsigned char*>(out), &n, sealed, static_cast<int>(length)) != 1 ||
      EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_GCM_SET_TAG, kTagBytes, sealed + length) != 1)
    shoal::fail(errc::internal, "{}: OpenSSL's AES-256-GCM failed on chunk {}", path_.string(), index);
  if (EVP_DecryptFinal_ex(ctx.get(), reinterpret_cast<unsigned char*>(out) + n, &tail) != 1) {
    // Nothing of a chunk that does not authenticate may be used.
    std::memset(out, 0, length);
    shoal::fail(errc::invalid_argument,
                "{}: chunk {} of {} does not authenticate: the weights key is wrong, or the file was changed, "
                "renamed or truncated",
                path_.string(), index, chunks_);
  }
}

encrypt_summary encrypt_checkpoint(const std::filesystem::path& dir, const std::filesystem::path& out,
                                   const weights_key& key, std::uint32_t chunk_bytes,
                                   const std::function<void(const std::string&)>& progress) {
  namespace fs = std::filesystem;
  const auto start = std::chrono::steady_clock::now();
  if (!fs::is_directory(dir)) shoal::fail(errc::not_found, "{}: not a checkpoint directory", dir.string());
  if (fs::exists(out) && !(fs::is_directory(out) && fs::is_empty(out)))
    shoal::fail(errc::invalid_argument, "{}: the output directory exists and is not empty", out.string());
  encrypt_summary summary;
  const bool had_manifest = fs::exists(dir / kManifestFile);
  // The copies are only as good as the files they were made from.
  if (had_manifest) verify_manifest(dir, progress);
  std::error_code ec;
  fs::create_directories(out, ec);
  if (ec) shoal::fail(errc::invalid_argument, "{}: cannot create the output directory: {}", out.string(), ec.message());
  std::vector<fs::path> files;
  for (const auto& entry : fs::directory_iterator(dir)) {
    if (hidden(entry.path()) || entry.path().filename() == kManifestFile) continue;
    if (!entry.is_regular_file())
      shoal::fail(errc::invalid_argument, "{}: only regular files are encrypted or copied, not this",
                  entry.path().string());
    files.push_back(entry.path());
  }
  std::sort(files.begin(), files.end());
  for (const auto& file : files) {
    const auto target = out / file.filename();
    summary.bytes += fs::file_size(file);
    if (file.extension() == ".safetensors") {
      if (is_encrypted_weights_file(file))
        shoal::fail(errc::invalid_argument, "{}: already encrypted", file.string());
      encrypt_weights_file(file, target, key, chunk_bytes);
      ++summary.encrypted_files;
      if (progress) progress(fmt::format("encrypted {}", file.filename().string()));
    } else {
      fs::copy_file(file, target, ec);
      if (ec) shoal::fail(errc::invalid_argument, "{}: cannot copy to {}: {}", file.string(), target.string(), ec.message());
      ++summary.copied_files;
      if (progress) progress(fmt::format("copied {}", file.filename().string()));
    }
  }
  if (had_manifest) {
    write_manifest(out, progress);
    summary.manifest = true;
  }
  summary.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return summary;
}

}  // namespace shoal::runtime
