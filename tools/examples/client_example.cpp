// shoal-client-example: the C++ client API end to end. It connects to a running cluster
// (`shoal launch CLUSTER.yaml` prints the address), renders a chat message with the model's
// chat template, streams the answer to the terminal as it is generated, and can cancel it
// part way.
//
//   shoal-client-example --cluster 127.0.0.1:7610 --model DIR --chat "Hello!" --temperature 0.7 --seed 1
//
// The cluster only sees token ids: the tokenizer and the chat template run here, from the
// checkpoint directory's tokenizer files.

#include "shoal/actors/client.hpp"
#include "shoal/base/error.hpp"
#include "shoal/runtime/chat_template.hpp"
#include "shoal/runtime/detokenizer.hpp"
#include "shoal/runtime/tokenizer.hpp"

#include <CLI/CLI.hpp>
#include <fmt/core.h>

#include <charconv>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <mutex>

int main(int argc, char** argv) {
  std::string cluster, model, chat;
  std::uint32_t max_tokens = 64;
  std::uint32_t cancel_after = 0;
  shoal::sampling_options sampling;  // greedy unless told otherwise
  std::uint64_t seed = 0;
  CLI::App app{"Streams a chat answer from a Shoal cluster through the C++ client API"};
  app.add_option("--cluster", cluster, "HOST:PORT of the cluster's head node")->required();
  app.add_option("--model", model, "Checkpoint directory (its tokenizer and chat template are used here)")->required();
  app.add_option("--chat", chat, "The user message")->required();
  app.add_option("--max-tokens", max_tokens, "Tokens to generate at most")->capture_default_str();
  app.add_option("--temperature", sampling.temperature, "0: greedy")->capture_default_str();
  app.add_option("--top-p", sampling.top_p, "Nucleus cut")->capture_default_str();
  app.add_option("--top-k", sampling.top_k, "0: no top-k cut")->capture_default_str();
  auto* seed_option = app.add_option("--seed", seed, "Same seed, same answer");
  app.add_option("--cancel-after", cancel_after, "Cancel the request after this many tokens (0: never)");
  CLI11_PARSE(app, argc, argv);
  try {
    if (*seed_option) {
      sampling.has_seed = true;
      sampling.seed = seed;
    }
    const auto colon = cluster.rfind(':');
    int port = 0;
    if (colon == std::string::npos ||
        std::from_chars(cluster.data() + colon + 1, cluster.data() + cluster.size(), port).ec != std::errc())
      shoal::fail(shoal::errc::invalid_argument, "--cluster '{}': expected HOST:PORT", cluster);

    // Text to ids: the checkpoint's own tokenizer and chat template.
    const auto tok = shoal::runtime::tokenizer::load(model);
    const std::vector<shoal::runtime::chat_message> messages{{.role = "user", .content = chat, .tool_calls = {}}};
    const auto prompt_text = shoal::runtime::chat_template::for_tokenizer(tok).render(messages, true);
    shoal::generate_options request;
    for (auto id : tok.encode(prompt_text)) request.prompt.push_back(id);
    request.max_tokens = max_tokens;
    request.sampling = sampling;
    request.sampling.id_limit = static_cast<std::uint32_t>(tok.id_limit());
    if (const auto eos = tok.eos_id()) request.stop_tokens.push_back(*eos);

    // A cluster whose config sets join_secret_file admits only processes that hold the secret.
    const char* secret_file = std::getenv("SHOAL_JOIN_SECRET_FILE");
    auto client = shoal::client::connect(cluster.substr(0, colon), static_cast<std::uint16_t>(port),
                                         std::chrono::seconds(10),
                                         secret_file ? shoal::read_join_secret(secret_file) : std::string());

    // Chunks arrive on a client thread; this one waits for the last.
    std::mutex mutex;
    std::condition_variable done_cv;
    bool done = false;
    std::size_t generated = 0;
    shoal::actors::finish_reason finish{};
    std::string error;
    shoal::runtime::stream_detokenizer detok(tok);
    std::uint64_t id = 0;
    std::mutex id_mutex;
    std::unique_lock id_lock(id_mutex);  // the callback needs `id` to cancel: held until it is set
    const auto start = std::chrono::steady_clock::now();
    id = client->submit(request, [&](const shoal::token_event& chunk) {
      std::string text;
      for (auto t : chunk.tokens) text += detok.push(t);
      text += chunk.finish != shoal::actors::finish_reason::none ? detok.finish() : std::string();
      std::fputs(text.c_str(), stdout);
      std::fflush(stdout);
      std::lock_guard lock(mutex);
      generated += chunk.tokens.size();
      if (cancel_after > 0 && generated >= cancel_after && chunk.finish == shoal::actors::finish_reason::none) {
        std::lock_guard wait_for_id(id_mutex);
        client->cancel(id);
      }
      if (chunk.finish != shoal::actors::finish_reason::none) {
        finish = chunk.finish;
        error = chunk.error;
        done = true;
        done_cv.notify_all();
      }
    });
    id_lock.unlock();
    std::unique_lock lock(mutex);
    if (!done_cv.wait_for(lock, std::chrono::minutes(5), [&] { return done; }))
      shoal::fail(shoal::errc::deadline_exceeded, "no end of the answer within 5 minutes ({} tokens so far)", generated);
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    static constexpr const char* reasons[] = {"none", "stop", "length", "cancelled", "error"};
    std::fputs("\n", stdout);
    if (finish == shoal::actors::finish_reason::error) shoal::fail(shoal::errc::unavailable, "the cluster failed the request: {}", error);
    fmt::print(stderr, "[client] {} tokens in {:.2f} s, finish: {}\n", generated, seconds,
               reasons[static_cast<int>(finish)]);
  } catch (const std::exception& e) {
    fmt::print(stderr, "shoal-client-example: error: {}\n", e.what());
    return 2;
  }
  return 0;
}
