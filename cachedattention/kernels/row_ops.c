/* The small per-layer operations of a decode step, one call each, for a CPU.
 *
 * A decode step has a few rows (one per decoder), so its norms, rotations and KV writes are tiny:
 * what they cost in torch is the dispatch of several operators each (an RMSNorm alone took about
 * 50 us for 8 rows, bench/decode_profile.py). Here each is one plain loop.
 *
 *   add_rms_norm: residual += delta (when delta is given); out = residual * rsqrt(mean(residual^2)
 *       + eps) * weight. The residual stream of a Llama layer and the norm that follows it.
 *   rope_store: rotate q in place; rotate k into k_out and into the pool at each row's slot; copy v
 *       into the pool at that slot. cos/sin hold each row's table row ([rows, head_dim], the Hugging
 *       Face layout: both halves of a row carry the same frequencies). The pre-RoPE k is left alone:
 *       the store saves it. rope_store_kv: the same into a pool of narrower values (kv_types.h), each
 *       written as torch casts it.
 *   head_rms_norm: x = x * rsqrt(mean(x^2) + eps) * weight for each row of dim, in place: Qwen3's
 *       norm of each head's q and k (rows = tokens x heads, dim = head_dim), before the rotation.
 *   silu_mul: gate = silu(gate) * up, elementwise: the gated MLP's activation.
 *   lora_add: y[r] += (A x[r]) B for each listed row r: a LoRA adapter's share of a linear layer's
 *       output (A [rank, in]; bt, B transposed, [rank, out], the adapter's scale in it). The rank
 *       sums over the inputs first, then each of them times its row of bt, added in rank order.
 *
 * Layouts: float32, contiguous rows; q [rows, heads, head_dim], k, v, k_out [rows, kv_heads,
 * head_dim]; the pools [num_slots, kv_heads, head_dim]. Every slot (and row) is checked before it
 * is used. Returns 0, RO_UNSUPPORTED (a LoRA rank past LORA_MAX_RANK) or RO_BAD_INDEX.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kv_types.h"

enum { RO_OK = 0, RO_UNSUPPORTED = 1, RO_BAD_INDEX = 2 };
#define LORA_MAX_RANK 512 /* vLLM's largest --max-lora-rank */

int add_rms_norm(float *restrict residual, const float *restrict delta, const float *restrict weight,
                 float *restrict out, int64_t rows, int64_t dim, float eps) {
    for (int64_t r = 0; r < rows; r++) {
        float *h = residual + r * dim;
        if (delta) {
            const float *d = delta + r * dim;
            for (int64_t j = 0; j < dim; j++) h[j] += d[j];
        }
        float sum = 0.0f;
        for (int64_t j = 0; j < dim; j++) sum += h[j] * h[j];
        const float inv = 1.0f / sqrtf(sum / (float)dim + eps);
        float *o = out + r * dim;
        for (int64_t j = 0; j < dim; j++) o[j] = h[j] * inv * weight[j];
    }
    return RO_OK;
}

int head_rms_norm(float *x, const float *restrict weight, int64_t rows, int64_t dim, float eps) {
    for (int64_t r = 0; r < rows; r++) {
        float *h = x + r * dim;
        float sum = 0.0f;
        for (int64_t j = 0; j < dim; j++) sum += h[j] * h[j];
        const float inv = 1.0f / sqrtf(sum / (float)dim + eps);
        for (int64_t j = 0; j < dim; j++) h[j] = h[j] * inv * weight[j];
    }
    return RO_OK;
}

/* out = x * cos + rotate_half(x) * sin for one head of head_dim (out may be x). */
static inline void rotate(float *out, const float *x, const float *cos, const float *sin, int64_t half) {
    for (int64_t j = 0; j < half; j++) {
        const float lo = x[j], hi = x[j + half];
        out[j] = lo * cos[j] - hi * sin[j];
        out[j + half] = hi * cos[j + half] + lo * sin[j + half];
    }
}

int rope_store_kv(float *restrict q, const float *restrict k, const float *restrict v, const float *restrict cos,
                  const float *restrict sin, const int64_t *restrict slots, float *restrict k_out,
                  void *restrict k_pool, void *restrict v_pool, int64_t rows, int64_t heads, int64_t kv_heads,
                  int64_t head_dim, int64_t num_slots, int64_t kv_type) {
    if (kv_type < KV_F32 || kv_type > KV_E5M2) return RO_UNSUPPORTED;
    for (int64_t r = 0; r < rows; r++)
        if (slots[r] < 0 || slots[r] >= num_slots) return RO_BAD_INDEX;
    const int64_t half = head_dim / 2, kv_row = kv_heads * head_dim;
    for (int64_t r = 0; r < rows; r++) {
        const float *c = cos + r * head_dim, *s = sin + r * head_dim;
        for (int64_t h = 0; h < heads; h++) {
            float *qh = q + (r * heads + h) * head_dim;
            rotate(qh, qh, c, s, half);
        }
        for (int64_t h = 0; h < kv_heads; h++) {
            const int64_t at = h * head_dim;
            rotate(k_out + r * kv_row + at, k + r * kv_row + at, c, s, half);
        }
        const int64_t at = slots[r] * kv_row * kv_bytes(kv_type);
        kv_encode(kv_type, k_out + r * kv_row, (uint8_t *)k_pool + at, kv_row);
        kv_encode(kv_type, v + r * kv_row, (uint8_t *)v_pool + at, kv_row);
    }
    return RO_OK;
}

int rope_store(float *restrict q, const float *restrict k, const float *restrict v, const float *restrict cos,
               const float *restrict sin, const int64_t *restrict slots, float *restrict k_out,
               float *restrict k_pool, float *restrict v_pool, int64_t rows, int64_t heads, int64_t kv_heads,
               int64_t head_dim, int64_t num_slots) {
    return rope_store_kv(q, k, v, cos, sin, slots, k_out, k_pool, v_pool, rows, heads, kv_heads, head_dim, num_slots,
                         KV_F32);
}

/* exp of -|x| only: it never overflows, which -ffast-math (no infinities) needs */
int silu_mul(float *restrict gate, const float *restrict up, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        const float g = gate[i], e = expf(-fabsf(g));
        gate[i] = g * (g >= 0.0f ? 1.0f : e) / (1.0f + e) * up[i];
    }
    return RO_OK;
}

int lora_add(const float *restrict x, const float *restrict a, const float *restrict bt, float *restrict y,
             const int64_t *restrict rows, int64_t count, int64_t num_rows, int64_t in, int64_t out, int64_t rank) {
    if (rank < 1 || rank > LORA_MAX_RANK) return RO_UNSUPPORTED;
    for (int64_t i = 0; i < count; i++)
        if (rows[i] < 0 || rows[i] >= num_rows) return RO_BAD_INDEX;
    float t[LORA_MAX_RANK];
    for (int64_t i = 0; i < count; i++) {
        const float *xr = x + rows[i] * in;
        for (int64_t j = 0; j < rank; j++) {
            const float *aj = a + j * in;
            float s = 0.0f;
            for (int64_t k = 0; k < in; k++) s += aj[k] * xr[k];
            t[j] = s;
        }
        float *yr = y + rows[i] * out;
        for (int64_t j = 0; j < rank; j++) {
            const float *bj = bt + j * out;
            const float tj = t[j];
            for (int64_t o = 0; o < out; o++) yr[o] += tj * bj[o];
        }
    }
    return RO_OK;
}
