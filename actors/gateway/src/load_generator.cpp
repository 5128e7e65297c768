// Clients are plain threads with blocking Beast calls: one request at a time per client is
// exactly the behaviour being measured, and per-thread timing needs no event loop. Blocking
// socket calls have no timeouts, so a watchdog shuts down the socket of any request that
// overruns its deadline.

#include "shoal/gateway/load_generator.hpp"

#include "shoal/base/error.hpp"

// Boost 1.74's Asio uses std::exchange without including <utility>.
#include <utility>

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <sys/socket.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <mutex>
#include <thread>

namespace shoal::gateway {
namespace {

namespace beast = boost::beast;
namespace http = beast::http;
namespace net = boost::asio;
using tcp = net::ip::tcp;
using clock_type = std::chrono::steady_clock;
using json = nlohmann::json;

double seconds(clock_type::duration d) { return std::chrono::duration<double>(d).count(); }

// The socket a client is blocked on and until when it may block.
struct watched {
  std::mutex mutex;
  int fd = -1;
  clock_type::time_point deadline = clock_type::time_point::max();
  void arm(int f, clock_type::time_point d) {
    std::lock_guard lock(mutex);
    fd = f;
    deadline = d;
  }
  void disarm() { arm(-1, clock_type::time_point::max()); }
};

class watchdog {
 public:
  explicit watchdog(std::vector<watched>& clients) : clients_(clients), thread_([this] { loop(); }) {}
  ~watchdog() {
    {
      std::lock_guard lock(mutex_);
      done_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }

 private:
  void loop() {
    std::unique_lock lock(mutex_);
    while (!cv_.wait_for(lock, std::chrono::milliseconds(50), [this] { return done_; })) {
      const auto now = clock_type::now();
      for (auto& c : clients_) {
        std::lock_guard l(c.mutex);
        if (c.fd >= 0 && now > c.deadline) ::shutdown(c.fd, SHUT_RDWR);  // the blocked call fails
      }
    }
  }
  std::vector<watched>& clients_;
  std::mutex mutex_;
  std::condition_variable cv_;
  bool done_ = false;
  std::thread thread_;
};

void connect(tcp::socket& socket, const http_address& a) {
  net::io_context& ioc = static_cast<net::io_context&>(socket.get_executor().context());
  tcp::resolver resolver(ioc);
  net::connect(socket, resolver.resolve(a.host, std::to_string(a.port)));
  socket.set_option(tcp::no_delay(true));
}

struct stream_outcome {
  bool ok = false;
  std::string error;
  double ttft = -1;
  std::vector<double> itl;
  std::int64_t prompt_tokens = 0, cached_tokens = 0, completion_tokens = 0;
};

// Feeds complete server-sent events of `body[from..]` to `on_data`; returns where parsing stopped.
template <typename F>
std::size_t parse_events(const std::string& body, std::size_t from, F&& on_data) {
  for (;;) {
    const auto end = body.find("\n\n", from);
    if (end == std::string::npos) return from;
    std::string_view event(body.data() + from, end - from);
    if (event.starts_with("data: ")) on_data(event.substr(6));
    from = end + 2;
  }
}

stream_outcome stream_one(tcp::socket& socket, beast::flat_buffer& buffer, const http_address& a, const std::string& body) {
  stream_outcome out;
  http::request<http::string_body> req{http::verb::post, "/v1/chat/completions", 11};
  req.set(http::field::host, a.host);
  req.set(http::field::content_type, "application/json");
  req.keep_alive(true);
  req.body() = body;
  req.prepare_payload();
  const auto sent = clock_type::now();
  http::write(socket, req);
  http::response_parser<http::string_body> parser;
  parser.body_limit(std::numeric_limits<std::uint64_t>::max());
  http::read_header(socket, buffer, parser);
  const int status = parser.get().result_int();
  std::size_t parsed = 0;
  clock_type::time_point last{};
  bool done = false;
  auto on_data = [&](std::string_view data) {
    if (data == "[DONE]") {
      done = true;
      return;
    }
    const auto j = json::parse(data, nullptr, false);
    if (j.is_discarded()) {
      out.error = "a streamed event is not JSON";
      return;
    }
    if (j.contains("error")) {
      out.error = j["error"].value("message", std::string("error event"));
      return;
    }
    if (const auto u = j.find("usage"); u != j.end() && u->is_object()) {
      out.prompt_tokens = u->value("prompt_tokens", std::int64_t{0});
      out.completion_tokens = u->value("completion_tokens", std::int64_t{0});
      if (const auto d = u->find("prompt_tokens_details"); d != u->end() && d->is_object())
        out.cached_tokens = d->value("cached_tokens", std::int64_t{0});
    }
    const auto choices = j.find("choices");
    if (choices == j.end() || !choices->is_array() || choices->empty()) return;
    const auto& delta = (*choices)[0].contains("delta") ? (*choices)[0]["delta"] : json::object();
    const bool text = (delta.contains("content") && delta["content"].is_string() && !delta["content"].get<std::string>().empty()) ||
                      (delta.contains("reasoning_content") && delta["reasoning_content"].is_string() &&
                       !delta["reasoning_content"].get<std::string>().empty());
    if (!text) return;
    const auto now = clock_type::now();
    if (out.ttft < 0)
      out.ttft = seconds(now - sent);
    else
      out.itl.push_back(seconds(now - last));
    last = now;
  };
  while (!parser.is_done()) {
    http::read_some(socket, buffer, parser);
    if (status == 200) parsed = parse_events(parser.get().body(), parsed, on_data);
  }
  if (status != 200) {
    out.error = fmt::format("HTTP {}: {}", status, parser.get().body().substr(0, 300));
    return out;
  }
  if (!done && out.error.empty()) out.error = "the stream ended without data: [DONE]";
  out.ok = out.error.empty();
  if (!parser.get().keep_alive()) socket.close();
  return out;
}

}  // namespace

http_address parse_http_url(std::string_view url) {
  if (url.starts_with("https://")) shoal::fail(errc::invalid_argument, "'{}': https is not supported; use http://", url);
  if (url.starts_with("http://")) url.remove_prefix(7);
  if (const auto slash = url.find('/'); slash != std::string_view::npos) url = url.substr(0, slash);
  http_address a;
  const auto colon = url.rfind(':');
  if (colon == std::string_view::npos) {
    a.host = std::string(url);
    a.port = 80;
  } else {
    a.host = std::string(url.substr(0, colon));
    const auto port = url.substr(colon + 1);
    int value = 0;
    for (char c : port) {
      if (c < '0' || c > '9' || value > 65535) shoal::fail(errc::invalid_argument, "'{}' has a bad port", url);
      value = value * 10 + (c - '0');
    }
    if (port.empty() || value == 0 || value > 65535) shoal::fail(errc::invalid_argument, "'{}' has a bad port", url);
    a.port = static_cast<std::uint16_t>(value);
  }
  if (a.host.empty()) shoal::fail(errc::invalid_argument, "'{}' names no host", url);
  return a;
}

http_reply http_call(const http_address& address, std::string_view method, std::string_view target, std::string_view body,
                     std::chrono::milliseconds timeout) {
  net::io_context ioc;
  beast::tcp_stream stream(ioc);
  http_reply reply;
  beast::error_code failure;
  http::request<http::string_body> req{http::string_to_verb(beast::string_view(method.data(), method.size())),
                                      beast::string_view(target.data(), target.size()), 11};
  req.set(http::field::host, address.host);
  if (!body.empty()) req.set(http::field::content_type, "application/json");
  req.body() = std::string(body);
  req.prepare_payload();
  beast::flat_buffer buffer;
  http::response<http::string_body> res;
  tcp::resolver resolver(ioc);
  stream.expires_after(timeout);
  // Asynchronous calls only for the timeout; the io_context runs them to completion here.
  resolver.async_resolve(address.host, std::to_string(address.port), [&](beast::error_code ec, tcp::resolver::results_type r) {
    if (ec) return void(failure = ec);
    stream.async_connect(r, [&](beast::error_code ec2, const tcp::endpoint&) {
      if (ec2) return void(failure = ec2);
      http::async_write(stream, req, [&](beast::error_code ec3, std::size_t) {
        if (ec3) return void(failure = ec3);
        http::async_read(stream, buffer, res, [&](beast::error_code ec4, std::size_t) {
          if (ec4) failure = ec4;
        });
      });
    });
  });
  ioc.run();
  if (failure)
    shoal::fail(errc::unavailable, "{} http://{}:{}{}: {}", method, address.host, address.port, target, failure.message());
  reply.status = res.result_int();
  reply.body = std::move(res.body());
  return reply;
}

double percentile(std::vector<double> values, double p) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  const auto rank = static_cast<std::size_t>(std::ceil(p / 100.0 * static_cast<double>(values.size())));
  return values[std::min(values.size() - 1, rank == 0 ? 0 : rank - 1)];
}

load_result run_load(const load_options& o) {
  SHOAL_REQUIRE(o.concurrency >= 1, "concurrency {} must be at least 1", o.concurrency);
  std::string model = o.model;
  if (model.empty()) {
    const auto reply = http_call(o.address, "GET", "/v1/models");
    const auto j = json::parse(reply.body, nullptr, false);
    if (reply.status != 200 || j.is_discarded() || !j.contains("data") || !j["data"].is_array() || j["data"].empty())
      shoal::fail(errc::unavailable, "GET /v1/models answered {}: {}", reply.status, reply.body.substr(0, 200));
    model = j["data"][0].value("id", std::string());
  }
  std::vector<watched> watch(static_cast<std::size_t>(o.concurrency));
  std::mutex result_mutex;
  load_result result;
  std::atomic<std::int64_t> issued{0};
  const auto start = clock_type::now();
  const auto stop_at = start + o.duration;
  {
    watchdog dog(watch);
    std::vector<std::thread> clients;
    for (int c = 0; c < o.concurrency; ++c)
      clients.emplace_back([&, c] {
        net::io_context ioc;
        tcp::socket socket(ioc);
        beast::flat_buffer buffer;
        auto& w = watch[static_cast<std::size_t>(c)];
        for (;;) {
          const std::int64_t index = issued.fetch_add(1);
          if (o.requests > 0 ? index >= o.requests : clock_type::now() >= stop_at) break;
          json messages = json::array();
          if (!o.system_prompt.empty()) messages.push_back({{"role", "system"}, {"content", o.system_prompt}});
          messages.push_back({{"role", "user"}, {"content", fmt::format("Request {}: what follows {}?", index, index * 7919 % 1000)}});
          const json body{{"model", model},     {"messages", messages},     {"stream", true},
                          {"stream_options", {{"include_usage", true}}}, {"max_tokens", o.max_tokens},
                          {"temperature", 0},   {"ignore_eos", o.ignore_eos}};
          stream_outcome out;
          try {
            if (!socket.is_open()) {
              buffer.clear();
              connect(socket, o.address);
            }
            w.arm(socket.native_handle(), clock_type::now() + o.request_timeout);
            out = stream_one(socket, buffer, o.address, body.dump());
          } catch (const std::exception& e) {
            out.ok = false;
            out.error = e.what();
          }
          w.disarm();
          if (!out.ok) {
            beast::error_code ignored;
            socket.close(ignored);
          }
          std::lock_guard lock(result_mutex);
          if (!out.ok) {
            ++result.failed;
            if (result.errors.size() < 5) result.errors.push_back(out.error);
            continue;
          }
          ++result.succeeded;
          result.prompt_tokens += out.prompt_tokens;
          result.cached_tokens += out.cached_tokens;
          result.generated_tokens += out.completion_tokens;
          if (out.ttft >= 0) result.ttft.push_back(out.ttft);
          result.itl.insert(result.itl.end(), out.itl.begin(), out.itl.end());
        }
      });
    for (auto& t : clients) t.join();
  }
  result.seconds = seconds(clock_type::now() - start);
  return result;
}

}  // namespace shoal::gateway
