/* y = x @ W.T for GGUF block-quantized matrices, on x86-64 with AVX2, FMA and F16C.
 *
 * samplerkit compiles this file at run time with the system C compiler (see ../native.py) and
 * calls it through ctypes; where that is not possible the backend keeps torch's int4 kernel.
 *
 * Weights: the file's codes, regrouped into tiles of 4 output rows x 32 inputs (one GGUF block
 * per row), so that one pass streams a tile's scales and codes from one place:
 *
 *   Q4 tile, scales in float16 (80 bytes):  f16 scale[4], f16 zero[4], u8 codes[4][16]
 *   Q4 tile, scales in float32 (96 bytes):  f32 scale[4], f32 zero[4], u8 codes[4][16]
 *   Q8 tile, scales in float16 (136 bytes): f16 scale[4], i8 codes[4][32]
 *
 * A Q4 code byte j of row r holds input j (low nibble) and input j + 16 (high nibble), ggml's
 * order; the weight is w = scale[r] * c + zero[r] (Q4_1: scale d, zero m; Q4_0: d and -8 d;
 * Q4_K: d sc and -dmin m). A Q8 weight is w = scale[r] * c.
 *
 * Math: the codes are exact small integers in float32, the activations stay float32, and
 *
 *     y[i, n] = sum_g scale[n, g] * (sum_j c[n, 32g + j] x[i, 32g + j])  +  sum_g zero[n, g] * S[i, g]
 *
 * with S[i, g] = sum_j x[i, 32g + j] computed once per call (this is sum_k w[n, k] x[i, k]
 * regrouped: one scaling per group instead of per weight, the cheapest form at one row). The
 * scales are the file's (float16 is exact for Q4_0, Q4_1 and Q8_0; Q4_K's d * sc, a float32
 * product, is exact too). Unlike llama.cpp (8-bit activations) and torch's int4 kernel (bfloat16
 * activations and scales), no operand is rounded below float32: the result is the exact model's
 * product up to float32 rounding of the sums. A prefill's dense copy (*_dequantize) computes each
 * weight as fma(c, scale, zero): for float16 scales bit-identical to gguf's own dequantizer.
 *
 * Batch invariance: output (i, n) is accumulated in one 8-lane register over the groups in
 * order (four FMAs for the group's dot product, one to scale it), then summed across lanes in a
 * fixed order, plus its zero term summed over the groups in order -- whichever kernel variant
 * (rows of x per pass, rows of W per pass) and thread computes it. So a row of x gets the same
 * bits alone, at any position of any batch, and with any thread count.
 *
 * Speed: at one row a product is bound by converting codes to floats (about 16 vector
 * instructions per row and group of 32) and by memory latency; the loop prefetches PREFETCH
 * bytes ahead (measured best at 2 KB on an AMD EPYC, docs/performance.md). Below the products
 * are a decode step's fused glue (RMSNorm, SiLU, rotary, attention), so a layer costs four
 * calls from Python instead of about thirty torch ops.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <immintrin.h>

#define R 4         /* output rows per tile */
#define GROUP 32    /* inputs per block */
#ifndef PREFETCH
#define PREFETCH 2048
#endif

enum { Q4H_TILE = 80, Q4F_TILE = 96, Q8H_TILE = 136 };
#define HEAD_BLOCK 4  /* q heads of one kv head that decode attention serves per pass over the keys */

int blockmm_abi(void) { return 2; }

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Row r's 32 codes of one tile as floats (inputs 0-7, 8-15, 16-23, 24-31). The products scale
 * a group's dot product once; the prefill's dense copy makes each weight fma(c, scale, zero). */
static inline void codes_q4(const uint8_t *codes, __m256 *c) {
    __m256i lo = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)codes));
    __m256i hi = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(codes + 8)));
    const __m256i mask = _mm256_set1_epi32(15);
    c[0] = _mm256_cvtepi32_ps(_mm256_and_si256(lo, mask));
    c[1] = _mm256_cvtepi32_ps(_mm256_and_si256(hi, mask));
    c[2] = _mm256_cvtepi32_ps(_mm256_srli_epi32(lo, 4));
    c[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(hi, 4));
}
static inline void codes_q8(const uint8_t *codes, __m256 *c) {
    for (int s = 0; s < 4; s++)
        c[s] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(codes + 8 * s))));
}

/* acc += scale * (c . x) over one group: the dot product in 8 lanes, then one scaling FMA. */
static inline __m256 group_dot(const __m256 *c, const float *x, __m256 scale, __m256 acc) {
    __m256 dot = _mm256_mul_ps(c[0], _mm256_loadu_ps(x));
    dot = _mm256_fmadd_ps(c[1], _mm256_loadu_ps(x + 8), dot);
    dot = _mm256_fmadd_ps(c[2], _mm256_loadu_ps(x + 16), dot);
    dot = _mm256_fmadd_ps(c[3], _mm256_loadu_ps(x + 24), dot);
    return _mm256_fmadd_ps(dot, scale, acc);
}

/* sums[i * G + g] = the sum of row i's inputs in group g (for the zero term), in a fixed order. */
static void group_sums(const float *x, int64_t M, int64_t K, float *sums) {
    const int64_t G = K / GROUP;
    for (int64_t i = 0; i < M; i++)
        for (int64_t g = 0; g < G; g++) {
            const float *p = x + i * K + g * GROUP;
            __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)),
                                     _mm256_add_ps(_mm256_loadu_ps(p + 16), _mm256_loadu_ps(p + 24)));
            sums[i * G + g] = hsum(s);
        }
}

/* The tile header's scales (lanes 0-3) and zeros (lanes 4-7; 0 for Q8) as 8 floats. */
static inline __m256 header8_h(const uint8_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
static inline __m256 header8_q8(const uint8_t *p) {      /* zeros: explicitly 0 (a cast leaves them undefined) */
    return _mm256_set_m128(_mm_setzero_ps(), _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)p)));
}
static inline __m256 header8_f(const uint8_t *p) { return _mm256_loadu_ps((const float *)p); }
static inline __m256 lane(__m256 v, int r) { return _mm256_permutevar8x32_ps(v, _mm256_set1_epi32(r)); }

/* One tile (4 output rows) against MB rows of x. Output (i, n) is
 *     sum over groups g, in order, of  scale[n, g] * (c[n, g] . x[i, g])     (8 lanes, then hsum)
 *   + sum over groups g, in order, of  zero[n, g] * sums[i, g]                (one float lane)
 * computed identically by every variant:
 *   _all: the 4 output rows together (MB * 4 accumulators: MB <= 2 stays in registers);
 *   _row: one output row at a time (MB accumulators), the tile coming from L1 after the first.
 * The zero term runs in the 4 lanes of an SSE register, one lane per output row of the tile. */
#define TILE_KERNELS(FMT, TILE, HEADER8, CODES, CODE_BYTES)                                 \
static inline void FMT##_all(int MB, const uint8_t *t, const float *x, const float *sums, int64_t K,   \
                             int64_t G, float *y, int64_t N) {                                         \
    __m256 acc[2][R]; __m128 zacc[2];                                                                  \
    for (int i = 0; i < 2; i++) { zacc[i] = _mm_setzero_ps();                                          \
        for (int r = 0; r < R; r++) acc[i][r] = _mm256_setzero_ps(); }                                 \
    for (int64_t g = 0; g < G; g++) {                                                                  \
        const uint8_t *p = t + g * TILE; __m256 h = HEADER8(p);                                        \
        _mm_prefetch((const char *)p + PREFETCH, _MM_HINT_T0);                                         \
        _mm_prefetch((const char *)p + PREFETCH + 64, _MM_HINT_T0);                                    \
        float hs[8]; _mm256_storeu_ps(hs, h);                                                          \
        for (int r = 0; r < R; r++) {                                                                  \
            __m256 c[4]; CODES(p + (TILE - R * CODE_BYTES) + CODE_BYTES * r, c);                       \
            __m256 d = _mm256_broadcast_ss(hs + r);                                                    \
            for (int i = 0; i < MB; i++) acc[i][r] = group_dot(c, x + i * K + g * GROUP, d, acc[i][r]); \
        }                                                                                              \
        __m128 z = _mm256_extractf128_ps(h, 1);                                                        \
        for (int i = 0; i < MB; i++) zacc[i] = _mm_fmadd_ps(z, _mm_set1_ps(sums[i * G + g]), zacc[i]); \
    }                                                                                                  \
    for (int i = 0; i < MB; i++) {                                                                     \
        float zs[4]; _mm_storeu_ps(zs, zacc[i]);                                                       \
        for (int r = 0; r < R; r++) y[i * N + r] = hsum(acc[i][r]) + zs[r];                            \
    }                                                                                                  \
}                                                                                                      \
static inline void FMT##_row(int MB, const uint8_t *t, const float *x, const float *sums, int64_t K,   \
                             int64_t G, float *y, int64_t N) {                                         \
    float zs[8][4];                                                                                    \
    for (int i = 0; i < MB; i++) {                                                                     \
        __m128 zacc = _mm_setzero_ps();                                                                \
        for (int64_t g = 0; g < G; g++) {                                                              \
            if (i == 0) {                                                                              \
                _mm_prefetch((const char *)t + g * TILE + PREFETCH, _MM_HINT_T0);                      \
                _mm_prefetch((const char *)t + g * TILE + PREFETCH + 64, _MM_HINT_T0);                 \
            }                                                                                          \
            zacc = _mm_fmadd_ps(_mm256_extractf128_ps(HEADER8(t + g * TILE), 1), _mm_set1_ps(sums[i * G + g]), zacc); \
        }                                                                                              \
        _mm_storeu_ps(zs[i], zacc);                                                                    \
    }                                                                                                  \
    for (int r = 0; r < R; r++) {                                                                      \
        __m256 acc[8];                                                                                 \
        for (int i = 0; i < 8; i++) acc[i] = _mm256_setzero_ps();                                      \
        for (int64_t g = 0; g < G; g++) {                                                              \
            const uint8_t *p = t + g * TILE;                                                           \
            __m256 c[4]; CODES(p + (TILE - R * CODE_BYTES) + CODE_BYTES * r, c);                       \
            __m256 d = lane(HEADER8(p), r);                                                            \
            for (int i = 0; i < MB; i++) acc[i] = group_dot(c, x + i * K + g * GROUP, d, acc[i]);      \
        }                                                                                              \
        for (int i = 0; i < MB; i++) y[i * N + r] = hsum(acc[i]) + zs[i][r];                           \
    }                                                                                                  \
}                                                                                                      \
/* y[M, N] = x[M, K] @ W.T; W is N/4 tiles of K/32 groups. Tiles are split between threads; */        \
/* within a tile, the rows of x go 8, 4, 2, then 1 at a time (the tile stays in L1). 0 on success. */  \
int FMT##_mm(const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, float *y, int nthreads) { \
    const int64_t G = K / GROUP, tiles = N / R;                                                        \
    float stack_sums[8 * 64];                                                                          \
    float *sums = M * G <= 8 * 64 ? stack_sums : (float *)malloc(sizeof(float) * M * G);               \
    if (!sums) return -1;                                                                              \
    group_sums(x, M, K, sums);                                                                         \
    _Pragma("omp parallel for schedule(static) num_threads(nthreads)")                                 \
    for (int64_t t = 0; t < tiles; t++) {                                                              \
        const uint8_t *tile = w + t * G * TILE;                                                        \
        int64_t i = 0;                                                                                 \
        for (; i + 8 <= M; i += 8) FMT##_row(8, tile, x + i * K, sums + i * G, K, G, y + i * N + t * R, N); \
        for (; i + 4 <= M; i += 4) FMT##_row(4, tile, x + i * K, sums + i * G, K, G, y + i * N + t * R, N); \
        for (; i + 2 <= M; i += 2) FMT##_all(2, tile, x + i * K, sums + i * G, K, G, y + i * N + t * R, N); \
        for (; i < M; i++) FMT##_all(1, tile, x + i * K, sums + i * G, K, G, y + i * N + t * R, N);   \
    }                                                                                                  \
    if (sums != stack_sums) free(sums);                                                                \
    return 0;                                                                                          \
}                                                                                                      \
/* The dense matrix W [N, K] in float32 (a prefill's transient copy), w = fma(c, scale, zero). */    \
void FMT##_dequantize(const uint8_t *w, int64_t N, int64_t K, float *out, int nthreads) {              \
    const int64_t G = K / GROUP, tiles = N / R;                                                        \
    _Pragma("omp parallel for schedule(static) num_threads(nthreads)")                                 \
    for (int64_t t = 0; t < tiles; t++) {                                                              \
        for (int64_t g = 0; g < G; g++) {                                                              \
            const uint8_t *p = w + (t * G + g) * TILE; __m256 h = HEADER8(p);                          \
            for (int r = 0; r < R; r++) {                                                              \
                __m256 c[4]; CODES(p + (TILE - R * CODE_BYTES) + CODE_BYTES * r, c);                   \
                const __m256 d = lane(h, r), z = lane(h, 4 + r);     /* z = 0 for Q8 */                \
                float *o = out + (t * R + r) * K + g * GROUP;                                          \
                for (int s = 0; s < 4; s++) _mm256_storeu_ps(o + 8 * s, _mm256_fmadd_ps(c[s], d, z)); \
            }                                                                                          \
        }                                                                                              \
    }                                                                                                  \
}

TILE_KERNELS(q4h, Q4H_TILE, header8_h, codes_q4, 16)
TILE_KERNELS(q4f, Q4F_TILE, header8_f, codes_q4, 16)
TILE_KERNELS(q8h, Q8H_TILE, header8_q8, codes_q8, 32)

/* ---- A decode step's glue, fused around the products (one call instead of ~10 torch ops) ---- */

typedef int (*mm_fn)(const float *, int64_t, int64_t, const uint8_t *, int64_t, float *, int);

/* Tile formats by number, as the Python side passes them (native.FORMAT_IDS). */
static mm_fn mm_for(int fmt) {
    switch (fmt) {
    case 0: return q4h_mm;
    case 1: return q4f_mm;
    case 2: return q8h_mm;
    default: return 0;
    }
}

/* out[i] = x[i] / sqrt(mean(x[i]^2) + eps) * weight, row by row; the mean's sum runs in 8 lanes
 * then across them, in a fixed order (the same bits for a row whatever M is). */
void rms_norm(const float *x, int64_t M, int64_t K, const float *weight, float eps, float *out) {
    for (int64_t i = 0; i < M; i++) {
        const float *row = x + i * K;
        __m256 ss = _mm256_setzero_ps();
        int64_t k = 0;
        for (; k + 8 <= K; k += 8) { __m256 v = _mm256_loadu_ps(row + k); ss = _mm256_fmadd_ps(v, v, ss); }
        float sum = hsum(ss);
        for (; k < K; k++) sum = fmaf(row[k], row[k], sum);
        const float scale = 1.0f / sqrtf(sum / (float)K + eps);
        for (k = 0; k < K; k++) out[i * K + k] = row[k] * scale * weight[k];
    }
}

/* y[M, N] = rms_norm(x) @ W.T (attention's input norm and q/k/v product). 0 on success. */
int norm_mm(const float *x, int64_t M, int64_t K, const float *norm_weight, float eps,
            int fmt, const uint8_t *w, int64_t N, float *y, int nthreads) {
    mm_fn mm = mm_for(fmt);
    float *xn = (float *)malloc(sizeof(float) * M * K);
    if (!mm || !xn) { free(xn); return -1; }
    rms_norm(x, M, K, norm_weight, eps, xn);
    const int status = mm(xn, M, K, w, N, y, nthreads);
    free(xn);
    return status;
}

/* h[M, N] += x[M, K] @ W.T (the attention output's product and the residual add). 0 on success. */
int mm_add(const float *x, int64_t M, int64_t K, int fmt, const uint8_t *w, int64_t N, float *h, int nthreads) {
    mm_fn mm = mm_for(fmt);
    float *y = (float *)malloc(sizeof(float) * M * N);
    if (!mm || !y) { free(y); return -1; }
    const int status = mm(x, M, K, w, N, y, nthreads);
    if (status == 0)
        for (int64_t i = 0; i < M * N; i++) h[i] += y[i];
    free(y);
    return status;
}

/* The feed-forward block with its residual add, in place on h [M, K]:
 *   g, u = rms_norm(h) @ W_gate_up.T     (gate: the first I outputs, up: the next I)
 *   h   += (silu(g) * u) @ W_down.T       silu(g) = g / (1 + exp(-g))
 * 0 on success. */
int mlp(float *h, int64_t M, int64_t K, const float *norm_weight, float eps,
        int fmt_gate_up, const uint8_t *gate_up, int64_t I, int fmt_down, const uint8_t *down, int nthreads) {
    mm_fn mm_gu = mm_for(fmt_gate_up), mm_down = mm_for(fmt_down);
    float *xn = (float *)malloc(sizeof(float) * M * (K + 3 * I + K));
    if (!mm_gu || !mm_down || !xn) { free(xn); return -1; }
    float *gu = xn + M * K, *act = gu + M * 2 * I, *out = act + M * I;
    rms_norm(h, M, K, norm_weight, eps, xn);
    if (mm_gu(xn, M, K, gate_up, 2 * I, gu, nthreads) != 0) { free(xn); return -1; }
    for (int64_t i = 0; i < M; i++)
        for (int64_t j = 0; j < I; j++) {
            const float g = gu[i * 2 * I + j];
            act[i * I + j] = g / (1.0f + expf(-g)) * gu[i * 2 * I + I + j];
        }
    const int status = mm_down(act, M, I, down, K, out, nthreads);
    if (status == 0)
        for (int64_t i = 0; i < M * K; i++) h[i] += out[i];
    free(xn);
    return status;
}

/* One decode step's attention for B rows, in place of rotary + cache writes + attention:
 *   qkv [B, (H + 2 KVH) D]: each row's q heads, k heads, v heads (from norm_mm); q and k are
 *     rotated in place: pair (x[2i], x[2i+1]) of a head by the angle of position pos[b] and
 *     frequency i, rope[(pos * D/2 + i) * 2 + {0, 1}] = (cos, sin), as a complex product;
 *   the row's k and v heads are written to column t of k_cache, v_cache [B, KVH, cap, D];
 *   out [B, H D]: for q head h (kv head h / (H / KVH)), softmax(q . k_s / sqrt(D)) over the
 *     row's keys s = start[b] .. t, times v_s, summed over s in order.
 * Each (row, kv head) is computed on its own, in a fixed order: batch-invariant. 0 on success. */
int attend_decode(float *qkv, int64_t B, int64_t H, int64_t KVH, int64_t D, const float *rope,
                  const int64_t *pos, float *k_cache, float *v_cache, int64_t cap, int64_t t,
                  const int64_t *start, float *out, int nthreads) {
    const int64_t width = (H + 2 * KVH) * D, rep = H / KVH, half = D / 2;
    if (D % 8 != 0 || H % KVH != 0) return -1;
    for (int64_t b = 0; b < B; b++) {                 /* rotate q and k, write k and v */
        float *row = qkv + b * width;
        const float *cs = rope + pos[b] * half * 2;
        for (int64_t hh = 0; hh < H + KVH; hh++) {
            float *x = row + hh * D;
            for (int64_t i = 0; i < half; i++) {
                const float re = x[2 * i], im = x[2 * i + 1], c = cs[2 * i], s = cs[2 * i + 1];
                x[2 * i] = re * c - im * s;
                x[2 * i + 1] = re * s + im * c;
            }
        }
        for (int64_t j = 0; j < KVH; j++) {
            memcpy(k_cache + ((b * KVH + j) * cap + t) * D, row + (H + j) * D, sizeof(float) * D);
            memcpy(v_cache + ((b * KVH + j) * cap + t) * D, row + (H + KVH + j) * D, sizeof(float) * D);
        }
    }
    int failed = 0;
    const float scale = 1.0f / sqrtf((float)D);
    _Pragma("omp parallel for schedule(static) num_threads(nthreads)")
    for (int64_t bj = 0; bj < B * KVH; bj++) {
        const int64_t b = bj / KVH, j = bj % KVH, s0 = start[b], n = t + 1 - s0;
        const float *keys = k_cache + ((b * KVH + j) * cap + s0) * D;
        const float *vals = v_cache + ((b * KVH + j) * cap + s0) * D;
        float *p = (float *)malloc(sizeof(float) * HEAD_BLOCK * (n > 0 ? n : 1));
        if (!p) { failed = 1; continue; }
        /* The kv head's q heads, up to HEAD_BLOCK at a time: each key and value is loaded once
         * for all of them (the order of every head's sums is the same as one head at a time). */
        for (int64_t r0 = 0; r0 < rep; r0 += HEAD_BLOCK) {
            const int hb = (int)(rep - r0 < HEAD_BLOCK ? rep - r0 : HEAD_BLOCK);
            const float *q[HEAD_BLOCK];
            float top[HEAD_BLOCK], inv[HEAD_BLOCK];
            for (int r = 0; r < hb; r++) { q[r] = qkv + b * width + (j * rep + r0 + r) * D; top[r] = -INFINITY; }
            for (int64_t s = 0; s < n; s++) {                    /* scores: q . k / sqrt(D) */
                __m256 acc[HEAD_BLOCK];
                for (int r = 0; r < hb; r++) acc[r] = _mm256_setzero_ps();
                for (int64_t d = 0; d < D; d += 8) {
                    const __m256 k8 = _mm256_loadu_ps(keys + s * D + d);
                    for (int r = 0; r < hb; r++) acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(q[r] + d), k8, acc[r]);
                }
                for (int r = 0; r < hb; r++) {
                    const float v = hsum(acc[r]) * scale;
                    p[r * n + s] = v;
                    if (v > top[r]) top[r] = v;
                }
            }
            for (int r = 0; r < hb; r++) {                       /* softmax numerators, their sum */
                float total = 0.0f;
                for (int64_t s = 0; s < n; s++) { p[r * n + s] = expf(p[r * n + s] - top[r]); total += p[r * n + s]; }
                inv[r] = 1.0f / total;
            }
            for (int64_t d = 0; d < D; d += 16) {                /* sum_s p_s v_s, 16 dims at a time */
                const int two = d + 16 <= D;
                __m256 lo[HEAD_BLOCK], hi[HEAD_BLOCK];
                for (int r = 0; r < hb; r++) lo[r] = hi[r] = _mm256_setzero_ps();
                for (int64_t s = 0; s < n; s++) {
                    const __m256 v0 = _mm256_loadu_ps(vals + s * D + d);
                    const __m256 v1 = two ? _mm256_loadu_ps(vals + s * D + d + 8) : v0;
                    for (int r = 0; r < hb; r++) {
                        const __m256 w = _mm256_set1_ps(p[r * n + s] * inv[r]);
                        lo[r] = _mm256_fmadd_ps(w, v0, lo[r]);
                        if (two) hi[r] = _mm256_fmadd_ps(w, v1, hi[r]);
                    }
                }
                for (int r = 0; r < hb; r++) {
                    float *o = out + b * H * D + (j * rep + r0 + r) * D + d;
                    _mm256_storeu_ps(o, lo[r]);
                    if (two) _mm256_storeu_ps(o + 8, hi[r]);
                }
            }
        }
        free(p);
    }
    return failed ? -1 : 0;
}
