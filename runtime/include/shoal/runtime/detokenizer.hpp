#pragma once
/// \file
/// UTF-8 handling for token streams: byte-level BPE tokens are byte fragments, so a Chinese
/// character or an emoji may be split across two or three tokens. The streaming decoder emits
/// text only once its characters are complete.

#include "shoal/runtime/tokenizer.hpp"

#include <cstddef>
#include <string>
#include <string_view>

namespace shoal::runtime {

/// The same bytes with every maximal invalid UTF-8 subpart replaced by U+FFFD (the Unicode
/// "substitution of maximal subparts" practice, as Rust's `from_utf8_lossy`).
std::string utf8_lossy(std::string_view bytes);

/// Whether `bytes` is entirely valid UTF-8 (no surrogates, no overlongs, at most U+10FFFF).
bool utf8_valid(std::string_view bytes);

/// Length of the longest prefix of `bytes` that `utf8_lossy` could convert without knowing
/// the bytes that follow: everything but a trailing incomplete (still possibly valid)
/// character.
std::size_t utf8_stable_prefix(std::string_view bytes);

/// Turns a stream of token ids into text, one id at a time. Every string it returns is valid
/// UTF-8, and the concatenation of all of them (with `finish`) equals
/// `tokenizer::decode(all_ids, skip_special)`.
class stream_detokenizer {
 public:
  /// `tok` must outlive this decoder.
  explicit stream_detokenizer(const tokenizer& tok, bool skip_special = true)
      : tok_(&tok), skip_special_(skip_special) {}

  /// Adds one token; returns the text it completes (possibly empty).
  std::string push(token_id id);

  /// Ends the stream; returns what was held back (an incomplete character, as U+FFFD).
  std::string finish();

 private:
  const tokenizer* tok_;
  bool skip_special_;
  std::string pending_;  // bytes of a character whose remaining bytes have not arrived yet
};

}  // namespace shoal::runtime
