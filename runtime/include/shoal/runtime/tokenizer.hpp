#pragma once
/// \file
/// The byte-level BPE tokenizer of DeepSeek-V3/R1 checkpoints, read from the checkpoint's
/// `tokenizer.json` (Hugging Face tokenizers format) and `tokenizer_config.json`.
///
/// The pipeline is the one Hugging Face's tokenizers run for these files: added tokens (such
/// as `<｜User｜>`) are cut out of the raw text first, leftmost-longest; each remaining span
/// goes through the `Split` pre-tokenizers in order (Unicode-class regexes, compiled with
/// PCRE2 in UTF + UCP mode and JIT); every resulting piece is byte-level BPE encoded with
/// ranked merges. Piece encodings are cached, so repeated words cost one hash lookup.

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace shoal::runtime {

/// A token id in the model's vocabulary.
using token_id = std::int32_t;

/// A token that is matched in raw text before BPE (`added_tokens` in tokenizer.json).
struct added_token {
  token_id id = 0;       ///< Its id.
  std::string content;   ///< The exact text it stands for.
  bool special = false;  ///< Control token (BOS, EOS, ...): dropped by `decode(..., true)`.
};

/// A loaded tokenizer. Immutable after loading except for an internal piece cache, so one
/// instance may be shared by any number of threads.
class tokenizer {
 public:
  /// Reads `dir/tokenizer.json` and, when present, `dir/tokenizer_config.json`. Throws
  /// `not_found` when tokenizer.json is missing and `invalid_argument` when a file is
  /// malformed or uses a pipeline this implementation does not support (it names the part).
  static tokenizer load(const std::filesystem::path& dir);

  /// Builds a tokenizer from the two files' contents; `tokenizer_config_json` may be empty.
  /// `origin` names the source in error messages.
  static tokenizer from_json(std::string_view tokenizer_json, std::string_view tokenizer_config_json,
                             std::string_view origin = "tokenizer.json");

  tokenizer(tokenizer&&) noexcept;
  tokenizer& operator=(tokenizer&&) noexcept;
  ~tokenizer();

  /// Token ids of `text`, with no BOS or other special tokens added. Added tokens written in
  /// the text are recognised. Throws `invalid_argument` if `text` is not valid UTF-8.
  std::vector<token_id> encode(std::string_view text) const;

  /// Appends the ids of `text` to `out` (as `encode`).
  void encode_into(std::string_view text, std::vector<token_id>& out) const;

  /// The text of `ids`. Byte sequences that are not valid UTF-8 become U+FFFD, one per
  /// maximal invalid subpart (as Hugging Face does). Ids that name no token contribute
  /// nothing. `skip_special` drops special added tokens (BOS, EOS, padding).
  std::string decode(std::span<const token_id> ids, bool skip_special = false) const;

  /// The raw bytes token `id` stands for; possibly a fragment of a UTF-8 character. Empty
  /// for ids that name no token.
  std::string_view token_bytes(token_id id) const;

  /// Whether `id` is a special added token (BOS, EOS, padding, placeholders).
  bool is_special(token_id id) const;

  /// The id of a token given its text (an added token's content, or a vocabulary entry's
  /// raw bytes), if there is one.
  std::optional<token_id> find_token(std::string_view text) const;

  /// One past the largest id that names a token.
  std::int64_t id_limit() const;

  /// The added tokens, in id order.
  std::span<const added_token> added_tokens() const;

  /// The beginning-of-sequence token's text and id (from tokenizer_config.json).
  const std::string& bos_token() const;
  /// BOS id, if the configured BOS text is a token.
  std::optional<token_id> bos_id() const;
  /// The end-of-sequence token's text (generation ends when it is produced).
  const std::string& eos_token() const;
  /// EOS id, if the configured EOS text is a token.
  std::optional<token_id> eos_id() const;
  /// Whether a plain prompt (not a chat) starts with BOS (`add_bos_token`).
  bool add_bos_token() const;
  /// The Jinja chat template from tokenizer_config.json; empty when there is none.
  const std::string& chat_template_source() const;

 private:
  struct impl;
  explicit tokenizer(std::unique_ptr<impl> p);
  std::unique_ptr<impl> impl_;
};

}  // namespace shoal::runtime
