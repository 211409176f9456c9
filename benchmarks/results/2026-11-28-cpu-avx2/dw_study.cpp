#include <chrono>
#include <cstdio>
#include <vector>
#include <cstdlib>
typedef float vec __attribute__((vector_size(32)));
static inline vec ld(const float* p) { vec v; __builtin_memcpy(&v, p, 32); return v; }
static inline void st(float* p, vec v) { __builtin_memcpy(p, &v, 32); }
template <int P, int S>
__attribute__((always_inline)) inline void block(const float* const* rows, long C, const float* wt, vec bias, float* out) {
  vec acc[P];
#pragma GCC unroll 16
  for (int p = 0; p < P; ++p) acc[p] = bias;
#pragma GCC unroll 3
  for (int dy = 0; dy < 3; ++dy) {
    const float* r = rows[dy];
    const long Cs = C;
    const vec w0 = ld(wt + (dy * 3) * C), w1 = ld(wt + (dy * 3 + 1) * C), w2 = ld(wt + (dy * 3 + 2) * C);
#pragma GCC unroll 32
    for (int j = 0; j < (P - 1) * S + 3; ++j) {
      const vec xv = ld(r);
      r += Cs;
      asm("" : "+r"(r));
#pragma GCC unroll 16
      for (int p = 0; p < P; ++p) {
        const int dx = j - p * S;
        if (dx == 0) acc[p] += w0 * xv;
        else if (dx == 1) acc[p] += w1 * xv;
        else if (dx == 2) acc[p] += w2 * xv;
      }
    }
  }
#pragma GCC unroll 16
  for (int p = 0; p < P; ++p) st(out + p * C, acc[p]);
}
template <int P>
__attribute__((noinline)) void row_block(const float* r0, long W, long C, const float* wt, float* out) {
  const float* rows[3] = {r0, r0 + W * C, r0 + 2 * W * C};
  for (long ow = 1; ow + P <= W - 1; ow += P) {
    const long o = (ow - 1) * C;
    const float* rr[3] = {rows[0] + o, rows[1] + o, rows[2] + o};
    for (long c = 0; c < C; c += 8) {
      const float* rc[3] = {rr[0] + c, rr[1] + c, rr[2] + c};
      block<P, 1>(rc, C, wt + c, vec{}, out + ow * C + c);
    }
  }
}
int main(int argc, char** argv) {
  long C = atol(argv[1]), W = atol(argv[2]), rows = atol(argv[3]);
  std::vector<float> x((rows + 2) * W * C + 64, 1.0f), y(rows * W * C + 64), wt(9 * C, 0.5f);
  const long reps = 200000000 / (W * C * rows) + 1;
  auto t0 = std::chrono::steady_clock::now();
  for (long r = 0; r < reps; ++r)
    for (long i = 0; i < rows; ++i) row_block<8>(x.data() + i * W * C, W, C, wt.data(), y.data() + i * W * C);
  auto t1 = std::chrono::steady_clock::now();
  double ns = std::chrono::duration<double, std::nano>(t1 - t0).count();
  double vecs = double(reps) * rows * ((W - 2) / 8 * 8) * C / 8;
  printf("P=8 C=%ld W=%ld rows=%ld (x %.0f KB): %.2f ns/vector = %.1f cycles @2.9GHz\n", C, W, rows, (rows + 2) * W * C * 4 / 1024.0, ns / vecs, ns / vecs * 2.9);
}
