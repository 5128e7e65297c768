#include "shoal/kernels/cuda/sampling.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

namespace shoal::kernels::cuda::reference {

void sample(const sampling_params& p) {
  std::vector<std::int32_t> order(static_cast<std::size_t>(p.vocab));
  for (std::int64_t b = 0; b < p.batch; ++b) {
    const float* x = p.logits + b * p.vocab;
    const float max = *std::max_element(x, x + p.vocab);
    if (p.temperature[b] <= 0.0f) {
      p.tokens[b] = static_cast<std::int32_t>(std::find(x, x + p.vocab, max) - x);
      continue;
    }
    const float t = p.temperature[b];
    float z = 0.0f;
    for (std::int64_t i = 0; i < p.vocab; ++i) z += std::exp((x[i] - max) / t);
    std::int64_t k = p.top_k[b] <= 0 ? kSamplingMaxCandidates : p.top_k[b];
    k = std::min({k, kSamplingMaxCandidates, p.vocab});
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + k, order.end(),
                      [&](std::int32_t i, std::int32_t j) { return x[i] > x[j] || (x[i] == x[j] && i < j); });
    std::vector<float> cumulative(static_cast<std::size_t>(k));
    float running = 0.0f;
    std::int64_t kept = 0;
    for (std::int64_t i = 0; i < k; ++i) {
      if (running >= p.top_p[b]) break;  // the mass before this candidate already reaches top_p
      running += std::exp((x[order[i]] - max) / t) / z;
      cumulative[i] = running;
      kept = i + 1;
    }
    const float target = p.uniform[b] * running;
    std::int64_t pick = kept - 1;
    for (std::int64_t i = 0; i < kept; ++i)
      if (cumulative[i] > target) {
        pick = i;
        break;
      }
    p.tokens[b] = order[pick];
  }
}

}  // namespace shoal::kernels::cuda::reference
