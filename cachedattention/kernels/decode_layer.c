/* One decoder layer of a few-row decode step on a CPU, in two calls instead of a dozen from Python.
 *
 * A decode step's layer is a dozen small operations: two norms, seven linear layers, the rotation
 * and KV write, the attention and the MLP's activation. Each is fast in C, but from Python each costs
 * its dispatch too, about a third of a lone decoder's step (bench/lone_decode_timing.py). Here a
 * layer is two calls, split where the store takes the layer's pre-RoPE K/V and waits for its load:
 *
 *   decode_layer_in:  residual += delta (the previous layer's output, when given); h = norm(residual);
 *                     q, k, v = h's projections (k, v pre-RoPE, into the caller's buffers); with
 *                     head norms (Qwen3), each head of q and k normed in place.
 *   decode_layer_out: rotate q and k, write k and v into the pool; attend over the pages; delta =
 *                     o(attention); residual += delta; h = norm(residual); delta = down(silu(gate(h))
 *                     * up(h)).
 *
 * Each linear layer's output gains the step's LoRA adapters' shares for their rows (lora_add, after
 * the weight's product and bias, as the per-operation path adds them).
 *
 * They run the very functions the per-operation path calls (included below), with the same
 * arguments, so the results are the same bit for bit. After the last layer the caller adds the
 * last delta to the residual. Every layout is float32, contiguous, rows first; each call returns 0,
 * 1 (an unsupported shape), 2 (a slot or page index out of range: a bad slot is found before this
 * layer writes the pool, a bad page after) or 3 (out of memory).
 */
#include "few_rows_linear.c"
#include "paged_decode.c"
#include "row_ops.c"

/* A linear layer's weight: float32 [out, in] (kind 0), or blocks of 32 of one of the few-rows kernel's kinds. */
typedef struct {
    const float *weight;
    const uint8_t *quants;
    const float *scales, *mins, *bias;
    int64_t kind, in_features, out_features;
} DLLinear;

typedef struct {
    DLLinear q, k, v, o, gate, up, down;
    const float *input_norm, *post_norm;
    void *k_pool, *v_pool;          /* [num_slots, kv_heads, head_dim] of kv_type values */
    const float *q_norm, *k_norm;   /* [head_dim] each, or both null: no per-head norm */
    int64_t index;                  /* the layer's place in the model: its row of the step's LoRA tables */
    int64_t kv_type;                /* what the pools hold (kv_types.h) */
} DLLayer;

enum { DL_Q, DL_K, DL_V, DL_O, DL_GATE, DL_UP, DL_DOWN, DL_LINEARS };

/* What every layer of the step shares: its shape, positions, slots, sequences and buffers. */
typedef struct {
    int64_t rows, hidden, heads, kv_heads, head_dim, intermediate, num_slots, num_threads;
    float eps, scale;
    const float *cos, *sin; /* [rows, head_dim] */
    const int64_t *slots;   /* [rows]: pool slot of each row's new token */
    /* the decoders, as the paged decode kernel takes them */
    const int64_t *seq_rows, *pages, *page_start, *lengths;
    int64_t num_seqs, table_len, page_size, chunk_pages;
    /* buffers: residual, delta and h [rows, hidden]; q and attn [rows, heads * head_dim]; k_rot
     * [rows, kv_heads * head_dim]; gate, up [rows, intermediate] */
    float *residual, *delta, *h, *q, *attn, *k_rot, *gate, *up;
    /* the step's LoRA adapters (lora_groups 0: none): group g's rows are lora_rows[lora_start[g] ..
     * lora_start[g + 1]); layer l's linear i has A, B^T and their rank lora_a[t], lora_bt[t],
     * lora_rank[t] from group g's adapter at t = (l * DL_LINEARS + i) * lora_groups + g (A null: not
     * adapted; an adapter's rank may differ from one linear layer to another) */
    int64_t lora_groups;
    const int64_t *lora_rows, *lora_start, *lora_rank;
    const float *const *lora_a;
    const float *const *lora_bt;
} DLStep;

static const DLLinear *dl_weights(const DLLayer *l, int which) {
    switch (which) {
    case DL_Q: return &l->q;
    case DL_K: return &l->k;
    case DL_V: return &l->v;
    case DL_O: return &l->o;
    case DL_GATE: return &l->gate;
    case DL_UP: return &l->up;
    default: return &l->down;
    }
}

static int dl_linear(const DLLayer *layer, int which, const float *x, float *y, const DLStep *s) {
    const DLLinear *l = dl_weights(layer, which);
    int status;
    if (l->kind == 0)
        status = few_rows_linear(x, l->weight, l->bias, y, s->rows, l->in_features, l->out_features, l->in_features,
                                 l->out_features, s->num_threads);
    else
        status = few_rows_linear_quantized(x, l->kind, l->quants, l->scales, l->mins, l->bias, y, s->rows,
                                           l->in_features, l->out_features, l->in_features, l->out_features,
                                           s->num_threads);
    for (int64_t g = 0; !status && g < s->lora_groups; g++) {
        int64_t t = (layer->index * DL_LINEARS + which) * s->lora_groups + g;
        if (s->lora_a[t])
            status = lora_add(x, s->lora_a[t], s->lora_bt[t], y, s->lora_rows + s->lora_start[g],
                              s->lora_start[g + 1] - s->lora_start[g], s->rows, l->in_features, l->out_features,
                              s->lora_rank[t]);
    }
    return status;
}

int decode_layer_in(const DLLayer *l, const DLStep *s, int add_delta, float *k_pre, float *v) {
    int status = add_rms_norm(s->residual, add_delta ? s->delta : 0, l->input_norm, s->h, s->rows, s->hidden, s->eps);
    if (!status) status = dl_linear(l, DL_Q, s->h, s->q, s);
    if (!status) status = dl_linear(l, DL_K, s->h, k_pre, s);
    if (!status) status = dl_linear(l, DL_V, s->h, v, s);
    if (!status && l->q_norm) {
        status = head_rms_norm(s->q, l->q_norm, s->rows * s->heads, s->head_dim, s->eps);
        if (!status) status = head_rms_norm(k_pre, l->k_norm, s->rows * s->kv_heads, s->head_dim, s->eps);
    }
    return status;
}

int decode_layer_out(const DLLayer *l, const DLStep *s, const float *k_pre, const float *v) {
    int status = rope_store_kv(s->q, k_pre, v, s->cos, s->sin, s->slots, s->k_rot, l->k_pool, l->v_pool, s->rows,
                               s->heads, s->kv_heads, s->head_dim, s->num_slots, l->kv_type);
    if (!status)
        /* whole contexts: the fused layers are not built for a model with a sliding window */
        status = paged_decode_attention_kv(s->q, s->seq_rows, l->k_pool, l->v_pool, s->pages, s->page_start,
                                           s->lengths, NULL, s->attn, s->num_seqs, s->rows, s->num_slots / s->page_size,
                                           s->table_len, s->heads, s->kv_heads, s->head_dim, s->page_size,
                                           s->chunk_pages, s->num_threads, s->scale, 0.0f, /* no cap: Llama's */
                                           l->kv_type);
    if (!status) status = dl_linear(l, DL_O, s->attn, s->delta, s);
    if (!status) status = add_rms_norm(s->residual, s->delta, l->post_norm, s->h, s->rows, s->hidden, s->eps);
    if (!status) status = dl_linear(l, DL_GATE, s->h, s->gate, s);
    if (!status) status = dl_linear(l, DL_UP, s->h, s->up, s);
    if (!status) status = silu_mul(s->gate, s->up, s->rows * s->intermediate);
    if (!status) status = dl_linear(l, DL_DOWN, s->gate, s->delta, s);
    return status;
}
