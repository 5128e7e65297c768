#include "shoal/transport/node.hpp"

#include "buffer_pool.hpp"
#include "message_impl.hpp"
#include "ucx_status.hpp"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>
#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/spdlog.h>
#include <ucs/debug/log_def.h>

#include <arpa/inet.h>
#include <netdb.h>
#include <ifaddrs.h>
#include <net/if.h>
#include <netinet/in.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <condition_variable>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <cstdlib>
#include <future>
#include <deque>
#include <fstream>
#include <map>
#include <set>
#include <mutex>
#include <optional>
#include <string_view>
#include <thread>
#include <unordered_map>
#include <utility>
#include <variant>
#include <vector>

namespace shoal::transport {

namespace {

// Logs go to stderr: a node's stdout carries the JSON lines (ready, events) that `shoal
// launch` and scripts read, and a warning there would be taken for one.
spdlog::logger& transport_log() {
  static const std::shared_ptr<spdlog::logger> logger = [] {
    if (auto existing = spdlog::get("shoal.transport")) return existing;
    return spdlog::stderr_logger_mt("shoal.transport");
  }();
  return *logger;
}

// The name of the interface that holds the address `address`, if one does.
std::optional<std::string> interface_holding(const ifaddrs* list, const sockaddr* address) {
  for (const ifaddrs* i = list; i != nullptr; i = i->ifa_next) {
    if (i->ifa_addr == nullptr || i->ifa_addr->sa_family != address->sa_family) continue;
    if (address->sa_family == AF_INET &&
        reinterpret_cast<const sockaddr_in*>(i->ifa_addr)->sin_addr.s_addr ==
            reinterpret_cast<const sockaddr_in*>(address)->sin_addr.s_addr)
      return i->ifa_name;
    if (address->sa_family == AF_INET6 &&
        std::memcmp(&reinterpret_cast<const sockaddr_in6*>(i->ifa_addr)->sin6_addr,
                    &reinterpret_cast<const sockaddr_in6*>(address)->sin6_addr, sizeof(in6_addr)) == 0)
      return i->ifa_name;
  }
  return std::nullopt;
}

// The network interfaces this machine's routing table uses toward `peer_hosts`, plus the one
// that holds `listen_address` (peers come in there; null: not listening), by name; empty
// where none can be told. A connected UDP socket asks the kernel for the route without
// sending anything.
std::set<std::string> interfaces_toward(const std::vector<std::string>& peer_hosts, const sockaddr* listen_address) {
  std::set<std::string> names;
  ifaddrs* list = nullptr;
  if (::getifaddrs(&list) != 0) return names;
  for (const auto& host : peer_hosts) {
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_DGRAM;
    addrinfo* found = nullptr;
    if (::getaddrinfo(host.c_str(), "9", &hints, &found) != 0) continue;
    for (const addrinfo* a = found; a != nullptr; a = a->ai_next) {
      if (a->ai_family != AF_INET && a->ai_family != AF_INET6) continue;
      const int fd = ::socket(a->ai_family, SOCK_DGRAM | SOCK_CLOEXEC, 0);
      if (fd < 0) continue;
      sockaddr_storage local{};
      socklen_t length = sizeof(local);
      if (::connect(fd, a->ai_addr, a->ai_addrlen) == 0 &&
          ::getsockname(fd, reinterpret_cast<sockaddr*>(&local), &length) == 0)
        if (auto name = interface_holding(list, reinterpret_cast<const sockaddr*>(&local))) names.insert(*name);
      ::close(fd);
    }
    ::freeaddrinfo(found);
  }
  if (listen_address != nullptr)
    if (auto name = interface_holding(list, listen_address)) names.insert(*name);
  ::freeifaddrs(list);
  return names;
}

// RDMA ports (InfiniBand, RoCE) as UCX names them ("mlx5_0:1"): UCX_NET_DEVICES covers them too,
// and choosing the TCP interfaces must not take RDMA away.
std::vector<std::string> rdma_ports() {
  std::vector<std::string> ports;
  std::error_code ec;
  for (const auto& device : std::filesystem::directory_iterator("/sys/class/infiniband", ec))
    for (const auto& port : std::filesystem::directory_iterator(device.path() / "ports", ec))
      ports.push_back(device.path().filename().string() + ":" + port.path().filename().string());
  std::sort(ports.begin(), ports.end());
  return ports;
}

// UCX prints its own warnings and errors on stdout by default (a failed connect to a peer
// that just died, for instance), where they would be read as one of the node's JSON lines.
// They go to the transport's log on stderr instead, with UCX's file and line.
ucs_log_func_rc_t ucx_log_to_stderr(const char* file, unsigned line, const char* /*function*/, ucs_log_level_t level,
                                    const ucs_log_component_config_t* /*component*/, const char* format,
                                    va_list ap) {
  char message[1024];
  std::vsnprintf(message, sizeof(message), format, ap);
  const char* base = std::strrchr(file, '/');
  base = base ? base + 1 : file;
  const auto spd_level = level <= UCS_LOG_LEVEL_ERROR  ? spdlog::level::err
                         : level == UCS_LOG_LEVEL_WARN ? spdlog::level::warn
                         : level <= UCS_LOG_LEVEL_INFO ? spdlog::level::info
                                                       : spdlog::level::debug;
  transport_log().log(spd_level, "UCX: {} ({}:{})", message, base, line);
  return UCS_LOG_FUNC_RC_STOP;
}

void route_ucx_logs() {
  static std::once_flag once;
  std::call_once(once, [] { ucs_log_push_handler(ucx_log_to_stderr); });
}

using clock = std::chrono::steady_clock;

// Every transport message is one UCX active message with this id and a wire_header.
constexpr unsigned kAmId = 17;
constexpr std::uint32_t kMagic = 0x4c414f53;  // "SOAL" little-endian; cheap garbage filter.

// Every version names the sender first and ends the name with a NUL when more follows, so
// that a peer of another version can still be named when it is refused.
enum class wire_kind : std::uint16_t {
  hello = 1,      // Data: dialer's name, NUL, its nonce. Dialer -> listener after connecting.
  hello_ack = 2,  // Data: listener's name, NUL, 1 if it asks for a proof else 0, its nonce.
                  // `version` tells compatibility (another version gets the name alone).
  envelope = 3,   // Data: Cap'n Proto envelope; `count` bulk messages with the same seq follow.
  bulk = 4,       // Data: bulk buffer `index` of envelope `seq`.
  bye = 5,        // Orderly close: no more messages follow.
  proof = 6,      // Data: the dialer's proof (empty: it has no secret). Dialer -> listener.
  welcome = 7,    // Data: the listener's proof, sent once the dialer's passed.
  refused = 8,    // Data: why the listener refused the dialer's proof; the connection closes.
};

struct wire_header {
  std::uint32_t magic;
  std::uint16_t version;  // schema_version of the sender.
  wire_kind kind;
  std::uint64_t seq;      // Per-connection message number, from 0.
  std::uint32_t count;    // envelope: number of bulk buffers.
  std::uint32_t index;    // bulk: its index.
};
static_assert(sizeof(wire_header) == 24);

// A peer may announce at most this many messages beyond the next one to deliver; more means
// it is broken or hostile, and it would otherwise make us buffer without bound.
constexpr std::uint64_t kMaxPendingMessages = 4096;
constexpr std::size_t kMaxNameBytes = 256;
constexpr std::size_t kPoolCacheBytes = 256u << 20;
constexpr std::size_t kMaxRefusalBytes = 512;

// connecting -> (proving) -> connected on the dialer, accepting -> (verifying) -> connected on
// the listener; the middle phases only with a join secret.
enum class peer_phase { connecting, proving, accepting, verifying, connected };

using nonce = std::array<unsigned char, 32>;
using proof_mac = std::array<unsigned char, 32>;

nonce fresh_nonce() {
  nonce n;
  if (RAND_bytes(n.data(), static_cast<int>(n.size())) != 1)
    fail(errc::internal, "OpenSSL's random generator failed to make a nonce");
  return n;
}

// HMAC-SHA256 over the direction, the verifier's nonce (so a proof answers exactly one
// challenge), the prover's nonce and both names (so a proof cannot be replayed on another
// connection, reflected back to its sender or claimed under another name). Names hold no NUL,
// so the encoding is unambiguous.
proof_mac join_proof(std::string_view secret, std::string_view direction, const nonce& verifier_nonce,
                     const nonce& prover_nonce, std::string_view prover, std::string_view verifier) {
  std::string text = "shoal join proof";
  text += '\0';
  text += direction;
  text += '\0';
  text.append(reinterpret_cast<const char*>(verifier_nonce.data()), verifier_nonce.size());
  text.append(reinterpret_cast<const char*>(prover_nonce.data()), prover_nonce.size());
  text += prover;
  text += '\0';
  text += verifier;
  proof_mac mac{};
  unsigned int length = 0;
  if (HMAC(EVP_sha256(), secret.data(), static_cast<int>(secret.size()),
           reinterpret_cast<const unsigned char*>(text.data()), text.size(), mac.data(), &length) == nullptr ||
      length != mac.size())
    fail(errc::internal, "OpenSSL's HMAC-SHA256 failed");
  return mac;
}

bool proof_matches(const proof_mac& expected, const void* data, std::size_t length) {
  return length == expected.size() && CRYPTO_memcmp(expected.data(), data, expected.size()) == 0;
}

std::string_view bytes_of(const nonce& n) {
  return {reinterpret_cast<const char*>(n.data()), n.size()};
}

std::string address_text(const sockaddr_storage& address) {
  char host[INET6_ADDRSTRLEN] = "?";
  std::uint16_t port = 0;
  if (address.ss_family == AF_INET) {
    const auto* a = reinterpret_cast<const sockaddr_in*>(&address);
    ::inet_ntop(AF_INET, &a->sin_addr, host, sizeof(host));
    port = ntohs(a->sin_port);
  } else if (address.ss_family == AF_INET6) {
    const auto* a = reinterpret_cast<const sockaddr_in6*>(&address);
    ::inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof(host));
    port = ntohs(a->sin6_port);
  } else {
    return "an unknown address";
  }
  return fmt::format("{}:{}", host, port);
}

struct connect_waiter {
  std::mutex mutex;
  std::condition_variable cv;
  bool done = false;
  peer_id peer = 0;
  std::optional<error> failure;

  void finish(peer_id id, std::optional<error> why) {
    {
      std::lock_guard lock(mutex);
      if (done) return;
      done = true;
      peer = id;
      failure = std::move(why);
    }
    cv.notify_all();
  }
};

// One envelope being received with its bulk buffers.
struct assembly {
  std::optional<incoming_message> message;  // Set once the envelope arrived and decoded.
  std::uint32_t expected = 0;               // Bulk buffers announced by the envelope header.
  std::vector<byte_buffer> bulk;
  std::vector<bool> bulk_done;
  std::vector<bool> bulk_started;
  std::uint32_t bulk_remaining = 0;         // Valid once `message` is set.
  bool envelope_arrived = false;
};

struct peer_state {
  peer_id id = 0;
  ucp_ep_h ep = nullptr;
  std::string name;
  std::string address;  // Where it connected from or to, for log lines.
  peer_phase phase = peer_phase::connecting;
  std::shared_ptr<connect_waiter> waiter;  // Dialer side until the peer is connected.
  nonce local_nonce{};                     // Ours, sent in the hello or hello_ack.
  nonce remote_nonce{};                    // The peer's.
  std::uint64_t next_send_seq = 0;
  std::uint64_t next_deliver_seq = 0;
  // Whether bulk buffers may go eagerly (the active-message lane is shared memory); final
  // once `route_known`. UCX settles the lanes during wireup, shortly after connecting.
  bool bulk_eager = false;
  bool route_known = false;
  std::chrono::steady_clock::time_point connected_at{};
  std::chrono::steady_clock::time_point route_checked{};
  std::chrono::microseconds route_backoff{1000};  // Until the next look at the lanes.
  std::map<std::uint64_t, assembly> pending;
};

// Sockaddr of host:port; throws error(invalid_argument) when it does not resolve.
sockaddr_storage resolve(std::string_view host, std::uint16_t port, socklen_t& length) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV | AI_PASSIVE;
  addrinfo* result = nullptr;
  std::string host_string(host);
  std::string port_string = std::to_string(port);
  int rc = getaddrinfo(host_string.empty() ? nullptr : host_string.c_str(), port_string.c_str(),
                       &hints, &result);
  if (rc != 0 || result == nullptr)
    fail(errc::invalid_argument, "cannot resolve '{}:{}': {}", host, port, gai_strerror(rc));
  sockaddr_storage storage{};
  std::memcpy(&storage, result->ai_addr, result->ai_addrlen);
  length = result->ai_addrlen;
  freeaddrinfo(result);
  return storage;
}

// UCX's description of an endpoint (ucp_ep_print_info), empty when it cannot be had.
std::string endpoint_info(ucp_ep_h ep) {
  char* text = nullptr;
  std::size_t size = 0;
  FILE* stream = ::open_memstream(&text, &size);
  if (stream == nullptr) return {};
  ucp_ep_print_info(ep, stream);
  std::fclose(stream);
  std::string out(text, size);
  std::free(text);
  return out;
}

// Whether the endpoint's active-message lane is a shared-memory transport (sysv/memory,
// posix/memory, self/memory...), from a line such as
// "lane[1]:  3:sysv/memory.0 md[2] -> md[2]/sysv/sysdev[255] am am_bw#0 keepalive".
// UCX 1.13 has no query for an endpoint's transports, so its printout is parsed.
bool am_lane_is_shared_memory(std::string_view info) {
  std::size_t start = 0;
  while (start < info.size()) {
    std::size_t end = info.find('\n', start);
    if (end == std::string_view::npos) end = info.size();
    std::string_view line = info.substr(start, end - start);
    start = end + 1;
    if (line.find("lane[") == std::string_view::npos) continue;
    std::string_view roles = line.substr(std::min(line.size(), line.find("->")));
    const bool am_lane = roles.find(" am ") != std::string_view::npos ||
                         (roles.size() >= 3 && roles.substr(roles.size() - 3) == " am");
    if (!am_lane) continue;
    const auto colon = line.find(':', line.find("lane["));
    std::string_view transport = line.substr(colon == std::string_view::npos ? 0 : colon);
    transport = transport.substr(0, transport.find(" md["));
    return transport.find("/memory") != std::string_view::npos;
  }
  return false;
}

// Eager bulk messages at least this large are handed to the application in the memory UCX
// assembled them in. Smaller ones are copied: the copy is cheap, and it gives UCX's receive
// descriptor back at once.
constexpr std::size_t kAdoptMinBytes = 64 * 1024;
// byte_buffer promises this alignment; UCX is asked to assemble messages aligned so.
constexpr std::size_t kBufferAlignment = 64;

// The UCX context and worker. Received buffers may point into UCX memory (eager bulk data
// handed over without a copy), so these live until the node and the last such buffer are
// gone. While the node runs, a buffer's descriptor is given back on the progress thread (the
// worker is single-threaded); afterwards, by whichever thread drops it, one at a time.
class ucx_handles {
 public:
  detail::ucp_context_ptr context;
  detail::ucp_worker_ptr worker;

  // A buffer over `data` (from an active-message callback that returns UCS_INPROGRESS).
  byte_buffer adopt(void* data, std::size_t length) {
    {
      std::lock_guard lock(mutex_);
      ++refs_;
    }
    return byte_buffer(static_cast<std::byte*>(data), length, length, &ucx_handles::release, this);
  }

  // Progress thread: gives UCX back the descriptors of buffers dropped since the last call.
  void give_back() {
    std::vector<void*> batch;
    {
      std::lock_guard lock(mutex_);
      if (returned_.empty()) return;
      batch.swap(returned_);
      returned_.reserve(batch.capacity());
      refs_ -= batch.size();  // The node holds one, so this never reaches zero here.
    }
    for (void* data : batch) ucp_am_data_release(worker.get(), data);
  }

  // Endpoints that never finished closing (a peer that stopped answering mid-flush): UCX 1.13
  // aborts the process if the worker is destroyed under such an endpoint ("pending request
  // ... should have been flushed"), so the worker and context are left for the process's
  // exit to reclaim instead.
  void abandon() noexcept { abandoned_ = true; }

  // The node is done with UCX (its progress thread has stopped); frees everything once no
  // buffer points into UCX memory. `this` may be gone when it returns.
  void release_node() noexcept {
    std::unique_lock lock(mutex_);
    running_ = false;
    for (void* data : returned_) ucp_am_data_release(worker.get(), data);
    refs_ -= returned_.size();
    returned_.clear();
    if (--refs_ != 0) return;
    lock.unlock();
    delete this;
  }

 private:
  ~ucx_handles() {
    if (abandoned_) {
      (void)worker.release();
      (void)context.release();
      return;
    }
    worker.reset();
    context.reset();
  }

  static void release(void* context, std::byte* data, std::size_t) noexcept {
    auto* self = static_cast<ucx_handles*>(context);
    std::unique_lock lock(self->mutex_);
    if (self->running_) {
      try {
        self->returned_.push_back(data);
        return;
      } catch (...) {
        // Out of memory for the list: releasing from this thread would race the progress
        // thread, so the descriptor leaks.
        --self->refs_;
        return;
      }
    }
    ucp_am_data_release(self->worker.get(), data);
    if (--self->refs_ != 0) return;
    lock.unlock();
    delete self;
  }

  std::mutex mutex_;
  std::vector<void*> returned_;  // Descriptors of dropped buffers, for the progress thread.
  bool running_ = true;          // Whether the node's progress thread may still run.
  std::size_t refs_ = 1;         // The node's reference plus one per adopted buffer.
  bool abandoned_ = false;       // See abandon().
};

struct fd_closer {
  int fd = -1;
  ~fd_closer() {
    if (fd >= 0) ::close(fd);
  }
};

}  // namespace

struct node::impl {
  // A send that a caller queued; the envelope is encoded on the caller's thread.
  struct send_command {
    peer_id peer;
    byte_buffer envelope;
    std::vector<bulk_view> bulk;
  };
  struct connect_command {
    sockaddr_storage address;
    socklen_t length;
    std::string target;  // host:port, for messages.
    std::shared_ptr<connect_waiter> waiter;
  };
  struct abandon_command {
    std::shared_ptr<connect_waiter> waiter;
  };
  struct disconnect_command {
    peer_id peer;
  };
  // UCX's description of a peer's endpoint, for the caller waiting on `done`.
  struct describe_command {
    peer_id peer;
    std::shared_ptr<std::promise<std::string>> done;
  };
  using command = std::variant<send_command, connect_command, abandon_command, disconnect_command, describe_command>;

  // Events are handed to the application outside UCX callbacks, so the application may send
  // from its callback without re-entering UCX.
  struct message_event {
    peer_id peer;
    incoming_message message;
  };
  struct connected_event {
    peer_id peer;
    std::string name;
  };
  struct failed_event {
    peer_id peer;
    error reason;
  };
  struct closed_event {
    peer_id peer;
  };
  using event = std::variant<message_event, connected_event, failed_event, closed_event>;

  // Everything an outgoing message holds until UCX is done with all its parts.
  struct send_record {
    impl* self;
    wire_header envelope_header;
    byte_buffer envelope;
    std::vector<bulk_view> bulk;
    std::vector<wire_header> bulk_headers;
    std::uint64_t bulk_bytes = 0;
    std::uint32_t bulk_eager = 0;  // Bulk buffers sent eagerly.
    std::uint32_t remaining = 0;  // UCX operations not yet complete.
    bool failed = false;
  };
  // A control message (hello, hello_ack, bye).
  struct control_record {
    wire_header header;
    std::string payload;
  };
  // A rendezvous receive in progress. It owns the target buffer, not the assembly: if the
  // peer is dropped meanwhile, UCX may still write into the buffer until it completes the
  // request.
  struct recv_record {
    impl* self;
    peer_id peer;
    std::uint64_t seq;
    std::uint32_t index;
    byte_buffer buffer;
  };

  node_options options;
  node_callbacks callbacks;
  ucx_handles* ucx = new ucx_handles;
  detail::ucp_listener_ptr listener;
  std::uint16_t port = 0;
  int worker_fd = -1;
  fd_closer wake_fd;
  fd_closer epoll_fd;
  detail::buffer_pool* pool = nullptr;

  // Shared with callers; guarded by `mutex`.
  mutable std::mutex mutex;
  std::vector<command> queue;
  std::unordered_map<peer_id, std::string> live;  // Connected peers and their names.
  std::atomic<bool> sleeping{false};
  std::atomic<bool> stopping{false};
  std::atomic<std::size_t> in_flight{0};
  std::atomic<std::uint64_t> stat_sent{0}, stat_received{0}, stat_bulk_sent{0},
      stat_bulk_received{0}, stat_rejected{0}, stat_refused{0}, stat_bulk_eager{0};

  // Progress thread only.
  std::thread thread;
  std::thread::id thread_id;
  peer_id next_peer = 1;
  std::unordered_map<peer_id, peer_state> peers;
  std::unordered_map<ucp_ep_h, peer_id> by_ep;
  std::vector<ucp_ep_h> to_close;       // Endpoints to force-close outside UCX callbacks.
  std::vector<void*> closing;           // Close requests in progress.
  std::deque<event> events;
  bool stopped = false;
  bool holding_data = false;  // The active message being handled keeps UCX's data descriptor.

  impl(node_options opts, node_callbacks cbs)
      : options(std::move(opts)), callbacks(std::move(cbs)) {}

  // ---- Setup ---------------------------------------------------------------------------------

  void start() {
    if (const char* spin_us = std::getenv("SHOAL_TRANSPORT_SPIN_US")) {
      char* end = nullptr;
      const long long value = std::strtoll(spin_us, &end, 10);
      if (end == spin_us || *end != '\0' || value < 0)
        fail(errc::invalid_argument, "SHOAL_TRANSPORT_SPIN_US='{}' is not a number of microseconds", spin_us);
      options.spin = std::chrono::microseconds(value);
    }
    route_ucx_logs();
    ucp_config_t* raw_config = nullptr;
    SHOAL_UCS_CHECK(ucp_config_read(nullptr, nullptr, &raw_config), "reading UCX configuration");
    detail::ucp_config_ptr config(raw_config);
    // A node restarted on its configured port (by an operator or a supervisor) must not fail
    // because the previous process's connections are still in TIME_WAIT. An explicit
    // UCX_TCP_CM_REUSEADDR in the environment wins; a UCX without the setting just keeps its own.
    if (!std::getenv("UCX_TCP_CM_REUSEADDR")) (void)ucp_config_modify(config.get(), "CM_REUSEADDR", "y");
    // Endpoints are created with peer-failure handling (a dead node must fail its calls), and
    // UCX then leaves out every transport that does not report peer failures: its shared-memory
    // transports report them only when asked to, so without this, nodes on one machine talk
    // over TCP loopback even when UCX_TLS offers sm. Explicit settings in the environment win.
    const std::string& tls = options.transports;
    const bool shared_memory = tls.empty() || tls.find("sm") != std::string::npos || tls.find("mm") != std::string::npos ||
                               tls.find("posix") != std::string::npos || tls.find("sysv") != std::string::npos ||
                               tls.find("all") != std::string::npos;
    if (shared_memory && !std::getenv("UCX_MM_ERROR_HANDLING") && !std::getenv("UCX_POSIX_ERROR_HANDLING") &&
        !std::getenv("UCX_SYSV_ERROR_HANDLING"))
      (void)ucp_config_modify(config.get(), "MM_ERROR_HANDLING", "y");
    // The address the listener will bind (resolved once, for it and for the devices below).
    socklen_t listen_length = 0;
    std::optional<sockaddr_storage> listen_address;
    if (!options.listen_host.empty())
      listen_address = resolve(options.listen_host, options.listen_port, listen_length);
    // Lanes only over the interfaces toward the peers (see node_options::peer_hosts).
    if (!std::getenv("UCX_NET_DEVICES")) {
      const auto interfaces = interfaces_toward(
          options.peer_hosts, listen_address ? reinterpret_cast<const sockaddr*>(&*listen_address) : nullptr);
      if (!interfaces.empty()) {
        std::vector<std::string> devices(interfaces.begin(), interfaces.end());
        const auto rdma = rdma_ports();
        devices.insert(devices.end(), rdma.begin(), rdma.end());
        std::string list;
        for (const auto& device : devices) list += (list.empty() ? "" : ",") + device;
        (void)ucp_config_modify(config.get(), "NET_DEVICES", list.c_str());
        transport_log().debug("node '{}': UCX network devices {} (toward its peers)", options.name, list);
      }
    }
    if (!options.transports.empty())
      SHOAL_UCS_CHECK(ucp_config_modify(config.get(), "TLS", options.transports.c_str()),
                      fmt::format("setting UCX transports to '{}'", options.transports));

    ucp_params_t params{};
    params.field_mask = UCP_PARAM_FIELD_FEATURES | UCP_PARAM_FIELD_MT_WORKERS_SHARED |
                        UCP_PARAM_FIELD_NAME;
    params.features = UCP_FEATURE_AM | UCP_FEATURE_WAKEUP;
    params.mt_workers_shared = 0;
    params.name = "shoal";
    ucp_context_h raw_context = nullptr;
    SHOAL_UCS_CHECK(ucp_init(&params, config.get(), &raw_context), "initializing UCX");
    ucx->context.reset(raw_context);

    ucp_worker_params_t worker_params{};
    worker_params.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE | UCP_WORKER_PARAM_FIELD_AM_ALIGNMENT;
    // Eager bulk data is handed over in the memory UCX assembles it in.
    worker_params.am_alignment = kBufferAlignment;
    // Only the progress thread touches the worker.
    worker_params.thread_mode = UCS_THREAD_MODE_SINGLE;
    ucp_worker_h raw_worker = nullptr;
    SHOAL_UCS_CHECK(ucp_worker_create(ucx->context.get(), &worker_params, &raw_worker),
                    "creating the UCX worker");
    ucx->worker.reset(raw_worker);

    ucp_am_handler_param_t handler{};
    handler.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_FLAGS |
                         UCP_AM_HANDLER_PARAM_FIELD_CB | UCP_AM_HANDLER_PARAM_FIELD_ARG;
    handler.id = kAmId;
    handler.flags = UCP_AM_FLAG_WHOLE_MSG;
    handler.cb = &impl::on_am;
    handler.arg = this;
    SHOAL_UCS_CHECK(ucp_worker_set_am_recv_handler(worker(), &handler),
                    "registering the active message handler");

    if (ucp_worker_get_efd(worker(), &worker_fd) != UCS_OK) worker_fd = -1;
    wake_fd.fd = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    epoll_fd.fd = ::epoll_create1(EPOLL_CLOEXEC);
    if (wake_fd.fd < 0 || epoll_fd.fd < 0)
      fail(errc::unavailable, "cannot create the progress thread's event fds: {}",
           std::strerror(errno));
    for (int fd : {worker_fd, wake_fd.fd}) {
      if (fd < 0) continue;
      epoll_event ev{};
      ev.events = EPOLLIN;
      ev.data.fd = fd;
      if (::epoll_ctl(epoll_fd.fd, EPOLL_CTL_ADD, fd, &ev) != 0)
        fail(errc::unavailable, "epoll_ctl: {}", std::strerror(errno));
    }

    if (listen_address) {
      ucp_listener_params_t listener_params{};
      listener_params.field_mask =
          UCP_LISTENER_PARAM_FIELD_SOCK_ADDR | UCP_LISTENER_PARAM_FIELD_CONN_HANDLER;
      listener_params.sockaddr.addr = reinterpret_cast<const sockaddr*>(&*listen_address);
      listener_params.sockaddr.addrlen = listen_length;
      listener_params.conn_handler.cb = &impl::on_connection_request;
      listener_params.conn_handler.arg = this;
      ucp_listener_h raw_listener = nullptr;
      const ucs_status_t listen_status = ucp_listener_create(worker(), &listener_params, &raw_listener);
      // UCX reports EADDRINUSE as "Device is busy", which sends operators looking at hardware.
      if (listen_status == UCS_ERR_BUSY)
        fail(errc::unavailable,
             "listening on {}:{}: the address is already in use (another process listens on port {}; "
             "stop it or choose another port)",
             options.listen_host, options.listen_port, options.listen_port);
      SHOAL_UCS_CHECK(listen_status, fmt::format("listening on {}:{}", options.listen_host, options.listen_port));
      listener.reset(raw_listener);
      ucp_listener_attr_t attr{};
      attr.field_mask = UCP_LISTENER_ATTR_FIELD_SOCKADDR;
      SHOAL_UCS_CHECK(ucp_listener_query(listener.get(), &attr), "querying the listener");
      if (attr.sockaddr.ss_family == AF_INET)
        port = ntohs(reinterpret_cast<const sockaddr_in*>(&attr.sockaddr)->sin_port);
      else if (attr.sockaddr.ss_family == AF_INET6)
        port = ntohs(reinterpret_cast<const sockaddr_in6*>(&attr.sockaddr)->sin6_port);
    }

    pool = detail::buffer_pool::create(kPoolCacheBytes);
    thread = std::thread([this] { run(); });
  }

  ~impl() {
    if (pool != nullptr) pool->release_owner();
    release_ucx();
  }

  ucp_worker_h worker() const { return ucx->worker.get(); }

  // The listener goes first: it belongs to the worker.
  void release_ucx() noexcept {
    listener.reset();
    if (ucx != nullptr) std::exchange(ucx, nullptr)->release_node();
  }

  // ---- Caller side ---------------------------------------------------------------------------

  bool on_progress_thread() const { return std::this_thread::get_id() == thread_id; }

  void push(command cmd) {
    {
      std::lock_guard lock(mutex);
      queue.push_back(std::move(cmd));
    }
    // Paired with the progress thread's store of `sleeping` before its last queue check: one
    // of the two sees the other, so a command never waits for the poll timeout.
    if (sleeping.load()) wake();
  }

  void wake() {
    std::uint64_t one = 1;
    [[maybe_unused]] auto n = ::write(wake_fd.fd, &one, sizeof(one));
  }

  // ---- Progress thread -----------------------------------------------------------------------

  void run() {
    thread_id = std::this_thread::get_id();
    auto last_activity = clock::now();
    std::vector<command> batch;
    while (!stopping.load(std::memory_order_relaxed)) {
      bool busy = false;
      {
        std::lock_guard lock(mutex);
        batch.swap(queue);
      }
      if (!batch.empty()) {
        busy = true;
        for (auto& cmd : batch) execute(std::move(cmd));
        batch.clear();
      }
      // Each message is delivered, and the UCX memory of eager data the application dropped
      // given back, as soon as UCX has handed it over: batching a burst would hold every
      // buffer of it at once, and malloc would trim and page-fault that memory each time.
      while (ucp_worker_progress(worker()) != 0) {
        busy = true;
        flush_closes();
        dispatch_events();
        ucx->give_back();
      }
      flush_closes();
      if (!events.empty()) {
        busy = true;
        dispatch_events();
      }
      ucx->give_back();
      auto now = clock::now();
      if (busy) {
        last_activity = now;
        continue;
      }
      if (now - last_activity < options.spin) {
        // Stay responsive without starving other threads on a busy machine.
        if (options.spin_yield) std::this_thread::yield();
        continue;
      }
      sleep();
      last_activity = clock::now();
    }
    shutdown();
  }

  void sleep() {
    sleeping.store(true);
    bool has_work;
    {
      std::lock_guard lock(mutex);
      has_work = !queue.empty();
    }
    if (has_work || stopping.load()) {
      sleeping.store(false);
      return;
    }
    if (worker_fd >= 0) {
      ucs_status_t status = ucp_worker_arm(worker());
      if (status == UCS_ERR_BUSY) {
        sleeping.store(false);
        return;
      }
    }
    epoll_event ready[2];
    // Without a worker fd (a transport without wakeup support) poll UCX every millisecond.
    int timeout_ms = worker_fd >= 0 ? 100 : 1;
    int n = ::epoll_wait(epoll_fd.fd, ready, 2, timeout_ms);
    for (int i = 0; i < n; ++i) {
      if (ready[i].data.fd == wake_fd.fd) {
        std::uint64_t value;
        [[maybe_unused]] auto r = ::read(wake_fd.fd, &value, sizeof(value));
      }
    }
    sleeping.store(false);
  }

  void execute(command&& cmd) {
    std::visit([this](auto&& c) { handle(std::move(c)); }, std::move(cmd));
  }

  void handle(connect_command&& cmd) {
    ucp_ep_params_t params{};
    params.field_mask = UCP_EP_PARAM_FIELD_FLAGS | UCP_EP_PARAM_FIELD_SOCK_ADDR |
                        UCP_EP_PARAM_FIELD_ERR_HANDLER | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE;
    params.flags = UCP_EP_PARAMS_FLAGS_CLIENT_SERVER;
    params.sockaddr.addr = reinterpret_cast<const sockaddr*>(&cmd.address);
    params.sockaddr.addrlen = cmd.length;
    params.err_mode = UCP_ERR_HANDLING_MODE_PEER;
    params.err_handler.cb = &impl::on_ep_error;
    params.err_handler.arg = this;
    ucp_ep_h ep = nullptr;
    ucs_status_t status = ucp_ep_create(worker(), &params, &ep);
    if (status != UCS_OK) {
      cmd.waiter->finish(0, error(detail::to_errc(status),
                                  fmt::format("connecting to {}: {}", cmd.target,
                                              ucs_status_string(status))));
      return;
    }
    peer_state& peer = add_peer(ep, peer_phase::connecting);
    peer.waiter = std::move(cmd.waiter);
    peer.name = cmd.target;
    peer.address = cmd.target;
    peer.local_nonce = fresh_nonce();
    std::string hello = options.name;
    hello += '\0';
    hello += bytes_of(peer.local_nonce);
    send_control(peer, wire_kind::hello, hello);
  }

  void handle(abandon_command&& cmd) {
    for (auto& [id, peer] : peers) {
      if (peer.waiter == cmd.waiter && dialing(peer)) {
        drop_peer(id, /*force=*/true);
        return;
      }
    }
  }

  void handle(describe_command&& cmd) {
    auto it = peers.find(cmd.peer);
    if (it == peers.end() || it->second.phase != peer_phase::connected) {
      cmd.done->set_value({});
      return;
    }
    cmd.done->set_value(endpoint_info(it->second.ep));
  }

  void handle(disconnect_command&& cmd) {
    auto it = peers.find(cmd.peer);
    if (it == peers.end()) return;
    {
      // Gone for callers before the peer can hear the bye: a caller that learns of the close
      // from the peer must not still be able to send on it.
      std::lock_guard lock(mutex);
      live.erase(cmd.peer);
    }
    if (it->second.phase == peer_phase::connected) send_control(it->second, wire_kind::bye, {});
    drop_peer(cmd.peer, /*force=*/false);
  }

  void handle(send_command&& cmd) {
    auto it = peers.find(cmd.peer);
    if (it == peers.end() || it->second.phase != peer_phase::connected) {
      // The peer failed after the caller checked; the failure was or will be reported.
      in_flight.fetch_sub(1);
      return;
    }
    peer_state& peer = it->second;
    auto* record = new send_record{this, {}, std::move(cmd.envelope), std::move(cmd.bulk), {}, 0,
                                   0, 0, false};
    std::uint64_t seq = peer.next_send_seq++;
    auto count = static_cast<std::uint32_t>(record->bulk.size());
    record->envelope_header = {kMagic, schema_version, wire_kind::envelope, seq, count, 0};
    record->bulk_headers.resize(count);
    for (std::uint32_t i = 0; i < count; ++i) {
      record->bulk_headers[i] = {kMagic, schema_version, wire_kind::bulk, seq, count, i};
      record->bulk_bytes += record->bulk[i].size;
    }
    const bool eager = count != 0 && options.eager_bulk_max != 0 && bulk_eager(peer);
    // One extra reference while posting so that immediate completions cannot free the record.
    record->remaining = 1 + count + 1;
    post(peer.ep, record, &record->envelope_header, record->envelope.data(),
         record->envelope.size(), 0);
    for (std::uint32_t i = 0; i < count; ++i) {
      // Without CMA, a rendezvous to a shared-memory peer runs over UCX's TCP rma lanes with a
      // handshake per buffer (about 4 GB/s here); the shared-memory FIFO moves the same bytes
      // at about twice that. Above the bound the receiver's pacing matters more: an eager
      // message is assembled in freshly allocated memory whatever the receiver has ready.
      const unsigned flags =
          eager && record->bulk[i].size <= options.eager_bulk_max ? UCP_AM_SEND_FLAG_EAGER : 0;
      if (flags != 0) ++record->bulk_eager;
      post(peer.ep, record, &record->bulk_headers[i], record->bulk[i].data,
           record->bulk[i].size, flags);
    }
    part_done(record, UCS_OK);
  }

  // Whether bulk buffers to `peer` may go eagerly; asks UCX about the lanes until they settle.
  bool bulk_eager(peer_state& peer) {
    if (peer.route_known) return peer.bulk_eager;
    const auto now = clock::now();
    // Printing the endpoint costs tens of microseconds: look again after 1, 2, 4... ms.
    if (now - peer.route_checked < peer.route_backoff) return peer.bulk_eager;
    peer.route_checked = now;
    peer.route_backoff *= 2;
    peer.bulk_eager = am_lane_is_shared_memory(endpoint_info(peer.ep));
    // A shared-memory lane is only ever the outcome of wireup; anything else is final once
    // wireup had ample time.
    peer.route_known = peer.bulk_eager || now - peer.connected_at > std::chrono::seconds(2);
    return peer.bulk_eager;
  }

  void post(ucp_ep_h ep, send_record* record, const wire_header* header, const void* data,
            std::size_t size, unsigned extra_flags) {
    ucp_request_param_t param{};
    param.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA |
                         UCP_OP_ATTR_FIELD_FLAGS | UCP_OP_ATTR_FIELD_DATATYPE;
    param.cb.send = &impl::on_send_done;
    param.user_data = record;
    param.flags = UCP_AM_SEND_FLAG_REPLY | extra_flags;
    param.datatype = ucp_dt_make_contig(1);
    ucs_status_ptr_t request =
        ucp_am_send_nbx(ep, kAmId, header, sizeof(wire_header), data, size, &param);
    if (request == nullptr) {
      part_done(record, UCS_OK);
    } else if (UCS_PTR_IS_ERR(request)) {
      part_done(record, UCS_PTR_STATUS(request));
    }
    // Otherwise the callback completes the part and frees the request: freeing it here would
    // suppress the callback.
  }

  static void on_send_done(void* request, ucs_status_t status, void* user_data) {
    auto* record = static_cast<send_record*>(user_data);
    record->self->part_done(record, status);
    ucp_request_free(request);
  }

  void part_done(send_record* record, ucs_status_t status) {
    if (status != UCS_OK) record->failed = true;
    if (--record->remaining != 0) return;
    if (!record->failed) {
      stat_sent.fetch_add(1, std::memory_order_relaxed);
      stat_bulk_sent.fetch_add(record->bulk_bytes, std::memory_order_relaxed);
      stat_bulk_eager.fetch_add(record->bulk_eager, std::memory_order_relaxed);
    }
    in_flight.fetch_sub(1);
    delete record;  // Releases the bulk owners.
  }

  void send_control(peer_state& peer, wire_kind kind, std::string_view payload) {
    auto* record = new control_record{{kMagic, schema_version, kind, 0, 0, 0},
                                      std::string(payload)};
    ucp_request_param_t param{};
    param.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA |
                         UCP_OP_ATTR_FIELD_FLAGS;
    param.cb.send = [](void* request, ucs_status_t, void* user_data) {
      delete static_cast<control_record*>(user_data);
      ucp_request_free(request);
    };
    param.user_data = record;
    param.flags = UCP_AM_SEND_FLAG_REPLY;
    ucs_status_ptr_t request =
        ucp_am_send_nbx(peer.ep, kAmId, &record->header, sizeof(wire_header),
                        record->payload.data(), record->payload.size(), &param);
    if (request == nullptr || UCS_PTR_IS_ERR(request))
      delete record;  // Errors surface through the endpoint's error handler.
  }

  peer_state& add_peer(ucp_ep_h ep, peer_phase phase) {
    peer_id id = next_peer++;
    peer_state& peer = peers[id];
    peer.id = id;
    peer.ep = ep;
    peer.phase = phase;
    by_ep[ep] = id;
    return peer;
  }

  // Forgets a peer and closes its endpoint; `force` skips flushing (the peer is dead or lying).
  void drop_peer(peer_id id, bool force) {
    auto it = peers.find(id);
    if (it == peers.end()) return;
    ucp_ep_h ep = it->second.ep;
    by_ep.erase(ep);
    peers.erase(it);
    {
      std::lock_guard lock(mutex);
      live.erase(id);
    }
    if (force) {
      to_close.push_back(ep);
    } else {
      close_ep(ep, 0);
    }
  }

  void close_ep(ucp_ep_h ep, std::uint32_t flags) {
    ucp_request_param_t param{};
    param.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    param.flags = flags;
    ucs_status_ptr_t request = ucp_ep_close_nbx(ep, &param);
    if (request != nullptr && !UCS_PTR_IS_ERR(request)) closing.push_back(request);
  }

  void flush_closes() {
    if (!to_close.empty()) {
      auto eps = std::move(to_close);
      to_close.clear();
      for (ucp_ep_h ep : eps) close_ep(ep, UCP_EP_CLOSE_FLAG_FORCE);
    }
    for (std::size_t i = 0; i < closing.size();) {
      if (ucp_request_check_status(closing[i]) != UCS_INPROGRESS) {
        ucp_request_free(closing[i]);
        closing[i] = closing.back();
        closing.pop_back();
      } else {
        ++i;
      }
    }
  }

  // Reports a connected peer as failed (or fails its pending connect) and drops it.
  void fail_peer(peer_id id, error reason) {
    auto it = peers.find(id);
    if (it == peers.end()) return;
    peer_state& peer = it->second;
    if (reason.code() == errc::invalid_argument)
      stat_rejected.fetch_add(1, std::memory_order_relaxed);
    if (dialing(peer)) {
      if (peer.waiter) peer.waiter->finish(0, std::move(reason));
    } else if (peer.phase == peer_phase::connected) {
      transport_log().warn("transport: peer '{}' ({}) failed: {}", peer.name, id, reason.what());
      events.push_back(failed_event{id, std::move(reason)});
    }
    drop_peer(id, /*force=*/true);
  }

  void dispatch_events() {
    while (!events.empty()) {
      event ev = std::move(events.front());
      events.pop_front();
      try {
        std::visit([this](auto& e) { deliver(e); }, ev);
      } catch (const std::exception& e) {
        transport_log().error("transport: a callback of node '{}' threw: {}", options.name, e.what());
      }
    }
  }

  void deliver(message_event& e) {
    if (callbacks.on_message) callbacks.on_message(e.peer, std::move(e.message));
  }
  void deliver(connected_event& e) {
    if (callbacks.on_peer_connected) callbacks.on_peer_connected(e.peer, e.name);
  }
  void deliver(failed_event& e) {
    if (callbacks.on_peer_failed) callbacks.on_peer_failed(e.peer, e.reason);
  }
  void deliver(closed_event& e) {
    if (callbacks.on_peer_closed) callbacks.on_peer_closed(e.peer);
  }

  // ---- UCX callbacks (progress thread, inside ucp_worker_progress) ---------------------------

  static void on_connection_request(ucp_conn_request_h request, void* arg) {
    auto* self = static_cast<impl*>(arg);
    if (self->stopping.load() || !self->listener) {
      // Without the listener (closed at shutdown) there is nothing to reject with.
      if (self->listener) ucp_listener_reject(self->listener.get(), request);
      return;
    }
    // Queried before the endpoint takes over the request.
    ucp_conn_request_attr_t attr{};
    attr.field_mask = UCP_CONN_REQUEST_ATTR_FIELD_CLIENT_ADDR;
    std::string from = ucp_conn_request_query(request, &attr) == UCS_OK ? address_text(attr.client_address)
                                                                         : std::string("an unknown address");
    ucp_ep_params_t params{};
    params.field_mask = UCP_EP_PARAM_FIELD_CONN_REQUEST | UCP_EP_PARAM_FIELD_ERR_HANDLER |
                        UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE;
    params.conn_request = request;
    params.err_mode = UCP_ERR_HANDLING_MODE_PEER;
    params.err_handler.cb = &impl::on_ep_error;
    params.err_handler.arg = self;
    ucp_ep_h ep = nullptr;
    ucs_status_t status = ucp_ep_create(self->worker(), &params, &ep);
    if (status != UCS_OK) {
      transport_log().warn("transport: node '{}' could not accept a connection: {}", self->options.name,
                   ucs_status_string(status));
      return;
    }
    self->add_peer(ep, peer_phase::accepting).address = std::move(from);
  }

  static void on_ep_error(void* arg, ucp_ep_h ep, ucs_status_t status) {
    auto* self = static_cast<impl*>(arg);
    auto it = self->by_ep.find(ep);
    if (it == self->by_ep.end()) return;  // Already dropped; its close is under way.
    peer_id id = it->second;
    std::string name = self->peers[id].name;
    self->fail_peer(id, error(errc::unavailable,
                              fmt::format("connection to '{}' lost: {}", name,
                                          ucs_status_string(status))));
  }

  static ucs_status_t on_am(void* arg, const void* header, std::size_t header_length, void* data,
                            std::size_t length, const ucp_am_recv_param_t* param) {
    auto* self = static_cast<impl*>(arg);
    bool rndv = (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) != 0;
    self->holding_data = false;
    if (!(param->recv_attr & UCP_AM_RECV_ATTR_FIELD_REPLY_EP)) return UCS_OK;
    auto it = self->by_ep.find(param->reply_ep);
    if (it == self->by_ep.end()) return UCS_OK;  // A peer we dropped; ignore its stragglers.
    peer_id id = it->second;
    try {
      return self->receive(self->peers.at(id), header, header_length, data, length, param->recv_attr);
    } catch (const error& e) {
      self->fail_peer(id, e);
    } catch (const std::exception& e) {
      self->fail_peer(id, error(errc::internal, e.what()));
    }
    // The data descriptor (if any) is dropped by UCX when we return an error status, unless a
    // buffer already points into it (it is given back when that buffer goes).
    if (self->holding_data) return UCS_INPROGRESS;
    return rndv ? UCS_ERR_REJECTED : UCS_OK;
  }

  ucs_status_t receive(peer_state& peer, const void* header, std::size_t header_length,
                       void* data, std::size_t length, std::uint64_t recv_attr) {
    const bool rndv = (recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) != 0;
    if (header_length != sizeof(wire_header))
      fail(errc::invalid_argument, "peer '{}' sent a {}-byte header, expected {}", peer.name,
           header_length, sizeof(wire_header));
    wire_header h;
    std::memcpy(&h, header, sizeof(h));
    if (h.magic != kMagic)
      fail(errc::invalid_argument, "peer '{}' sent a message without the Shoal magic",
           peer.name);
    if (rndv && h.kind != wire_kind::bulk)
      fail(errc::invalid_argument, "peer '{}' sent a {}-byte control message", peer.name, length);

    switch (h.kind) {
      case wire_kind::hello: return receive_hello(peer, h, data, length);
      case wire_kind::hello_ack: return receive_hello_ack(peer, h, data, length);
      case wire_kind::bye: {
        if (peer.phase != peer_phase::connected)
          fail(errc::invalid_argument, "peer '{}' said bye before hello", peer.name);
        events.push_back(closed_event{peer.id});
        drop_peer(peer.id, /*force=*/false);
        return UCS_OK;
      }
      case wire_kind::envelope: return receive_envelope(peer, h, data, length);
      case wire_kind::bulk: return receive_bulk(peer, h, data, length, recv_attr);
      case wire_kind::proof: return receive_proof(peer, data, length);
      case wire_kind::welcome: return receive_welcome(peer, data, length);
      case wire_kind::refused: return receive_refused(peer, data, length);
    }
    fail(errc::invalid_argument, "peer '{}' sent unknown message kind {}", peer.name,
         static_cast<unsigned>(h.kind));
  }

  static bool dialing(const peer_state& peer) {
    return peer.phase == peer_phase::connecting || peer.phase == peer_phase::proving;
  }

  // The sender's name of a hello or hello_ack, and what follows its NUL (nothing when the
  // payload is the name alone, as an ack to another version is).
  static std::pair<std::string, std::string_view> split_hello(const void* data, std::size_t length) {
    std::string_view payload(static_cast<const char*>(data), length);
    const auto end = payload.find('\0');
    const auto name = payload.substr(0, end);
    if (name.size() > kMaxNameBytes)
      fail(errc::invalid_argument, "node name of {} bytes is too long", name.size());
    return {std::string(name), end == std::string_view::npos ? std::string_view() : payload.substr(end + 1)};
  }

  static nonce nonce_from(std::string_view bytes) {
    nonce n;
    std::memcpy(n.data(), bytes.data(), n.size());
    return n;
  }

  ucs_status_t receive_hello(peer_state& peer, const wire_header& h, const void* data,
                             std::size_t length) {
    if (peer.phase != peer_phase::accepting)
      fail(errc::invalid_argument, "peer '{}' sent a second hello", peer.name);
    auto [name, rest] = split_hello(data, length);
    peer.name = std::move(name);
    if (h.version != schema_version) {
      // It learns our version from the ack and gives up; we just forget it.
      send_control(peer, wire_kind::hello_ack, options.name);
      transport_log().warn("transport: refused node '{}': it speaks schema version {}, this node {}",
                   peer.name, h.version, schema_version);
      drop_peer(peer.id, /*force=*/false);
      return UCS_OK;
    }
    if (rest.size() != sizeof(nonce))
      fail(errc::invalid_argument, "peer '{}' sent a hello without its nonce", peer.name);
    peer.remote_nonce = nonce_from(rest);
    peer.local_nonce = fresh_nonce();
    const bool ask_proof = !options.join_secret.empty();
    std::string ack = options.name;
    ack += '\0';
    ack += ask_proof ? '\1' : '\0';
    ack += bytes_of(peer.local_nonce);
    send_control(peer, wire_kind::hello_ack, ack);
    if (ask_proof) {
      peer.phase = peer_phase::verifying;
      return UCS_OK;
    }
    mark_connected(peer);
    return UCS_OK;
  }

  ucs_status_t receive_hello_ack(peer_state& peer, const wire_header& h, const void* data,
                                 std::size_t length) {
    if (peer.phase != peer_phase::connecting)
      fail(errc::invalid_argument, "peer '{}' sent an unexpected hello_ack", peer.name);
    auto [name, rest] = split_hello(data, length);
    peer.name = std::move(name);
    if (h.version != schema_version) {
      peer.waiter->finish(0, error(errc::failed_precondition,
                                   fmt::format("node '{}' at {} speaks schema version {}, this "
                                               "node {}",
                                               peer.name, peer.address, h.version, schema_version)));
      drop_peer(peer.id, /*force=*/false);
      return UCS_OK;
    }
    if (rest.size() != 1 + sizeof(nonce) || (rest[0] != '\0' && rest[0] != '\1'))
      fail(errc::invalid_argument, "peer '{}' sent a malformed hello_ack", peer.name);
    const bool asks_proof = rest[0] == '\1';
    peer.remote_nonce = nonce_from(rest.substr(1));
    if (asks_proof) {
      // Without a secret an empty proof still goes out: the listener counts the refusal and
      // says why.
      const auto proof = options.join_secret.empty()
                             ? std::string()
                             : std::string(reinterpret_cast<const char*>(
                                               join_proof(options.join_secret, "dialer", peer.remote_nonce,
                                                          peer.local_nonce, options.name, peer.name)
                                                   .data()),
                                           sizeof(proof_mac));
      send_control(peer, wire_kind::proof, proof);
      peer.phase = peer_phase::proving;
      return UCS_OK;
    }
    if (!options.join_secret.empty()) {
      refuse_listener(peer, "it has no join secret, so it cannot prove that it belongs to this node's cluster");
      return UCS_OK;
    }
    mark_connected(peer);
    return UCS_OK;
  }

  // Listener: the dialer's answer to our nonce.
  ucs_status_t receive_proof(peer_state& peer, const void* data, std::size_t length) {
    if (peer.phase != peer_phase::verifying)
      fail(errc::invalid_argument, "peer '{}' sent a proof it was not asked for", peer.name);
    const auto expected = join_proof(options.join_secret, "dialer", peer.local_nonce, peer.remote_nonce,
                                     peer.name, options.name);
    if (!proof_matches(expected, data, length)) {
      const std::string why = length == 0 ? "it has no join secret" : "its join secret differs from this node's";
      stat_refused.fetch_add(1, std::memory_order_relaxed);
      transport_log().warn("transport: node '{}' refused a connection from {} calling itself '{}': {} (refused so far: {})",
                   options.name, peer.address, peer.name, why, stat_refused.load());
      send_control(peer, wire_kind::refused,
                   fmt::format("{} requires the cluster's join secret: {}", options.name, why));
      drop_peer(peer.id, /*force=*/false);
      return UCS_OK;
    }
    const auto answer = join_proof(options.join_secret, "listener", peer.remote_nonce, peer.local_nonce,
                                   options.name, peer.name);
    send_control(peer, wire_kind::welcome,
                 std::string_view(reinterpret_cast<const char*>(answer.data()), answer.size()));
    mark_connected(peer);
    return UCS_OK;
  }

  // Dialer: the listener accepted our proof and proves itself.
  ucs_status_t receive_welcome(peer_state& peer, const void* data, std::size_t length) {
    if (peer.phase != peer_phase::proving)
      fail(errc::invalid_argument, "peer '{}' sent an unexpected welcome", peer.name);
    if (options.join_secret.empty())
      fail(errc::invalid_argument, "peer '{}' welcomed a node that has no join secret", peer.name);
    const auto expected = join_proof(options.join_secret, "listener", peer.local_nonce, peer.remote_nonce,
                                     peer.name, options.name);
    if (!proof_matches(expected, data, length)) {
      refuse_listener(peer, "its proof of the join secret is wrong");
      return UCS_OK;
    }
    mark_connected(peer);
    return UCS_OK;
  }

  ucs_status_t receive_refused(peer_state& peer, const void* data, std::size_t length) {
    if (peer.phase != peer_phase::proving)
      fail(errc::invalid_argument, "peer '{}' sent an unexpected refusal", peer.name);
    std::string why(static_cast<const char*>(data), std::min(length, kMaxRefusalBytes));
    for (char& c : why)
      if (static_cast<unsigned char>(c) < 0x20 || static_cast<unsigned char>(c) > 0x7e) c = '?';
    peer.waiter->finish(0, error(errc::failed_precondition,
                                 fmt::format("node '{}' at {} refused this node ({}): {}", peer.name,
                                             peer.address, options.name, why)));
    drop_peer(peer.id, /*force=*/false);
    return UCS_OK;
  }

  // Dialer: the node we dialed could not prove the secret; `connect` fails with `why`.
  void refuse_listener(peer_state& peer, std::string_view why) {
    stat_refused.fetch_add(1, std::memory_order_relaxed);
    peer.waiter->finish(0, error(errc::failed_precondition,
                                 fmt::format("refused node '{}' at {}: {} (this node requires the cluster's "
                                             "join secret from its peers)",
                                             peer.name, peer.address, why)));
    drop_peer(peer.id, /*force=*/false);
  }

  void mark_connected(peer_state& peer) {
    peer.phase = peer_phase::connected;
    peer.connected_at = clock::now();
    {
      std::lock_guard lock(mutex);
      live[peer.id] = peer.name;
    }
    if (peer.waiter) {
      peer.waiter->finish(peer.id, std::nullopt);
      peer.waiter.reset();
    }
    events.push_back(connected_event{peer.id, peer.name});
  }

  assembly& assembly_for(peer_state& peer, std::uint64_t seq) {
    if (peer.phase != peer_phase::connected)
      fail(errc::invalid_argument, "peer '{}' sent data before its hello", peer.name);
    if (seq < peer.next_deliver_seq || seq - peer.next_deliver_seq >= kMaxPendingMessages)
      fail(errc::invalid_argument, "peer '{}' sent message {} while expecting {}", peer.name, seq,
           peer.next_deliver_seq);
    return peer.pending[seq];
  }

  ucs_status_t receive_envelope(peer_state& peer, const wire_header& h, const void* data,
                                std::size_t length) {
    assembly& a = assembly_for(peer, h.seq);
    if (a.envelope_arrived)
      fail(errc::invalid_argument, "peer '{}' sent envelope {} twice", peer.name, h.seq);
    a.envelope_arrived = true;
    if (length > options.limits.max_envelope_bytes)
      fail(errc::invalid_argument, "peer '{}' sent a {}-byte envelope, limit {}", peer.name,
           length, options.limits.max_envelope_bytes);
    auto message = decode_envelope(
        std::span<const std::byte>(static_cast<const std::byte*>(data), length), options.limits);
    auto refs = message.envelope().getBulk();
    if (refs.size() != h.count)
      fail(errc::invalid_argument, "peer '{}' announced {} bulk buffers, its envelope lists {}",
           peer.name, h.count, refs.size());
    if (a.bulk.empty()) {
      a.bulk.resize(h.count);
      a.bulk_done.assign(h.count, false);
      a.bulk_started.assign(h.count, false);
    } else if (a.bulk.size() != h.count) {
      fail(errc::invalid_argument, "peer '{}' disagrees with itself on bulk count of {}",
           peer.name, h.seq);
    }
    a.expected = h.count;
    a.bulk_remaining = 0;
    for (std::uint32_t i = 0; i < h.count; ++i) {
      if (a.bulk_done[i]) {
        if (a.bulk[i].size() != refs[i].getBytes())
          fail(errc::invalid_argument, "peer '{}' sent bulk {} of {} bytes, envelope says {}",
               peer.name, i, a.bulk[i].size(), refs[i].getBytes());
      } else {
        ++a.bulk_remaining;
      }
    }
    a.message.emplace(std::move(message));
    try_deliver(peer);
    return UCS_OK;
  }

  ucs_status_t receive_bulk(peer_state& peer, const wire_header& h, void* data,
                            std::size_t length, std::uint64_t recv_attr) {
    const bool rndv = (recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) != 0;
    assembly& a = assembly_for(peer, h.seq);
    if (a.bulk.empty()) {
      if (h.count == 0 || h.count > options.limits.max_bulk)
        fail(errc::invalid_argument, "peer '{}' sent a bulk buffer of a {}-buffer message",
             peer.name, h.count);
      a.bulk.resize(h.count);
      a.bulk_done.assign(h.count, false);
      a.bulk_started.assign(h.count, false);
    }
    if (h.index >= a.bulk.size() || h.count != a.bulk.size())
      fail(errc::invalid_argument, "peer '{}' sent bulk {} of {} for message {} with {}",
           peer.name, h.index, h.count, h.seq, a.bulk.size());
    if (a.bulk_started[h.index])
      fail(errc::invalid_argument, "peer '{}' sent bulk {} of message {} twice", peer.name,
           h.index, h.seq);
    if (length > options.limits.max_bulk_bytes)
      fail(errc::invalid_argument, "peer '{}' sent a {}-byte bulk buffer, limit {}", peer.name,
           length, options.limits.max_bulk_bytes);
    if (a.message) {
      auto expected = a.message->envelope().getBulk()[h.index].getBytes();
      if (expected != length)
        fail(errc::invalid_argument, "peer '{}' sent bulk {} of {} bytes, envelope says {}",
             peer.name, h.index, length, expected);
    }
    a.bulk_started[h.index] = true;
    // Eager data UCX assembled in memory we may keep: hand it over as it is (sent eagerly
    // because the peer is on shared memory; the copy would cost as much as the transfer).
    if ((recv_attr & UCP_AM_RECV_ATTR_FLAG_DATA) != 0 && length >= kAdoptMinBytes &&
        reinterpret_cast<std::uintptr_t>(data) % kBufferAlignment == 0) {
      a.bulk[h.index] = ucx->adopt(data, length);
      holding_data = true;
      bulk_arrived(peer, a, h.index);
      return UCS_INPROGRESS;
    }
    byte_buffer buffer = pool->acquire(length);
    if (!rndv) {
      if (length != 0) std::memcpy(buffer.data(), data, length);
      a.bulk[h.index] = std::move(buffer);
      bulk_arrived(peer, a, h.index);
      return UCS_OK;
    }
    // Rendezvous: UCX fetches the bytes straight into our buffer (zero-copy where it can).
    void* target = buffer.data();
    auto* record = new recv_record{this, peer.id, h.seq, h.index, std::move(buffer)};
    ucp_request_param_t param{};
    param.op_attr_mask =
        UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_DATATYPE;
    param.cb.recv_am = &impl::on_recv_done;
    param.user_data = record;
    param.datatype = ucp_dt_make_contig(1);
    ucs_status_ptr_t request = ucp_am_recv_data_nbx(worker(), data, target, length, &param);
    if (request == nullptr) {
      a.bulk[h.index] = std::move(record->buffer);
      delete record;
      bulk_arrived(peer, a, h.index);
    } else if (UCS_PTR_IS_ERR(request)) {
      delete record;
      fail(errc::unavailable, "receiving bulk {} from '{}': {}", h.index, peer.name,
           ucs_status_string(UCS_PTR_STATUS(request)));
    }
    return UCS_INPROGRESS;
  }

  static void on_recv_done(void* request, ucs_status_t status, std::size_t, void* user_data) {
    ucp_request_free(request);
    std::unique_ptr<recv_record> record(static_cast<recv_record*>(user_data));
    impl* self = record->self;
    auto it = self->peers.find(record->peer);
    if (it == self->peers.end()) return;  // The peer was dropped; its buffers went with it.
    if (status != UCS_OK) {
      self->fail_peer(record->peer,
                      error(detail::to_errc(status),
                            fmt::format("receiving bulk {} from '{}': {}", record->index,
                                        it->second.name, ucs_status_string(status))));
      return;
    }
    auto pending = it->second.pending.find(record->seq);
    if (pending == it->second.pending.end()) return;
    pending->second.bulk[record->index] = std::move(record->buffer);
    self->bulk_arrived(it->second, pending->second, record->index);
  }

  void bulk_arrived(peer_state& peer, assembly& a, std::uint32_t index) {
    a.bulk_done[index] = true;
    if (a.message) {
      --a.bulk_remaining;
      try_deliver(peer);
    }
  }

  void try_deliver(peer_state& peer) {
    while (true) {
      auto it = peer.pending.find(peer.next_deliver_seq);
      if (it == peer.pending.end()) return;
      assembly& a = it->second;
      if (!a.message || a.bulk_remaining != 0) return;
      auto& state = a.message->internals();
      std::uint64_t bytes = 0;
      for (auto& buffer : a.bulk) {
        bytes += buffer.size();
        state.bulk.push_back(std::move(buffer));
        state.taken.push_back(false);
      }
      stat_received.fetch_add(1, std::memory_order_relaxed);
      stat_bulk_received.fetch_add(bytes, std::memory_order_relaxed);
      events.push_back(message_event{peer.id, std::move(*a.message)});
      peer.pending.erase(it);
      ++peer.next_deliver_seq;
    }
  }

  // ---- Shutdown ------------------------------------------------------------------------------

  void shutdown() {
    // No new connections first: peers that hear bye below may dial again at once (clients
    // follow a restarted head), and UCX 1.13 can crash in its connection-request callback
    // when a request arrives while the listener is being destroyed (openucx/ucx#11087).
    // Closed now, such a dial is refused by the kernel instead.
    listener.reset();
    // Pending connects fail; connected peers hear bye, then every endpoint closes with a flush.
    std::vector<peer_id> ids;
    for (auto& [id, peer] : peers) ids.push_back(id);
    for (peer_id id : ids) {
      peer_state& peer = peers[id];
      if (peer.waiter)
        peer.waiter->finish(0, error(errc::cancelled, "the node is shutting down"));
      if (peer.phase == peer_phase::connected) send_control(peer, wire_kind::bye, {});
      drop_peer(id, /*force=*/false);
    }
    {
      std::lock_guard lock(mutex);
      for (auto& cmd : queue) {
        if (auto* c = std::get_if<connect_command>(&cmd))
          c->waiter->finish(0, error(errc::cancelled, "the node is shutting down"));
        if (std::holds_alternative<send_command>(cmd)) in_flight.fetch_sub(1);
      }
      queue.clear();
    }
    auto deadline = clock::now() + std::chrono::seconds(2);
    while ((!closing.empty() || !to_close.empty()) && clock::now() < deadline) {
      ucp_worker_progress(worker());
      flush_closes();
    }
    if (!closing.empty() || !to_close.empty()) {
      transport_log().warn("node '{}': {} connection(s) did not finish closing within 2 s of stopping; "
                              "leaving their UCX worker to the process's exit",
                              options.name, closing.size() + to_close.size());
      ucx->abandon();
    }
    closing.clear();
    to_close.clear();
    events.clear();
  }
};

std::string read_join_secret(const std::filesystem::path& file) {
  const auto name = file.string();
  struct stat info{};
  if (::stat(name.c_str(), &info) != 0)
    fail(errc::not_found, "{}: cannot read the join secret file: {}", name, std::strerror(errno));
  // As ssh does with private keys: a secret others can read is no longer a secret, and one
  // others can write lets them choose it.
  if ((info.st_mode & 077) != 0)
    fail(errc::failed_precondition,
         "{}: the join secret file may be read or written by other users (mode {:04o}); run chmod 600 {}", name,
         info.st_mode & 07777, name);
  std::ifstream in(file, std::ios::binary);
  if (!in) fail(errc::not_found, "{}: cannot read the join secret file", name);
  std::string secret((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  while (!secret.empty() && (secret.back() == '\n' || secret.back() == '\r' || secret.back() == ' ' || secret.back() == '\t'))
    secret.pop_back();
  if (secret.empty()) fail(errc::invalid_argument, "{}: the join secret file is empty", name);
  if (secret.size() < 32)
    fail(errc::invalid_argument,
         "{}: the join secret has {} bytes, at least 32 are needed (`shoal keys new-join-secret --file {}` "
         "writes one)",
         name, secret.size(), name);
  return secret;
}

node::node(node_options options, node_callbacks callbacks)
    : impl_(std::make_unique<impl>(std::move(options), std::move(callbacks))) {
  impl_->start();
}

node::~node() { stop(); }

const std::string& node::name() const noexcept { return impl_->options.name; }

std::uint16_t node::port() const noexcept { return impl_->port; }

peer_id node::connect(std::string_view host, std::uint16_t port) {
  SHOAL_REQUIRE(!impl_->on_progress_thread(), "node::connect called from a node callback");
  if (impl_->stopping.load()) fail(errc::failed_precondition, "node '{}' is stopped", name());
  impl::connect_command cmd;
  cmd.address = resolve(host, port, cmd.length);
  cmd.target = fmt::format("{}:{}", host, port);
  cmd.waiter = std::make_shared<connect_waiter>();
  auto waiter = cmd.waiter;
  impl_->push(std::move(cmd));
  std::unique_lock lock(waiter->mutex);
  if (!waiter->cv.wait_for(lock, impl_->options.connect_timeout, [&] { return waiter->done; })) {
    lock.unlock();
    impl_->push(impl::abandon_command{waiter});
    waiter->finish(0, std::nullopt);
    fail(errc::unavailable, "no hello from {}:{} within {} ms", host, port,
         impl_->options.connect_timeout.count());
  }
  if (waiter->failure) throw *waiter->failure;
  return waiter->peer;
}

void node::send(peer_id peer, outgoing_message message) {
  {
    std::lock_guard lock(impl_->mutex);
    if (impl_->live.find(peer) == impl_->live.end())
      fail(errc::unavailable, "node '{}' has no connection {} (failed, closed or unknown)",
           name(), peer);
  }
  impl::send_command cmd{peer, encode_envelope(message),
                         std::move(message.internals().bulk)};
  impl_->in_flight.fetch_add(1);
  if (impl_->on_progress_thread()) {
    impl_->handle(std::move(cmd));
  } else {
    impl_->push(std::move(cmd));
  }
}

void node::disconnect(peer_id peer) {
  if (impl_->on_progress_thread()) {
    impl_->handle(impl::disconnect_command{peer});
  } else {
    impl_->push(impl::disconnect_command{peer});
  }
}

std::string node::peer_name(peer_id peer) const {
  std::lock_guard lock(impl_->mutex);
  auto it = impl_->live.find(peer);
  if (it == impl_->live.end()) fail(errc::not_found, "no connection {}", peer);
  return it->second;
}

std::string node::peer_lanes(peer_id peer) const {
  {
    std::lock_guard lock(impl_->mutex);
    if (impl_->live.find(peer) == impl_->live.end()) fail(errc::not_found, "no connection {}", peer);
  }
  SHOAL_REQUIRE(!impl_->on_progress_thread(), "node::peer_lanes called from a node callback");
  auto done = std::make_shared<std::promise<std::string>>();
  auto answer = done->get_future();
  impl_->push(impl::describe_command{peer, done});
  if (answer.wait_for(std::chrono::seconds(10)) != std::future_status::ready)
    fail(errc::deadline_exceeded, "the transport's progress thread did not answer within 10 s");
  auto text = answer.get();
  if (text.empty()) fail(errc::not_found, "no connection {}", peer);
  return text;
}

std::size_t node::in_flight() const noexcept { return impl_->in_flight.load(); }

node_stats node::stats() const noexcept {
  return {impl_->stat_sent.load(), impl_->stat_received.load(), impl_->stat_bulk_sent.load(),
          impl_->stat_bulk_received.load(), impl_->stat_bulk_eager.load(), impl_->stat_rejected.load(),
          impl_->stat_refused.load()};
}

void node::stop() {
  if (!impl_ || impl_->stopped) return;
  SHOAL_REQUIRE(!impl_->on_progress_thread(), "node::stop called from a node callback");
  impl_->stopping.store(true);
  impl_->wake();
  if (impl_->thread.joinable()) impl_->thread.join();
  impl_->stopped = true;
  impl_->release_ucx();
}

}  // namespace shoal::transport
