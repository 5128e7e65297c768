#include "shoal/runtime/sampling.hpp"

#include "shoal/base/error.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

namespace shoal::runtime {
namespace {

// Higher logit first; equal logits by lower id, so the result never depends on the order in
// which a partial sort left them.
bool better(const std::pair<float, token_id>& a, const std::pair<float, token_id>& b) {
  return a.first != b.first ? a.first > b.first : a.second < b.second;
}

}  // namespace

void validate(const sampling_params& p) {
  auto bad = [](std::string_view name, double value, std::string_view range) {
    shoal::fail(errc::invalid_argument, "{} = {} is out of range (expected {})", name, value, range);
  };
  if (!(p.temperature >= 0.0f) || !std::isfinite(p.temperature)) bad("temperature", p.temperature, ">= 0");
  if (p.top_k < 0) bad("top_k", p.top_k, ">= 0, 0 meaning off");
  if (!(p.top_p > 0.0f && p.top_p <= 1.0f)) bad("top_p", p.top_p, "in (0, 1]");
  if (!(p.min_p >= 0.0f && p.min_p <= 1.0f)) bad("min_p", p.min_p, "in [0, 1]");
  if (!(p.repetition_penalty > 0.0f) || !std::isfinite(p.repetition_penalty))
    bad("repetition_penalty", p.repetition_penalty, "> 0, 1 meaning off");
  if (!(std::abs(p.frequency_penalty) <= 2.0f)) bad("frequency_penalty", p.frequency_penalty, "in [-2, 2]");
  if (!(std::abs(p.presence_penalty) <= 2.0f)) bad("presence_penalty", p.presence_penalty, "in [-2, 2]");
}

sampler::sampler(sampling_params params, std::span<const token_id> prompt, std::int64_t id_limit)
    : params_(params), id_limit_(id_limit), seed_(params.seed ? *params.seed : std::random_device{}()), rng_(seed_) {
  validate(params_);
  if (params_.repetition_penalty != 1.0f) seen_.insert(prompt.begin(), prompt.end());
}

void sampler::accept(token_id id) {
  if (params_.repetition_penalty != 1.0f) seen_.insert(id);
  ++counts_[id];
}

void sampler::replay(token_id id) {
  // `sample` draws exactly one number when it does not decode greedily.
  if (params_.temperature != 0.0f && params_.top_k != 1) rng_.discard(1);
  accept(id);
}

token_id sampler::sample(std::span<const float> logits) {
  SHOAL_REQUIRE(!logits.empty(), "no logits to sample from");
  const auto n = static_cast<std::int64_t>(logits.size());
  const auto limit = id_limit_ > 0 ? std::min(id_limit_, n) : n;
  const bool penalised = params_.repetition_penalty != 1.0f || params_.frequency_penalty != 0.0f || params_.presence_penalty != 0.0f;
  std::span<const float> scores = logits.first(static_cast<std::size_t>(limit));
  if (penalised) {
    work_.assign(scores.begin(), scores.end());
    const float rp = params_.repetition_penalty;
    if (rp != 1.0f)
      for (const auto id : seen_)
        if (id >= 0 && id < limit) {
          float& s = work_[static_cast<std::size_t>(id)];
          s = s < 0.0f ? s * rp : s / rp;
        }
    for (const auto& [id, count] : counts_)
      if (id >= 0 && id < limit)
        work_[static_cast<std::size_t>(id)] -= static_cast<float>(count) * params_.frequency_penalty + params_.presence_penalty;
    scores = work_;
  }

  token_id chosen = 0;
  if (params_.temperature == 0.0f || params_.top_k == 1) {
    // Greedy: the first maximum, as runtime::argmax.
    chosen = static_cast<token_id>(std::max_element(scores.begin(), scores.end()) - scores.begin());
  } else {
    const float inv_t = 1.0f / params_.temperature;
    candidates_.clear();
    for (std::size_t i = 0; i < scores.size(); ++i)
      if (scores[i] > -std::numeric_limits<float>::infinity())
        candidates_.emplace_back(scores[i] * inv_t, static_cast<token_id>(i));
    if (candidates_.empty()) shoal::fail(errc::invalid_argument, "every token's logit is -inf; nothing to sample");

    auto keep_best = [&](std::size_t k) {
      if (k >= candidates_.size()) return;
      std::nth_element(candidates_.begin(), candidates_.begin() + static_cast<std::ptrdiff_t>(k), candidates_.end(), better);
      candidates_.resize(k);
    };
    bool in_order = true;  // candidates_ in id order, or sorted by `better`
    if (params_.top_k > 0 && static_cast<std::size_t>(params_.top_k) < candidates_.size()) {
      keep_best(static_cast<std::size_t>(params_.top_k));
      in_order = false;
    }

    // `better` orders best first, so the best candidate is the minimum under it.
    const float max_logit = std::min_element(candidates_.begin(), candidates_.end(), better)->first;
    double total = 0.0;
    for (const auto& c : candidates_) total += std::exp(static_cast<double>(c.first - max_logit));

    if (params_.top_p < 1.0f) {
      // The nucleus is a prefix of the sorted distribution; sort only as much of it as needed,
      // doubling the window until it holds top_p of the mass (rarely more than a few hundred).
      const double target = static_cast<double>(params_.top_p) * total;
      std::size_t window = std::min<std::size_t>(256, candidates_.size());
      for (;;) {
        std::partial_sort(candidates_.begin(), candidates_.begin() + static_cast<std::ptrdiff_t>(window), candidates_.end(), better);
        double mass = 0.0;
        std::size_t keep = 0;
        while (keep < window && mass < target) mass += std::exp(static_cast<double>(candidates_[keep++].first - max_logit));
        if (mass >= target || window == candidates_.size()) {
          candidates_.resize(std::max<std::size_t>(keep, 1));
          in_order = true;
          break;
        }
        window = std::min(window * 4, candidates_.size());
      }
    }
    if (params_.min_p > 0.0f) {
      // p_i >= min_p * p_max  <=>  logit_i - max_logit >= log(min_p).
      const float floor = std::log(params_.min_p);
      std::erase_if(candidates_, [&](const auto& c) { return c.first - max_logit < floor; });
    }
    // Draw in a fixed order so that the same seed gives the same token with any standard
    // library (nth_element leaves an unspecified order).
    if (!in_order) std::sort(candidates_.begin(), candidates_.end(), better);
    double kept = 0.0;
    for (const auto& c : candidates_) kept += std::exp(static_cast<double>(c.first - max_logit));
    const double u = static_cast<double>(rng_() >> 11) * 0x1.0p-53 * kept;
    double acc = 0.0;
    chosen = candidates_.back().second;
    for (const auto& c : candidates_) {
      acc += std::exp(static_cast<double>(c.first - max_logit));
      if (u < acc) {
        chosen = c.second;
        break;
      }
    }
  }
  accept(chosen);
  return chosen;
}

}  // namespace shoal::runtime
