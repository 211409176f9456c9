#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <vector>
int main() {
  const long iters = 200000000;
  __m256 a[10]; for (int i = 0; i < 10; ++i) a[i] = _mm256_set1_ps(1.0f + i * 1e-7f);
  __m256 m = _mm256_set1_ps(0.9999999f), c = _mm256_set1_ps(1e-7f);
  auto t0 = std::chrono::steady_clock::now();
  for (long i = 0; i < iters; ++i) {
#pragma GCC unroll 10
    for (int k = 0; k < 10; ++k) a[k] = _mm256_fmadd_ps(a[k], m, c);
  }
  auto t1 = std::chrono::steady_clock::now();
  __m256 s = a[0]; for (int i = 1; i < 10; ++i) s = _mm256_add_ps(s, a[i]);
  double ns = std::chrono::duration<double, std::nano>(t1 - t0).count();
  printf("FMA throughput: %.2f FMA/ns (%.3f)\n", iters * 10.0 / ns, _mm256_cvtss_f32(s));
  // dependent chain: latency 4 cycles on Zen 3 -> gives GHz
  __m256 d = a[0];
  t0 = std::chrono::steady_clock::now();
  for (long i = 0; i < iters; ++i) d = _mm256_fmadd_ps(d, m, c);
  t1 = std::chrono::steady_clock::now();
  ns = std::chrono::duration<double, std::nano>(t1 - t0).count();
  printf("FMA chain: %.3f ns per FMA -> %.2f GHz if 4-cycle latency (%.3f)\n", ns / iters, 4.0 / (ns / iters), _mm256_cvtss_f32(d));
  // loads + FMA from L1: 16 KB buffer
  std::vector<float> buf(4096, 1.0f);
  __m256 acc[8]; for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
  const long it2 = 20000000;
  t0 = std::chrono::steady_clock::now();
  for (long i = 0; i < it2; ++i) {
    const float* p = buf.data() + (i & 15) * 256;
#pragma GCC unroll 16
    for (int k = 0; k < 16; ++k) acc[k & 7] = _mm256_fmadd_ps(_mm256_loadu_ps(p + k * 8), _mm256_loadu_ps(p + 128 + k * 8), acc[k & 7]);
  }
  t1 = std::chrono::steady_clock::now();
  s = acc[0]; for (int i = 1; i < 8; ++i) s = _mm256_add_ps(s, acc[i]);
  ns = std::chrono::duration<double, std::nano>(t1 - t0).count();
  printf("2 loads + 1 FMA from L1: %.2f loads/ns (%.1f)\n", it2 * 32.0 / ns, _mm256_cvtss_f32(s));
}
