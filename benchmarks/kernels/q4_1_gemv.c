/* A 4-bit GEMV with a float minimum per block (llama.cpp's Q4_1 form: w = q*d + m), for
 * benchmarks/int4_gemv.py: how far a plain hand-written kernel gets past onnxruntime's MatMulNBits
 * on weights that do not fit in cache. Not used by onnxlm.
 *
 * Block of 32 weights: float d, float m, 16 bytes of nibbles (element j in the low nibble of byte j,
 * element 16 + j in the high one): 24 bytes, the bytes MatMulNBits packs a symmetric block into
 * (16 of data, a float scale, a float block sum). Activations are quantized per block of 32 to int8
 * (scale and the float sum of the block kept), then each block is one AVX-512 VNNI dot product
 * (256-bit form): y[n] = sum_b d*sx*dot(q, xq) + m*sum(x). Two or more threads split the rows of each
 * matrix and meet at a spinning barrier between matrices, as onnxruntime's thread pool does.
 */
#include <immintrin.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

typedef struct {
  float d, m;
  uint8_t q[16];
} block_t;

enum { MAX_K = 8192, MAX_THREADS = 16 };

static void quantize_x(const float *x, int k, int8_t *xq, float *xs, float *xsum) {
  for (int b = 0; b < k / 32; b++) {
    float amax = 0.f, sum = 0.f;
    for (int i = 0; i < 32; i++) {
      amax = fmaxf(amax, fabsf(x[b * 32 + i]));
      sum += x[b * 32 + i];
    }
    float inv = amax > 0.f ? 127.f / amax : 0.f;
    for (int i = 0; i < 32; i++) xq[b * 32 + i] = (int8_t)lrintf(x[b * 32 + i] * inv);
    xs[b] = amax / 127.f;
    xsum[b] = sum;
  }
}

static inline float sum8(__m256 v) {
  __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_add_ps(a, _mm_movehl_ps(a, a));
  return _mm_cvtss_f32(_mm_add_ss(a, _mm_movehdup_ps(a)));
}

static void rows(const block_t *w, int kb, const int8_t *xq, const float *xs, const float *xsum, float *y,
                 int n0, int n1, int prefetch) {
  const __m128i low = _mm_set1_epi8(0x0f);
  for (int n = n0; n < n1; n++) {
    const block_t *row = w + (size_t)n * kb;
    __m256 acc = _mm256_setzero_ps();
    float offset = 0.f;
    for (int b = 0; b < kb; b++) {
      if (prefetch) _mm_prefetch((const char *)(row + b) + prefetch, _MM_HINT_T0);
      __m128i raw = _mm_loadu_si128((const __m128i *)row[b].q);
      __m256i q = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), low), _mm_and_si128(raw, low));
      __m256i a = _mm256_loadu_si256((const __m256i *)(xq + b * 32));
      __m256i dot = _mm256_dpbusd_epi32(_mm256_setzero_si256(), q, a);
      acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(row[b].d * xs[b]), acc);
      offset += row[b].m * xsum[b];
    }
    y[n] = sum8(acc) + offset;
  }
}

/* y = W x for one (N, K) matrix, one thread: the correctness check */
void q4_1_gemv(const block_t *w, int k, int n, const float *x, float *y) {
  static int8_t xq[MAX_K];
  static float xs[MAX_K / 32], xsum[MAX_K / 32];
  quantize_x(x, k, xq, xs, xsum);
  rows(w, k / 32, xq, xs, xsum, y, 0, n, 0);
}

/* --- a chain of matrices, each one's output the next one's input, on a spinning thread pool --- */
static struct {
  const block_t *const *w;
  const int *k, *n;
  int count, threads, prefetch;
  float *a, *b;
  int8_t xq[MAX_K];
  float xs[MAX_K / 32], xsum[MAX_K / 32];
  atomic_int arrived, generation, start, quit;
} pool;
static pthread_t workers[MAX_THREADS];
static int started;

static void barrier(void) {
  int g = atomic_load(&pool.generation);
  if (atomic_fetch_add(&pool.arrived, 1) == pool.threads - 1) {
    atomic_store(&pool.arrived, 0);
    atomic_fetch_add(&pool.generation, 1);
  } else {
    while (atomic_load(&pool.generation) == g) _mm_pause();
  }
}

static void run_chain(int t) {
  float *x = pool.a, *y = pool.b;
  for (int i = 0; i < pool.count; i++) {
    if (t == 0) quantize_x(x, pool.k[i], pool.xq, pool.xs, pool.xsum);
    barrier();
    int share = (pool.n[i] + pool.threads - 1) / pool.threads, n0 = t * share;
    int n1 = n0 + share < pool.n[i] ? n0 + share : pool.n[i];
    rows(pool.w[i], pool.k[i] / 32, pool.xq, pool.xs, pool.xsum, y, n0, n1, pool.prefetch);
    barrier();
    float *swap = x;
    x = y;
    y = swap;
  }
}

static void *worker(void *arg) {
  int t = (int)(intptr_t)arg, seen = 0;
  for (;;) {
    while (atomic_load(&pool.start) == seen) {
      if (atomic_load(&pool.quit)) return 0;
      _mm_pause();
    }
    seen = atomic_load(&pool.start);
    run_chain(t);
  }
}

/* Runs the chain from `a` (ping-ponging with `b`); returns 0, or -1 for a bad argument. */
int q4_1_chain(const block_t *const *w, const int *k, const int *n, int count, float *a, float *b,
               int threads, int prefetch) {
  if (threads < 1 || threads > MAX_THREADS || (started && threads != pool.threads)) return -1;
  for (int i = 0; i < count; i++)
    if (k[i] % 32 || k[i] > MAX_K) return -1;
  pool.w = w, pool.k = k, pool.n = n, pool.count = count, pool.a = a, pool.b = b;
  pool.threads = threads, pool.prefetch = prefetch;
  if (!started) {
    for (int t = 1; t < threads; t++) pthread_create(&workers[t], 0, worker, (void *)(intptr_t)t);
    started = 1;
  }
  atomic_fetch_add(&pool.start, 1);
  run_chain(0);
  return 0;
}

void q4_1_stop(void) {
  atomic_store(&pool.quit, 1);
  for (int t = 1; started && t < pool.threads; t++) pthread_join(workers[t], 0);
  started = 0;
}
