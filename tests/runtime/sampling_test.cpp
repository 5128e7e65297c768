#include "shoal/runtime/sampling.hpp"

#include "shoal/base/error.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <map>
#include <numeric>
#include <random>
#include <set>

using namespace shoal;
using namespace shoal::runtime;

namespace {

std::vector<float> random_logits(std::size_t n, std::uint32_t seed, float scale = 3.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> logits(n);
  for (auto& l : logits) l = normal(rng);
  return logits;
}

std::vector<double> softmax(const std::vector<float>& logits, double temperature) {
  const double max = *std::max_element(logits.begin(), logits.end());
  std::vector<double> p(logits.size());
  double total = 0;
  for (std::size_t i = 0; i < logits.size(); ++i) total += p[i] = std::exp((logits[i] - max) / temperature);
  for (auto& x : p) x /= total;
  return p;
}

// Pearson's chi-square statistic of observed counts against expected probabilities.
double chi_square(const std::vector<int>& counts, const std::vector<double>& p, int draws) {
  double chi = 0;
  for (std::size_t i = 0; i < counts.size(); ++i) {
    const double expected = p[i] * draws;
    if (expected > 0) chi += (counts[i] - expected) * (counts[i] - expected) / expected;
  }
  return chi;
}

std::vector<int> draw_counts(const sampling_params& params, const std::vector<float>& logits, int draws) {
  sampler s(params);
  std::vector<int> counts(logits.size());
  for (int i = 0; i < draws; ++i) ++counts[static_cast<std::size_t>(s.sample(logits))];
  return counts;
}

}  // namespace

TEST_CASE("sampling: temperature 0 is argmax, whatever the other filters say", "[sampling]") {
  for (std::uint32_t seed = 0; seed < 50; ++seed) {
    const auto logits = random_logits(129280, seed);
    const auto best = static_cast<token_id>(std::max_element(logits.begin(), logits.end()) - logits.begin());
    sampler s({.temperature = 0.0f, .top_k = 5, .top_p = 0.5f, .min_p = 0.1f, .seed = seed});
    REQUIRE(s.sample(logits) == best);
  }
  // top_k = 1 is greedy too, at any temperature.
  const auto logits = random_logits(1000, 99);
  const auto best = static_cast<token_id>(std::max_element(logits.begin(), logits.end()) - logits.begin());
  sampler s({.temperature = 5.0f, .top_k = 1, .seed = 1});
  for (int i = 0; i < 100; ++i) REQUIRE(s.sample(logits) == best);
}

TEST_CASE("sampling: top-k never picks outside the k most likely and reaches all of them", "[sampling]") {
  const auto logits = random_logits(5000, 3, 0.5f);
  std::vector<token_id> order(logits.size());
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](token_id a, token_id b) { return logits[a] > logits[b]; });
  for (const int k : {2, 10, 40}) {
    const std::set<token_id> allowed(order.begin(), order.begin() + k);
    const auto counts = draw_counts({.temperature = 1.0f, .top_k = k, .seed = 11}, logits, 20000);
    std::set<token_id> seen;
    for (std::size_t id = 0; id < counts.size(); ++id)
      if (counts[id] > 0) seen.insert(static_cast<token_id>(id));
    CHECK(seen == allowed);
  }
}

TEST_CASE("sampling: frequencies follow softmax(logits / temperature) (chi-square)", "[sampling]") {
  const std::vector<float> logits = {2.0f, 1.0f, 0.5f, -1.0f, 0.0f};
  for (const double t : {0.5, 1.0, 2.0}) {
    const int draws = 50000;
    const auto counts = draw_counts({.temperature = static_cast<float>(t), .seed = 5}, logits, draws);
    // 4 degrees of freedom: P(chi2 > 23.5) = 1e-4. A wrong temperature gives thousands.
    CHECK(chi_square(counts, softmax(logits, t), draws) < 23.5);
  }
}

TEST_CASE("sampling: top-p keeps the smallest set reaching p, renormalised", "[sampling]") {
  // Probabilities 0.5, 0.25, 0.125, 0.0625, ... : top_p = 0.8 keeps the first three (0.875).
  std::vector<float> logits;
  for (int i = 0; i < 12; ++i) logits.push_back(-static_cast<float>(i) * std::log(2.0f));
  const int draws = 40000;
  const auto counts = draw_counts({.temperature = 1.0f, .top_p = 0.8f, .seed = 9}, logits, draws);
  for (std::size_t i = 3; i < counts.size(); ++i) CHECK(counts[i] == 0);
  const std::vector<double> p = {4.0 / 7, 2.0 / 7, 1.0 / 7};
  CHECK(chi_square({counts[0], counts[1], counts[2]}, p, draws) < 18.4);  // 2 dof, 1e-4
  // A large vocabulary takes the windowed path; nothing outside the nucleus is ever drawn.
  const auto big = random_logits(129280, 17, 4.0f);
  const auto probs = softmax(big, 1.0);
  std::vector<token_id> order(big.size());
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](token_id a, token_id b) { return probs[a] > probs[b]; });
  std::set<token_id> nucleus;
  double mass = 0;
  for (const auto id : order) {
    if (mass >= 0.9) break;
    nucleus.insert(id);
    mass += probs[id];
  }
  sampler s({.temperature = 1.0f, .top_p = 0.9f, .seed = 4});
  for (int i = 0; i < 300; ++i) REQUIRE(nucleus.count(s.sample(big)) == 1);
}

TEST_CASE("sampling: min-p drops tokens below min_p times the best", "[sampling]") {
  const auto logits = random_logits(2000, 21, 2.0f);
  const auto p = softmax(logits, 1.0);
  const double p_max = *std::max_element(p.begin(), p.end());
  const auto counts = draw_counts({.temperature = 1.0f, .min_p = 0.05f, .seed = 2}, logits, 20000);
  double kept_mass = 0, p_min_kept = 1;
  std::size_t kept = 0;
  for (std::size_t i = 0; i < counts.size(); ++i) {
    if (counts[i] > 0) REQUIRE(p[i] >= 0.05 * p_max * (1 - 1e-5));
    if (p[i] >= 0.05 * p_max * (1 + 1e-5)) {
      ++kept;
      kept_mass += p[i];
      p_min_kept = std::min(p_min_kept, p[i]);
    }
  }
  // Every token above the threshold stays drawable (an argmax sampler would pass the check
  // above): the least likely one expects enough draws that never seeing it means it was dropped.
  REQUIRE(kept > 10);
  REQUIRE(20000 * p_min_kept / kept_mass > 30);
  for (std::size_t i = 0; i < counts.size(); ++i)
    if (p[i] >= 0.05 * p_max * (1 + 1e-5)) CHECK(counts[i] > 0);
}

TEST_CASE("sampling: the same seed gives the same tokens, another seed others", "[sampling]") {
  const auto logits = random_logits(129280, 8, 1.0f);
  auto run = [&](std::uint64_t seed) {
    sampler s({.temperature = 1.0f, .top_p = 0.95f, .seed = seed});
    std::vector<token_id> out;
    for (int i = 0; i < 30; ++i) out.push_back(s.sample(logits));
    return out;
  };
  CHECK(run(123) == run(123));
  CHECK(run(123) != run(124));
  sampler unseeded({.temperature = 1.0f});
  sampler replay({.temperature = 1.0f, .seed = unseeded.seed()});
  for (int i = 0; i < 10; ++i) REQUIRE(unseeded.sample(logits) == replay.sample(logits));
}

TEST_CASE("sampling: a sampler rebuilt from the tokens already drawn continues as the original", "[sampling]") {
  // Different logits each step, penalties on: the rebuilt sampler must match both the random
  // stream and the penalty state of the original.
  const sampling_params params{.temperature = 0.8f, .top_p = 0.9f, .frequency_penalty = 0.3f, .seed = 99};
  std::vector<std::vector<float>> steps;
  for (std::uint32_t i = 0; i < 40; ++i) steps.push_back(random_logits(5000, 100 + i, 1.0f));
  sampler original(params);
  std::vector<token_id> drawn;
  for (const auto& l : steps) drawn.push_back(original.sample(l));
  for (std::size_t cut : {std::size_t{0}, std::size_t{1}, std::size_t{17}, std::size_t{39}}) {
    sampler rebuilt(params);
    for (std::size_t i = 0; i < cut; ++i) rebuilt.replay(drawn[i]);
    for (std::size_t i = cut; i < steps.size(); ++i) REQUIRE(rebuilt.sample(steps[i]) == drawn[i]);
  }
  // Plain `accept` does not advance the random stream, so it does not continue the same way.
  sampler accepted(params);
  for (std::size_t i = 0; i < 17; ++i) accepted.accept(drawn[i]);
  std::vector<token_id> rest, expected(drawn.begin() + 17, drawn.end());
  for (std::size_t i = 17; i < steps.size(); ++i) rest.push_back(accepted.sample(steps[i]));
  CHECK(rest != expected);
}

TEST_CASE("sampling: penalties", "[sampling]") {
  std::vector<float> logits = {3.0f, 2.9f, 1.0f, -1.0f};
  SECTION("repetition penalty covers the prompt and divides positive logits") {
    const std::vector<token_id> prompt = {0};
    sampler s({.repetition_penalty = 1.5f}, prompt);
    CHECK(s.sample(logits) == 1);  // 3.0 / 1.5 = 2.0 < 2.9
    CHECK(s.sample(logits) == 0);  // 1 is now penalised too: 2.9 / 1.5 = 1.93 < 2.0
  }
  SECTION("frequency penalty grows with each occurrence in the output") {
    sampler s({.frequency_penalty = 0.06f});
    CHECK(s.sample(logits) == 0);  // 3.0
    CHECK(s.sample(logits) == 0);  // 2.94 > 2.9
    CHECK(s.sample(logits) == 1);  // 2.88 < 2.9
  }
  SECTION("presence penalty applies once") {
    sampler s({.presence_penalty = 0.2f});
    CHECK(s.sample(logits) == 0);
    CHECK(s.sample(logits) == 1);  // 2.8 < 2.9
    CHECK(s.sample(logits) == 0);  // 2.8 > 2.7
  }
  SECTION("negative logits are multiplied") {
    std::vector<float> neg = {-1.0f, -1.2f};
    sampler s({.repetition_penalty = 1.5f}, std::vector<token_id>{0});
    CHECK(s.sample(neg) == 1);  // -1.5 < -1.2
  }
}

TEST_CASE("sampling: ids beyond the tokenizer are never chosen", "[sampling]") {
  std::vector<float> logits(100, 0.0f);
  logits[99] = 100.0f;
  sampler greedy({}, {}, 90);
  CHECK(greedy.sample(logits) < 90);
  sampler hot({.temperature = 1.0f, .seed = 3}, {}, 90);
  for (int i = 0; i < 1000; ++i) REQUIRE(hot.sample(logits) < 90);
}

TEST_CASE("sampling: out-of-range parameters are refused", "[sampling]") {
  auto rejects = [](sampling_params p) {
    try {
      sampler s(p);
      return false;
    } catch (const shoal::error& e) {
      return e.code() == errc::invalid_argument;
    }
  };
  CHECK(rejects({.temperature = -1.0f}));
  CHECK(rejects({.top_k = -2}));
  CHECK(rejects({.top_p = 0.0f}));
  CHECK(rejects({.top_p = 1.5f}));
  CHECK(rejects({.min_p = -0.1f}));
  CHECK(rejects({.repetition_penalty = 0.0f}));
  CHECK(rejects({.frequency_penalty = 3.0f}));
  CHECK_FALSE(rejects({.temperature = 0.7f, .top_k = 40, .top_p = 0.9f, .min_p = 0.05f}));
}
