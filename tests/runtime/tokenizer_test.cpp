#include "shoal/runtime/tokenizer.hpp"

#include "shoal/base/error.hpp"
#include "shoal/runtime/detokenizer.hpp"
#include "shoal/runtime/embedded_tokenizer.hpp"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <thread>

using namespace shoal;
using namespace shoal::runtime;
namespace fs = std::filesystem;

namespace {

const fs::path kData = fs::path(SHOAL_TEST_DATA_DIR) / "tokenizer";

const tokenizer& deepseek() {
  static const tokenizer tok = tokenizer::load(kData);
  return tok;
}

std::vector<nlohmann::json> vectors() {
  std::ifstream in(kData / "vectors.jsonl");
  REQUIRE(in);
  std::vector<nlohmann::json> rows;
  for (std::string line; std::getline(in, line);)
    if (!line.empty()) rows.push_back(nlohmann::json::parse(line));
  return rows;
}

}  // namespace

TEST_CASE("tokenizer: every reference vector encodes and decodes exactly", "[tokenizer]") {
  const auto rows = vectors();
  REQUIRE(rows.size() >= 200);
  int failures = 0;
  for (const auto& row : rows) {
    const auto text = row.at("text").get<std::string>();
    const auto want = row.at("ids").get<std::vector<token_id>>();
    const auto got = deepseek().encode(text);
    if (got != want) {
      ++failures;
      UNSCOPED_INFO("encode mismatch for " << nlohmann::json(text).dump() << ": got " << nlohmann::json(got).dump()
                                          << " want " << nlohmann::json(want).dump());
    }
    const auto decoded = deepseek().decode(want);
    if (decoded != row.at("decoded").get<std::string>()) {
      ++failures;
      UNSCOPED_INFO("decode mismatch for " << nlohmann::json(text).dump() << ": got " << nlohmann::json(decoded).dump());
    }
  }
  CHECK(failures == 0);
}

TEST_CASE("tokenizer: special tokens and config", "[tokenizer]") {
  const auto& tok = deepseek();
  CHECK(tok.bos_token() == "<｜begin▁of▁sentence｜>");
  CHECK(tok.eos_token() == "<｜end▁of▁sentence｜>");
  CHECK(tok.bos_id() == 0);
  CHECK(tok.eos_id() == 1);
  CHECK(tok.add_bos_token());
  CHECK(tok.id_limit() == 128815);
  CHECK(tok.is_special(0));
  CHECK(tok.is_special(1));
  CHECK_FALSE(tok.is_special(19923));
  CHECK(tok.find_token("<｜User｜>").has_value());
  CHECK_FALSE(tok.is_special(*tok.find_token("<｜User｜>")));
  CHECK_FALSE(tok.chat_template_source().empty());
  // Added tokens are cut out before the pre-tokenizer and win over BPE, leftmost-longest.
  const auto user = *tok.find_token("<｜User｜>");
  const auto ids = tok.encode("a<｜User｜>b");
  REQUIRE(ids.size() == 3);
  CHECK(ids[1] == user);
  CHECK(tok.decode(std::vector<token_id>{0, 19923, 1}, /*skip_special=*/true) == "Hello");
  CHECK(tok.decode(std::vector<token_id>{0, 19923, 1}) == "<｜begin▁of▁sentence｜>Hello<｜end▁of▁sentence｜>");
  // Ids that name no token (the model's padded vocabulary) decode to nothing.
  CHECK(tok.decode(std::vector<token_id>{19923, 129000, -5}) == "Hello");
}

TEST_CASE("tokenizer: invalid UTF-8 input is refused with invalid_argument", "[tokenizer]") {
  try {
    (void)deepseek().encode(std::string("ok \xC3\x28 bad"));
    FAIL("no error");
  } catch (const shoal::error& e) {
    CHECK(e.code() == errc::invalid_argument);
  }
}

TEST_CASE("tokenizer: round trip of random text (mixed scripts, whitespace, digits, emoji)", "[tokenizer]") {
  const std::vector<std::string> atoms = {"a", "Z", " ", "  ", "\n", "\r\n", "\t", "0", "123", "中", "文字", "ひら",
                                          "カタ", "é", "ß", "😀", "👍🏽", "\xE2\x80\x8B", "--", "'s", ".", "(", "{",
                                          "<｜User｜>", "<｜", "｜>", "▁", "Ġ", "\xC2\xA0", "русский", "عربى", "🇺🇸"};
  std::mt19937 rng(7);
  for (int round = 0; round < 300; ++round) {
    std::string text;
    const int n = static_cast<int>(rng() % 40);
    for (int i = 0; i < n; ++i) text += atoms[rng() % atoms.size()];
    const auto ids = deepseek().encode(text);
    INFO(nlohmann::json(text).dump());
    REQUIRE(deepseek().decode(ids) == text);
  }
}

TEST_CASE("tokenizer: the embedded files are the checkpoint's files", "[tokenizer]") {
  std::ifstream in(kData / "tokenizer.json", std::ios::binary);
  const std::string on_disk((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  CHECK(deepseek_v3_tokenizer_json() == on_disk);
  const auto embedded = tokenizer::from_json(deepseek_v3_tokenizer_json(), deepseek_v3_tokenizer_config_json());
  CHECK(embedded.encode("Hello, world!") == std::vector<token_id>{19923, 14, 2058, 3});
}

TEST_CASE("tokenizer: unsupported pipelines are refused, naming the part", "[tokenizer]") {
  auto root = nlohmann::json::parse(deepseek_v3_tokenizer_json());
  root["pre_tokenizer"]["pretokenizers"][0]["behavior"] = "MergedWithNext";
  try {
    (void)tokenizer::from_json(root.dump(), "");
    FAIL("no error");
  } catch (const shoal::error& e) {
    CHECK(e.code() == errc::invalid_argument);
    CHECK_THAT(e.what(), Catch::Contains("Isolated"));
  }
  CHECK_THROWS_AS(tokenizer::load(fs::temp_directory_path() / "shoal-no-such-dir"), shoal::error);
}

TEST_CASE("utf8: lossy conversion replaces maximal invalid subparts", "[tokenizer]") {
  CHECK(utf8_lossy("abc") == "abc");
  CHECK(utf8_lossy("\xE4\xB8") == "\xEF\xBF\xBD");                 // truncated 3-byte character
  CHECK(utf8_lossy("\xE4\xB8" "a") == "\xEF\xBF\xBD" "a");
  CHECK(utf8_lossy("\xF0\x80\x80") == "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD");  // overlong: each byte
  CHECK(utf8_lossy("\xED\xA0\x80") == "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD");  // surrogate
  CHECK(utf8_lossy("\xFF") == "\xEF\xBF\xBD");
  CHECK(utf8_valid("中文😀"));
  CHECK_FALSE(utf8_valid("\xC0\xAF"));
  CHECK(utf8_stable_prefix("ab\xE4\xB8") == 2);
  CHECK(utf8_stable_prefix("ab\xE4\xB8\xAD") == 5);
  CHECK(utf8_stable_prefix("ab\xF0\x9F\x98") == 2);
  CHECK(utf8_stable_prefix("ab\xFF") == 3);
}

TEST_CASE("detokenizer: streaming never emits broken UTF-8 and equals decode (property)", "[detokenizer]") {
  const auto& tok = deepseek();
  // Byte tokens (ids of single bytes) make splits inside characters common; mixing them with
  // real ids from multilingual text and random ids covers the rest.
  std::vector<token_id> pool = tok.encode("中文字符 emoji 😀👍🏽 ünïcödé русский текст 日本語のテキスト");
  for (int b = 0; b < 256; ++b) {
    const std::string byte(1, static_cast<char>(b));
    if (const auto id = tok.find_token(byte)) pool.push_back(*id);
  }
  REQUIRE(pool.size() > 256);
  std::mt19937 rng(42);
  for (int round = 0; round < 2000; ++round) {
    std::vector<token_id> ids(rng() % 24);
    for (auto& id : ids) {
      const auto pick = rng() % 10;
      id = pick < 7 ? pool[rng() % pool.size()] : static_cast<token_id>(rng() % 129280);
    }
    const bool skip_special = (round % 2) == 0;
    stream_detokenizer detok(tok, skip_special);
    std::string streamed;
    for (const auto id : ids) {
      const auto piece = detok.push(id);
      INFO("round " << round);
      REQUIRE(utf8_valid(piece));
      streamed += piece;
    }
    const auto rest = detok.finish();
    REQUIRE(utf8_valid(rest));
    streamed += rest;
    REQUIRE(streamed == tok.decode(ids, skip_special));
  }
}

TEST_CASE("detokenizer: a character split over byte tokens is emitted once complete", "[detokenizer]") {
  const auto& tok = deepseek();
  const std::string emoji = "😀";
  std::vector<token_id> ids;
  for (const char c : emoji) ids.push_back(*tok.find_token(std::string(1, c)));
  stream_detokenizer detok(tok);
  CHECK(detok.push(ids[0]).empty());
  CHECK(detok.push(ids[1]).empty());
  CHECK(detok.push(ids[2]).empty());
  CHECK(detok.push(ids[3]) == emoji);
  CHECK(detok.finish().empty());
}

TEST_CASE("tokenizer: long pieces (the heap merge path) round trip and are stable", "[tokenizer]") {
  const auto& tok = deepseek();
  std::string zh;
  for (int i = 0; i < 200; ++i) zh += (i % 3 == 0) ? "中文" : (i % 3 == 1) ? "的一是" : "不了人";
  const std::string letters(3000, 'q');
  const std::string spaces = std::string(500, ' ') + "x";
  for (const auto& text : {zh, letters, spaces, letters + zh}) {
    const auto ids = tok.encode(text);
    CHECK(tok.decode(ids) == text);
    CHECK(ids.size() < text.size());
    CHECK(tok.encode(text) == ids);  // a second call is served from the piece cache
  }
}

TEST_CASE("tokenizer: one instance encodes from many threads at once", "[tokenizer]") {
  const auto& tok = deepseek();
  std::vector<std::string> texts;
  for (const auto& row : vectors()) texts.push_back(row.at("text").get<std::string>());
  std::vector<std::vector<token_id>> want;
  for (const auto& t : texts) want.push_back(tok.encode(t));
  std::vector<int> mismatches(4, 0);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      for (int round = 0; round < 20; ++round)
        for (std::size_t i = static_cast<std::size_t>(t); i < texts.size(); i += 1 + static_cast<std::size_t>(round % 3))
          if (tok.encode(texts[i] + std::to_string(round)) != tok.encode(texts[i] + std::to_string(round)) ||
              tok.encode(texts[i]) != want[i])
            ++mismatches[static_cast<std::size_t>(t)];
    });
  for (auto& th : threads) th.join();
  CHECK(mismatches == std::vector<int>(4, 0));
}
