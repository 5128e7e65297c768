#pragma once
// Loopback TCP ports for cluster configs that must name their ports before any node runs.
//
// Handing out a port the kernel picked for bind(0) and then closing it is racy: the kernel
// hands the same ephemeral port to the next process that binds port 0 or connects (UCX's TCP
// transport does both all the time), and a node then fails with "address in use". Instead
// the ports come from below the kernel's ephemeral range (ip_local_port_range), which the
// kernel never assigns on its own, and each one is reserved for the lifetime of this test
// process by an flock on a per-port file, so concurrently running tests never pick the same.

#include <catch2/catch.hpp>

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <mutex>
#include <random>
#include <string>
#include <ctime>
#include <utility>

namespace shoal::testing {

namespace detail {

// [first, last] of the ports this process may choose from: the 8000 ports just below the
// kernel's ephemeral range, kept above the well-known ports.
inline std::pair<int, int> reservable_port_range() {
  int ephemeral_low = 32768, ephemeral_high = 60999;
  std::ifstream("/proc/sys/net/ipv4/ip_local_port_range") >> ephemeral_low >> ephemeral_high;
  const int last = ephemeral_low - 1;
  const int first = std::max(1024, last - 8000);
  REQUIRE(first < last);
  return {first, last};
}

inline bool port_bindable(std::uint16_t port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  REQUIRE(fd >= 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(port);
  const bool ok = ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
  ::close(fd);
  return ok;
}

// Takes the lock file of `port`; the descriptor stays open (and the lock held) until the
// process exits, whatever the test does with the port meanwhile.
inline bool reserve_port(std::uint16_t port) {
  const char* tmp = std::getenv("TMPDIR");
  const std::string dir = std::string(tmp && *tmp ? tmp : "/tmp") + "/shoal-test-ports-" + std::to_string(::getuid());
  ::mkdir(dir.c_str(), 0700);
  const std::string path = dir + "/" + std::to_string(port);
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  REQUIRE(fd >= 0);
  if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    ::close(fd);
    return false;
  }
  return true;
}

}  // namespace detail

/// A loopback port that no other test process holds, that nothing listens on, and that the
/// kernel will not hand out as an ephemeral port; reserved until this process exits.
inline std::uint16_t free_port() {
  static std::mutex mutex;
  static std::mt19937 rng(static_cast<unsigned>(::getpid()) * 2654435761u ^ static_cast<unsigned>(::time(nullptr)));
  std::lock_guard lock(mutex);
  const auto [first, last] = detail::reservable_port_range();
  std::uniform_int_distribution<int> pick(first, last);
  for (int attempt = 0; attempt < 1000; ++attempt) {
    const auto port = static_cast<std::uint16_t>(pick(rng));
    if (detail::reserve_port(port) && detail::port_bindable(port)) return port;
  }
  FAIL("no free loopback port in " << first << "-" << last << " after 1000 tries");
  return 0;
}

}  // namespace shoal::testing
