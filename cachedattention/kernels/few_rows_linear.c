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
 * caller keeps torch's GEMM. Weights may also come as GGUF blocks (few_rows_linear_quantized, below).
 * Returns 0, FRL_UNSUPPORTED, or FRL_NO_MEMORY.
 */
#include <stdint.h>
#include <stdlib.h>

enum { FRL_OK = 0, FRL_UNSUPPORTED = 1, FRL_NO_MEMORY = 3 };

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

/* y[j][i] = the sum of acc[i + TILE j]'s lanes (+ bias[i]), for i < nr, j < mr. */
static inline __attribute__((always_inline)) void store_tile(const __m512 *acc, float *restrict y, int64_t y_stride,
                                                             const float *restrict bias, const int nr, const int mr) {
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
    store_tile(acc, y, y_stride, bias, nr, mr);
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

/* weight_block for the next `left` weight rows, at most TILE of them: a whole tile, or the tail of
 * out_features % TILE (each row count its own inlined copy). */
static void weight_rows(const float *x, int64_t x_stride, const float *w, int64_t k_len, float *y, int64_t y_stride,
                        const float *bias, int64_t rows, int64_t left, int more) {
    switch (left < TILE ? left : TILE) {
        case 4: weight_block(x, x_stride, w, k_len, y, y_stride, bias, rows, 4, more); break;
        case 3: weight_block(x, x_stride, w, k_len, y, y_stride, bias, rows, 3, 0); break;
        case 2: weight_block(x, x_stride, w, k_len, y, y_stride, bias, rows, 2, 0); break;
        case 1: weight_block(x, x_stride, w, k_len, y, y_stride, bias, rows, 1, 0); break;
        default: break;
    }
}

static int bad_call(int64_t rows, int64_t in_features, int64_t out_features, int64_t x_stride, int64_t y_stride,
                    int64_t num_threads) {
    return rows < 0 || in_features <= 0 || out_features < 0 || x_stride < in_features || y_stride < out_features ||
           num_threads <= 0;
}

int few_rows_linear(const float *x, const float *w, const float *bias, float *y, int64_t rows, int64_t in_features,
                    int64_t out_features, int64_t x_stride, int64_t y_stride, int64_t num_threads) {
    if (bad_call(rows, in_features, out_features, x_stride, y_stride, num_threads)) return FRL_UNSUPPORTED;
    const int64_t blocks = (out_features + TILE - 1) / TILE, full = out_features / TILE;
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t n = b * TILE;
        weight_rows(x, x_stride, w + n * in_features, in_features, y + n, y_stride, bias ? bias + n : 0, rows,
                    out_features - n, b + 1 < full);
    }
    return FRL_OK;
}

/* Weights kept as GGUF blocks of 32 (the embedded model's layers are Q4_1, its head Q8_0; a K-quant
 * file's super-blocks are re-expressed exactly in these kinds at load): a decode step then reads
 * 0.75-1.25 bytes per weight (float32 scales included; 2 for 16-bit floats) instead of 4. For up to four input rows,
 * each block is dequantized into registers and multiplied right away (tile_blocks); for more, each
 * thread dequantizes four weight rows at a time into a buffer that stays in L1 and runs the float32
 * tiles over it, once for all the input rows. The dequantized values are exactly GGUF's (scale * q is
 * exact in float32 wherever a min is added, so adding it rounds once, fused or not), so either way
 * the result equals the float32 path over the dequantized weight, bit for bit.
 *   Q4_1:   quants [out, in / 2] bytes; byte j of a block holds element j (low nibble) and j + 16
 *           (high nibble); value = scale * q + min (Q4_K too).
 *   Q8_0:   quants [out, in] int8; value = scale * q.
 *   Q8_M:   as Q8_0, plus a min: value = scale * q + min (Q5_K's 5-bit values).
 *   Q8_S16: as Q8_0 with a scale for each 16 elements (Q6_K's and Q3_K's sub-blocks).
 *   Q4_MS16: as Q4_1 with a scale and a min for each 16 elements (Q2_K's sub-blocks): the low
 *           nibbles of a block take its first scale and min, the high nibbles its second.
 *   BF16, F16: quants [out, in] 16-bit floats, no scales (a checkpoint's bfloat16 or float16
 *           weights, exact in float32: half float32's bytes).
 * scales and mins are float32 [out, in / 32] ([out, in / 16] for Q8_S16 and Q4_MS16). */
enum { KIND_Q4_1 = 1, KIND_Q8_0 = 2, KIND_Q8_M = 3, KIND_Q8_S16 = 4, KIND_Q4_MS16 = 5, KIND_BF16 = 6, KIND_F16 = 7,
       KIND_F8 = 8 };
#define KIND_LAST KIND_F8

static inline int has_mins(int64_t kind) { return kind == KIND_Q4_1 || kind == KIND_Q8_M || kind == KIND_Q4_MS16; }

/* Block b (elements 32b .. 32b + 31) of one weight row as two vectors: elements 0-15 and 16-31.
 * `q`, `scales` and `mins` point at the row's own. */
static inline __attribute__((always_inline)) void dequantize_block(const int kind, const uint8_t *restrict q,
                                                                   const float *restrict scales,
                                                                   const float *restrict mins, int64_t b,
                                                                   __m512 *lo, __m512 *hi) {
    if (kind == KIND_BF16 || kind == KIND_F16) { /* bfloat16 is float32's upper half; float16 converts exactly */
        const __m256i a = _mm256_loadu_si256((const __m256i *)(q + 64 * b));
        const __m256i c = _mm256_loadu_si256((const __m256i *)(q + 64 * b + 32));
        if (kind == KIND_BF16) {
            *lo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(a), 16));
            *hi = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(c), 16));
        } else {
            *lo = _mm512_cvtph_ps(a);
            *hi = _mm512_cvtph_ps(c);
        }
        return;
    }
    if (kind == KIND_F8) {
        /* e4m3's 7 magnitude bits shifted into a float16's exponent and mantissa are the value / 256 (subnormals
         * too: the conversion takes them exactly), its sign bit a float16's; the scale's 256 gives the value back */
        const __m512 d = _mm512_set1_ps(scales[b] * 256.0f);
        for (int half = 0; half < 2; half++) {
            const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(q + 32 * b + 16 * half)));
            const __m256i h = _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(v, _mm256_set1_epi16(0x7F)), 7),
                                              _mm256_slli_epi16(_mm256_and_si256(v, _mm256_set1_epi16(0x80)), 8));
            *(half ? hi : lo) = _mm512_mul_ps(d, _mm512_cvtph_ps(h));
        }
        return;
    }
    if (kind == KIND_Q4_1 || kind == KIND_Q4_MS16) {
        const int64_t s = kind == KIND_Q4_1 ? b : 2 * b, t = kind == KIND_Q4_1 ? b : 2 * b + 1; /* (lo's, hi's) */
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + 16 * b)));
        *lo = _mm512_add_ps(_mm512_mul_ps(_mm512_set1_ps(scales[s]),
                                          _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(15)))),
                            _mm512_set1_ps(mins[s]));
        *hi = _mm512_add_ps(_mm512_mul_ps(_mm512_set1_ps(scales[t]), _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4))),
                            _mm512_set1_ps(mins[t]));
        return;
    }
    const __m512 qlo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + 32 * b))));
    const __m512 qhi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + 32 * b + 16))));
    if (kind == KIND_Q8_S16) {
        *lo = _mm512_mul_ps(_mm512_set1_ps(scales[2 * b]), qlo);
        *hi = _mm512_mul_ps(_mm512_set1_ps(scales[2 * b + 1]), qhi);
        return;
    }
    const __m512 d = _mm512_set1_ps(scales[b]);
    *lo = _mm512_mul_ps(d, qlo);
    *hi = _mm512_mul_ps(d, qhi);
    if (kind == KIND_Q8_M) {
        const __m512 m = _mm512_set1_ps(mins[b]);
        *lo = _mm512_add_ps(*lo, m);
        *hi = _mm512_add_ps(*hi, m);
    }
}

static inline void dequantize_row(int kind, const uint8_t *restrict q, const float *restrict scales,
                                  const float *restrict mins, int64_t k_len, float *restrict out) {
    for (int64_t b = 0; b < k_len / 32; b++) {
        __m512 lo, hi;
        dequantize_block(kind, q, scales, mins, b, &lo, &hi);
        _mm512_storeu_ps(out + 32 * b, lo);
        _mm512_storeu_ps(out + 32 * b + 16, hi);
    }
}

/* A kind's bytes of quants, and scales, per weight row. */
static inline int64_t quant_row_bytes(int kind, int64_t in_features) {
    if (kind == KIND_BF16 || kind == KIND_F16) return 2 * in_features;
    return kind == KIND_Q4_1 || kind == KIND_Q4_MS16 ? in_features / 2 : in_features;
}
static inline int64_t scale_row_len(int kind, int64_t in_features) {
    if (kind == KIND_BF16 || kind == KIND_F16) return 0;
    return kind == KIND_Q8_S16 || kind == KIND_Q4_MS16 ? in_features / 16 : in_features / 32;
}

/* Ask for the quantized weight rows [first, first + TILE) that exist (contiguous): the next tile's. */
static inline void prefetch_rows(const uint8_t *quants, int64_t row_bytes, int64_t first, int64_t out_features) {
    const int64_t rows = out_features - first < TILE ? out_features - first : TILE;
    for (int64_t at = 0; at < rows * row_bytes; at += 64) _mm_prefetch((const char *)(quants + first * row_bytes + at), _MM_HINT_T0);
}

/* GGUF weights, at most TILE input rows: no buffer. Each block of 32 of the nr weight rows is
 * dequantized into registers (two vectors: elements 0-15, 16-31) and multiplied with every input
 * row right away. Each accumulator takes the same fused multiply-adds in the same order (k rising)
 * as `tile` over the dequantized rows, and is summed the same way: the same result, bit for bit,
 * without storing and reloading every dequantized weight. The next tile's blocks are asked for ahead. */
static inline __attribute__((always_inline)) void tile_blocks(const float *restrict x, int64_t x_stride, const int kind,
                                                              const uint8_t *restrict q, int64_t row_bytes,
                                                              const float *restrict scales, int64_t row_scales,
                                                              const float *restrict mins, int64_t row_blocks,
                                                              float *restrict y, int64_t y_stride,
                                                              const float *restrict bias, const int nr, const int mr) {
    __m512 acc[TILE * TILE];
    for (int t = 0; t < TILE * TILE; t++) acc[t] = _mm512_setzero_ps();
    for (int64_t b = 0; b < row_blocks; b++) {
        __m512 lo[TILE], hi[TILE];
        for (int i = 0; i < nr; i++)
            dequantize_block(kind, q + i * row_bytes, scales + i * row_scales, mins ? mins + i * row_scales : 0, b,
                             &lo[i], &hi[i]);
        for (int j = 0; j < mr; j++) {
            const __m512 xlo = _mm512_loadu_ps(x + j * x_stride + 32 * b);
            for (int i = 0; i < nr; i++) acc[i + TILE * j] = _mm512_fmadd_ps(lo[i], xlo, acc[i + TILE * j]);
            const __m512 xhi = _mm512_loadu_ps(x + j * x_stride + 32 * b + 16);
            for (int i = 0; i < nr; i++) acc[i + TILE * j] = _mm512_fmadd_ps(hi[i], xhi, acc[i + TILE * j]);
        }
    }
    store_tile(acc, y, y_stride, bias, nr, mr);
}

/* tile_blocks with constant kind, nr and mr (each combination its own inlined copy). */
#define TILE_BLOCKS_MR(KIND, NR)                                                                                      \
    switch (rows) {                                                                                                   \
        case 4: tile_blocks(x, x_stride, KIND, q, row_bytes, scales, row_scales, mins, row_blocks, y, y_stride, bias, NR, 4); break; \
        case 3: tile_blocks(x, x_stride, KIND, q, row_bytes, scales, row_scales, mins, row_blocks, y, y_stride, bias, NR, 3); break; \
        case 2: tile_blocks(x, x_stride, KIND, q, row_bytes, scales, row_scales, mins, row_blocks, y, y_stride, bias, NR, 2); break; \
        case 1: tile_blocks(x, x_stride, KIND, q, row_bytes, scales, row_scales, mins, row_blocks, y, y_stride, bias, NR, 1); break; \
        default: break;                                                                                               \
    }
#define TILE_BLOCKS_NR(KIND)                                    \
    switch (nr) {                                               \
        case 4: TILE_BLOCKS_MR(KIND, 4) break;                  \
        case 3: TILE_BLOCKS_MR(KIND, 3) break;                  \
        case 2: TILE_BLOCKS_MR(KIND, 2) break;                  \
        case 1: TILE_BLOCKS_MR(KIND, 1) break;                  \
        default: break;                                         \
    }

static void weight_tile_blocks(const float *x, int64_t x_stride, int kind, const uint8_t *q, int64_t row_bytes,
                               const float *scales, int64_t row_scales, const float *mins, int64_t row_blocks,
                               float *y, int64_t y_stride, const float *bias, int64_t rows, int64_t nr) {
    switch (kind) {
        case KIND_Q4_1: TILE_BLOCKS_NR(KIND_Q4_1) break;
        case KIND_Q8_0: TILE_BLOCKS_NR(KIND_Q8_0) break;
        case KIND_Q8_M: TILE_BLOCKS_NR(KIND_Q8_M) break;
        case KIND_Q8_S16: TILE_BLOCKS_NR(KIND_Q8_S16) break;
        case KIND_Q4_MS16: TILE_BLOCKS_NR(KIND_Q4_MS16) break;
        case KIND_BF16: TILE_BLOCKS_NR(KIND_BF16) break;
        case KIND_F8: TILE_BLOCKS_NR(KIND_F8) break;
        default: TILE_BLOCKS_NR(KIND_F16) break;
    }
}
#undef TILE_BLOCKS_NR
#undef TILE_BLOCKS_MR

int few_rows_linear_quantized(const float *x, int64_t kind, const uint8_t *quants, const float *scales,
                              const float *mins, const float *bias, float *y, int64_t rows, int64_t in_features,
                              int64_t out_features, int64_t x_stride, int64_t y_stride, int64_t num_threads) {
    if (bad_call(rows, in_features, out_features, x_stride, y_stride, num_threads) || in_features % 32 ||
        kind < KIND_Q4_1 || kind > KIND_LAST || (has_mins(kind) && !mins))
        return FRL_UNSUPPORTED;
    const int64_t row_bytes = quant_row_bytes((int)kind, in_features), row_blocks = in_features / 32;
    const int64_t row_scales = scale_row_len((int)kind, in_features);
    const int64_t blocks = (out_features + TILE - 1) / TILE;
    if (rows == 0) return FRL_OK;
    if (rows <= TILE) { /* one tile of input rows: dequantize into registers, straight into the products */
#pragma omp parallel for schedule(static) num_threads(num_threads)
        for (int64_t b = 0; b < blocks; b++) {
            const int64_t n = b * TILE, nr = out_features - n < TILE ? out_features - n : TILE;
            prefetch_rows(quants, row_bytes, n + TILE, out_features);
            weight_tile_blocks(x, x_stride, (int)kind, quants + n * row_bytes, row_bytes, scales + n * row_scales,
                               row_scales, mins ? mins + n * row_scales : 0, row_blocks, y + n, y_stride,
                               bias ? bias + n : 0, rows, nr);
        }
        return FRL_OK;
    }
    int failed = 0;
#pragma omp parallel num_threads(num_threads)
    {
        float *buf = aligned_alloc(64, sizeof(float) * (size_t)(TILE * in_features + 16));
        if (!buf) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; b++) {
            if (!buf) continue;
            const int64_t n = b * TILE, nr = out_features - n < TILE ? out_features - n : TILE;
            prefetch_rows(quants, row_bytes, n + TILE, out_features);
            for (int64_t i = 0; i < nr; i++)
                dequantize_row((int)kind, quants + (n + i) * row_bytes, scales + (n + i) * row_scales,
                               mins ? mins + (n + i) * row_scales : 0, in_features, buf + i * in_features);
            weight_rows(x, x_stride, buf, in_features, y + n, y_stride, bias ? bias + n : 0, rows, nr, 0);
        }
        free(buf);
    }
    return failed ? FRL_NO_MEMORY : FRL_OK;
}

/* Every row of a weight in blocks dequantized into `out` (float32 [out_features, in_features]), rows
 * split across threads: a call of more rows than the kernel takes, on a weight held only as blocks,
 * runs torch's GEMM over this. The same values as the kernel's tiles, and as QuantizedWeight.dequantize:
 * scale * q, then + min, each rounded once. */
int few_rows_dequantize(int64_t kind, const uint8_t *quants, const float *scales, const float *mins, float *out,
                        int64_t in_features, int64_t out_features, int64_t num_threads) {
    if (in_features <= 0 || in_features % 32 || out_features < 0 || num_threads <= 0 || kind < KIND_Q4_1 ||
        kind > KIND_LAST || (has_mins(kind) && !mins))
        return FRL_UNSUPPORTED;
    const int64_t row_bytes = quant_row_bytes((int)kind, in_features);
    const int64_t row_scales = scale_row_len((int)kind, in_features);
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t r = 0; r < out_features; r++)
        dequantize_row((int)kind, quants + r * row_bytes, scales + r * row_scales, mins ? mins + r * row_scales : 0,
                       in_features, out + r * in_features);
    return FRL_OK;
}

#else /* no AVX-512: torch's GEMM serves */

int few_rows_linear_supported(void) { return 0; }

int few_rows_linear_quantized(const float *x, int64_t kind, const uint8_t *quants, const float *scales,
                              const float *mins, const float *bias, float *y, int64_t rows, int64_t in_features,
                              int64_t out_features, int64_t x_stride, int64_t y_stride, int64_t num_threads) {
    (void)x, (void)kind, (void)quants, (void)scales, (void)mins, (void)bias, (void)y, (void)rows, (void)in_features,
        (void)out_features, (void)x_stride, (void)y_stride, (void)num_threads;
    return FRL_UNSUPPORTED;
}

int few_rows_linear(const float *x, const float *w, const float *bias, float *y, int64_t rows, int64_t in_features,
                    int64_t out_features, int64_t x_stride, int64_t y_stride, int64_t num_threads) {
    (void)x, (void)w, (void)bias, (void)y, (void)rows, (void)in_features, (void)out_features, (void)x_stride,
        (void)y_stride, (void)num_threads;
    return FRL_UNSUPPORTED;
}

int few_rows_dequantize(int64_t kind, const uint8_t *quants, const float *scales, const float *mins, float *out,
                        int64_t in_features, int64_t out_features, int64_t num_threads) {
    (void)kind, (void)quants, (void)scales, (void)mins, (void)out, (void)in_features, (void)out_features,
        (void)num_threads;
    return FRL_UNSUPPORTED;
}

#endif
