#pragma once
// Private to the CPU kernels: small vector primitives with an AVX-512 path chosen at run time
// and a portable fallback, so the binary runs on any x86-64 (and elsewhere).

#include <cstdint>

#if defined(__x86_64__)
#include <immintrin.h>
// GCC 12 flags its own AVX-512 intrinsic headers (an undefined-vector idiom) as uninitialized
// use wherever they are inlined; this header is private to the kernel sources.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace shoal::kernels::detail {

#if defined(__x86_64__)
inline bool cpu_has_avx512() {
  static const bool supported = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                                __builtin_cpu_supports("avx512vl");
  return supported;
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) inline float dot_avx512(const float* a, const float* b,
                                                                              std::int64_t n) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  std::int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc0);
    acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), acc1);
  }
  for (; i < n; i += 16) {
    const __mmask16 mask = static_cast<__mmask16>(n - i >= 16 ? 0xffff : (1u << (n - i)) - 1u);
    acc0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, a + i), _mm512_maskz_loadu_ps(mask, b + i), acc0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) inline void axpy_avx512(float* y, float alpha, const float* x,
                                                                             std::int64_t n) {
  const __m512 a = _mm512_set1_ps(alpha);
  std::int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(y + i, _mm512_fmadd_ps(a, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
  if (i < n) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (n - i)) - 1u);
    _mm512_mask_storeu_ps(y + i, mask,
                          _mm512_fmadd_ps(a, _mm512_maskz_loadu_ps(mask, x + i), _mm512_maskz_loadu_ps(mask, y + i)));
  }
}
#endif

/// sum_i a[i] * b[i] in fp32.
inline float dot(const float* a, const float* b, std::int64_t n) {
#if defined(__x86_64__)
  if (cpu_has_avx512()) return dot_avx512(a, b, n);
#endif
  float partial[8] = {};
  std::int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) partial[j] += a[i + j] * b[i + j];
  float sum = 0.0f;
  for (float p : partial) sum += p;
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

/// y += alpha * x.
inline void axpy(float* y, float alpha, const float* x, std::int64_t n) {
#if defined(__x86_64__)
  if (cpu_has_avx512()) return axpy_avx512(y, alpha, x, n);
#endif
  for (std::int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

}  // namespace shoal::kernels::detail
