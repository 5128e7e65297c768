#pragma once
/// \file
/// The text side of one generation: sampled ids in, text deltas out, with the rules for when
/// generation ends (EOS, stop strings, a token budget). Stop strings are matched on the
/// decoded text, across token boundaries, and are never emitted: text that could be the start
/// of a stop string is held back until it is clear it is not.

#include "shoal/runtime/detokenizer.hpp"
#include "shoal/runtime/tokenizer.hpp"

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace shoal::runtime {

/// When a completion ends.
struct completion_limits {
  std::int64_t max_tokens = 256;          ///< Generated tokens at most (>= 1).
  std::vector<std::string> stop{};        ///< Stop strings (non-empty); the text ends before the first one.
  std::vector<token_id> stop_token_ids{}; ///< Ids that end generation and are not shown (EOS).
};

/// Why a completion ended.
enum class finish_reason {
  none,    ///< Not finished.
  stop,    ///< A stop string or a stop token (EOS) was produced.
  length,  ///< `max_tokens` were generated.
};

/// "stop", "length" or "" (OpenAI's `finish_reason`).
std::string_view finish_reason_name(finish_reason r);

/// One completion's text stream. Feed each sampled id to `push`; print what it returns.
class completion_stream {
 public:
  /// `tok` must outlive the stream. Throws `invalid_argument` for an empty stop string or a
  /// `max_tokens` below 1.
  completion_stream(const tokenizer& tok, completion_limits limits);

  /// Adds a generated token; returns the text that may be shown now. After the call that
  /// finishes the stream, `finished()` is true and no more tokens may be pushed; that call's
  /// return value already includes everything left to show.
  std::string push(token_id id);

  /// Ends the stream early (e.g. the caller ran out of context); returns the rest to show.
  std::string close();

  /// Whether generation has ended.
  bool finished() const { return reason_ != finish_reason::none; }
  /// Why it ended (`none` while running).
  finish_reason reason() const { return reason_; }
  /// The stop string that ended it, if any.
  const std::string& matched_stop() const { return matched_stop_; }
  /// All text shown so far (the completion's final text once finished).
  const std::string& text() const { return text_; }
  /// Generated ids so far, including a final stop token.
  const std::vector<token_id>& tokens() const { return tokens_; }

 private:
  std::string release(std::string_view piece);
  std::string finish_with(finish_reason reason);

  const tokenizer* tok_;
  completion_limits limits_;
  stream_detokenizer detok_;
  std::string held_;  // decoded text not yet shown: it may be the start of a stop string
  std::string text_;
  std::string matched_stop_;
  std::vector<token_id> tokens_;
  finish_reason reason_ = finish_reason::none;
  std::size_t longest_stop_ = 0;
};

}  // namespace shoal::runtime
