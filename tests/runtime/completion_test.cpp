#include "shoal/runtime/completion.hpp"

#include "shoal/base/error.hpp"
#include "shoal/runtime/detokenizer.hpp"
#include "shoal/runtime/reasoning.hpp"

#include <catch2/catch.hpp>

#include <filesystem>
#include <random>

using namespace shoal;
using namespace shoal::runtime;
namespace fs = std::filesystem;

namespace {

const tokenizer& deepseek() {
  static const tokenizer tok = tokenizer::load(fs::path(SHOAL_TEST_DATA_DIR) / "tokenizer");
  return tok;
}

// Ids of `text` one byte per token, so that every possible split point is exercised.
std::vector<token_id> byte_ids(std::string_view text) {
  std::vector<token_id> ids;
  for (const char c : text) ids.push_back(*deepseek().find_token(std::string(1, c)));
  return ids;
}

struct run_result {
  std::string streamed;
  finish_reason reason;
  std::size_t tokens_used;
};

run_result run(const std::vector<token_id>& ids, completion_limits limits) {
  completion_stream stream(deepseek(), std::move(limits));
  std::string streamed;
  std::size_t used = 0;
  for (const auto id : ids) {
    const auto piece = stream.push(id);
    REQUIRE(utf8_valid(piece));
    streamed += piece;
    ++used;
    if (stream.finished()) break;
  }
  if (!stream.finished()) streamed += stream.close();
  CHECK(streamed == stream.text());
  return {streamed, stream.reason(), used};
}

}  // namespace

TEST_CASE("completion: stop strings match across token boundaries and are not emitted", "[completion]") {
  const std::string text = "The answer is 42.\n\nUser: next question";
  for (const auto& ids : {deepseek().encode(text), byte_ids(text)}) {
    const auto r = run(ids, {.max_tokens = 1000, .stop = {"\n\nUser:"}});
    CHECK(r.streamed == "The answer is 42.");
    CHECK(r.reason == finish_reason::stop);
    CHECK(r.tokens_used < ids.size());
  }
}

TEST_CASE("completion: stop string property over random texts and byte splits", "[completion]") {
  std::mt19937 rng(5);
  const std::vector<std::string> atoms = {"a", "b", "ab", " ", "中", "文", "😀", "\n", "END", "EN", "D"};
  for (int round = 0; round < 500; ++round) {
    std::string text;
    for (int i = 0, n = static_cast<int>(rng() % 20); i < n; ++i) text += atoms[rng() % atoms.size()];
    const std::string stop = round % 3 == 0 ? "END" : round % 3 == 1 ? "中文" : "b b";
    const auto ids = rng() % 2 ? byte_ids(text) : deepseek().encode(text);
    const auto r = run(ids, {.max_tokens = 1000, .stop = {stop}});
    INFO(text << " / stop " << stop);
    const auto at = text.find(stop);
    CHECK(r.streamed == text.substr(0, at));
    CHECK(r.reason == (at == std::string::npos ? finish_reason::length : finish_reason::stop));
  }
}

TEST_CASE("completion: EOS ends generation and is not shown", "[completion]") {
  auto ids = deepseek().encode("Hello there");
  const auto n = ids.size();
  ids.push_back(*deepseek().eos_id());
  ids.push_back(deepseek().encode("never")[0]);
  const auto r = run(ids, {.max_tokens = 100, .stop_token_ids = {*deepseek().eos_id()}});
  CHECK(r.streamed == "Hello there");
  CHECK(r.reason == finish_reason::stop);
  CHECK(r.tokens_used == n + 1);
}

TEST_CASE("completion: max_tokens ends with 'length' and flushes held-back text", "[completion]") {
  const auto ids = byte_ids("abcEN");
  const auto r = run(ids, {.max_tokens = 5, .stop = {"END"}});
  CHECK(r.streamed == "abcEN");  // "EN" was held as a possible "END" until the budget ran out
  CHECK(r.reason == finish_reason::length);
  const auto cut = run(byte_ids("abcdef"), {.max_tokens = 3});
  CHECK(cut.streamed == "abc");
  CHECK(cut.tokens_used == 3);
  // A character cut off by the budget is shown as U+FFFD, never as broken bytes.
  const auto broken = run(byte_ids("a😀"), {.max_tokens = 3});
  CHECK(broken.streamed == "a\xEF\xBF\xBD");
  CHECK_THROWS_AS(completion_stream(deepseek(), {.max_tokens = 0}), shoal::error);
  CHECK_THROWS_AS(completion_stream(deepseek(), {.stop = {""}}), shoal::error);
}

TEST_CASE("reasoning: R1 output splits into reasoning and content", "[reasoning]") {
  const auto r = split_reasoning("<think>\nLet me think.\nYes.\n</think>\n\nThe answer is 4.");
  CHECK(r.reasoning == "Let me think.\nYes.");
  CHECK(r.content == "The answer is 4.");
  const auto opened = split_reasoning("Thinking already\n</think>\n\nDone", /*starts_in_reasoning=*/true);
  CHECK(opened.reasoning == "Thinking already");
  CHECK(opened.content == "Done");
  const auto plain = split_reasoning("Just an answer with <think> inside");
  CHECK(plain.reasoning.empty());
  CHECK(plain.content == "Just an answer with <think> inside");
  const auto unfinished = split_reasoning("<think>still going");
  CHECK(unfinished.reasoning == "still going");
  CHECK(unfinished.content.empty());
  const auto not_a_tag = split_reasoning("<thinking>no</thinking>");
  CHECK(not_a_tag.content == "<thinking>no</thinking>");
  const auto later_close = split_reasoning("<think>a</think>b</think>c");
  CHECK(later_close.reasoning == "a");
  CHECK(later_close.content == "b</think>c");
}

TEST_CASE("reasoning: streaming in any split gives the same result as at once", "[reasoning]") {
  struct example {
    std::string text;
    bool opened;  // the prompt ended inside the reasoning
    std::string reasoning, content;
  };
  // Expected splits by the rules in reasoning.hpp: <think> only at the start (after
  // whitespace), the first </think> ends the reasoning, whitespace around it is dropped.
  const std::vector<example> examples = {
      {"<think>\nLet me think.\n</think>\n\nThe answer is 4.", false, "Let me think.", "The answer is 4."},
      {"  <think>x < y and </thin k></think>ok", false, "x < y and </thin k>", "ok"},
      {"reasoning \n</think> answer </think>", true, "reasoning", "answer </think>"},
      {"<thi", false, "", "<thi"},
      {"</think>", true, "", ""},
      {"plain text, 中文 😀", false, "", "plain text, 中文 😀"},
      {"<think>中文推理</think>答案", false, "中文推理", "答案"},
  };
  std::mt19937 rng(3);
  for (const auto& [text, opened, reasoning, content] : examples) {
    INFO(text);
    const auto whole = split_reasoning(text, opened);
    CHECK(whole.reasoning == reasoning);
    CHECK(whole.content == content);
    for (int round = 0; round < 200; ++round) {
      reasoning_parser parser(opened);
      reasoning_split streamed;
      std::size_t at = 0;
      while (at < text.size()) {
        const std::size_t n = std::min<std::size_t>(text.size() - at, 1 + rng() % 4);
        const auto part = parser.push(std::string_view(text).substr(at, n));
        streamed.reasoning += part.reasoning;
        streamed.content += part.content;
        at += n;
      }
      const auto rest = parser.finish();
      streamed.reasoning += rest.reasoning;
      streamed.content += rest.content;
      REQUIRE(streamed.reasoning == reasoning);
      REQUIRE(streamed.content == content);
    }
  }
}
