#pragma once
/// \file
/// DeepSeek-R1 style reasoning: the model thinks between `<think>` and `</think>` before it
/// answers. Like OpenAI-compatible servers (`reasoning_content` beside `content`), Shoal
/// reports the two separately, also while streaming.
///
/// Rules: a `<think>` is recognised only at the start of the output (after optional
/// whitespace), or the output starts inside the reasoning when the prompt already opened it
/// (R1 templates end the prompt with `<think>\n`; see `prompt_opens_reasoning`). The first `</think>` ends the reasoning;
/// everything after it is content, tags included. Whitespace around the reasoning (the
/// newlines R1 writes after `<think>` and before and after `</think>`) is dropped.

#include <string>
#include <string_view>

namespace shoal::runtime {

/// Text split into reasoning and answer.
struct reasoning_split {
  std::string reasoning;  ///< Between <think> and </think> (`reasoning_content`).
  std::string content;    ///< The answer (`content`).
};

/// Splits streamed text incrementally. Tags split across pushes are recognised: text that
/// may be the start of a tag is held back until it is clear.
class reasoning_parser {
 public:
  /// `starts_in_reasoning`: the prompt ended with an opening `<think>`.
  explicit reasoning_parser(bool starts_in_reasoning = false);

  /// Adds text; returns the parts of it that can be reported now.
  reasoning_split push(std::string_view text);

  /// Ends the text; returns what was held back.
  reasoning_split finish();

  /// Whether the output is (still) inside the reasoning.
  bool in_reasoning() const { return state_ == state::reasoning; }

 private:
  enum class state { start, reasoning, content_start, content };
  void step(reasoning_split& out, bool final);
  state state_;
  std::string buffer_;
  bool reasoning_started_ = false;  // non-whitespace reasoning text has been reported
};

/// Whether a rendered chat prompt ends inside an opened reasoning block: its last tag is
/// `<think>`, followed by nothing but whitespace (DeepSeek-R1's template ends the prompt with
/// `<think>\n`, V3.1's with `<think>` when thinking is on). The model's output then starts
/// inside the reasoning: pass the result as `starts_in_reasoning`.
bool prompt_opens_reasoning(std::string_view prompt);

/// The whole text at once (as `reasoning_parser` over one push and finish).
reasoning_split split_reasoning(std::string_view text, bool starts_in_reasoning = false);

}  // namespace shoal::runtime
