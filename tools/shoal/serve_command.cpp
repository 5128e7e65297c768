// shoal serve: the OpenAI-compatible server in front of the actors, in this process or on a
// cluster; shoal bench-serve: an HTTP load generator against any such server.

#include "commands.hpp"
#include "cluster_launch.hpp"
#include "stop_signals.hpp"

#include "shoal/actors/client.hpp"
#include "shoal/actors/cluster.hpp"
#include "shoal/base/error.hpp"
#include "shoal/config/cluster_config.hpp"
#include "shoal/config/model_config.hpp"
#include "shoal/gateway/backend.hpp"
#include "shoal/gateway/load_generator.hpp"
#include "shoal/gateway/server.hpp"
#include "shoal/kernels/thread_pool.hpp"
#include "shoal/runtime/embedded_tokenizer.hpp"
#include "shoal/runtime/make_model.hpp"
#include "shoal/runtime/model.hpp"
#include "shoal/runtime/tokenizer.hpp"
#include "shoal/runtime/weights.hpp"

#include <CLI/CLI.hpp>
#include <fmt/core.h>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <unistd.h>

#include <atomic>
#include <charconv>
#include <functional>
#include <chrono>
#include <optional>
#include <tuple>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

namespace shoal::tools {
namespace {

namespace fs = std::filesystem;
using clock_type = std::chrono::steady_clock;

double seconds_since(clock_type::time_point start) {
  return std::chrono::duration<double>(clock_type::now() - start).count();
}

fs::path cache_root() {
  if (const char* xdg = std::getenv("XDG_CACHE_HOME"); xdg && *xdg) return fs::path(xdg) / "shoal";
  if (const char* home = std::getenv("HOME"); home && *home) return fs::path(home) / ".cache" / "shoal";
  shoal::fail(errc::failed_precondition, "neither XDG_CACHE_HOME nor HOME is set; pass --model DIR");
}

// The tiny model, written once. It is built in a private directory and renamed into place so
// that servers starting at the same time never see half a checkpoint.
fs::path cached_tiny_model() {
  const auto dir = cache_root() / "models" / "tiny";
  if (fs::exists(dir / "config.json") && fs::exists(dir / "tokenizer.json")) return dir;
  fs::create_directories(dir.parent_path());
  const auto tmp = dir.parent_path() / fmt::format("tiny.partial-{}", ::getpid());
  fs::remove_all(tmp);
  fmt::print(stderr, "[serve] creating the tiny model in {} (once)\n", dir.string());
  runtime::write_random_model(runtime::model_preset("tiny", false), tmp, 0);
  runtime::write_deepseek_v3_tokenizer(tmp);
  std::error_code ec;
  fs::rename(tmp, dir, ec);
  if (ec) {
    fs::remove_all(tmp);  // another server won the race; its copy is identical
    if (!fs::exists(dir / "config.json")) shoal::fail(errc::failed_precondition, "cannot create {}: {}", dir.string(), ec.message());
  }
  return dir;
}

struct serve_options {
  std::string model;
  std::string cluster;
  std::string join_secret_file;
  std::string key_file;
  std::string transports;
  std::string name;
  std::string host = "127.0.0.1";
  int port = 8000;
  int threads = 0;
  int io_threads = 1;
  double cache_mb = 512;
  std::int64_t max_batch_tokens = 256;
  std::int64_t max_running = 64;
  std::int64_t max_waiting = 1024;
  bool no_prefix_cache = false;
  double drain_seconds = 30;
  double no_head_seconds = 60;
  std::size_t max_body_bytes = 1 << 20;
  std::size_t max_write_queue_kb = 1024;
  std::int64_t default_max_tokens = 1024;
  gateway::security_settings security;  // keys, tokens, TLS, audit log (paths and switches)
  double audit_log_max_mb = 100;
  std::shared_ptr<gateway::security> loaded_security;  // `security`, loaded once at start
};

gateway::server_options server_settings(const serve_options& o, const std::string& name, std::int64_t experts,
                                        std::mutex& log_mutex) {
  gateway::server_options so;
  so.host = o.host;
  so.port = static_cast<std::uint16_t>(o.port);
  so.model_name = name;
  so.io_threads = o.io_threads;
  so.max_body_bytes = o.max_body_bytes;
  so.max_write_queue_bytes = o.max_write_queue_kb * 1024;
  so.max_in_flight = o.max_waiting + o.max_running;
  so.default_max_tokens = o.default_max_tokens;
  so.experts_per_layer = experts;
  so.security = o.loaded_security;
  so.log = [&log_mutex](const std::string& line) {
    std::lock_guard lock(log_mutex);
    fmt::print(stderr, "[serve] {}\n", line);
  };
  return so;
}

void print_ready(const serve_options& o, const gateway::server& srv, const std::string& name,
                 clock_type::time_point start) {
  const auto& sec = o.security;
  const std::string scheme = sec.tls_cert_file.empty() ? "http" : "https";
  fmt::print(stderr, "[serve] listening on {}://{}:{}\n", scheme, o.host, srv.port());
  std::vector<std::string> access;
  if (!sec.api_keys_file.empty()) access.push_back(fmt::format("API keys from {}", sec.api_keys_file));
  if (!sec.jwt_hs256_secret_file.empty()) access.push_back("JWT HS256");
  if (!sec.jwt_rs256_public_key_file.empty()) access.push_back("JWT RS256");
  if (!access.empty())
    fmt::print(stderr, "[serve] requests need a bearer credential ({}); /health and /ready are open{}\n",
               fmt::join(access, ", "), sec.metrics_need_key ? "" : ", and /metrics");
  else
    fmt::print(stderr, "[serve] no --api-keys or --jwt-*: every route is open to whoever reaches {}:{}\n", o.host, srv.port());
  if (!sec.audit_log_file.empty())
    fmt::print(stderr, "[serve] audit log {}{}\n", sec.audit_log_file, sec.audit_prompts ? " (with prompts)" : "");
  fmt::print(stderr, "[serve] ready in {:.1f} s: try\n  curl {}{}://{}:{}/v1/chat/completions -H 'Content-Type: application/json' {}"
                     "-d '{{\"model\": \"{}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'\n",
             seconds_since(start), scheme == "https" ? "--cacert CERT " : "", scheme, o.host, srv.port(),
             access.empty() ? "" : "-H \"Authorization: Bearer $KEY\" ", name);
}

const char* signal_name(int signal) { return signal == SIGINT ? "SIGINT" : signal == SIGTERM ? "SIGTERM" : "a signal"; }

// The first SIGINT/SIGTERM drains: new generation requests get 503 while those in flight
// finish, for up to --drain-seconds, then the rest are cancelled. A second signal during the
// drain stops at once: `kill_now` (the cluster's nodes, if any), then exit 128 + the signal's
// number (130 for SIGINT, 143 for SIGTERM), what a shell reports for a process it killed.
void drain(gateway::server& srv, int signal, const serve_options& o, const sigset_t& signals,
           const std::function<void()>& kill_now) {
  fmt::print(stderr,
             "[serve] {} received: draining; new requests get 503; finishing {} requests in flight (up to {:.0f} s); "
             "a second signal stops at once\n",
             signal_name(signal), srv.in_flight(), o.drain_seconds);
  std::atomic<bool> drained{false};
  // The signals stay blocked: this thread takes the second one synchronously too.
  std::thread watch([&] {
    while (!drained) {
      const int again = wait_stop_signal(signals, std::chrono::milliseconds(100));
      if (again == 0) continue;
      fmt::print(stderr, "[serve] {} received while draining: stopping now, {} requests cut off\n", signal_name(again),
                 srv.in_flight());
      if (kill_now) kill_now();
      std::_Exit(128 + again);
    }
  });
  const auto cancelled = srv.shutdown(std::chrono::milliseconds(static_cast<std::int64_t>(o.drain_seconds * 1000)));
  drained = true;
  watch.join();
  if (cancelled > 0)
    fmt::print(stderr, "[serve] the drain ran out after {:.0f} s (--drain-seconds): cancelled {} requests still in flight\n",
               o.drain_seconds, cancelled);
}

// The gateway in front of a cluster: a running one (HOST:PORT of its head node) or the nodes
// of a config, started here and stopped with the server.
void serve_cluster(const serve_options& o, const sigset_t& signals) {
  const auto start = clock_type::now();
  std::optional<launched_cluster> nodes;
  fs::path dir = o.model;
  std::vector<head_endpoint> heads;
  std::string join_secret;
  if (auto addresses = head_addresses(o.cluster)) {
    join_secret = join_secret_from(o.join_secret_file);
    if (dir.empty())
      shoal::fail(errc::invalid_argument,
                  "--cluster {} needs --model DIR: the checkpoint the cluster serves (its tokenizer and context length "
                  "are read here; the weights are not)", o.cluster);
    heads = std::move(*addresses);
  } else {
    if (!fs::exists(o.cluster))
      shoal::fail(errc::invalid_argument, "--cluster '{}' is neither a cluster config file nor HOST:PORT of a head node",
                  o.cluster);
    const auto cluster = config::load_cluster_config(o.cluster);
    if (dir.empty()) dir = cluster.model;
    // The gateway needs the checkpoint's tokenizer: say so before starting any node.
    (void)runtime::tokenizer::load(dir);
    // Read before any node starts, so a bad secret file stops nothing.
    if (!cluster.join_secret_file.empty()) join_secret = read_join_secret(cluster.join_secret_file);
    std::vector<std::string> extra{"--ready-timeout", std::to_string(cluster.ready_timeout_s)};
    if (const auto key_path = weights_key_path(o.key_file); !key_path.empty()) {
      (void)runtime::read_weights_key(key_path);
      extra.push_back("--key-file");
      extra.push_back(fs::absolute(key_path).string());
    }
    if (!o.transports.empty()) {
      extra.push_back("--transports");
      extra.push_back(o.transports);
    }
    nodes.emplace(cluster, launched_cluster::settings{
                               .config_path = fs::absolute(o.cluster).string(),
                               .node_arguments = extra,
                               .ready_timeout = std::chrono::seconds(cluster.ready_timeout_s),
                               .interrupted = [&signals] {
                                 return wait_stop_signal(signals, std::chrono::milliseconds(0)) != 0;
                               },
                               .log_prefix = "[serve]",
                               .restart_limit = cluster.restart_limit,
                               .restart_window = std::chrono::seconds(cluster.restart_window_s)});
    for (const auto& [h, p] : nodes->heads()) heads.push_back({h, p});
  }
  const auto& [host, port] = heads.front();
  const auto model = config::load_model_config(dir);
  const auto tok = runtime::tokenizer::load(dir);
  std::string name = o.name;
  if (name.empty()) name = fs::absolute(dir).lexically_normal().filename().string();
  if (name.empty()) name = "shoal";
  // With a standby head, the client follows whichever is in charge and resumes the streams.
  auto client = shoal::client::connect(
      heads, std::chrono::seconds(10), join_secret, std::chrono::seconds(3),
      std::chrono::milliseconds(static_cast<std::int64_t>(o.no_head_seconds * 1000)));
  auto back = gateway::make_cluster_backend(*client, tok, model.max_position_embeddings, o.max_waiting + o.max_running);
  std::mutex log_mutex;
  auto srv = std::make_unique<gateway::server>(*back, tok, server_settings(o, name, model.n_routed_experts, log_mutex));
  fmt::print(stderr, "[serve] model {} on the cluster at {}:{}{}{}\n", name, host, port,
             heads.size() > 1 ? fmt::format(" (standby {}:{})", heads[1].host, heads[1].port) : std::string(),
             nodes ? fmt::format(" ({} started here)", o.cluster) : std::string());
  print_ready(o, *srv, name, start);

  int signal = 0;
  while (true) {
    signal = wait_stop_signal(signals, std::chrono::milliseconds(200));
    if (signal != 0) break;
    if (nodes) {
      if (const auto dead = nodes->exited_node()) {
        // Other nodes are restarted by the launcher; without the head (supervisor and
        // router) the cluster cannot answer: say so and stop rather than accept requests
        // that would only fail.
        fmt::print(stderr, "[serve] the head node {} exited (status {}): the cluster cannot serve; stopping\n",
                   dead->first, dead->second);
        (void)srv->shutdown(std::chrono::seconds(0));
        back.reset();
        srv.reset();
        shoal::fail(errc::unavailable, "the head node {} of {} exited", dead->first, o.cluster);
      }
    }
  }
  drain(*srv, signal, o, signals, [&nodes] {
    if (nodes) nodes->kill_now();
  });
  back.reset();  // cancels what is left on the cluster
  srv.reset();
  client.reset();
  if (nodes) nodes->stop();
  fmt::print(stderr, "[serve] stopped\n");
}

void serve(const serve_options& options) {
  // Signals are taken synchronously by this thread: block them before any thread starts.
  const sigset_t signals = block_stop_signals();
  std::signal(SIGPIPE, SIG_IGN);
  // Keys, tokens, certificates and the audit log are checked before any model is loaded or
  // node started: a malformed keys file is refused now, naming its line.
  serve_options o = options;
  o.security.audit_log_max_bytes = static_cast<std::uint64_t>(o.audit_log_max_mb * 1024 * 1024);
  o.loaded_security = gateway::security::load(o.security);

  if (!o.cluster.empty()) return serve_cluster(o, signals);
  const auto start = clock_type::now();
  const fs::path dir = o.model.empty() ? cached_tiny_model() : fs::path(o.model);
  std::string name = o.name;
  if (name.empty()) name = o.model.empty() ? "shoal-tiny" : fs::absolute(dir).lexically_normal().filename().string();
  if (name.empty()) name = "shoal";
  const auto model = config::load_model_config(dir);
  const auto tok = runtime::tokenizer::load(dir);
  // The same actors as a cluster, all in this process: one node, one stage with every layer
  // and expert, the router's scheduler in front of it.
  auto plan = config::embedded_cluster_config(dir, model.num_hidden_layers, o.threads);
  plan.cache_mb = std::max<std::int64_t>(1, static_cast<std::int64_t>(o.cache_mb));
  plan.max_batch_tokens = o.max_batch_tokens;
  plan.max_batch = static_cast<int>(o.max_running);
  plan.prefix_cache = !o.no_prefix_cache;
  const auto cache_blocks = config::cache_blocks_for(plan, model);
  actors::local_cluster cluster(plan, {.progress = [](const std::string& line) {
                                        fmt::print(stderr, "[load] {}\n", line);
                                      },
                                      .key = weights_key_from(o.key_file)});
  cluster.wait_ready();
  shoal::client client(cluster);
  const auto experts = model.n_routed_experts;
  // Queue, cache, health gauges and routed tokens per expert come through the client's
  // status, as for a remote cluster.
  const auto max_sequence = std::min(model.max_position_embeddings, cache_blocks * plan.block_tokens - 1);
  auto back = gateway::make_cluster_backend(client, tok, max_sequence, o.max_waiting + o.max_running);

  std::mutex log_mutex;
  auto srv = std::make_unique<gateway::server>(*back, tok, server_settings(o, name, experts, log_mutex));
  fmt::print(stderr, "[serve] model {} from {} ({} threads, {} cache blocks of {} tokens)\n", name, dir.string(),
             o.threads > 0 ? o.threads : static_cast<int>(std::thread::hardware_concurrency()), cache_blocks,
             plan.block_tokens);
  print_ready(o, *srv, name, start);

  int signal = 0;
  while (signal == 0) signal = wait_stop_signal(signals, std::chrono::seconds(1));
  drain(*srv, signal, o, signals, {});
  back.reset();  // cancels what is left in the cluster
  srv.reset();
  fmt::print(stderr, "[serve] stopped\n");
}

void add_serve(CLI::App& app) {
  auto o = std::make_shared<serve_options>();
  auto* cmd = app.add_subcommand("serve", "Serve a model over an OpenAI-compatible HTTP API, computed in this process or (--cluster) by a cluster");
  cmd->add_option("--model", o->model,
                  "Checkpoint directory (default: the tiny demo model, created once under $XDG_CACHE_HOME/shoal "
                  "or ~/.cache/shoal)");
  cmd->add_option("--cluster", o->cluster,
                  "Serve a cluster instead of computing here: a cluster config (YAML; its nodes are started here and "
                  "stopped with the server) or HOST:PORT of a running cluster's head node, HOST:PORT,HOST:PORT for its "
                  "head and standby (then --model names the checkpoint, for its tokenizer)");
  cmd->add_option("--transports", o->transports, "With a --cluster config: UCX transports for its nodes, e.g. tcp");
  cmd->add_option("--no-head-seconds", o->no_head_seconds,
                  "With --cluster: while neither head nor standby answers, requests wait this long for one to come "
                  "back, then fail (503, or an error event in a stream); later requests fail the same way until a head "
                  "answers")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  add_join_secret_option(*cmd, o->join_secret_file);
  add_weights_key_option(*cmd, o->key_file);
  cmd->add_option("--name", o->name, "Model name clients use (default: the directory's name, shoal-tiny for the demo)");
  cmd->add_option("--host", o->host, "Address to listen on")->capture_default_str();
  cmd->add_option("--port", o->port, "Port (0: any free port)")->capture_default_str()->check(CLI::Range(0, 65535));
  cmd->add_option("--threads", o->threads, "Compute threads (0: one per core)");
  cmd->add_option("--io-threads", o->io_threads, "Threads serving connections")->capture_default_str()->check(CLI::Range(1, 64));
  cmd->add_option("--cache-mb", o->cache_mb, "Memory for the latent KV cache")->capture_default_str()->check(CLI::PositiveNumber);
  cmd->add_option("--max-batch-tokens", o->max_batch_tokens, "Tokens per engine iteration")->capture_default_str()->check(CLI::PositiveNumber);
  cmd->add_option("--max-running", o->max_running, "Sequences decoding at once")->capture_default_str()->check(CLI::PositiveNumber);
  cmd->add_option("--max-waiting", o->max_waiting, "Queued requests; more are refused with 429")->capture_default_str()->check(CLI::PositiveNumber);
  cmd->add_flag("--no-prefix-cache", o->no_prefix_cache, "Do not reuse cached prompt prefixes");
  cmd->add_option("--drain-seconds", o->drain_seconds, "On SIGINT/SIGTERM, time given to requests in flight before they are cancelled (new ones get 503 meanwhile; "
                  "a second signal stops at once, exit 130/143)")
      ->capture_default_str()->check(CLI::NonNegativeNumber);
  cmd->add_option("--max-body-bytes", o->max_body_bytes, "Larger request bodies get 413")->capture_default_str();
  cmd->add_option("--max-write-queue-kb", o->max_write_queue_kb,
                  "Unsent response data one connection may hold; a client reading slower than its stream is produced "
                  "has its request cancelled and its connection closed past this")
      ->capture_default_str()->check(CLI::PositiveNumber);
  cmd->add_option("--default-max-tokens", o->default_max_tokens, "max_tokens of requests that name none")->capture_default_str()->check(CLI::PositiveNumber);
  auto& sec = o->security;
  const std::string access = "Access (docs/security.md)";
  cmd->add_option("--api-keys", sec.api_keys_file,
                  "Keys file (shoal keys new): requests need `Authorization: Bearer KEY`")->group(access);
  cmd->add_option("--jwt-hs256-secret-file", sec.jwt_hs256_secret_file,
                  "Accept JWTs signed HS256 with the secret in this file (at least 32 bytes)")->group(access);
  cmd->add_option("--jwt-rs256-public-key", sec.jwt_rs256_public_key_file,
                  "Accept JWTs signed RS256 by the key of this PEM public key")->group(access);
  cmd->add_option("--jwt-audience", sec.jwt_audience, "JWTs must carry this aud")->group(access);
  cmd->add_option("--jwt-issuer", sec.jwt_issuer, "JWTs must carry this iss")->group(access);
  cmd->add_flag("--metrics-need-key", sec.metrics_need_key, "/metrics needs a key or token too (any scope)")->group(access);
  cmd->add_option("--tls-cert", sec.tls_cert_file, "PEM certificate chain: serve HTTPS (TLS 1.2+) instead of HTTP")->group(access);
  cmd->add_option("--tls-key", sec.tls_key_file, "PEM private key of --tls-cert")->group(access);
  cmd->add_option("--audit-log", sec.audit_log_file,
                  "Append one JSON line per request (who, route, model, tokens, status, latency, client)")->group(access);
  cmd->add_option("--audit-log-max-mb", o->audit_log_max_mb, "Rotate the audit log at this size")
      ->capture_default_str()->check(CLI::PositiveNumber)->group(access);
  cmd->add_option("--audit-log-keep", sec.audit_log_keep, "Rotated audit logs kept (FILE.1 ... FILE.N)")
      ->capture_default_str()->check(CLI::Range(1, 1000))->group(access);
  cmd->add_flag("--audit-prompts", sec.audit_prompts, "Also record each request's prompt in the audit log")->group(access);
  cmd->callback([o] { serve(*o); });
}

struct bench_serve_options {
  std::string url = "http://127.0.0.1:8000";
  std::string model;
  std::vector<int> concurrency{32, 1};
  std::int64_t requests = 0;
  double duration = 20;
  std::int64_t max_tokens = 32;
  int system_words = 200;
  bool json = false;
};

nlohmann::json summary(const gateway::load_result& r) {
  auto ms = [](double s) { return s * 1e3; };
  return {{"succeeded", r.succeeded},
          {"failed", r.failed},
          {"errors", r.errors},
          {"seconds", r.seconds},
          {"generated_tokens", r.generated_tokens},
          {"tokens_per_second", r.tokens_per_second()},
          {"requests_per_second", r.seconds > 0 ? static_cast<double>(r.succeeded) / r.seconds : 0.0},
          {"prompt_tokens", r.prompt_tokens},
          {"cached_tokens", r.cached_tokens},
          {"ttft_ms", {{"p50", ms(gateway::percentile(r.ttft, 50))}, {"p90", ms(gateway::percentile(r.ttft, 90))},
                       {"p99", ms(gateway::percentile(r.ttft, 99))}}},
          {"itl_ms", {{"p50", ms(gateway::percentile(r.itl, 50))}, {"p90", ms(gateway::percentile(r.itl, 90))},
                      {"p99", ms(gateway::percentile(r.itl, 99))}}}};
}

// Prefilled and cached prompt tokens so far, from the server's /metrics.
std::pair<double, double> prefill_counters(const gateway::http_address& a) {
  const auto reply = gateway::http_call(a, "GET", "/metrics");
  double prefilled = -1, cached = -1;
  std::size_t pos = 0;
  while (pos < reply.body.size()) {
    auto end = reply.body.find('\n', pos);
    if (end == std::string::npos) end = reply.body.size();
    const std::string_view line(reply.body.data() + pos, end - pos);
    auto value = [&](std::string_view name) {
      return line.starts_with(name) && line.size() > name.size() && line[name.size()] == ' '
                 ? std::strtod(std::string(line.substr(name.size() + 1)).c_str(), nullptr)
                 : -1.0;
    };
    if (auto v = value("shoal_engine_prefilled_tokens_total"); v >= 0) prefilled = v;
    if (auto v = value("shoal_engine_cached_prompt_tokens_total"); v >= 0) cached = v;
    pos = end + 1;
  }
  return {prefilled, cached};
}

void bench_serve(const bench_serve_options& o) {
  gateway::load_options lo;
  lo.address = gateway::parse_http_url(o.url);
  lo.model = o.model;
  lo.requests = o.requests;
  lo.duration = std::chrono::milliseconds(static_cast<std::int64_t>(o.duration * 1000));
  lo.max_tokens = o.max_tokens;
  nlohmann::json report{{"url", o.url}, {"max_tokens", o.max_tokens}, {"runs", nlohmann::json::array()}};
  if (!o.json)
    fmt::print("{:>11} {:>9} {:>6} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}\n", "concurrency", "requests", "failed",
               "tokens/s", "TTFT p50", "p90", "p99", "ITL p50", "p90", "p99");
  double first_tps = 0, last_tps = 0;
  for (std::size_t i = 0; i < o.concurrency.size(); ++i) {
    lo.concurrency = o.concurrency[i];
    const auto r = gateway::run_load(lo);
    auto s = summary(r);
    s["concurrency"] = lo.concurrency;
    report["runs"].push_back(s);
    if (i == 0) first_tps = r.tokens_per_second();
    last_tps = r.tokens_per_second();
    if (!o.json) {
      auto ms = [](const std::vector<double>& v, double p) { return gateway::percentile(v, p) * 1e3; };
      fmt::print("{:>11} {:>9} {:>6} {:>10.1f} {:>6.0f}ms {:>6.0f}ms {:>6.0f}ms {:>6.1f}ms {:>6.1f}ms {:>6.1f}ms\n",
                 lo.concurrency, r.succeeded, r.failed, r.tokens_per_second(), ms(r.ttft, 50), ms(r.ttft, 90),
                 ms(r.ttft, 99), ms(r.itl, 50), ms(r.itl, 90), ms(r.itl, 99));
      for (const auto& e : r.errors) fmt::print("  error: {}\n", e);
    }
  }
  if (o.concurrency.size() >= 2 && last_tps > 0) {
    report["speedup"] = first_tps / last_tps;
    if (!o.json)
      fmt::print("continuous batching: {:.2f}x the generated tokens/s at concurrency {} vs {}\n", first_tps / last_tps,
                 o.concurrency.front(), o.concurrency.back());
  }
  if (o.system_words > 0) {
    // Every request shares one long system prompt: the server should prefill it once.
    std::string system = "You are a helpful assistant. Follow these rules carefully.";
    for (int w = 0; w < o.system_words; ++w) system += fmt::format(" rule{} applies", w);
    lo.system_prompt = system;
    lo.concurrency = o.concurrency.front();
    const auto before = prefill_counters(lo.address);
    const auto r = gateway::run_load(lo);
    const auto after = prefill_counters(lo.address);
    auto s = summary(r);
    s["concurrency"] = lo.concurrency;
    const double hit = r.prompt_tokens > 0 ? static_cast<double>(r.cached_tokens) / static_cast<double>(r.prompt_tokens) : 0;
    s["prefix_cache_hit_rate"] = hit;
    if (before.first >= 0 && after.first >= 0) {
      s["server_prefilled_tokens"] = after.first - before.first;
      s["server_cached_tokens"] = after.second - before.second;
    }
    report["shared_system_prompt"] = s;
    if (!o.json) {
      fmt::print("shared system prompt (~{} words), concurrency {}: {} requests, {} failed, {:.1f} tokens/s\n", o.system_words,
                 lo.concurrency, r.succeeded, r.failed, r.tokens_per_second());
      fmt::print("  prefix-cache hit rate {:.1f}% ({} of {} prompt tokens cached)", hit * 100, r.cached_tokens, r.prompt_tokens);
      if (s.contains("server_prefilled_tokens"))
        fmt::print("; server prefilled {:.0f} tokens", s["server_prefilled_tokens"].get<double>());
      fmt::print("\n");
      for (const auto& e : r.errors) fmt::print("  error: {}\n", e);
    }
  }
  if (o.json) fmt::print("{}\n", report.dump());
}

void add_bench_serve(CLI::App& app) {
  auto o = std::make_shared<bench_serve_options>();
  auto* cmd = app.add_subcommand("bench-serve",
                                 "Load an OpenAI-compatible server with concurrent streaming chat clients: throughput, TTFT, "
                                 "inter-token latency, batching speedup and prefix-cache hit rate");
  cmd->add_option("--url", o->url, "Server address")->capture_default_str();
  cmd->add_option("--model", o->model, "Model name (default: the server's first)");
  cmd->add_option("--concurrency", o->concurrency,
                  "Concurrent clients per run; several values run one after another on the same server "
                  "(the first against the last gives the batching speedup)")
      ->capture_default_str()->check(CLI::Range(1, 4096));
  cmd->add_option("--requests", o->requests, "Requests per run (0: run for --duration)")->capture_default_str()->check(CLI::NonNegativeNumber);
  cmd->add_option("--duration", o->duration, "Seconds per run when --requests is 0")->capture_default_str()->check(CLI::PositiveNumber);
  cmd->add_option("--max-tokens", o->max_tokens, "Tokens generated per request (EOS ignored)")->capture_default_str()->check(CLI::PositiveNumber);
  cmd->add_option("--system-words", o->system_words,
                  "Words of a shared system prompt for the prefix-cache run at the first concurrency (0: skip it)")
      ->capture_default_str()->check(CLI::NonNegativeNumber);
  cmd->add_flag("--json", o->json, "Print one JSON report");
  cmd->callback([o] { bench_serve(*o); });
}

}  // namespace

void add_serve_commands(CLI::App& app) {
  add_serve(app);
  add_bench_serve(app);
}

// HOST:PORT[,HOST:PORT] of a running cluster's head node and standby, or nothing when `spec`
// is not that.
std::optional<std::vector<head_endpoint>> head_addresses(const std::string& spec) {
  if (std::filesystem::exists(spec)) return std::nullopt;
  std::vector<head_endpoint> out;
  std::size_t start = 0;
  while (true) {
    const auto comma = spec.find(',', start);
    const auto one = head_address(spec.substr(start, comma == std::string::npos ? std::string::npos : comma - start));
    if (!one) return std::nullopt;
    out.push_back({one->first, one->second});
    if (comma == std::string::npos) return out;
    start = comma + 1;
  }
}

// HOST:PORT of a running cluster's head node, or nothing when `spec` is not one.
std::optional<std::pair<std::string, std::uint16_t>> head_address(const std::string& spec) {
  if (std::filesystem::exists(spec)) return std::nullopt;
  return config::parse_host_port(spec);
}

}  // namespace shoal::tools
