// The HTTP server. Beast parses requests (with size limits) and runs the sockets with
// timeouts; responses are formatted here as bytes because the streaming path writes
// server-sent events as hand-framed chunks, and both paths share one write queue per
// connection. Each connection runs on its own strand; backend events arrive on the engine
// thread and are posted to the connection's strand, so a session's state is never shared.

#include "shoal/gateway/server.hpp"

#include "shoal/base/error.hpp"
#include "shoal/gateway/api.hpp"
#include "shoal/gateway/metrics.hpp"
#include "shoal/runtime/chat_template.hpp"
#include "shoal/runtime/reasoning.hpp"

// Boost 1.74's Asio uses std::exchange without including <utility>.
#include <utility>

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <openssl/err.h>
#include <openssl/ssl.h>

#include <atomic>
#include <deque>
#include <mutex>
#include <optional>
#include <random>
#include <thread>
#include <unordered_map>

namespace shoal::gateway {
namespace {

namespace beast = boost::beast;
namespace http = beast::http;
namespace net = boost::asio;
using tcp = net::ip::tcp;
using clock_type = std::chrono::steady_clock;

double seconds(clock_type::duration d) { return std::chrono::duration<double>(d).count(); }
std::int64_t to_ns(clock_type::time_point t) { return t.time_since_epoch().count(); }
clock_type::time_point from_ns(std::int64_t ns) { return clock_type::time_point(clock_type::duration(ns)); }

std::string_view reason_phrase(int status) {
  const auto r = http::obsolete_reason(static_cast<http::status>(status));
  return {r.data(), r.size()};
}

std::string format_response(int status, std::string_view content_type, std::string_view body, bool keep_alive,
                            std::string_view extra_headers = {}) {
  return fmt::format("HTTP/1.1 {} {}\r\nServer: shoal\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: {}\r\n{}\r\n{}",
                     status, reason_phrase(status), content_type,
                     body.size(), keep_alive ? "keep-alive" : "close", extra_headers, body);
}

// One server-sent event framed as one HTTP chunk.
std::string sse_chunk(std::string_view data) {
  const auto event = fmt::format("data: {}\n\n", data);
  return fmt::format("{:x}\r\n{}\r\n", event.size(), event);
}

api_error error_from(errc code, const std::string& message) {
  switch (code) {
    case errc::invalid_argument: return {400, "invalid_request_error", message};
    case errc::not_found: return {404, "invalid_request_error", message};
    case errc::resource_exhausted: return {429, "rate_limit_error", message, {}, "rate_limit_exceeded"};
    case errc::deadline_exceeded: return {504, "timeout_error", message, {}, "timeout"};
    case errc::unavailable:
    case errc::cancelled:
    case errc::aborted: return {503, "server_error", message, {}, "unavailable"};
    default: return {500, "server_error", message, {}, "internal_error"};
  }
}

// Routes get metric labels; anything else is "other" so that random paths cannot grow /metrics.
std::string_view route_label(std::string_view path) {
  for (std::string_view known :
       {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/ready", "/metrics", "/admin/status"})
    if (path == known) return known;
  return "other";
}

enum class readiness { ready, not_ready, probing };

}  // namespace

// What the server asks of every connection, plain or TLS.
class session_base {
 public:
  virtual ~session_base() = default;
  // Begins serving (the TLS handshake first, for HTTPS).
  virtual void start() = 0;
  // Shutdown: drop connections that are not serving a request. While draining (`finally`
  // false) only those waiting for another request on a kept-alive connection: one that is
  // new, or has a request under way, is answered (503 for a generation) rather than reset.
  virtual void close_if_idle(bool finally) = 0;
  // Shutdown after the grace period: cancel what is still generating.
  virtual void cancel_generation() = 0;
};

// TLS 1.2 and 1.3 only; for 1.2, forward-secret AEAD suites only (Mozilla's "intermediate").
constexpr const char* kTls12Ciphers =
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"
    "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305";

// Everything the connections share; `server::impl` is this plus nothing, so that the
// connection class can name it without being a friend of `server`.
struct server_core {
  server_core(backend& b, const runtime::tokenizer& t, server_options o);

  void do_accept();
  void forget(session_base* s) {
    std::lock_guard lock(sessions_mutex);
    sessions.erase(s);
  }
  template <typename F>
  void for_each_session(F&& f);
  void note_progress() { last_event_ns.store(to_ns(clock_type::now()), std::memory_order_relaxed); }
  std::pair<readiness, std::string> check_ready(clock_type::time_point asked);
  std::string next_id(endpoint kind) {
    std::lock_guard lock(id_mutex);
    return fmt::format("{}-{:016x}{:08x}", kind == endpoint::chat ? "chatcmpl" : "cmpl", rng(), ++id_counter);
  }

  backend& back;
  const runtime::tokenizer& tok;
  std::optional<runtime::chat_template> tmpl;
  std::string tmpl_error;
  server_options opt;
  gateway::metrics counters;
  std::int64_t created = 0;
  // Draining: new generations get 503 while those in flight finish.
  std::atomic<bool> stopping{false};
  // Cleared when the drain is over; until then new connections are accepted (and answered 503)
  // rather than refused, so that a client learns to retry elsewhere instead of seeing a reset.
  std::atomic<bool> listening{true};
  std::atomic<std::int64_t> in_flight{0};
  std::atomic<std::int64_t> last_event_ns{0};
  std::atomic<std::int64_t> busy_since_ns{0};
  std::mutex id_mutex;
  std::mt19937_64 rng{std::random_device{}()};
  std::uint64_t id_counter = 0;
  // The idle probe of /ready.
  std::mutex probe_mutex;
  bool probe_pending = false;
  std::uint64_t probe_id = 0;
  bool probe_failed = false;
  std::string probe_error;
  clock_type::time_point probe_started{};
  clock_type::time_point last_probe_ok{};
  std::mutex shutdown_mutex;
  bool shut_down = false;
  // Sessions before the io_context: sessions still owned by queued handlers are destroyed
  // with the io_context and unregister themselves here.
  std::mutex sessions_mutex;
  std::unordered_map<session_base*, std::weak_ptr<session_base>> sessions;
  std::optional<net::ssl::context> tls;
  std::atomic<std::uint64_t> tls_handshake_failures{0};
  net::io_context ioc;
  std::optional<net::executor_work_guard<net::io_context::executor_type>> work;
  tcp::acceptor acceptor;
  net::steady_timer accept_retry;
  std::vector<std::thread> threads;
};

namespace {

struct choice_state {
  std::uint64_t engine_id = 0;
  bool done = false;
  bool started = false;  // a chunk has been streamed (the first carries the role)
  runtime::reasoning_parser reasoning;
  std::string content, reasoning_text, finish_reason;
  std::optional<errc> error;
  std::string error_message;
  std::int64_t prompt_tokens = 0, cached_tokens = 0, completion_tokens = 0;
};

struct job_state {
  generation_body body;
  response_meta meta;
  std::vector<choice_state> choices;
  int remaining = 0;
  bool client_gone = false;
  std::optional<api_error> failure;  // a later choice could not be submitted
  bool got_first = false;
  clock_type::time_point first_token{};
};

}  // namespace

// One connection; `Stream` is beast::tcp_stream, or beast::ssl_stream over one for HTTPS.
template <typename Stream>
class session : public session_base, public std::enable_shared_from_this<session<Stream>> {
  static constexpr bool kTls = !std::is_same_v<Stream, beast::tcp_stream>;

 public:
  template <typename... StreamArgs>
  session(server_core& srv, std::string client, StreamArgs&&... stream_args)
      : stream_(std::forward<StreamArgs>(stream_args)...),
        srv_(srv),
        client_(std::move(client)),
        read_timer_(stream_.get_executor()),
        write_timer_(stream_.get_executor()),
        ready_timer_(stream_.get_executor()) {}
  ~session() override { srv_.forget(this); }

  void start() override {
    net::dispatch(stream_.get_executor(), [self = this->shared_from_this()] {
      if constexpr (kTls)
        self->do_handshake();
      else
        self->do_read(true);
    });
  }
  void close_if_idle(bool finally) override {
    net::post(stream_.get_executor(), [self = this->shared_from_this(), finally] {
      if (self->job_ || self->writing_ || self->response_done_ || self->handling_) return;
      const bool between_requests = self->answered_ && self->reading_ && self->buffer_.size() == 0 &&
                                    !(self->parser_ && self->parser_->got_some());
      if (finally || between_requests) self->close();
    });
  }
  void cancel_generation() override {
    net::post(stream_.get_executor(), [self = this->shared_from_this()] {
      if (self->job_)
        for (auto& c : self->job_->choices)
          if (!c.done) self->srv_.back.cancel(c.engine_id);
    });
  }

 private:
  tcp::socket& tcp_socket() { return beast::get_lowest_layer(stream_).socket(); }

  // ---- TLS ----

  void do_handshake() {
    beast::get_lowest_layer(stream_).expires_after(srv_.opt.read_timeout);
    if constexpr (kTls)
      stream_.async_handshake(net::ssl::stream_base::server, [self = this->shared_from_this()](beast::error_code ec) {
        beast::get_lowest_layer(self->stream_).expires_never();
        if (!ec) return self->do_read(true);
        self->srv_.tls_handshake_failures.fetch_add(1);
        // Plain HTTP to the TLS port: say so in plain HTTP (as nginx does), then close.
        if (ec.category() == net::error::get_ssl_category() &&
            ERR_GET_REASON(static_cast<unsigned long>(ec.value())) == SSL_R_HTTP_REQUEST)
          return self->refuse_plain_http();
        self->close();
      });
  }

  void refuse_plain_http() {
    static const std::string response = format_response(
        400, "application/json",
        R"({"error":{"message":"this port serves HTTPS; plain HTTP is refused","type":"invalid_request_error","param":null,"code":"https_required"}})",
        false);
    beast::get_lowest_layer(stream_).expires_after(std::chrono::seconds(2));
    net::async_write(beast::get_lowest_layer(stream_), net::buffer(response),
                     [self = this->shared_from_this()](beast::error_code ec, std::size_t) {
                       if (ec) return self->close();
                       self->linger_close();
                     });
  }

  // ---- requests ----

  void do_read(bool first) {
    if (closed_) return;
    parser_.emplace();
    parser_->body_limit(srv_.opt.max_body_bytes);
    parser_->header_limit(16 * 1024);
    // Our own timer rather than tcp_stream's timeout, which closes the socket: a client that
    // sent half a request should still get its 408.
    read_timed_out_ = false;
    reading_ = true;
    read_timer_.expires_after(first ? srv_.opt.read_timeout : srv_.opt.idle_timeout);
    read_timer_.async_wait([self = this->shared_from_this()](beast::error_code ec) {
      if (ec || !self->reading_) return;
      self->read_timed_out_ = true;
      beast::error_code ignored;
      self->tcp_socket().cancel(ignored);
    });
    http::async_read(stream_, buffer_, *parser_,
                     [self = this->shared_from_this()](beast::error_code ec, std::size_t) { self->on_read(ec); });
  }

  void on_read(beast::error_code ec) {
    read_timer_.cancel();
    reading_ = false;
    if (closed_) return;
    if (read_timed_out_) ec = beast::error::timeout;
    if (ec == http::error::end_of_stream) return close();
    if (ec) {
      start_ = clock_type::now();
      wall_start_ = std::chrono::system_clock::now();
      principal_.reset();
      audit_model_.clear();
      audit_prompt_.reset();
      method_ = "-";
      target_ = "-";
      keep_alive_ = false;
      if (ec == beast::error::timeout) {
        if (!parser_->got_some() && buffer_.size() == 0) return close();  // an idle keep-alive connection
        return reply_error(api_error(408, "invalid_request_error",
                                     fmt::format("the request did not arrive within {} ms", srv_.opt.read_timeout.count()),
                                     {}, "request_timeout"));
      }
      if (ec == http::error::body_limit)
        return reply_error(api_error(413, "invalid_request_error",
                                     fmt::format("the request body exceeds {} bytes", srv_.opt.max_body_bytes), {},
                                     "request_too_large"));
      if (ec == http::error::header_limit)
        return reply_error(api_error(431, "invalid_request_error", "the request headers are too large"));
      if (ec.category() == http::make_error_code(http::error::bad_target).category())
        return reply_error(api_error(400, "invalid_request_error", fmt::format("malformed HTTP request: {}", ec.message())));
      return close();  // reset or aborted by the peer: nobody to answer
    }
    auto req = parser_->release();
    handling_ = true;
    try {
      handle(std::move(req));
    } catch (const api_error& e) {
      reply_error(e);
    } catch (const std::exception& e) {
      reply_error(api_error(500, "server_error", fmt::format("internal error: {}", e.what()), {}, "internal_error"));
    }
    handling_ = false;
  }

  void handle(http::request<http::string_body> req) {
    start_ = clock_type::now();
    wall_start_ = std::chrono::system_clock::now();
    principal_.reset();
    audit_model_.clear();
    audit_prompt_.reset();
    method_ = std::string(req.method_string());
    target_ = std::string(req.target());
    keep_alive_ = req.keep_alive();
    const std::string_view path = std::string_view(target_).substr(0, target_.find('?'));
    const auto method = req.method();
    auto require = [&](http::verb v) {
      if (method != v)
        throw api_error(405, "invalid_request_error", fmt::format("{} does not support {}", path, method_), {},
                        "method_not_allowed");
    };
    // /health and /ready stay open (probes carry no credentials); /metrics when not asked
    // to need a key; everything else, unknown routes included, needs a key or a token.
    const security& sec = *srv_.opt.security;  // set by server_core's constructor
    const bool open_route =
        path == "/health" || path == "/ready" || (path == "/metrics" && !sec.settings().metrics_need_key);
    if (sec.requires_auth() && !open_route) {
      const auto header = req[http::field::authorization];
      auto checked = sec.authenticate(std::string_view(header.data(), header.size()));
      if (!checked.who) throw api_error(checked.status, "invalid_request_error", checked.message, {}, checked.code);
      principal_ = std::move(checked.who);
      const bool admin_route = path.starts_with("/admin/");
      if (admin_route && !principal_->admin)
        throw api_error(403, "permission_error", fmt::format("{} needs the admin scope", path), {}, "insufficient_scope");
      if (!admin_route && path != "/metrics" && !principal_->model)
        throw api_error(403, "permission_error", "this credential does not grant model use (scope model or admin)", {},
                        "insufficient_scope");
    }
    if (path == "/health") {
      require(http::verb::get);
      return respond(200, "application/json", R"({"status":"ok"})");
    }
    if (path == "/ready") {
      require(http::verb::get);
      return handle_ready();
    }
    if (path == "/metrics") {
      require(http::verb::get);
      auto text = srv_.counters.render(srv_.back.stats(), srv_.in_flight.load(), srv_.opt.experts_per_layer);
      text += sec.metrics_text();
      if (srv_.tls)
        text += fmt::format("# HELP shoal_tls_handshake_failures_total TLS handshakes that failed (plain HTTP included).\n"
                            "# TYPE shoal_tls_handshake_failures_total counter\nshoal_tls_handshake_failures_total {}\n",
                            srv_.tls_handshake_failures.load());
      return respond(200, "text/plain; version=0.0.4; charset=utf-8", text);
    }
    if (path == "/admin/status") {
      require(http::verb::get);
      const auto stats = srv_.back.stats();
      nlohmann::json j{{"model", srv_.opt.model_name},
                       {"in_flight", srv_.in_flight.load()},
                       {"waiting", stats.waiting},
                       {"running", stats.running},
                       {"cache_blocks_total", stats.cache_blocks_total},
                       {"cache_blocks_used", stats.cache_blocks_used},
                       {"preemptions", stats.preemptions}};
      return respond(200, "application/json", j.dump());
    }
    if (path == "/v1/models") {
      require(http::verb::get);
      return respond(200, "application/json", models_response(srv_.opt.model_name, srv_.created));
    }
    if (path == "/v1/chat/completions" || path == "/v1/completions") {
      require(http::verb::post);
      return start_generation(path == "/v1/chat/completions" ? endpoint::chat : endpoint::completion, req.body());
    }
    throw api_error(404, "invalid_request_error", fmt::format("no route {} {}", method_, path), {}, "not_found");
  }

  // ---- /ready ----

  void handle_ready() {
    ready_asked_ = clock_type::now();
    auto [state, message] = srv_.check_ready(ready_asked_);
    if (state == readiness::probing) {
      ready_deadline_ = ready_asked_ + srv_.opt.probe_timeout;
      return poll_ready();
    }
    answer_ready(state, message);
  }

  void poll_ready() {
    ready_timer_.expires_after(std::chrono::milliseconds(10));
    ready_timer_.async_wait([self = this->shared_from_this()](beast::error_code ec) {
      if (ec || self->closed_) return;
      auto [state, message] = self->srv_.check_ready(self->ready_asked_);
      if (state == readiness::probing && clock_type::now() < self->ready_deadline_) return self->poll_ready();
      if (state == readiness::probing) {
        state = readiness::not_ready;
        message = fmt::format("a one-token probe did not finish within {} ms", self->srv_.opt.probe_timeout.count());
      }
      self->answer_ready(state, message);
    });
  }

  void answer_ready(readiness state, const std::string& message) {
    if (state == readiness::ready) return respond(200, "application/json", R"({"status":"ready"})");
    reply_error(api_error(503, "server_error", message, {}, "not_ready"));
  }

  // ---- generation ----

  void start_generation(endpoint kind, const std::string& body) {
    if (srv_.stopping) throw api_error(503, "server_error", "the server is shutting down", {}, "unavailable");
    audit_model_ = srv_.opt.model_name;
    if (srv_.opt.security->settings().audit_prompts) {
      const auto j = nlohmann::json::parse(body, nullptr, false);
      const char* field = kind == endpoint::chat ? "messages" : "prompt";
      if (j.is_object() && j.contains(field))
        audit_prompt_ = j[field].dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
    }
    auto parsed = parse_request(body, kind, srv_.opt.model_name);
    const char* prompt_param = kind == endpoint::chat ? "messages" : "prompt";
    std::vector<runtime::token_id> prompt;
    bool opened_think = false;
    try {
      if (kind == endpoint::chat) {
        if (!srv_.tmpl) throw api_error(400, "invalid_request_error", srv_.tmpl_error, "messages");
        runtime::chat_render_options options;
        options.add_generation_prompt = true;
        options.kwargs_json = parsed.chat_template_kwargs;
        const auto text = srv_.tmpl->render(parsed.messages, options);
        // Templates that open the reasoning in the prompt (DeepSeek-R1's `<think>\n`, V3.1's
        // `<think>` when thinking): the output then starts inside it.
        opened_think = runtime::prompt_opens_reasoning(text);
        srv_.tok.encode_into(text, prompt);
      } else if (parsed.prompt_tokens) {
        prompt = *parsed.prompt_tokens;
        for (const auto id : prompt)
          if (id >= srv_.tok.id_limit())
            throw api_error(400, "invalid_request_error", fmt::format("token id {} is outside the vocabulary", id), "prompt");
      } else {
        if (srv_.tok.add_bos_token() && srv_.tok.bos_id()) prompt.push_back(*srv_.tok.bos_id());
        srv_.tok.encode_into(parsed.prompt, prompt);
      }
    } catch (const shoal::error& e) {
      throw api_error(400, "invalid_request_error", e.what(), prompt_param);
    }
    if (prompt.empty()) throw api_error(400, "invalid_request_error", "the prompt is empty", prompt_param);
    const auto context = srv_.back.max_sequence_tokens();
    const auto prompt_tokens = static_cast<std::int64_t>(prompt.size());
    if (prompt_tokens >= context)
      throw api_error(400, "invalid_request_error",
                      fmt::format("This model's maximum context length is {} tokens. However, your prompt has {} tokens.",
                                  context, prompt_tokens),
                      prompt_param, "context_length_exceeded");
    std::int64_t max_tokens = std::min(srv_.opt.default_max_tokens, context - prompt_tokens);
    if (parsed.max_tokens) {
      if (prompt_tokens + *parsed.max_tokens > context)
        throw api_error(400, "invalid_request_error",
                        fmt::format("This model's maximum context length is {} tokens. However, you requested {} tokens "
                                    "({} in the prompt, {} for the completion).",
                                    context, prompt_tokens + *parsed.max_tokens, prompt_tokens, *parsed.max_tokens),
                        "max_tokens", "context_length_exceeded");
      max_tokens = *parsed.max_tokens;
    }
    if (srv_.in_flight.load() >= srv_.opt.max_in_flight)
      throw api_error(429, "rate_limit_error",
                      fmt::format("the server is serving {} requests, its limit; retry later", srv_.opt.max_in_flight), {},
                      "rate_limit_exceeded");
    // Counted in flight before it reaches the backend, and the drain looked at after: a
    // shutdown starting now either sees this request and waits for it, or this request sees
    // the shutdown and is answered 503; never submitted and then cut off with the server.
    if (srv_.in_flight.fetch_add(1) == 0) srv_.busy_since_ns.store(to_ns(clock_type::now()));
    if (srv_.stopping) {
      srv_.in_flight.fetch_sub(1);
      throw api_error(503, "server_error", "the server is shutting down", {}, "unavailable");
    }

    auto job = std::make_unique<job_state>();
    job->meta = response_meta{kind, srv_.next_id(kind),
                              std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count(),
                              srv_.opt.model_name};
    job->choices.resize(static_cast<std::size_t>(parsed.n));
    for (auto& c : job->choices) c.reasoning = runtime::reasoning_parser(opened_think);
    job->body = std::move(parsed);
    job_ = std::move(job);
    auto& j = *job_;

    for (int i = 0; i < j.body.n; ++i) {
      runtime::generation_request r;
      r.prompt = prompt;
      r.sampling = j.body.sampling;
      // Seeded choices must differ from each other and stay reproducible.
      if (r.sampling.seed && i > 0) r.sampling.seed = *r.sampling.seed + static_cast<std::uint64_t>(i);
      r.limits.max_tokens = max_tokens;
      r.limits.stop = j.body.stop;
      if (!j.body.ignore_eos && srv_.tok.eos_id()) r.limits.stop_token_ids.push_back(*srv_.tok.eos_id());
      r.deadline = clock_type::now() + srv_.opt.request_deadline;
      r.on_event = [self = this->shared_from_this(), i](const runtime::generation_event& ev) {
        self->srv_.note_progress();
        net::post(self->stream_.get_executor(), [self, i, ev] { self->on_event(static_cast<std::size_t>(i), ev); });
      };
      try {
        j.choices[static_cast<std::size_t>(i)].engine_id = srv_.back.submit(std::move(r));
      } catch (const shoal::error& e) {
        auto err = error_from(e.code(), e.what());
        if (i == 0) {
          job_.reset();
          srv_.in_flight.fetch_sub(1);
          throw err;
        }
        // Earlier choices are running: cancel them and answer once they have ended.
        j.failure = err;
        for (int k = 0; k < i; ++k) srv_.back.cancel(j.choices[static_cast<std::size_t>(k)].engine_id);
        j.choices.resize(static_cast<std::size_t>(i));
        break;
      }
      ++j.remaining;
    }
    if (j.body.stream && !j.failure)
      send("HTTP/1.1 200 OK\r\nServer: shoal\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
           "Transfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n");
    start_watch();
  }

  void on_event(std::size_t index, const runtime::generation_event& ev) {
    if (!job_ || index >= job_->choices.size()) return;
    auto& j = *job_;
    auto& c = j.choices[index];
    if (c.done) return;
    c.prompt_tokens = ev.prompt_tokens;
    c.cached_tokens = ev.cached_prompt_tokens;
    c.completion_tokens = ev.completion_tokens;
    if (!ev.tokens.empty() && !j.got_first) {
      j.got_first = true;
      j.first_token = clock_type::now();
      srv_.counters.observe_ttft(seconds(j.first_token - start_));
    }
    runtime::reasoning_split part;
    const bool chat = j.meta.kind == endpoint::chat;
    if (chat)
      part = c.reasoning.push(ev.text);
    else
      part.content = ev.text;
    if (ev.finished) {
      if (chat) {
        auto rest = c.reasoning.finish();
        part.content += rest.content;
        part.reasoning += rest.reasoning;
      }
      c.done = true;
      --j.remaining;
      if (ev.error) {
        c.error = ev.error;
        c.error_message = ev.error_message.empty() ? std::string(errc_name(*ev.error)) : ev.error_message;
      } else {
        c.finish_reason = std::string(runtime::finish_reason_name(ev.reason));
      }
    }
    c.content += part.content;
    c.reasoning_text += part.reasoning;
    if (j.body.stream && !j.client_gone && !j.failure && !c.error) {
      const bool has_text = !part.content.empty() || !part.reasoning.empty();
      if (has_text || (chat && !c.started)) {
        choice_delta d{static_cast<int>(index), chat && !c.started, part.content, part.reasoning, {}};
        c.started = true;
        send(sse_chunk(stream_chunk(j.meta, d)));
      }
      if (c.done) send(sse_chunk(stream_chunk(j.meta, choice_delta{static_cast<int>(index), false, {}, {}, c.finish_reason})));
    }
    if (j.remaining == 0) finish_generation();
  }

  void finish_generation() {
    auto job = std::move(job_);
    auto& j = *job;
    srv_.in_flight.fetch_sub(1);
    usage_counts usage;
    if (!j.choices.empty()) {
      usage.prompt_tokens = j.choices[0].prompt_tokens;
      usage.cached_tokens = j.choices[0].cached_tokens;
    }
    for (const auto& c : j.choices) usage.completion_tokens += c.completion_tokens;
    srv_.counters.count_tokens(usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens);
    if (j.got_first && !j.choices.empty() && j.choices[0].completion_tokens > 1)
      srv_.counters.observe_tpot(seconds(clock_type::now() - j.first_token) /
                                 static_cast<double>(j.choices[0].completion_tokens - 1));
    usage_ = usage;
    std::optional<api_error> failure = j.failure;
    if (!failure)
      for (const auto& c : j.choices)
        if (c.error) {
          failure = error_from(*c.error, c.error_message);
          break;
        }
    if (j.client_gone) {
      finish_log(499);
      return close();
    }
    if (j.body.stream && !j.failure) {
      // The status line went out with the first byte; an error now travels as an event.
      if (failure) send(sse_chunk(stream_error(*failure)));
      if (j.body.include_usage) send(sse_chunk(stream_usage_chunk(j.meta, usage)));
      send(sse_chunk("[DONE]"));
      send("0\r\n\r\n");
      status_ = 200;
      response_done_ = true;
      finish_log(failure ? failure->status() : 200);
      if (!writing_) on_drained();
      return;
    }
    if (failure) return reply_error(*failure);
    std::vector<choice_result> results;
    for (std::size_t i = 0; i < j.choices.size(); ++i) {
      const auto& c = j.choices[i];
      results.push_back({static_cast<int>(i), c.content, c.reasoning_text, c.finish_reason});
    }
    respond(200, "application/json", full_response(j.meta, results, usage));
  }

  // While a request generates, a read stays posted so that a client that goes away is noticed
  // (and its request cancelled) even when nothing is being written to it.
  void start_watch() {
    if (watch_pending_ || closed_ || buffer_.size() > 64 * 1024) return;
    watch_pending_ = true;
    stream_.async_read_some(buffer_.prepare(4096),
                            [self = this->shared_from_this()](beast::error_code ec, std::size_t n) { self->on_watch(ec, n); });
  }

  void on_watch(beast::error_code ec, std::size_t n) {
    watch_pending_ = false;
    if (!ec) buffer_.commit(n);
    if (job_) {
      if (ec) return client_gone();
      return start_watch();  // pipelined bytes: kept in buffer_ for the next request
    }
    if (resume_) {
      resume_ = false;
      if (ec && ec != net::error::operation_aborted) return close();
      proceed();
    }
  }

  void client_gone() {
    if (!job_ || job_->client_gone) return;
    job_->client_gone = true;
    keep_alive_ = false;
    for (auto& c : job_->choices)
      if (!c.done) srv_.back.cancel(c.engine_id);
  }

  // ---- responses and writes ----

  void reply_error(const api_error& e) {
    // After a request that could not be read completely the stream position is unknown.
    if (e.status() == 408 || e.status() == 413 || e.status() == 431 || (e.status() == 400 && method_ == "-"))
      keep_alive_ = false;
    std::string extra;
    if (e.status() == 429 || e.status() == 503) extra = "Retry-After: 1\r\n";
    if (e.status() == 401) extra = fmt::format("WWW-Authenticate: Bearer realm=\"shoal\", error=\"{}\"\r\n",
                                               e.code() == "missing_credentials" ? "invalid_request" : "invalid_token");
    respond(e.status(), "application/json", error_body(e), extra);
  }

  void respond(int status, std::string_view content_type, std::string_view body, std::string_view extra = {}) {
    status_ = status;
    const bool keep = keep_alive_ && !srv_.stopping;
    send(format_response(status, content_type, body, keep, extra));
    response_done_ = true;
    finish_log(status);
    if (!writing_) on_drained();
  }

  void finish_log(int status) {
    const std::string_view path = std::string_view(target_).substr(0, target_.find('?'));
    srv_.counters.count_request(route_label(path), status);
    if (!srv_.opt.security->settings().audit_log_file.empty()) {
      audit_record r;
      r.time = wall_start_;
      if (principal_) {
        r.principal = principal_->name;
        r.auth_method = principal_->method;
      }
      r.method = method_;
      r.route = std::string(path.substr(0, 200));
      r.model = audit_model_;
      if (usage_) {
        r.prompt_tokens = usage_->prompt_tokens;
        r.completion_tokens = usage_->completion_tokens;
      }
      r.status = status;
      r.latency_ms = seconds(clock_type::now() - start_) * 1e3;
      r.client = client_;
      r.prompt = std::move(audit_prompt_);
      audit_prompt_.reset();
      srv_.opt.security->audit(r);
    }
    if (srv_.opt.log) {
      // The path only: a query string may carry a credential (`?api_key=...`) and logs are
      // read by more people than the server's keys should be.
      auto logged = target_.substr(0, std::min(target_.find('?'), std::size_t{200}));
      if (target_.find('?') != std::string::npos) logged += "?...";
      std::string line = fmt::format("{} {} {} {:.3f}s", method_, logged, status, seconds(clock_type::now() - start_));
      if (usage_) {
        line += fmt::format(" prompt={} cached={} completion={}", usage_->prompt_tokens, usage_->cached_tokens,
                            usage_->completion_tokens);
      }
      srv_.opt.log(line);
    }
    usage_.reset();
  }

  void send(std::string data) {
    if (closed_) return;
    queued_bytes_ += data.size();
    out_.push_back(std::move(data));
    // The kernel's send buffer is full and the client is not emptying it: stop generating
    // for it rather than hold its whole answer in memory. The write in progress keeps its
    // buffer until its handler runs (with an error, once the socket is closed).
    const auto waiting = queued_bytes_ - (writing_ ? out_.front().size() : 0);
    if (waiting > srv_.opt.max_write_queue_bytes) {
      srv_.counters.count_slow_client();
      if (srv_.opt.log)
        srv_.opt.log(fmt::format("{} read too slowly ({} bytes unsent): request cancelled, connection closed", client_,
                                 waiting));
      return close();
    }
    if (!writing_) write_next();
  }

  void write_next() {
    if (out_.empty()) {
      writing_ = false;
      return on_drained();
    }
    writing_ = true;
    write_timer_.expires_after(srv_.opt.write_timeout);
    write_timer_.async_wait([self = this->shared_from_this()](beast::error_code ec) {
      if (!ec) self->close();  // the client stopped reading
    });
    net::async_write(stream_, net::buffer(out_.front()),
                     [self = this->shared_from_this()](beast::error_code ec, std::size_t) {
      self->write_timer_.cancel();
      if (ec) {
        self->writing_ = false;
        self->out_.clear();
        self->queued_bytes_ = 0;
        if (self->job_) self->client_gone();
        return self->close();
      }
      self->queued_bytes_ -= self->out_.front().size();
      self->out_.pop_front();
      self->write_next();
    });
  }

  void on_drained() {
    if (!response_done_ || closed_) return;
    response_done_ = false;
    answered_ = true;
    next_read_ = keep_alive_ && !srv_.stopping;
    if (watch_pending_) {
      resume_ = true;
      beast::error_code ec;
      tcp_socket().cancel(ec);
      return;
    }
    proceed();
  }

  void proceed() {
    if (next_read_) return do_read(false);
    linger_close();
  }

  // Closing right after answering a request whose body was not read would reset the
  // connection, and the client could lose the answer: stop sending, drain briefly, then close.
  void linger_close() {
    if (closed_) return;
    beast::error_code ec;
    tcp_socket().shutdown(tcp::socket::shutdown_send, ec);
    beast::get_lowest_layer(stream_).expires_after(std::chrono::seconds(1));
    drain_.consume(drain_.size());
    // On the TCP layer: what is left of a TLS stream is discarded unread.
    beast::get_lowest_layer(stream_).async_read_some(
        drain_.prepare(16 * 1024), [self = this->shared_from_this()](beast::error_code ec, std::size_t n) {
      if (ec) return self->close();
      self->drained_bytes_ += n;
      if (self->drained_bytes_ > (8u << 20)) return self->close();
      self->linger_close_read();
    });
  }
  void linger_close_read() {
    drain_.consume(drain_.size());
    // On the TCP layer: what is left of a TLS stream is discarded unread.
    beast::get_lowest_layer(stream_).async_read_some(
        drain_.prepare(16 * 1024), [self = this->shared_from_this()](beast::error_code ec, std::size_t n) {
      if (ec) return self->close();
      self->drained_bytes_ += n;
      if (self->drained_bytes_ > (8u << 20)) return self->close();
      self->linger_close_read();
    });
  }

  void close() {
    if (closed_) return;
    closed_ = true;
    client_gone();
    beast::error_code ec;
    tcp_socket().shutdown(tcp::socket::shutdown_both, ec);
    beast::get_lowest_layer(stream_).close();
    read_timer_.cancel();
    write_timer_.cancel();
    ready_timer_.cancel();
  }

  Stream stream_;
  server_core& srv_;
  std::string client_;  // the peer's address:port, for the audit log
  std::optional<principal> principal_;
  std::string audit_model_;
  std::optional<std::string> audit_prompt_;
  std::chrono::system_clock::time_point wall_start_{};
  net::steady_timer read_timer_;
  net::steady_timer write_timer_;
  net::steady_timer ready_timer_;
  beast::flat_buffer buffer_;
  beast::flat_buffer drain_;
  std::size_t drained_bytes_ = 0;
  std::optional<http::request_parser<http::string_body>> parser_;
  std::deque<std::string> out_;
  std::size_t queued_bytes_ = 0;  // the sizes of out_
  std::unique_ptr<job_state> job_;
  std::optional<usage_counts> usage_;
  std::string method_, target_;
  clock_type::time_point start_{};
  clock_type::time_point ready_asked_{};
  clock_type::time_point ready_deadline_{};
  int status_ = 0;
  bool keep_alive_ = true;
  bool writing_ = false;
  bool response_done_ = false;
  bool answered_ = false;  // a response went out on this connection
  bool handling_ = false;
  bool watch_pending_ = false;
  bool resume_ = false;
  bool next_read_ = false;
  bool closed_ = false;
  bool read_timed_out_ = false;
  bool reading_ = false;
};

server_core::server_core(backend& b, const runtime::tokenizer& t, server_options o)
    : back(b), tok(t), opt(std::move(o)), acceptor(ioc), accept_retry(ioc) {
  try {
    tmpl = runtime::chat_template::for_tokenizer(tok);
  } catch (const shoal::error& e) {
    // Found once, at start-up (a template that cannot be parsed, or none): said in the log
    // now, and to every chat request, while plain completions are served.
    tmpl_error = fmt::format("this model has no usable chat template ({}); use /v1/completions", e.what());
    if (opt.log) opt.log(fmt::format("chat requests will be refused: {}", tmpl_error));
  }
  created = std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count();
  if (!opt.security) opt.security = security::load({});
  if (opt.security->tls()) {
    const auto& s = opt.security->settings();
    try {
      tls.emplace(net::ssl::context::tls_server);
      tls->set_options(net::ssl::context::default_workarounds | net::ssl::context::no_sslv2 |
                       net::ssl::context::no_sslv3 | net::ssl::context::no_tlsv1 | net::ssl::context::no_tlsv1_1 |
                       net::ssl::context::single_dh_use);
      SHOAL_REQUIRE(SSL_CTX_set_min_proto_version(tls->native_handle(), TLS1_2_VERSION) == 1, "TLS 1.2 minimum refused");
      SHOAL_REQUIRE(SSL_CTX_set_cipher_list(tls->native_handle(), kTls12Ciphers) == 1, "TLS 1.2 cipher list refused");
      tls->use_certificate_chain_file(s.tls_cert_file);
      tls->use_private_key_file(s.tls_key_file, net::ssl::context::pem);
    } catch (const boost::system::system_error& e) {
      shoal::fail(errc::invalid_argument, "--tls-cert {} / --tls-key {}: {}", s.tls_cert_file, s.tls_key_file,
                  e.code().message());
    }
  }
  try {
    tcp::resolver resolver(ioc);
    const auto results = resolver.resolve(opt.host, std::to_string(opt.port), tcp::resolver::passive);
    if (results.empty()) shoal::fail(errc::unavailable, "cannot resolve {}", opt.host);
    const tcp::endpoint ep = *results.begin();
    acceptor.open(ep.protocol());
    acceptor.set_option(net::socket_base::reuse_address(true));
    acceptor.bind(ep);
    acceptor.listen(net::socket_base::max_listen_connections);
  } catch (const boost::system::system_error& e) {
    shoal::fail(errc::unavailable, "cannot listen on {}:{}: {}", opt.host, opt.port, e.code().message());
  }
}

void server_core::do_accept() {
  acceptor.async_accept(net::make_strand(ioc), [this](beast::error_code ec, tcp::socket socket) {
    if (!listening) return;
    if (ec) {
      if (ec == net::error::operation_aborted) return;
      // Out of descriptors or a transient error: back off instead of spinning.
      accept_retry.expires_after(std::chrono::milliseconds(50));
      accept_retry.async_wait([this](beast::error_code e) {
        if (!e && listening) do_accept();
      });
      return;
    }
    beast::error_code ignored;
    socket.set_option(tcp::no_delay(true), ignored);  // every streamed token is a small write
    if (opt.socket_send_buffer_bytes > 0)
      socket.set_option(net::socket_base::send_buffer_size(static_cast<int>(opt.socket_send_buffer_bytes)), ignored);
    std::string client = "-";
    const auto peer = socket.remote_endpoint(ignored);
    if (!ignored) client = fmt::format("{}:{}", peer.address().to_string(), peer.port());
    std::shared_ptr<session_base> s;
    if (tls)
      s = std::make_shared<session<beast::ssl_stream<beast::tcp_stream>>>(*this, std::move(client), std::move(socket), *tls);
    else
      s = std::make_shared<session<beast::tcp_stream>>(*this, std::move(client), std::move(socket));
    {
      std::lock_guard lock(sessions_mutex);
      sessions.emplace(s.get(), s);
    }
    s->start();
    do_accept();
  });
}

template <typename F>
void server_core::for_each_session(F&& f) {
  std::vector<std::shared_ptr<session_base>> live;
  {
    std::lock_guard lock(sessions_mutex);
    for (auto& [ptr, weak] : sessions)
      if (auto s = weak.lock()) live.push_back(std::move(s));
  }
  for (auto& s : live) f(*s);
}

std::pair<readiness, std::string> server_core::check_ready(clock_type::time_point asked) {
  if (stopping) return {readiness::not_ready, "the server is shutting down"};
  const auto stats = back.stats();
  // A cluster that is healing queues requests but cannot compute them: say why.
  if (!stats.unavailable.empty()) return {readiness::not_ready, stats.unavailable};
  const auto now = clock_type::now();
  const auto work = stats.waiting + stats.running;
  const auto progress = std::max({stats.last_step_end, from_ns(last_event_ns.load()), from_ns(busy_since_ns.load())});
  std::unique_lock lock(probe_mutex);
  // A probe in flight decides: while it runs the engine holds work, which is the probe itself.
  if (probe_pending) {
    if (now - probe_started > opt.probe_timeout)
      return {readiness::not_ready, fmt::format("a one-token probe has not finished after {:.1f} s", seconds(now - probe_started))};
    return {readiness::probing, {}};
  }
  if (last_probe_ok >= asked) return {readiness::ready, {}};
  if (work > 0 || in_flight.load() > 0) {
    if (now - progress > opt.stall_timeout)
      return {readiness::not_ready,
              fmt::format("the engine holds {} queued and {} running requests but completed no step for {:.1f} s",
                          stats.waiting, stats.running, seconds(now - progress))};
    return {readiness::ready, {}};
  }
  if (probe_failed) {
    probe_failed = false;  // the next check probes again
    return {readiness::not_ready, fmt::format("the one-token probe failed: {}", probe_error)};
  }
  if (now - std::max(stats.last_step_end, last_probe_ok) < opt.probe_interval) return {readiness::ready, {}};
  runtime::generation_request probe;
  probe.prompt.push_back(tok.bos_id().value_or(0));
  probe.limits.max_tokens = 1;
  probe.deadline = now + 2 * opt.probe_timeout;
  probe.on_event = [this](const runtime::generation_event& ev) {
    note_progress();
    if (!ev.finished) return;
    std::lock_guard l(probe_mutex);
    probe_pending = false;
    if (ev.error) {
      probe_failed = true;
      probe_error = ev.error_message.empty() ? std::string(errc_name(*ev.error)) : ev.error_message;
    } else {
      last_probe_ok = clock_type::now();
    }
  };
  probe_pending = true;
  probe_id = 0;
  probe_started = now;
  busy_since_ns.store(to_ns(now));
  try {
    // Unlocked: the backend may deliver the probe's events before submit returns.
    lock.unlock();
    const auto id = back.submit(std::move(probe));
    lock.lock();
    probe_id = id;
  } catch (const shoal::error& e) {
    if (!lock.owns_lock()) lock.lock();
    probe_pending = false;
    return {readiness::not_ready, fmt::format("the engine refused a one-token probe: {}", e.what())};
  }
  return {readiness::probing, {}};
}

struct server::impl : server_core {
  using server_core::server_core;
};

server::server(backend& back, const runtime::tokenizer& tok, server_options options)
    : impl_(std::make_unique<impl>(back, tok, std::move(options))) {
  auto& i = *impl_;
  i.work.emplace(i.ioc.get_executor());
  i.do_accept();
  const int n = std::max(1, i.opt.io_threads);
  for (int t = 0; t < n; ++t)
    i.threads.emplace_back([&i] {
      for (;;) {
        try {
          i.ioc.run();
          return;
        } catch (const std::exception& e) {
          // A handler bug must not take the whole server down; report and keep serving.
          if (i.opt.log) i.opt.log(fmt::format("internal error in a connection handler: {}", e.what()));
        }
      }
    });
}

server::~server() { (void)shutdown(std::chrono::milliseconds(0)); }

std::uint16_t server::port() const { return impl_->acceptor.local_endpoint().port(); }

std::int64_t server::in_flight() const { return impl_->in_flight.load(); }

std::int64_t server::shutdown(std::chrono::milliseconds grace) {
  auto& i = *impl_;
  std::lock_guard lock(i.shutdown_mutex);
  if (i.shut_down) return 0;
  i.shut_down = true;
  i.stopping = true;
  i.for_each_session([](session_base& s) { s.close_if_idle(false); });
  auto wait_until = [](clock_type::time_point deadline, auto done) {
    while (!done() && clock_type::now() < deadline) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  };
  wait_until(clock_type::now() + grace, [&i] { return i.in_flight.load() == 0; });
  const std::int64_t cancelled = i.in_flight.load();
  if (cancelled > 0) {
    i.for_each_session([](session_base& s) { s.cancel_generation(); });
    wait_until(clock_type::now() + std::chrono::seconds(5), [&i] { return i.in_flight.load() == 0; });
  }
  // The drain is over: stop listening, and close what connected meanwhile (each got its 503).
  i.listening = false;
  net::post(i.ioc, [&i] {
    beast::error_code ec;
    i.acceptor.close(ec);
    i.accept_retry.cancel();
  });
  i.for_each_session([](session_base& s) { s.close_if_idle(true); });
  // The probe's handler points at this server: it must have run before the server goes.
  {
    std::unique_lock l(i.probe_mutex);
    if (i.probe_pending && i.probe_id != 0) {
      const auto id = i.probe_id;
      l.unlock();
      i.back.cancel(id);
    }
  }
  wait_until(clock_type::now() + std::chrono::seconds(2), [&i] {
    std::lock_guard l(i.probe_mutex);
    return !i.probe_pending;
  });
  // Let final responses reach their clients.
  wait_until(clock_type::now() + std::chrono::seconds(2), [&i] {
    std::lock_guard l(i.sessions_mutex);
    return i.sessions.empty();
  });
  i.work.reset();
  i.ioc.stop();
  for (auto& t : i.threads) t.join();
  i.threads.clear();
  return cancelled;
}

}  // namespace shoal::gateway
