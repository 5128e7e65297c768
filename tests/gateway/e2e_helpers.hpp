#pragma once
// What the end-to-end tests of the gateway share beyond raw HTTP: bounded polling, a stop
// string taken from an answer, reading a connection until its bytes say enough, and the
// events of a streamed answer.

#include "raw_http.hpp"

#include <catch2/catch.hpp>

#include <nlohmann/json.hpp>

#include <chrono>
#include <functional>
#include <sstream>
#include <string>
#include <string_view>
#include <thread>

namespace shoal::gateway::testing {

// Polls `done` every 50 ms until it holds or `limit` passes.
inline bool eventually(const std::function<bool()>& done, std::chrono::milliseconds limit = std::chrono::seconds(10)) {
  const auto end = std::chrono::steady_clock::now() + limit;
  while (std::chrono::steady_clock::now() < end) {
    if (done()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return done();
}

// One whole UTF-8 character from the middle of `text` (a tiny model's text may be any script):
// a stop string that is certain to occur in it.
inline std::string middle_character(const std::string& text) {
  auto begin = text.size() / 2;
  while (begin > 0 && (static_cast<unsigned char>(text[begin]) & 0xC0) == 0x80) --begin;
  auto end = begin + 1;
  while (end < text.size() && (static_cast<unsigned char>(text[end]) & 0xC0) == 0x80) ++end;
  return text.substr(begin, end - begin);
}

// Reads from `c` until `pred(received)` holds or `limit` passes.
inline bool receive_until(raw_connection& c, const std::function<bool(const std::string&)>& pred,
                          std::chrono::milliseconds limit = std::chrono::seconds(60)) {
  const auto end = std::chrono::steady_clock::now() + limit;
  while (!pred(c.received()) && std::chrono::steady_clock::now() < end)
    if (!c.fill(std::chrono::duration_cast<std::chrono::milliseconds>(end - std::chrono::steady_clock::now()))) break;
  return pred(c.received());
}

inline std::size_t count_of(const std::string& text, std::string_view what) {
  std::size_t n = 0;
  for (auto at = text.find(what); at != std::string::npos; at = text.find(what, at + 1)) ++n;
  return n;
}

// The SSE events of a streamed answer: content, finish reason and the usage chunk.
struct streamed_answer {
  std::string content, finish;
  nlohmann::json usage;
  bool done = false;
  bool error = false;
};

inline streamed_answer parse_sse(const std::string& body) {
  streamed_answer a;
  std::istringstream lines(body);
  for (std::string line; std::getline(lines, line);) {
    if (line == "data: [DONE]") a.done = true;
    if (!line.starts_with("data: {")) continue;
    const auto event = nlohmann::json::parse(line.substr(6));
    if (event.contains("error")) a.error = true;
    if (event.contains("usage") && !event["usage"].is_null()) a.usage = event["usage"];
    if (!event.contains("choices") || event["choices"].empty()) continue;
    const auto& choice = event["choices"][0];
    if (choice.contains("delta") && choice["delta"].contains("content") && choice["delta"]["content"].is_string())
      a.content += choice["delta"]["content"].get<std::string>();
    if (choice.contains("text") && choice["text"].is_string()) a.content += choice["text"].get<std::string>();
    if (choice["finish_reason"].is_string()) a.finish = choice["finish_reason"].get<std::string>();
  }
  return a;
}

// Reads the rest of a streamed completion on `c` and checks that it ran to its length:
// `[DONE]`, no error event, `tokens` generated.
inline void check_runs_to_length(raw_connection& c, int tokens) {
  const auto r = c.read_response(std::chrono::seconds(120));
  REQUIRE(r.complete);
  const auto a = parse_sse(r.body);
  CHECK(a.done);
  CHECK_FALSE(a.error);
  CHECK(a.finish == "length");
  CHECK(a.usage["completion_tokens"] == tokens);
}

}  // namespace shoal::gateway::testing
