// shoal serve in front of a cluster, as an operator runs it: `shoal serve --cluster
// CLUSTER.yaml` starts 4 node processes (2 pipeline stages, 2 expert nodes) of the tiny
// model and serves them over HTTP; a second gateway joins the same cluster by HOST:PORT; the
// C++ client example streams from it. Answers must be those of the single-process server
// (`shoal serve --model`) on the same checkpoint: greedy, seeded sampling and stop strings.

#include "e2e_helpers.hpp"
#include "node_pid.hpp"
#include "serve_process.hpp"
#include "tiny_cluster.hpp"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <map>

#include <csignal>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

namespace fs = std::filesystem;
using json = nlohmann::json;
using namespace std::chrono_literals;
using namespace shoal::gateway::testing;
using shoal::testing::node_pid;

namespace {

const fs::path kWork = SHOAL_GATEWAY_WORK_DIR;

std::string head_address() {
  std::ifstream in(tiny_cluster_config());
  std::string line;
  while (std::getline(in, line))
    if (line.find("name: stage0") != std::string::npos) {
      const auto at = line.find("port: ") + 6;
      return "127.0.0.1:" + line.substr(at, line.find('}', at) - at);
    }
  FAIL("no stage0 in the config");
  return {};
}

serve_process& single() {
  static serve_process p("serve-single", {"serve", "--model", tiny_model().string(), "--port", "0", "--threads", "1",
                                          "--cache-mb", "64", "--name", "tiny"});
  return p;
}

serve_process& clustered() {
  static serve_process p("serve-cluster", {"serve", "--cluster", tiny_cluster_config().string(), "--transports", "tcp",
                                           "--port", "0", "--name", "tiny", "--drain-seconds", "5"});
  return p;
}

json chat(const serve_process& s, const json& extra) {
  json body{{"model", "tiny"}, {"messages", {{{"role", "user"}, {"content", "Tell me about the sea."}}}}};
  body.update(extra);
  const auto file = kWork / ("body-" + std::to_string(s.port()) + ".json");
  std::ofstream(file) << body.dump();
  const auto r = run("curl -sS -m 120 " + s.url() + "/v1/chat/completions -H 'Content-Type: application/json' -d @" +
                     file.string());
  INFO(r.out);
  REQUIRE(r.exit_code == 0);
  auto j = json::parse(r.out);
  REQUIRE(j.contains("choices"));
  return j;
}

std::string content(const json& j) { return j["choices"][0]["message"]["content"].get<std::string>(); }

}  // namespace

TEST_CASE("serve --cluster CONFIG answers as the single process does: greedy, seeded sampling, stop strings",
          "[gateway][e2e][cluster]") {
  auto& one = single();
  auto& many = clustered();

  const json greedy{{"temperature", 0}, {"max_tokens", 24}};
  const auto a = chat(one, greedy), b = chat(many, greedy);
  CHECK(content(a) == content(b));
  CHECK(a["usage"]["completion_tokens"] == b["usage"]["completion_tokens"]);
  CHECK(a["usage"]["prompt_tokens"] == b["usage"]["prompt_tokens"]);
  CHECK(b["choices"][0]["finish_reason"] == a["choices"][0]["finish_reason"]);
  REQUIRE(content(b).size() > 8);

  // The last stage samples with the request's parameters and seed, as the engine does.
  const json sampled{{"temperature", 1.0}, {"top_p", 0.95}, {"seed", 11}, {"max_tokens", 24}};
  const auto sa = chat(one, sampled), sb = chat(many, sampled), sb2 = chat(many, sampled);
  CHECK(content(sa) == content(sb));
  CHECK(content(sb) == content(sb2));
  const json other_seed{{"temperature", 1.0}, {"top_p", 0.95}, {"seed", 12}, {"max_tokens", 24}};
  CHECK(content(chat(many, other_seed)) != content(sb));

  // A stop string is found in the text here, the request is cancelled on the cluster.
  const auto text = content(b);
  const auto stop = middle_character(text);
  const auto cut = chat(many, {{"temperature", 0}, {"max_tokens", 24}, {"stop", {stop}}});
  CHECK(content(cut) == text.substr(0, text.find(stop)));
  CHECK(cut["choices"][0]["finish_reason"] == "stop");

  // Streaming through the cluster: SSE chunks that add up to the same answer.
  const auto file = kWork / "stream.json";
  std::ofstream(file) << json{{"model", "tiny"},
                              {"messages", {{{"role", "user"}, {"content", "Tell me about the sea."}}}},
                              {"temperature", 0},
                              {"max_tokens", 24},
                              {"stream", true}}
                             .dump();
  const auto st = run("curl -sS -N -m 120 " + many.url() + "/v1/chat/completions -H 'Content-Type: application/json' -d @" +
                      file.string());
  REQUIRE(st.exit_code == 0);
  CHECK(st.out.ends_with("data: [DONE]\n\n"));
  std::string streamed;
  std::istringstream lines(st.out);
  for (std::string line; std::getline(lines, line);) {
    if (line.empty() || line == "data: [DONE]") continue;
    const auto chunk = json::parse(line.substr(6));
    const auto& delta = chunk["choices"][0]["delta"];
    if (delta.contains("content") && delta["content"].is_string()) streamed += delta["content"].get<std::string>();
  }
  CHECK(streamed == text);

  // Bad input is still refused by the gateway, the cluster untouched.
  const auto bad = run("curl -sS -m 10 -w ' %{http_code}' " + many.url() + "/v1/chat/completions -d '{\"messages\": 3}'");
  CHECK(bad.out.ends_with(" 400"));
  CHECK(run("curl -sS -m 10 -o /dev/null -w '%{http_code}' " + many.url() + "/ready").out == "200");
}

TEST_CASE("a second gateway joins the running cluster by HOST:PORT; the client example streams from it",
          "[gateway][e2e][cluster]") {
  auto& many = clustered();
  serve_process second("serve-second", {"serve", "--cluster", head_address(), "--model", tiny_model().string(),
                                        "--port", "0", "--name", "tiny"},
                       {}, 60s);
  const json greedy{{"temperature", 0}, {"max_tokens", 24}};
  const auto expected = content(chat(many, greedy));
  CHECK(content(chat(second, greedy)) == expected);
  CHECK(second.terminate(30s) == 0);

  // HOST:PORT without the checkpoint cannot know the tokenizer: refused with the reason.
  const auto no_model = run(std::string(SHOAL_BINARY) + " serve --cluster " + head_address() + " --port 0", 30);
  CHECK(no_model.exit_code == 2);
  CHECK(no_model.out.find("needs --model DIR") != std::string::npos);

  const auto example = std::string(SHOAL_CLIENT_EXAMPLE) + " --cluster " + head_address() + " --model " +
                       tiny_model().string() + " --chat 'Tell me about the sea.' --max-tokens 24";
  const auto streamed = run(example, 120);
  INFO(streamed.out);
  REQUIRE(streamed.exit_code == 0);
  CHECK(streamed.out.find(expected) != std::string::npos);
  CHECK(streamed.out.find("finish: length") != std::string::npos);
  const auto cancelled = run(example + " --cancel-after 3", 120);
  INFO(cancelled.out);
  REQUIRE(cancelled.exit_code == 0);
  CHECK(cancelled.out.find("finish: cancelled") != std::string::npos);
}

TEST_CASE("concurrent requests: serve and serve --cluster give the same greedy answers", "[gateway][e2e][cluster]") {
  auto& one = single();
  auto& many = clustered();
  // 8 requests at once to each server; they share a long system prompt, so both schedulers
  // batch them and reuse the prefix.
  const std::string system(600, 'x');
  std::vector<fs::path> bodies;
  for (int i = 0; i < 8; ++i) {
    const auto file = kWork / ("concurrent-" + std::to_string(i) + ".json");
    std::ofstream(file) << json{{"model", "tiny"},
                                {"messages",
                                 {{{"role", "system"}, {"content", system}},
                                  {{"role", "user"}, {"content", "Question number " + std::to_string(i)}}}},
                                {"temperature", 0},
                                {"max_tokens", 16}}
                               .dump();
    bodies.push_back(file);
  }
  auto burst = [&](const serve_process& s, const std::string& tag) {
    std::string script;
    for (std::size_t i = 0; i < bodies.size(); ++i)
      script += "curl -sS -m 120 " + s.url() + "/v1/chat/completions -H \"Content-Type: application/json\" -d @" +
                bodies[i].string() + " > " + (kWork / (tag + std::to_string(i) + ".out")).string() + " & ";
    script += "wait";
    REQUIRE(run("sh -c '" + script + "'", 180).exit_code == 0);
    std::vector<json> answers;
    for (std::size_t i = 0; i < bodies.size(); ++i) {
      std::ifstream in(kWork / (tag + std::to_string(i) + ".out"));
      std::stringstream text;
      text << in.rdbuf();
      INFO(text.str());
      answers.push_back(json::parse(text.str()));
      REQUIRE(answers.back().contains("choices"));
    }
    return answers;
  };
  const auto a = burst(one, "single-"), b = burst(many, "cluster-");
  for (std::size_t i = 0; i < bodies.size(); ++i) {
    CAPTURE(i);
    CHECK(content(a[i]) == content(b[i]));
    CHECK(a[i]["usage"]["prompt_tokens"] == b[i]["usage"]["prompt_tokens"]);
    CHECK(a[i]["usage"]["completion_tokens"] == b[i]["usage"]["completion_tokens"]);
  }
  // The embedded server reports the shared prefix served from its cache.
  const auto metrics = run("curl -sS -m 10 " + one.url() + "/metrics").out;
  const auto at = metrics.find("\nshoal_engine_cached_prompt_tokens_total ");
  REQUIRE(at != std::string::npos);
  CHECK(std::stoll(metrics.substr(at + 41)) > 0);
}

namespace {

// A streamed chat completion (`curl -N`) into a file, on its own thread.
struct sse_stream {
  fs::path file;
  std::thread thread;
  int exit_code = -1;

  sse_stream(const serve_process& s, const json& body, const std::string& name) : file(kWork / (name + ".sse")) {
    fs::remove(file);
    const auto request = kWork / (name + ".json");
    std::ofstream(request) << body.dump();
    const auto command = "curl -sS -N -m 180 -o " + file.string() + " " + s.url() +
                         "/v1/chat/completions -H 'Content-Type: application/json' -d @" + request.string();
    thread = std::thread([this, command] { exit_code = run(command, 200).exit_code; });
  }
  ~sse_stream() {
    if (thread.joinable()) thread.join();
  }
  std::string text() const {
    std::ifstream in(file);
    return {std::istreambuf_iterator<char>(in), {}};
  }
  // Content deltas so far.
  std::size_t deltas() const {
    std::size_t n = 0;
    for (std::size_t at = 0; (at = text().find("\"content\":", at)) != std::string::npos; ++at) ++n;
    return n;
  }
  // The streamed content and finish reason; fails on an error event or a missing [DONE].
  std::pair<std::string, std::string> result() {
    thread.join();
    const auto all = text();
    INFO(all);
    REQUIRE(exit_code == 0);
    REQUIRE(all.find("data: [DONE]") != std::string::npos);
    std::string content, finish;
    std::istringstream lines(all);
    for (std::string line; std::getline(lines, line);) {
      if (!line.starts_with("data: {")) continue;
      const auto event = json::parse(line.substr(6));
      REQUIRE_FALSE(event.contains("error"));
      const auto& choice = event["choices"][0];
      if (choice["delta"].contains("content") && choice["delta"]["content"].is_string())
        content += choice["delta"]["content"].get<std::string>();
      if (choice.contains("finish_reason") && choice["finish_reason"].is_string())
        finish = choice["finish_reason"].get<std::string>();
    }
    return {content, finish};
  }
};

}  // namespace

TEST_CASE("a node killed mid-stream costs the streams a pause, not a token; a frozen node is named by /ready and replaced",
          "[gateway][e2e][cluster]") {
  auto& many = clustered();
  const json body{{"model", "tiny"},
                  {"messages", {{{"role", "user"}, {"content", "Tell me about the sea."}}}},
                  {"temperature", 0},
                  {"max_tokens", 160}};
  const auto undisturbed = content(chat(many, body));
  REQUIRE(undisturbed.size() > 0);

  // Three streams; once each has streamed a few tokens, an expert node is killed.
  auto streamed = body;
  streamed["stream"] = true;
  std::vector<std::unique_ptr<sse_stream>> streams;
  for (int i = 0; i < 3; ++i) streams.push_back(std::make_unique<sse_stream>(many, streamed, "heal-" + std::to_string(i)));
  const auto started = std::chrono::steady_clock::now();
  auto under_way = [&] {
    for (const auto& s : streams)
      if (s->deltas() < 4) return false;
    return true;
  };
  while (!under_way() && std::chrono::steady_clock::now() - started < 60s) std::this_thread::sleep_for(5ms);
  REQUIRE(under_way());
  for (const auto& s : streams) REQUIRE(s->text().find("[DONE]") == std::string::npos);  // not finished yet
  const pid_t experts0 = node_pid(many.pid(), "experts0");
  REQUIRE(experts0 > 0);
  REQUIRE(::kill(experts0, SIGKILL) == 0);
  for (auto& s : streams) {
    const auto [text, finish] = s->result();
    CHECK(text == undisturbed);  // nothing lost, repeated or changed
    CHECK(finish == "length");
  }
  CHECK(metric(many, "shoal_cluster_node_restarts_total") >= 1);
  CHECK(metric(many, "shoal_cluster_recoveries_total") >= 1);
  CHECK(metric(many, "shoal_cluster_replayed_requests_total") >= 3);
  CHECK(metric(many, "shoal_cluster_nodes_down") == 0);
  CHECK(metric(many, "shoal_cluster_serving") == 1);
  // The gauges come from the cluster's router: its cache holds blocks for the prefix cache.
  CHECK(metric(many, "shoal_cache_blocks_total") > 0);

  // A frozen stage node keeps its connections open: heartbeats find it out, /ready says so
  // within seconds, and the node is killed and started again.
  auto ready = [&] { return run("curl -sS -m 10 -w ' %{http_code}' " + many.url() + "/ready", 15).out; };
  REQUIRE(ready().ends_with(" 200"));
  const pid_t stage1 = node_pid(many.pid(), "stage1");
  REQUIRE(stage1 > 0);
  REQUIRE(::kill(stage1, SIGSTOP) == 0);
  const auto frozen_at = std::chrono::steady_clock::now();
  std::string answer;
  while (std::chrono::steady_clock::now() - frozen_at < 30s && (answer = ready()).ends_with(" 200"))
    std::this_thread::sleep_for(100ms);
  const auto took = std::chrono::duration<double>(std::chrono::steady_clock::now() - frozen_at).count();
  INFO("/ready answered " << answer << " after " << took << " s");
  CHECK(answer.ends_with(" 503"));
  CHECK(answer.find("stage1") != std::string::npos);
  CHECK(took < 5.0);  // 4 heartbeats of 500 ms missed, plus one probe
  const auto healing_at = std::chrono::steady_clock::now();
  while (std::chrono::steady_clock::now() - healing_at < 60s && !(answer = ready()).ends_with(" 200"))
    std::this_thread::sleep_for(200ms);
  CHECK(answer.ends_with(" 200"));
  CHECK(::kill(stage1, 0) != 0);  // killed and reaped: it cannot wake up under the old placement
  CHECK(node_pid(many.pid(), "stage1") > 0);
  CHECK(content(chat(many, body)) == undisturbed);
}

namespace {

// Per layer: the sum over experts of shoal_expert_routed_tokens_total.
std::map<int, double> routed_per_layer(const serve_process& s) {
  const auto r = run("curl -sS -m 10 " + s.url() + "/metrics", 15);
  std::map<int, double> out;
  std::istringstream lines(r.out);
  for (std::string line; std::getline(lines, line);) {
    if (!line.starts_with("shoal_expert_routed_tokens_total{layer=\"")) continue;
    const int layer = std::stoi(line.substr(40));
    out[layer] += std::stod(line.substr(line.rfind(' ') + 1));
  }
  return out;
}

}  // namespace

TEST_CASE("/metrics counts the tokens routed to each expert, embedded and across processes alike",
          "[gateway][e2e][cluster]") {
  // Every token a stage computes is routed to top_k experts in each MoE layer: a request adds
  // top_k x (prompt tokens computed + completion tokens - 1) per MoE layer.
  std::ifstream in(tiny_model() / "config.json");
  const auto config = json::parse(in);
  const int top_k = config["num_experts_per_tok"].get<int>();
  const int layers = config["num_hidden_layers"].get<int>();
  const int dense = config.value("first_k_dense_replace", 0);
  for (serve_process* server : {&single(), &clustered()}) {
    CAPTURE(server->url());
    // Counts of other processes reach the head with their heartbeat answers (every 500 ms):
    // start from counts that have stopped moving.
    auto before = routed_per_layer(*server);
    for (int i = 0; i < 12; ++i) {
      std::this_thread::sleep_for(800ms);
      auto again = routed_per_layer(*server);
      if (again == before) break;
      before = std::move(again);
    }
    const double prefilled_before = metric(*server, "shoal_engine_prefilled_tokens_total");
    const auto answer = chat(*server, {{"temperature", 0},
                                       {"max_tokens", 6},
                                       {"messages", {{{"role", "user"}, {"content", "Count the routed tokens: " + server->url()}}}}});
    const double completion = answer["usage"]["completion_tokens"].get<double>();
    // Counts of other processes arrive with their heartbeat answers: wait for them.
    std::map<int, double> after;
    double expected = -1;
    const auto deadline = std::chrono::steady_clock::now() + 10s;
    bool consistent = false;
    while (!consistent && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(200ms);
      after = routed_per_layer(*server);
      expected = top_k * (metric(*server, "shoal_engine_prefilled_tokens_total") - prefilled_before + completion - 1);
      consistent = expected > 0;
      for (int layer = 0; layer < layers; ++layer) {
        const double added = after[layer] - (before.count(layer) ? before.at(layer) : 0);
        consistent = consistent && added == (layer < dense ? 0 : expected);
      }
    }
    INFO("expected per MoE layer " << expected);
    for (int layer = 0; layer < layers; ++layer) {
      CAPTURE(layer);
      CHECK(after[layer] - (before.count(layer) ? before.at(layer) : 0) == (layer < dense ? 0 : expected));
    }
  }
}

TEST_CASE("a cluster with a join secret serving encrypted weights answers as the plain single process; "
          "/metrics counts refused connections",
          "[gateway][e2e][cluster][security]") {
  const std::string shoal = SHOAL_BINARY;
  const auto key = kWork / "weights.key";
  const auto encrypted = kWork / "tiny-encrypted";
  const auto secret = kWork / "join.secret";
  fs::remove(key);
  fs::remove(secret);
  fs::remove_all(encrypted);
  REQUIRE(run(shoal + " keys new-weights-key --file " + key.string()).exit_code == 0);
  REQUIRE(run(shoal + " keys new-join-secret --file " + secret.string()).exit_code == 0);
  const auto made = run(shoal + " encrypt-weights --quiet --model " + tiny_model().string() + " --out " +
                        encrypted.string() + " --key-file " + key.string());
  INFO(made.out);
  REQUIRE(made.exit_code == 0);
  // The tiny cluster's layout on ports of its own, with the secret, over the encrypted copy.
  std::string config = slurp(tiny_cluster_config());
  config.replace(config.find("model: "), config.find('\n') - config.find("model: "),
                 "model: " + encrypted.string() + "\njoin_secret_file: join.secret");
  for (const char* n : {"stage0", "stage1", "experts0", "experts1"}) {
    const auto at = config.find("port: ", config.find(std::string("name: ") + n)) + 6;
    config.replace(at, config.find('}', at) - at, std::to_string(shoal::testing::free_port()));
  }
  const auto config_file = kWork / "secure.yaml";
  std::ofstream(config_file) << config;
  serve_process secure("serve-secure", {"serve", "--cluster", config_file.string(), "--transports", "tcp", "--port",
                                        "0", "--name", "tiny", "--drain-seconds", "5", "--key-file", key.string()});

  const json greedy{{"temperature", 0}, {"max_tokens", 24}};
  CHECK(content(chat(secure, greedy)) == content(chat(single(), greedy)));
  CHECK(metric(secure, "shoal_cluster_refused_peers_total") == 0);

  std::string head;
  {
    const auto at = config.find("port: ", config.find("name: stage0")) + 6;
    head = "127.0.0.1:" + config.substr(at, config.find('}', at) - at);
  }
  const auto refused = run(shoal + " admin status --cluster " + head);
  CHECK(refused.exit_code == 2);
  CHECK_THAT(refused.out, Catch::Contains("it has no join secret"));
  const auto allowed = run(shoal + " admin status --json --cluster " + head + " --join-secret-file " + secret.string());
  INFO(allowed.out);
  CHECK(allowed.exit_code == 0);
  std::this_thread::sleep_for(300ms);  // the gateway reads the head's status at most every 250 ms
  CHECK(metric(secure, "shoal_cluster_refused_peers_total") == 1);
  CHECK(secure.terminate(60s) == 0);
}

namespace {

// The JSON line `shoal generate --json` printed (node or transport warnings may share the
// output).
json generate_json(const command_result& r) {
  std::istringstream lines(r.out);
  std::string line, last;
  while (std::getline(lines, line))
    if (!line.empty() && line.front() == '{') last = line;
  INFO(r.out);
  REQUIRE(!last.empty());
  return json::parse(last);
}

}  // namespace

TEST_CASE("shoal generate --cluster HOST:PORT answers as shoal generate --model does: chat, text, stop strings, "
          "sampled token ids",
          "[gateway][e2e][cluster]") {
  clustered();  // starts the cluster's nodes
  const std::string shoal = SHOAL_BINARY;
  const std::string model = tiny_model().string();
  const std::string head = head_address();
  auto both = [&](const std::string& args, bool text) {
    const auto local = run(shoal + " generate --model " + model + " " + args + " --json --quiet");
    const auto remote =
        run(shoal + " generate --cluster " + head + (text ? " --model " + model : std::string()) + " " + args +
            " --json --quiet");
    INFO(args << "\nlocal: " << local.out << "\ncluster: " << remote.out);
    REQUIRE(local.exit_code == 0);
    REQUIRE(remote.exit_code == 0);
    return std::pair{generate_json(local), generate_json(remote)};
  };
  // A chat, sampled with a seed: the cluster's last stage makes the same choices.
  {
    const auto [a, b] = both("--chat 'Tell me about the sea.' --temperature 0.8 --top-p 0.95 --seed 7 "
                             "--max-new-tokens 24",
                             true);
    CHECK(b["tokens"] == a["tokens"]);
    CHECK(b["content"] == a["content"]);
    CHECK(b["finish_reason"] == a["finish_reason"]);
    CHECK(b["usage"] == a["usage"]);
    CHECK(b["seed"] == 7);
    REQUIRE(a["tokens"].size() == 24);
  }
  // Plain text, greedy; then a stop string from the middle of that answer ends both early.
  std::string greedy_text;
  {
    const auto [a, b] = both("--prompt 'Once upon a time' --max-new-tokens 16", true);
    CHECK(b["tokens"] == a["tokens"]);
    CHECK(b["text"] == a["text"]);
    greedy_text = a["text"].get<std::string>();
  }
  REQUIRE(greedy_text.size() > 8);
  const auto stop = middle_character(greedy_text);
  if (stop.find('\'') == std::string::npos) {
    const auto [a, b] = both("--prompt 'Once upon a time' --max-new-tokens 16 --stop '" + stop + "'", true);
    CHECK(a["finish_reason"] == "stop");
    CHECK(b["finish_reason"] == "stop");
    CHECK(b["text"] == a["text"]);
    CHECK(a["stop"] == stop);  // which stop string ended it, on both paths
    CHECK(b["stop"] == stop);
    CHECK(a["text"].get<std::string>().size() < greedy_text.size());
  }
  // Token ids in and out, sampled with a seed.
  {
    const auto [a, b] = both("--tokens 3,5,7 --temperature 0.9 --seed 5", false);
    CHECK(b["tokens"] == a["tokens"]);
    REQUIRE(a["tokens"].size() == 16);
  }
  // EOS ends an answer unless --ignore-eos, on the cluster as in one process: a copy of the
  // checkpoint whose tokenizer calls the first greedy token of the prompt its EOS.
  {
    const auto first = generate_json(run(shoal + " generate --model " + model +
                                         " --prompt 'Once upon a time' --max-new-tokens 1 --json --quiet"));
    const auto eos_text = first["text"].get<std::string>();
    REQUIRE(!eos_text.empty());  // one whole token of text
    const auto copy = kWork / "tiny-eos";
    fs::remove_all(copy);
    fs::create_directories(copy);
    for (const auto& entry : fs::directory_iterator(tiny_model())) {
      const auto name = entry.path().filename().string();
      if (name == "tokenizer_config.json") continue;
      fs::copy_file(entry.path(), copy / name);  // a checkpoint refuses links that leave its directory
    }
    auto config = json::parse(slurp(tiny_model() / "tokenizer_config.json"));
    config["eos_token"] = eos_text;
    std::ofstream(copy / "tokenizer_config.json") << config.dump();
    for (const bool ignore : {false, true}) {
      const std::string args = "--prompt 'Once upon a time' --max-new-tokens 6" + std::string(ignore ? " --ignore-eos" : "");
      const auto local = generate_json(run(shoal + " generate --model " + copy.string() + " " + args + " --json --quiet"));
      const auto remote = generate_json(
          run(shoal + " generate --cluster " + head + " --model " + copy.string() + " " + args + " --json --quiet"));
      CAPTURE(ignore, local.dump(), remote.dump());
      CHECK(local["finish_reason"] == (ignore ? "length" : "stop"));
      CHECK(remote["finish_reason"] == local["finish_reason"]);
      CHECK(remote["tokens"] == local["tokens"]);
      CHECK(remote["text"] == local["text"]);
    }
  }
  // What it refuses, and says why.
  const auto no_model = run(shoal + " generate --cluster " + head + " --prompt hi");
  CHECK(no_model.exit_code != 0);
  CHECK_THAT(no_model.out, Catch::Contains("--cluster with a text prompt needs --model DIR"));
  const auto bad_address = run(shoal + " generate --cluster " + head + "x --tokens 1");
  CHECK(bad_address.exit_code != 0);
  CHECK_THAT(bad_address.out, Catch::Contains("expected HOST:PORT"));
}

// Last: it stops the cluster the cases above share.
TEST_CASE("SIGTERM stops the cluster gateway and every node it started", "[gateway][e2e][cluster]") {
  auto& many = clustered();
  // The nodes are the gateway's children.
  std::vector<pid_t> nodes;
  for (const auto& task : fs::directory_iterator("/proc/" + std::to_string(many.pid()) + "/task")) {
    std::ifstream in(task.path() / "children");
    for (pid_t pid; in >> pid;) nodes.push_back(pid);
  }
  CHECK(nodes.size() == 4);
  CHECK(many.terminate(60s) == 0);
  for (auto pid : nodes) CHECK(::kill(pid, 0) != 0);
  CHECK(many.log().find("[serve] stopped") != std::string::npos);
}
