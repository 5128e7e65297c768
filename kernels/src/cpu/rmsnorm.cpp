#include "shoal/kernels/rmsnorm.hpp"

#include "shoal/kernels/thread_pool.hpp"

#include <cmath>

namespace shoal::kernels {
namespace {

void rmsnorm_rows(const rmsnorm_params& p, std::int64_t begin, std::int64_t end) {
  const std::int64_t xs = p.x_stride ? p.x_stride : p.dim;
  const std::int64_t ys = p.y_stride ? p.y_stride : p.dim;
  for (std::int64_t r = begin; r < end; ++r) {
    const float* x = p.x + r * xs;
    float* y = p.y + r * ys;
    // Eight partial sums let the compiler vectorize without reassociation flags.
    float partial[8] = {};
    std::int64_t i = 0;
    for (; i + 8 <= p.dim; i += 8)
      for (int j = 0; j < 8; ++j) partial[j] += x[i + j] * x[i + j];
    float sum = 0.0f;
    for (float value : partial) sum += value;
    for (; i < p.dim; ++i) sum += x[i] * x[i];
    const float inv = 1.0f / std::sqrt(sum / static_cast<float>(p.dim) + p.eps);
    for (std::int64_t k = 0; k < p.dim; ++k) y[k] = p.weight[k] * (x[k] * inv);
  }
}

}  // namespace

void rmsnorm(thread_pool& pool, const rmsnorm_params& params) {
  if (params.rows < 4) {
    rmsnorm_rows(params, 0, params.rows);
    return;
  }
  pool.parallel_for(params.rows, [&](std::int64_t begin, std::int64_t end) {
    rmsnorm_rows(params, begin, end);
  });
}

namespace reference {
void rmsnorm(const rmsnorm_params& p) {
  const std::int64_t xs = p.x_stride ? p.x_stride : p.dim;
  const std::int64_t ys = p.y_stride ? p.y_stride : p.dim;
  for (std::int64_t r = 0; r < p.rows; ++r) {
    const float* x = p.x + r * xs;
    float* y = p.y + r * ys;
    double sum = 0.0;
    for (std::int64_t i = 0; i < p.dim; ++i) sum += static_cast<double>(x[i]) * x[i];
    const float inv =
        static_cast<float>(1.0 / std::sqrt(sum / static_cast<double>(p.dim) + p.eps));
    for (std::int64_t i = 0; i < p.dim; ++i) y[i] = p.weight[i] * (x[i] * inv);
  }
}
}  // namespace reference

}  // namespace shoal::kernels
