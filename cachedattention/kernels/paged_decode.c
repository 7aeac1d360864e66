/* Decode attention straight over the paged KV pool, for a CPU.
 *
 * Each decoding sequence has one new query token (all its heads) and a context held in pages of
 * the pool. The torch path gathers every context into a padded tensor first, then attends: three
 * passes over the KV bytes (read, write, read again). This kernel reads each page once, where it
 * lies, with an online softmax (running max and sum, rescaled once per page), and prefetches the
 * next page while it computes on this one (pages are scattered, so the hardware cannot guess).
 *
 * Work is split into items of at most `chunk_pages` pages of one sequence, so that a lone long
 * context still keeps every thread busy; a second pass merges each sequence's items by their
 * softmax statistics. Compiled at run time by kernels/build.py with OpenMP; with PyTorch's pip
 * wheels the library resolves to the libgomp torch has already loaded (same soname), so its
 * threads are torch's, and it runs with torch's thread count (passed in).
 * With AVX-512, head_dim 64, pages of at most 16 tokens and at most 16 query heads per KV head
 * take a hand-vectorised path; other shapes a plain C one that the compiler vectorises.
 *
 * Pages may hold narrower values than float32 (vLLM's --kv-cache-dtype: bfloat16, FP8 e4m3 or
 * e5m2, a scale of 1): each page's tokens are widened to float32 into the thread's buffer, exactly
 * as torch widens them, then attended as float32 pages are; reading a quarter of the bytes.
 *
 * Layouts (contiguous; float32 but for the pool's values):
 *   q, out      [rows, heads, head_dim]; sequence s uses row rows[s]
 *   k_pool, v_pool  [num_slots, kv_heads, head_dim] of kv_type, slot = page * page_size + offset
 *   pages       the page tables of all sequences, concatenated; sequence s owns
 *               pages[page_start[s] .. page_start[s + 1])
 *   lengths     [num_seqs] tokens of context (including the new one) of each sequence
 * Returns 0, or one of the PD_* codes below.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "kv_types.h"
#if defined(__SSE__)
#include <xmmintrin.h>
/* the intrinsic, not __builtin_prefetch: GCC deletes a loop that holds only the latter */
#define PREFETCH(address) _mm_prefetch((const char *)(address), _MM_HINT_T0)
#else
#define PREFETCH(address) __builtin_prefetch(address)
#endif

/* below every real score, yet finite: the kernel is built with -ffast-math (vectorised expf),
 * which assumes no infinities; exp(NO_SCORE - m) underflows to 0 */
#define NO_SCORE (-1e30f)
#define MAX_GROUP 16      /* query heads per KV head on the AVX-512 path (its score rows) */
#define MAX_PAGE_SIZE 256 /* tokens per page (the score buffer of one page) */

enum { PD_OK = 0, PD_UNSUPPORTED_SHAPE = 1, PD_BAD_INDEX = 2, PD_NO_MEMORY = 3 };

/* What every work item reads: the call's arguments. */
typedef struct {
    const float *q;
    const uint8_t *k_pool, *v_pool; /* values of kv_type */
    const int64_t *rows, *pages, *page_start, *lengths;
    const int64_t *starts; /* each context's first token attended (a sliding window's); NULL: token 0 */
    int64_t heads, kv_heads, head_dim, page_size;
    float scale;
    float cap; /* Gemma 2's cap on scores, cap * tanh(s / cap); 0: none */
    int64_t kv_type;
    float *widened; /* narrow pages: per thread, a page's keys then its values in float32 */
} Call;

/* Page `page`'s first n tokens of keys and values as float32: in place, or widened into the
 * thread's buffer. */
static inline void page_values(const Call *c, int64_t page, int64_t n, const float **kp, const float **vp) {
    const int64_t page_values = c->page_size * c->kv_heads * c->head_dim;
    const int64_t offset = page * page_values * kv_bytes(c->kv_type);
    if (c->kv_type == KV_F32) {
        *kp = (const float *)(c->k_pool + offset);
        *vp = (const float *)(c->v_pool + offset);
        return;
    }
#ifdef _OPENMP
    float *buffer = c->widened + (int64_t)omp_get_thread_num() * 2 * page_values;
#else
    float *buffer = c->widened;
#endif
    const int64_t count = n * c->kv_heads * c->head_dim;
    kv_widen(c->kv_type, c->k_pool + offset, buffer, count);
    kv_widen(c->kv_type, c->v_pool + offset, buffer + page_values, count);
    *kp = buffer;
    *vp = buffer + page_values;
}

typedef struct {
    int64_t seq;
    int64_t page_lo; /* index into the sequence's page table */
    int64_t page_hi;
} Item;

static inline int64_t first_token(const Call *c, int64_t seq) { return c->starts ? c->starts[seq] : 0; }

int paged_decode_supports(int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t page_size) {
    return heads > 0 && kv_heads > 0 && heads % kv_heads == 0 && head_dim > 0 && page_size > 0 &&
           page_size <= MAX_PAGE_SIZE;
}

/* Ask for every cache line of the item's next page, keys and values. A macro, not a function:
 * GCC counts a function that only prefetches as free of effects and deletes its calls. */
#define PREFETCH_NEXT_PAGE(c, it, p, table)                                                         \
    do {                                                                                          \
        if ((p) + 1 < (it)->page_hi) {                                                            \
            const int64_t page_bytes = (c)->page_size * (c)->kv_heads * (c)->head_dim * kv_bytes((c)->kv_type); \
            const uint8_t *next_k = (c)->k_pool + (table)[(p) + 1] * page_bytes;                  \
            const uint8_t *next_v = (c)->v_pool + (table)[(p) + 1] * page_bytes;                  \
            for (int64_t line = 0; line < page_bytes; line += 64) {                               \
                PREFETCH(next_k + line);                                                          \
                PREFETCH(next_v + line);                                                          \
            }                                                                                     \
        }                                                                                         \
    } while (0)

/* One item: the partial attention of every head over pages [page_lo, page_hi) of one sequence.
 * Writes, per head, the running max m, the sum l and the unnormalised output acc[head_dim]. */
static void attend_item_generic(const Call *c, const Item *it, float *restrict m, float *restrict l,
                                float *restrict acc) {
    const int64_t *table = c->pages + c->page_start[it->seq], length = c->lengths[it->seq];
    const int64_t heads = c->heads, kv_heads = c->kv_heads, d = c->head_dim, page_size = c->page_size;
    const float scale = c->scale;
    const int64_t group = heads / kv_heads;
    const int64_t slot_stride = kv_heads * d;
    const float *qs = c->q + c->rows[it->seq] * heads * d;
    float scores[MAX_PAGE_SIZE];
    for (int64_t h = 0; h < heads; h++) {
        m[h] = NO_SCORE;
        l[h] = 0.0f;
    }
    memset(acc, 0, sizeof(float) * heads * d);
    const int64_t first = first_token(c, it->seq);
    for (int64_t p = it->page_lo; p < it->page_hi; p++) {
        const int64_t n = length - p * page_size < page_size ? length - p * page_size : page_size;
        const int64_t t0 = first > p * page_size ? first - p * page_size : 0; /* tokens before the window */
        const float *kp, *vp;
        page_values(c, table[p], n, &kp, &vp);
        PREFETCH_NEXT_PAGE(c, it, p, table);
        for (int64_t h = 0; h < heads; h++) {
            const float *qh = qs + h * d;
            const int64_t offset = (h / group) * d; /* this head's KV head within a slot */
            float page_max = NO_SCORE;
            for (int64_t t = t0; t < n; t++) {
                const float *kt = kp + t * slot_stride + offset;
                float dot = 0.0f;
                for (int64_t i = 0; i < d; i++) dot += qh[i] * kt[i];
                scores[t] = c->cap > 0.0f ? c->cap * tanhf(dot * scale / c->cap) : dot * scale;
                page_max = scores[t] > page_max ? scores[t] : page_max;
            }
            const float m_new = page_max > m[h] ? page_max : m[h];
            const float correction = expf(m[h] - m_new); /* 0 on the first page */
            float sum = 0.0f;
            for (int64_t t = t0; t < n; t++) {
                scores[t] = expf(scores[t] - m_new);
                sum += scores[t];
            }
            l[h] = l[h] * correction + sum;
            m[h] = m_new;
            float *acc_h = acc + h * d;
            for (int64_t i = 0; i < d; i++) acc_h[i] *= correction;
            for (int64_t t = t0; t < n; t++) {
                const float *vt = vp + t * slot_stride + offset;
                for (int64_t i = 0; i < d; i++) acc_h[i] += scores[t] * vt[i];
            }
        }
    }
}

#if defined(__AVX512F__)
#include <immintrin.h>

/* exp(x) for 16 lanes, x <= 0: x = n ln2 + r with |r| <= ln2 / 2, a degree-6 polynomial for
 * exp(r), scaled by 2^n; relative error about 2e-7. Inputs below -87 count as -87: a weight of
 * 1.6e-38 next to the page's largest, 1 (and no denormals). */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* The same as attend_item_generic for head_dim 64 and pages of at most 16 tokens, in AVX-512: a key or
 * value row is four registers, a page's scores for one head one register. */
static void attend_item_avx512_d64(const Call *c, const Item *it, float *restrict m, float *restrict l,
                                   float *restrict acc) {
    const int64_t *table = c->pages + c->page_start[it->seq], length = c->lengths[it->seq];
    const int64_t heads = c->heads, kv_heads = c->kv_heads, page_size = c->page_size;
    const float scale = c->scale;
    const int64_t group = heads / kv_heads;
    const int64_t slot_stride = kv_heads * 64;
    const float *qs = c->q + c->rows[it->seq] * heads * 64;
    float scores[MAX_GROUP][16] __attribute__((aligned(64)));
    float corrections[MAX_GROUP];
    for (int64_t h = 0; h < heads; h++) {
        m[h] = NO_SCORE;
        l[h] = 0.0f;
    }
    memset(acc, 0, sizeof(float) * heads * 64);
    const int64_t first = first_token(c, it->seq);
    for (int64_t p = it->page_lo; p < it->page_hi; p++) {
        int64_t n = length - p * page_size;
        if (n > page_size) n = page_size;
        const int64_t t0 = first > p * page_size ? first - p * page_size : 0; /* tokens before the window */
        /* the page's tokens in the window: their weights, the others' 0 (their scores are not used) */
        const __mmask16 valid = (__mmask16)(((1u << n) - 1u) & ~((1u << t0) - 1u));
        const float *kp, *vp;
        page_values(c, table[p], n, &kp, &vp);
        PREFETCH_NEXT_PAGE(c, it, p, table);
        for (int64_t kvh = 0; kvh < kv_heads; kvh++) {
            const float *qg = qs + kvh * group * 64;
            for (int64_t t = t0; t < n; t++) { /* (the window's tokens only: others are never read) */
                const float *kt = kp + t * slot_stride + kvh * 64;
                const __m512 k0 = _mm512_loadu_ps(kt), k1 = _mm512_loadu_ps(kt + 16);
                const __m512 k2 = _mm512_loadu_ps(kt + 32), k3 = _mm512_loadu_ps(kt + 48);
                for (int64_t j = 0; j < group; j++) {
                    const float *qh = qg + j * 64;
                    __m512 x = _mm512_mul_ps(_mm512_loadu_ps(qh), k0);
                    x = _mm512_fmadd_ps(_mm512_loadu_ps(qh + 16), k1, x);
                    x = _mm512_fmadd_ps(_mm512_loadu_ps(qh + 32), k2, x);
                    x = _mm512_fmadd_ps(_mm512_loadu_ps(qh + 48), k3, x);
                    scores[j][t] = _mm512_reduce_add_ps(x);
                    if (c->cap > 0.0f) /* capped, then divided by the scale the page's scores get below */
                        scores[j][t] = c->cap * tanhf(scores[j][t] * scale / c->cap) / scale;
                }
            }
            for (int64_t j = 0; j < group; j++) {
                const int64_t h = kvh * group + j;
                const __m512 s = _mm512_mask_mul_ps(_mm512_set1_ps(NO_SCORE), valid, _mm512_maskz_load_ps(valid, scores[j]),
                                                    _mm512_set1_ps(scale));
                const float page_max = _mm512_reduce_max_ps(s);
                const float m_new = page_max > m[h] ? page_max : m[h];
                const float correction = expf(m[h] - m_new);
                const __m512 e = _mm512_maskz_mov_ps(valid, exp16(_mm512_sub_ps(s, _mm512_set1_ps(m_new))));
                _mm512_store_ps(scores[j], e);
                l[h] = l[h] * correction + _mm512_reduce_add_ps(e);
                m[h] = m_new;
                corrections[j] = correction;
            }
            /* acc = acc * correction + weights . V, one head at a time with its output in registers;
             * even and odd tokens in separate sums so that the adds do not wait on each other */
            for (int64_t j = 0; j < group; j++) {
                float *acc_h = acc + (kvh * group + j) * 64;
                const __m512 c = _mm512_set1_ps(corrections[j]);
                __m512 a0 = _mm512_mul_ps(_mm512_loadu_ps(acc_h), c), a1 = _mm512_mul_ps(_mm512_loadu_ps(acc_h + 16), c);
                __m512 a2 = _mm512_mul_ps(_mm512_loadu_ps(acc_h + 32), c), a3 = _mm512_mul_ps(_mm512_loadu_ps(acc_h + 48), c);
                __m512 b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps(), b2 = _mm512_setzero_ps(), b3 = _mm512_setzero_ps();
                int64_t t = t0;
                const float *vt = vp + t0 * slot_stride + kvh * 64;
                for (; t + 1 < n; t += 2, vt += 2 * slot_stride) {
                    const __m512 w = _mm512_set1_ps(scores[j][t]), u = _mm512_set1_ps(scores[j][t + 1]);
                    const float *vu = vt + slot_stride;
                    a0 = _mm512_fmadd_ps(w, _mm512_loadu_ps(vt), a0);
                    a1 = _mm512_fmadd_ps(w, _mm512_loadu_ps(vt + 16), a1);
                    a2 = _mm512_fmadd_ps(w, _mm512_loadu_ps(vt + 32), a2);
                    a3 = _mm512_fmadd_ps(w, _mm512_loadu_ps(vt + 48), a3);
                    b0 = _mm512_fmadd_ps(u, _mm512_loadu_ps(vu), b0);
                    b1 = _mm512_fmadd_ps(u, _mm512_loadu_ps(vu + 16), b1);
                    b2 = _mm512_fmadd_ps(u, _mm512_loadu_ps(vu + 32), b2);
                    b3 = _mm512_fmadd_ps(u, _mm512_loadu_ps(vu + 48), b3);
                }
                if (t < n) {
                    const __m512 w = _mm512_set1_ps(scores[j][t]);
                    a0 = _mm512_fmadd_ps(w, _mm512_loadu_ps(vt), a0);
                    a1 = _mm512_fmadd_ps(w, _mm512_loadu_ps(vt + 16), a1);
                    a2 = _mm512_fmadd_ps(w, _mm512_loadu_ps(vt + 32), a2);
                    a3 = _mm512_fmadd_ps(w, _mm512_loadu_ps(vt + 48), a3);
                }
                _mm512_storeu_ps(acc_h, _mm512_add_ps(a0, b0));
                _mm512_storeu_ps(acc_h + 16, _mm512_add_ps(a1, b1));
                _mm512_storeu_ps(acc_h + 32, _mm512_add_ps(a2, b2));
                _mm512_storeu_ps(acc_h + 48, _mm512_add_ps(a3, b3));
            }
        }
    }
}
#endif

static void attend_item(const Call *c, const Item *it, float *m, float *l, float *acc) {
#if defined(__AVX512F__)
    if (c->head_dim == 64 && c->page_size <= 16 && c->heads / c->kv_heads <= MAX_GROUP) {
        attend_item_avx512_d64(c, it, m, l, acc);
        return;
    }
#endif
    attend_item_generic(c, it, m, l, acc);
}

/* Checks every index the items will follow; counts the items (runs of at most chunk_pages). */
static int count_items(const Call *c, int64_t num_seqs, int64_t num_rows, int64_t num_pages, int64_t table_len,
                       int64_t chunk_pages, int64_t *num_items) {
    *num_items = 0;
    if (num_seqs > 0 && (c->page_start[0] < 0 || c->page_start[num_seqs] > table_len)) return PD_BAD_INDEX;
    for (int64_t s = 0; s < num_seqs; s++) {
        const int64_t used = (c->lengths[s] + c->page_size - 1) / c->page_size;
        if (c->rows[s] < 0 || c->rows[s] >= num_rows || c->lengths[s] <= 0) return PD_BAD_INDEX;
        const int64_t first = first_token(c, s);
        if (first < 0 || first >= c->lengths[s]) return PD_BAD_INDEX;
        if (c->page_start[s + 1] < c->page_start[s] || used > c->page_start[s + 1] - c->page_start[s])
            return PD_BAD_INDEX;
        for (int64_t p = 0; p < used; p++) {
            const int64_t page = c->pages[c->page_start[s] + p];
            if (page < 0 || page >= num_pages) return PD_BAD_INDEX;
        }
        for (int64_t r = 0; r < s; r++)
            if (c->rows[r] == c->rows[s]) return PD_BAD_INDEX; /* two writers of one output row */
        const int64_t attended = used - first / c->page_size; /* pages from the window's first */
        *num_items += (attended + chunk_pages - 1) / chunk_pages;
    }
    return PD_OK;
}

static void build_items(const Call *c, int64_t num_seqs, int64_t chunk_pages, Item *items, int64_t *first_item) {
    int64_t next = 0;
    for (int64_t s = 0; s < num_seqs; s++) {
        const int64_t used = (c->lengths[s] + c->page_size - 1) / c->page_size;
        first_item[s] = next;
        for (int64_t lo = first_token(c, s) / c->page_size; lo < used; lo += chunk_pages) {
            items[next].seq = s;
            items[next].page_lo = lo;
            items[next].page_hi = lo + chunk_pages < used ? lo + chunk_pages : used;
            next++;
        }
    }
    first_item[num_seqs] = next;
}

/* One sequence's output from its items: rescale each by exp(m_item - m_max), divide by the sum. */
static void merge_sequence(const Call *c, const float *partial, int64_t stats, int64_t lo, int64_t hi, float *o) {
    const int64_t heads = c->heads, d = c->head_dim;
    for (int64_t h = 0; h < heads; h++) {
        float m_max = NO_SCORE;
        for (int64_t i = lo; i < hi; i++) m_max = partial[i * stats + h] > m_max ? partial[i * stats + h] : m_max;
        float total = 0.0f;
        float *oh = o + h * d;
        memset(oh, 0, sizeof(float) * d);
        for (int64_t i = lo; i < hi; i++) {
            const float *base = partial + i * stats;
            const float w = expf(base[h] - m_max);
            total += base[heads + h] * w; /* >= 1: the item holding m_max has a weight of 1 */
            const float *acc = base + 2 * heads + h * d;
            for (int64_t j = 0; j < d; j++) oh[j] += w * acc[j];
        }
        const float inv = 1.0f / total;
        for (int64_t j = 0; j < d; j++) oh[j] *= inv;
    }
}

/* As paged_decode_attention, over pages of kv_type values. */
int paged_decode_attention_kv(const float *q, const int64_t *rows, const void *k_pool, const void *v_pool,
                              const int64_t *pages, const int64_t *page_start, const int64_t *lengths,
                              const int64_t *starts, float *out,
                              int64_t num_seqs, int64_t num_rows, int64_t num_pages, int64_t table_len, int64_t heads,
                              int64_t kv_heads, int64_t head_dim, int64_t page_size, int64_t chunk_pages,
                              int64_t num_threads, float scale, float cap, int64_t kv_type) {
    if (!paged_decode_supports(heads, kv_heads, head_dim, page_size) || chunk_pages <= 0 || num_threads <= 0 ||
        kv_type < KV_F32 || kv_type > KV_E5M2)
        return PD_UNSUPPORTED_SHAPE;
    Call c = {q, k_pool, v_pool, rows, pages, page_start, lengths, starts, heads, kv_heads, head_dim, page_size,
              scale, cap, kv_type, NULL};
    int64_t num_items;
    const int status = count_items(&c, num_seqs, num_rows, num_pages, table_len, chunk_pages, &num_items);
    if (status != PD_OK || num_items == 0) return status;
    const int64_t stats = heads * (head_dim + 2); /* per item: m[heads], l[heads], acc[heads * d] */
    Item *items = malloc(sizeof(Item) * (size_t)num_items);
    int64_t *first_item = malloc(sizeof(int64_t) * (size_t)(num_seqs + 1));
    float *partial = malloc(sizeof(float) * (size_t)(num_items * stats));
    const int64_t widened = kv_type == KV_F32 ? 0 : num_threads * 2 * page_size * kv_heads * head_dim;
    c.widened = widened ? malloc(sizeof(float) * (size_t)widened) : NULL;
    if (!items || !first_item || !partial || (widened && !c.widened)) {
        free(items);
        free(first_item);
        free(partial);
        free(c.widened);
        return PD_NO_MEMORY;
    }
    build_items(&c, num_seqs, chunk_pages, items, first_item);
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
    for (int64_t i = 0; i < num_items; i++) {
        float *base = partial + i * stats;
        attend_item(&c, &items[i], base, base + heads, base + 2 * heads);
    }
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t s = 0; s < num_seqs; s++)
        merge_sequence(&c, partial, stats, first_item[s], first_item[s + 1], out + rows[s] * heads * head_dim);
    free(items);
    free(first_item);
    free(partial);
    free(c.widened);
    return PD_OK;
}

int paged_decode_attention(const float *q, const int64_t *rows, const float *k_pool, const float *v_pool,
                           const int64_t *pages, const int64_t *page_start, const int64_t *lengths,
                           const int64_t *starts, float *out,
                           int64_t num_seqs, int64_t num_rows, int64_t num_pages, int64_t table_len, int64_t heads,
                           int64_t kv_heads, int64_t head_dim, int64_t page_size, int64_t chunk_pages,
                           int64_t num_threads, float scale, float cap) {
    return paged_decode_attention_kv(q, rows, k_pool, v_pool, pages, page_start, lengths, starts, out, num_seqs,
                                     num_rows, num_pages, table_len, heads, kv_heads, head_dim, page_size,
                                     chunk_pages, num_threads, scale, cap, KV_F32);
}
