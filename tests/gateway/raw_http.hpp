#pragma once
// Plain-socket HTTP for tests: exact bytes out, exact bytes in, and the misbehaviour (slow,
// half-sent, vanishing clients) that a well-behaved HTTP library would not produce.

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace shoal::gateway::testing {

struct raw_response {
  int status = 0;
  std::map<std::string, std::string> headers;  // lower-case names
  std::string body;                            // de-chunked
  std::vector<std::string> chunks;             // the HTTP chunks, when chunked
  bool complete = false;
};

class raw_connection {
 public:
  explicit raw_connection(std::uint16_t port) {
    fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(port);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (::connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) throw std::runtime_error("connect failed");
  }
  ~raw_connection() { close(); }
  raw_connection(const raw_connection&) = delete;
  raw_connection& operator=(const raw_connection&) = delete;

  void send(std::string_view data) {
    while (!data.empty()) {
      const auto n = ::send(fd_, data.data(), data.size(), MSG_NOSIGNAL);
      if (n <= 0) return;  // the server may have closed; the response tells
      data.remove_prefix(static_cast<std::size_t>(n));
    }
  }
  void shutdown_write() { ::shutdown(fd_, SHUT_WR); }
  void close() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

  // What has arrived and not been consumed by `read_response` yet.
  const std::string& received() const { return in_; }

  // Reads what arrives within `timeout`; false on timeout, true on data or EOF (eof_ set).
  bool fill(std::chrono::milliseconds timeout) {
    pollfd p{fd_, POLLIN, 0};
    if (::poll(&p, 1, static_cast<int>(timeout.count())) <= 0) return false;
    char buf[16384];
    const auto n = ::recv(fd_, buf, sizeof buf, 0);
    if (n <= 0) {
      eof_ = true;
      return true;
    }
    in_.append(buf, static_cast<std::size_t>(n));
    return true;
  }
  // True when the server closed the connection within `timeout`.
  bool closed_within(std::chrono::milliseconds timeout) {
    const auto end = std::chrono::steady_clock::now() + timeout;
    while (!eof_ && std::chrono::steady_clock::now() < end)
      if (!fill(std::chrono::duration_cast<std::chrono::milliseconds>(end - std::chrono::steady_clock::now()))) break;
    return eof_;
  }

  // Reads one response (Content-Length or chunked); `complete` is false on timeout or EOF.
  raw_response read_response(std::chrono::milliseconds timeout = std::chrono::seconds(10)) {
    const auto end = std::chrono::steady_clock::now() + timeout;
    auto more = [&] {
      if (eof_) return false;
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(end - std::chrono::steady_clock::now());
      return left.count() > 0 && fill(left) && !(eof_ && false);
    };
    raw_response r;
    std::size_t header_end;
    while ((header_end = in_.find("\r\n\r\n")) == std::string::npos)
      if (!more()) return r;
    const std::string head = in_.substr(0, header_end);
    in_.erase(0, header_end + 4);
    r.status = std::atoi(head.substr(head.find(' ') + 1, 3).c_str());
    std::size_t pos = head.find("\r\n");
    while (pos != std::string::npos && pos < head.size()) {
      const auto next = head.find("\r\n", pos + 2);
      const auto line = head.substr(pos + 2, next == std::string::npos ? std::string::npos : next - pos - 2);
      const auto colon = line.find(':');
      if (colon != std::string::npos) {
        std::string name = line.substr(0, colon);
        for (auto& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
        r.headers[name] = line.substr(line.find_first_not_of(' ', colon + 1));
      }
      pos = next;
    }
    if (r.headers.count("transfer-encoding")) {
      for (;;) {
        std::size_t eol;
        while ((eol = in_.find("\r\n")) == std::string::npos)
          if (!more()) return r;
        const auto size = std::strtoul(in_.substr(0, eol).c_str(), nullptr, 16);
        while (in_.size() < eol + 2 + size + 2)
          if (!more()) return r;
        if (size == 0) {
          in_.erase(0, eol + 4);
          r.complete = true;
          return r;
        }
        r.chunks.push_back(in_.substr(eol + 2, size));
        r.body += r.chunks.back();
        in_.erase(0, eol + 2 + size + 2);
      }
    }
    const auto length = r.headers.count("content-length") ? std::stoul(r.headers["content-length"]) : 0;
    while (in_.size() < length)
      if (!more()) return r;
    r.body = in_.substr(0, length);
    in_.erase(0, length);
    r.complete = true;
    return r;
  }

 private:
  int fd_ = -1;
  std::string in_;
  bool eof_ = false;
};

inline std::string post(std::string_view path, std::string_view body, std::string_view extra_headers = {}) {
  return std::string("POST ") + std::string(path) + " HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n" +
         std::string(extra_headers) + "Content-Length: " + std::to_string(body.size()) + "\r\n\r\n" + std::string(body);
}
inline std::string get(std::string_view path) {
  return std::string("GET ") + std::string(path) + " HTTP/1.1\r\nHost: localhost\r\n\r\n";
}

// One request on a fresh connection.
inline raw_response request(std::uint16_t port, const std::string& raw,
                            std::chrono::milliseconds timeout = std::chrono::seconds(10)) {
  raw_connection c(port);
  c.send(raw);
  return c.read_response(timeout);
}

}  // namespace shoal::gateway::testing
