#pragma once
/// \file
/// Choosing the next token from logits: penalties, temperature, top-k, top-p, min-p and a
/// seeded random draw. The semantics follow the common OpenAI-compatible servers: the
/// repetition penalty (Hugging Face / CTRL style) covers prompt and output tokens, frequency
/// and presence penalties (OpenAI style) cover output tokens only; then the temperature
/// divides the logits, and top-k, top-p and min-p filter the distribution in that order.

#include "shoal/runtime/tokenizer.hpp"

#include <cstdint>
#include <optional>
#include <random>
#include <span>
#include <unordered_map>
#include <unordered_set>
#include <vector>

namespace shoal::runtime {

/// How to pick tokens. The defaults are greedy decoding.
struct sampling_params {
  float temperature = 0.0f;         ///< 0: greedy (argmax); otherwise logits are divided by it.
  std::int32_t top_k = 0;           ///< Keep the k most likely tokens; 0: all.
  float top_p = 1.0f;               ///< Keep the smallest set whose probability reaches top_p; 1: all.
  float min_p = 0.0f;               ///< Drop tokens less likely than min_p times the most likely one.
  float repetition_penalty = 1.0f;  ///< >1 discourages any token already in prompt or output.
  float frequency_penalty = 0.0f;   ///< Subtracted from a logit once per earlier occurrence in the output.
  float presence_penalty = 0.0f;    ///< Subtracted from a logit if the token occurred in the output.
  std::optional<std::uint64_t> seed{};  ///< Same seed, same logits: same tokens. None: random.
};

/// Throws `invalid_argument` naming the parameter when `p` is out of range (negative
/// temperature, top_p outside (0, 1], ...).
void validate(const sampling_params& p);

/// The sampler of one sequence: it remembers the sequence's tokens for the penalties and
/// owns the random generator. Not thread-safe; one per sequence.
class sampler {
 public:
  /// `prompt` feeds the repetition penalty. Ids at or above `id_limit` (the tokenizer's, when
  /// the model's vocabulary is padded beyond it) are never chosen; 0: no limit.
  sampler(sampling_params params, std::span<const token_id> prompt = {}, std::int64_t id_limit = 0);

  /// Picks the next token from `logits` (one per vocabulary id) and records it as output.
  token_id sample(std::span<const float> logits);

  /// Records `id` as output without sampling (e.g. tokens replayed after a failure).
  void accept(token_id id);

  /// Records `id` as a token this sampler (same seed) drew earlier, and advances the random
  /// stream past that draw: a sampler rebuilt after a failure and fed the tokens already
  /// streamed then continues exactly as the original would have.
  void replay(token_id id);

  /// The parameters in use.
  const sampling_params& params() const { return params_; }

  /// The seed actually used (drawn from std::random_device when none was given), so that a
  /// sampled run can be reproduced.
  std::uint64_t seed() const { return seed_; }

 private:
  sampling_params params_;
  std::int64_t id_limit_;
  std::uint64_t seed_;
  std::mt19937_64 rng_;
  std::unordered_set<token_id> seen_;              // prompt and output, for the repetition penalty
  std::unordered_map<token_id, std::int32_t> counts_;  // output occurrences
  std::vector<float> work_;
  std::vector<std::pair<float, token_id>> candidates_;
};

}  // namespace shoal::runtime
