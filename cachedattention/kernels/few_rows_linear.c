/* y = x @ w.T (+ bias) for a few rows of x, on a CPU: the linear layers of a decode step.
 *
 * A decode step multiplies every weight by as many rows as there are decoders (a handful). That is
 * a matter of reading the weights once, fast: MKL's GEMM for 4-16 rows reads them at 45-60 % of the
 * speed of its own one-row path (bench/few_rows_linear_timing.py). Here each thread streams its
 * share of weight rows once, four at a time, against up to four input rows held in L1, and asks for
 * the next four weight rows while it computes (software prefetch: the hardware's prefetcher stops
 * at every 4 KiB page). The sixteen dot products of a 4 x 4 tile are reduced together by a
 * transposing tree of shuffles instead of sixteen horizontal sums.
 *
 * Layouts (float32): w [out_features, in_features] contiguous (torch's nn.Linear weight); x rows
 * of in_features floats, x_stride apart; y rows of out_features floats, y_stride apart; bias
 * [out_features] or NULL. AVX-512 only: elsewhere few_rows_linear_supported() says no and the
 * caller keeps torch's GEMM.
 * Returns 0, or FRL_UNSUPPORTED.
 */
#include <stdint.h>

enum { FRL_OK = 0, FRL_UNSUPPORTED = 1 };

#if defined(__AVX512F__)
#include <immintrin.h>

#define TILE 4 /* weight rows and input rows per tile: 16 accumulators */

int few_rows_linear_supported(void) { return 1; }

/* Sixteen vectors to one: lane 4c + e holds the sum of the lanes of v[c + 4e]. */
static inline __m512 reduce16(const __m512 *v) {
    __m512 t[8], u[4], w[2];
    for (int p = 0; p < 8; p++) /* 256-bit halves: t[p] = (v[2p] half-summed | v[2p+1] half-summed) */
        t[p] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * p], v[2 * p + 1], 0x44),
                             _mm512_shuffle_f32x4(v[2 * p], v[2 * p + 1], 0xEE));
    for (int r = 0; r < 4; r++) /* 128-bit quarters: quarter c of u[r] sums v[4r + c] */
        u[r] = _mm512_add_ps(_mm512_shuffle_f32x4(t[2 * r], t[2 * r + 1], 0x88),
                             _mm512_shuffle_f32x4(t[2 * r], t[2 * r + 1], 0xDD));
    for (int s = 0; s < 2; s++) /* pairs of lanes inside each quarter */
        w[s] = _mm512_add_ps(_mm512_shuffle_ps(u[2 * s], u[2 * s + 1], 0x44),
                             _mm512_shuffle_ps(u[2 * s], u[2 * s + 1], 0xEE));
    return _mm512_add_ps(_mm512_shuffle_ps(w[0], w[1], 0x88), _mm512_shuffle_ps(w[0], w[1], 0xDD));
}

/* y[j][i] = dot(x[j], w[i]) for i < nr weight rows, j < mr input rows (both at most TILE); inlined
 * with constant nr and mr, so the loops unroll into registers. When `prefetch`, ask for the weight
 * rows of the next tile, at the same offsets. */
static inline __attribute__((always_inline)) void tile(const float *restrict x, int64_t x_stride,
                                                       const float *restrict w, int64_t k_len, float *restrict y,
                                                       int64_t y_stride, const float *restrict bias, const int nr,
                                                       const int mr, const int prefetch) {
    __m512 acc[TILE * TILE];
    for (int t = 0; t < TILE * TILE; t++) acc[t] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= k_len; k += 16) {
        __m512 wv[TILE];
        for (int i = 0; i < nr; i++) wv[i] = _mm512_loadu_ps(w + i * k_len + k);
        if (prefetch)
            for (int i = 0; i < nr; i++) _mm_prefetch((const char *)(w + (nr + i) * k_len + k), _MM_HINT_T0);
        for (int j = 0; j < mr; j++) {
            const __m512 xv = _mm512_loadu_ps(x + j * x_stride + k);
            for (int i = 0; i < nr; i++) acc[i + TILE * j] = _mm512_fmadd_ps(wv[i], xv, acc[i + TILE * j]);
        }
    }
    if (k < k_len) { /* the last in_features % 16, masked */
        const __mmask16 mask = (__mmask16)((1u << (k_len - k)) - 1);
        __m512 wv[TILE];
        for (int i = 0; i < nr; i++) wv[i] = _mm512_maskz_loadu_ps(mask, w + i * k_len + k);
        for (int j = 0; j < mr; j++) {
            const __m512 xv = _mm512_maskz_loadu_ps(mask, x + j * x_stride + k);
            for (int i = 0; i < nr; i++) acc[i + TILE * j] = _mm512_fmadd_ps(wv[i], xv, acc[i + TILE * j]);
        }
    }
    float sums[TILE * TILE];
    if (nr == TILE && mr == TILE) {
        _mm512_storeu_ps(sums, reduce16(acc)); /* lane 4i + j: acc[i + 4j] */
        for (int j = 0; j < TILE; j++)
            for (int i = 0; i < TILE; i++) y[j * y_stride + i] = sums[TILE * i + j] + (bias ? bias[i] : 0.0f);
    } else {
        for (int j = 0; j < mr; j++)
            for (int i = 0; i < nr; i++)
                y[j * y_stride + i] = _mm512_reduce_add_ps(acc[i + TILE * j]) + (bias ? bias[i] : 0.0f);
    }
}

/* Every input row against weight rows [n, n + nr): full tiles of TILE input rows, then the rest.
 * The weight rows are read from memory by the first tile and from L1 by the others, so only the
 * first prefetches. */
static inline __attribute__((always_inline)) void weight_block(const float *x, int64_t x_stride, const float *w,
                                                               int64_t k_len, float *y, int64_t y_stride,
                                                               const float *bias, int64_t rows, const int nr,
                                                               const int more) {
    int64_t m = 0;
    for (; m + TILE <= rows; m += TILE)
        tile(x + m * x_stride, x_stride, w, k_len, y + m * y_stride, y_stride, bias, nr, TILE, more && m == 0);
    const int pf = more && m == 0;
    switch (rows - m) {
        case 3: tile(x + m * x_stride, x_stride, w, k_len, y + m * y_stride, y_stride, bias, nr, 3, pf); break;
        case 2: tile(x + m * x_stride, x_stride, w, k_len, y + m * y_stride, y_stride, bias, nr, 2, pf); break;
        case 1: tile(x + m * x_stride, x_stride, w, k_len, y + m * y_stride, y_stride, bias, nr, 1, pf); break;
        default: break;
    }
}

int few_rows_linear(const float *x, const float *w, const float *bias, float *y, int64_t rows, int64_t in_features,
                    int64_t out_features, int64_t x_stride, int64_t y_stride, int64_t num_threads) {
    if (rows < 0 || in_features <= 0 || out_features < 0 || x_stride < in_features || y_stride < out_features ||
        num_threads <= 0)
        return FRL_UNSUPPORTED;
    const int64_t blocks = out_features / TILE, tail = out_features % TILE;
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t b = 0; b <= blocks; b++) {
        const int64_t n = b * TILE;
        const float *wb = w + n * in_features, *bb = bias ? bias + n : 0;
        if (b < blocks)
            weight_block(x, x_stride, wb, in_features, y + n, y_stride, bb, rows, TILE, b + 1 < blocks);
        else if (tail == 3)
            weight_block(x, x_stride, wb, in_features, y + n, y_stride, bb, rows, 3, 0);
        else if (tail == 2)
            weight_block(x, x_stride, wb, in_features, y + n, y_stride, bb, rows, 2, 0);
        else if (tail == 1)
            weight_block(x, x_stride, wb, in_features, y + n, y_stride, bb, rows, 1, 0);
    }
    return FRL_OK;
}

#else /* no AVX-512: torch's GEMM serves */

int few_rows_linear_supported(void) { return 0; }

int few_rows_linear(const float *x, const float *w, const float *bias, float *y, int64_t rows, int64_t in_features,
                    int64_t out_features, int64_t x_stride, int64_t y_stride, int64_t num_threads) {
    (void)x, (void)w, (void)bias, (void)y, (void)rows, (void)in_features, (void)out_features, (void)x_stride,
        (void)y_stride, (void)num_threads;
    return FRL_UNSUPPORTED;
}

#endif
