"""The Llama family (Llama 2/3, Mistral, Ministral, Qwen2, Qwen3, Phi-3, SmolLM3, Granite, ERNIE 4.5,
Seed-OSS, Helium, the mixtures of experts Mixtral, Qwen2-MoE, Qwen3-MoE, and Gemma's, OLMo 2 and 3's
and EXAONE 4's variations on it) in plain PyTorch over a paged KV pool.

Keys are rotated at attention time; each layer hands its pre-RoPE keys to the store hooks
before rotating them (DESIGN.md, the positional-encoding rule).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from cachedattention.kernels.few_rows_linear import FewRowsLinearKernel
from cachedattention.kernels.row_ops import RowOpsKernel
from cachedattention.kvcache.kv_pool import KVPool
from cachedattention.lora.batch import ADAPTABLE, LoRASlot
from cachedattention.model.batch import DecodeGroup, ForwardBatch, SeqSlice
from cachedattention.model.fused_decode import FusedDecode
from cachedattention.model.layers import (
    Embedding,
    GatedMLP,
    LayerNorm,
    Linear,
    OneDNNWeight,
    RMSNorm,
    SparseMoE,
    make_norm,
)
from cachedattention.model.plain_attention import bottom_right_mask, plain_attention
from cachedattention.model.rope import RotaryEmbedding, apply_rotary
from cachedattention.model.spec import ModelSpec
from cachedattention.model.split_attention import attend_history_then_new


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        h, d = spec.hidden_size, spec.head_dim
        self.q_proj = Linear(h, spec.num_heads * d, bias=spec.qkv_bias)
        self.k_proj = Linear(h, spec.num_kv_heads * d, bias=spec.qkv_bias)
        self.v_proj = Linear(h, spec.num_kv_heads * d, bias=spec.qkv_bias)
        self.o_proj = Linear(spec.num_heads * d, h, bias=spec.o_bias)
        if spec.qk_norm_per_head:  # Command R+: a LayerNorm over each head, a weight for each
            self.q_norm = LayerNorm((spec.num_heads, d), spec.rms_norm_eps)
            self.k_norm = LayerNorm((spec.num_kv_heads, d), spec.rms_norm_eps)
        elif spec.qk_norm:  # each head's (Qwen3, Gemma 3), or the whole projection's (OLMo 2)
            self.q_norm = RMSNorm(spec.num_heads * d if spec.qk_norm_full else d, spec.rms_norm_eps)
            self.k_norm = RMSNorm(spec.num_kv_heads * d if spec.qk_norm_full else d, spec.rms_norm_eps)
        self.sinks = nn.Parameter(torch.zeros(spec.num_heads)) if spec.attn_sinks else None  # gpt-oss's

    def forward(
        self,
        x: torch.Tensor,
        layer: int,
        batch: ForwardBatch,
        pool: KVPool,
        cos: torch.Tensor,
        sin: torch.Tensor,
        ops: RowOpsKernel | None = None,
    ) -> torch.Tensor:
        s = self.spec
        n = x.shape[0]
        q, k = self.q_proj(x), self.k_proj(x)
        if s.qk_norm_full:  # before RoPE: the stored keys are the normed ones
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(n, s.num_heads, s.head_dim)
        k = k.view(n, s.num_kv_heads, s.head_dim)
        v = self.v_proj(x).view(n, s.num_kv_heads, s.head_dim)
        if s.qk_norm and not s.qk_norm_full:  # per head, before RoPE: the stored keys are the normed ones
            q, k = _head_norm(q, self.q_norm, ops), _head_norm(k, self.k_norm, ops)
        if batch.hooks is not None:
            batch.hooks.save_layer(layer, k, v)  # pre-RoPE: kept as it is
        if ops is None:  # rotate while the layer's stored KV may still be loading (a CUDA copy stream)
            q = apply_rotary(q, cos, sin)
            k = apply_rotary(k, cos, sin)
        if batch.hooks is not None:
            batch.hooks.wait_layer(layer)
        if ops is not None:  # a few rows on a CPU: rotate and write the pool in one call
            k = ops.rope_store(q, k, v, cos, sin, batch.new_slots, pool.k[layer], pool.v[layer], pool.storage)
        else:
            pool.write(layer, batch.new_slots, k, v)
        out = torch.empty_like(q)
        window = s.window(layer)  # None: this layer sees the whole context
        cap, sinks = s.attn_softcap, self.sinks
        if batch.paged_decode is not None:  # (never for sinks: the runner keeps the kernel off)
            batch.paged_decode.attend(q, out, pool.k[layer], pool.v[layer], window is not None, cap)
        for group in batch.decode:
            out[group.rows] = self._attend_decode(q, group, layer, pool, window is not None, cap, sinks)
        for seq in batch.seqs:
            out[seq.start : seq.start + seq.num_new] = self._attend(q, k, v, seq, layer, pool, window, cap, sinks)
        return self.o_proj(out.view(n, -1))

    @staticmethod
    def _attend_decode(q: torch.Tensor, group: DecodeGroup, layer: int, pool: KVPool, windowed: bool = False,
                       cap: float | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        pages, mask = group.pages, group.mask
        if windowed and group.window_pages is not None:  # only the pages each context's window reaches
            pages, mask = group.window_pages, group.window_mask
        b = pages.shape[0]
        ks, vs = pool.gather_pages(layer, pages.view(-1))
        kv_heads, d = ks.shape[1], ks.shape[2]
        ks = ks.view(b, -1, kv_heads, d).transpose(1, 2)  # [B, kv_heads, P * page_size, d]
        vs = vs.view(b, -1, kv_heads, d).transpose(1, 2)
        return _one_token_attention(q[group.rows], ks, vs, mask, cap, sinks)

    @staticmethod
    def _attend(q, k, v, seq: SeqSlice, layer: int, pool: KVPool, window: int | None = None,
                cap: float | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """`window`: the layer's sliding window (None: the whole context); `cap`: Gemma 2's on scores;
        `sinks`: gpt-oss's, per head."""
        plain = cap is not None or sinks is not None  # what the fused kernels do not take
        lo, hi = seq.start, seq.start + seq.num_new
        if seq.is_decode:  # a lone decoder: in a windowed layer, its last keys only
            first = max(0, seq.total_len - window) if window is not None else 0
            ks, vs = pool.read(layer, seq.pages, seq.total_len, seq.first_slot, first)
            return _one_token_attention(q[lo:hi], ks.transpose(0, 1)[None], vs.transpose(0, 1)[None], cap=cap,
                                        sinks=sinks)
        blocks = seq.window_blocks if window is not None else None  # where the window cuts this context
        # keys older than the first query's window are seen by none: never read (a store load may have
        # left them unwritten in this layer)
        first = blocks[0].lo if blocks else 0
        qs = q[lo:hi].transpose(0, 1)  # [heads, n, d]
        if seq.context_len == 0:
            # nothing cached: attend over this step's own keys (as the pages hold them), no gather from the pool
            ks, vs = pool.round_trip(k[lo:hi]), pool.round_trip(v[lo:hi])
            mask, causal = None, seq.num_new > 1
        else:
            ks, vs = pool.read(layer, seq.pages, seq.total_len, seq.first_slot, first)
            if seq.split and blocks is None and not plain:
                o = attend_history_then_new(qs, ks.transpose(0, 1), vs.transpose(0, 1), seq.context_len)
                if o is not None:
                    return o.transpose(0, 1)
            mask, causal = seq.mask, False
            if mask is None and seq.num_new > 1 and blocks is None:
                mask = bottom_right_causal(seq.num_new, seq.total_len, qs.device)
        ks, vs = ks.transpose(0, 1), vs.transpose(0, 1)
        if blocks is None:
            return _attention(qs, ks, vs, mask, causal, cap, sinks).transpose(0, 1)
        out = torch.empty_like(qs)
        for blk in blocks:  # each block of rows over the keys it sees
            keys = slice(blk.lo - first, blk.hi - first)
            out[:, blk.a : blk.b] = _attention(qs[:, blk.a : blk.b], ks[:, keys], vs[:, keys], blk.mask, False, cap, sinks)
        return out.transpose(0, 1)


def bottom_right_causal(n: int, total: int, device: torch.device):
    """The mask of n queries at the end of `total` keys (query i sits at total - n + i). On CUDA,
    SDPA's CausalBias, which the fused kernels take without materialising a mask; elsewhere the
    boolean mask SDPA would materialise from it (its module imports torch._dynamo: 1.3 s of every
    start, for nothing on a CPU)."""
    if device.type == "cuda":
        from torch.nn.attention.bias import causal_lower_right

        return causal_lower_right(n, total)
    return bottom_right_mask(n, total, device)


def _attention(qs: torch.Tensor, ks: torch.Tensor, vs: torch.Tensor, mask: torch.Tensor | None, causal: bool,
               cap: float | None, sinks: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    """qs [heads, n, d] over ks/vs [kv_heads, L, d] -> [heads, n, d]; `cap`: Gemma 2's on scores;
    `sinks`: gpt-oss's, per head (both in plain torch)."""
    if cap is not None or sinks is not None:
        sinks = sinks.view(-1, 1, 1) if sinks is not None else None  # [heads, n, L] scores
        return plain_attention(qs, ks, vs, mask, causal, cap=cap, sinks=sinks)
    # 4-D inputs: the fused CPU kernel only takes (batch, heads, length, dim)
    if qs.device.type == "cpu":
        # the CPU flash kernel shares KV heads itself: no copies of K/V per query head
        o = F.scaled_dot_product_attention(qs[None], ks[None], vs[None], attn_mask=mask, is_causal=causal, enable_gqa=True)
    else:
        # CUDA's masked kernels do not take enable_gqa (they would fall back to the math one)
        ks, vs = _expand_heads(ks, qs.shape[0]), _expand_heads(vs, qs.shape[0])
        o = F.scaled_dot_product_attention(qs[None], ks[None], vs[None], attn_mask=mask, is_causal=causal)
    return o[0]


def _head_norm(x: torch.Tensor, norm: RMSNorm | LayerNorm, ops: RowOpsKernel | None) -> torch.Tensor:
    return ops.head_rms_norm(x, norm.weight, norm.eps) if ops is not None and isinstance(norm, RMSNorm) else norm(x)


def _add_norm(x: torch.Tensor, delta: torch.Tensor | None, norm: RMSNorm | None,
              ops: RowOpsKernel | None) -> torch.Tensor:  # fmt: skip
    """x += delta (the residual stream, in place; nothing when None), then the norm that reads it
    (none: x itself, which the next sublayer only reads before x is added to again)."""
    if norm is None:
        return x.add_(delta) if delta is not None else x
    if ops is not None and not isinstance(norm, LayerNorm):
        return ops.add_rms_norm(x, delta, norm.weight, norm.eps)
    if delta is not None:
        x.add_(delta)
    return norm(x)


def _one_token_attention(q: torch.Tensor, ks: torch.Tensor, vs: torch.Tensor, mask: torch.Tensor | None = None,
                         cap: float | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """One new token per sequence over its context: q [B, heads, d], ks/vs [B, kv_heads, L, d].

    GQA without copying K/V: the query heads sharing a KV head become that head's query rows (one
    new token attends to every real key, so the rows need no causal mask; `mask` marks padding).
    Faster on a CPU than the flash kernel's own GQA too (1 query over 2,500 keys: 216 against
    312 us).
    """
    b, kv_heads, d = q.shape[0], ks.shape[1], ks.shape[3]
    if cap is not None or sinks is not None:
        sinks = sinks.view(kv_heads, -1, 1) if sinks is not None else None  # each KV head's group of query heads
        return plain_attention(q.view(b, kv_heads, -1, d), ks, vs, mask, cap=cap, sinks=sinks).reshape(b, -1, d)
    o = F.scaled_dot_product_attention(q.view(b, kv_heads, -1, d), ks, vs, attn_mask=mask)
    return o.reshape(b, -1, d)


def _expand_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[..., kv_heads, L, d] -> [..., heads, L, d]."""
    group = heads // x.shape[-3]
    return x if group == 1 else x.repeat_interleave(group, dim=-3)


class DecoderLayer(nn.Module):
    """Attention and MLP, each after a norm. Gemma's (`sandwich`) also norms each one's output before
    it joins the residual stream, and its post_attention_layernorm is that norm of the attention's;
    OLMo 2's has only those output norms; Cohere's (`parallel`) runs both on one norm's output and
    adds both to the stream."""

    def __init__(self, spec: ModelSpec, index: int) -> None:
        super().__init__()
        self.self_attn = Attention(spec)
        self.mlp = (SparseMoE(spec.hidden_size, spec.moe) if spec.is_sparse(index)
                    else GatedMLP(spec.hidden_size, spec.intermediate_size, spec.hidden_act, spec.mlp_bias))  # fmt: skip
        h, eps = spec.hidden_size, spec.rms_norm_eps
        self.input_layernorm = None if spec.post_norms_only else make_norm(h, eps, spec.layer_norm)
        self.parallel = spec.parallel_block
        if not self.parallel:
            self.post_attention_layernorm = RMSNorm(h, eps)
        self.sandwich = spec.sandwich_norms or spec.post_norms_only  # the attention's output normed
        if spec.sandwich_norms:
            self.pre_feedforward_layernorm = RMSNorm(h, eps)
        if self.sandwich:
            self.post_feedforward_layernorm = RMSNorm(h, eps)

    def attention_out(self, out: torch.Tensor) -> torch.Tensor:
        return self.post_attention_layernorm(out) if self.sandwich else out

    def mlp_norm(self) -> RMSNorm | None:
        if not self.sandwich:
            return self.post_attention_layernorm
        return getattr(self, "pre_feedforward_layernorm", None)  # OLMo 2: none

    def mlp_out(self, out: torch.Tensor) -> torch.Tensor:
        return self.post_feedforward_layernorm(out) if self.sandwich else out


class LlamaModel(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.embed_tokens = Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec, i) for i in range(spec.num_layers))
        self.norm = make_norm(spec.hidden_size, spec.rms_norm_eps, spec.layer_norm)


class LlamaForCausalLM(nn.Module):
    """Module names match Hugging Face checkpoints so state dicts load as they are."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.model = LlamaModel(spec)
        self.lm_head = Linear(spec.hidden_size, spec.vocab_size, bias=False)
        self.rotary: RotaryEmbedding | None = None
        self.row_ops: RowOpsKernel | None = None
        self.lora_slot: LoRASlot | None = None  # set by enable_lora

    def enable_lora(self) -> dict[str, tuple[int, int]]:
        """Let LoRA adapters add to the layers they may target (each call of which sees every row of
        a step: attention's projections, dense MLPs); their (out, in) shapes by name."""
        if self.lora_slot is None:
            self.lora_slot = LoRASlot()
        shapes = {}
        for name, m in self.named_modules():
            if isinstance(m, Linear) and ADAPTABLE.fullmatch(name):
                m.lora_slot, m.lora_key = self.lora_slot, name
                shapes[name] = (m.out_features, m.in_features)
        return shapes

    def tie_weights(self) -> None:
        if self.spec.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def init_rotary(self, max_len: int) -> None:
        p = self.lm_head.weight
        self.rotary = RotaryEmbedding(self.spec, max_len, p.device, p.dtype)

    def use_few_row_kernels(self, linear: FewRowsLinearKernel | None, row_ops: RowOpsKernel | None) -> None:
        """Decode steps have a few rows (one per decoder). On a CPU torch's GEMM reads the weights
        at half speed or less for those, and its small operators cost more to dispatch than to run.
        With the few-rows kernel every linear layer hands such calls to it. The vocabulary head, the
        widest weight, also gets a oneDNN-packed copy for the calls of 4 to 128 rows the kernel does
        not take (all of them without a kernel; 1 to 3 rows are as fast or faster unpacked). With
        the row ops, such steps norm, rotate and write the pool in one call each."""
        for m in self.modules():
            if isinstance(m, Linear):
                m.few_rows = linear
        head = self.lm_head
        if not head.blocks_only and (head.packed is None or head.packed.weight is not head.weight):  # (no float32 to pack)
            head.packed = OneDNNWeight(head.weight, rows=(4, 128))
        self.row_ops = row_ops

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, pool: KVPool, fused: FusedDecode | None = None) -> torch.Tensor:
        """Run the flat batch through every layer; return float32 logits at batch.logits_indices.

        `fused`: the layers described over this pool in two C calls each, for a step whose rows are
        all paged decoders; they reproduce the row ops and few-rows kernels (LoRA adapters' shares
        included), so only with those."""
        slot = self.lora_slot
        if slot is None:
            if batch.lora is not None:
                raise RuntimeError("a step with LoRA adapters on a model without enable_lora()")
            return self._forward(batch, pool, fused)
        slot.batch = batch.lora  # (None: the base model alone)
        try:
            return self._forward(batch, pool, fused)
        finally:
            slot.batch = None

    def _forward(self, batch: ForwardBatch, pool: KVPool, fused: FusedDecode | None) -> torch.Tensor:
        ropes = self.rotary.per_layer(batch.positions, self.spec.num_layers)
        x = self.model.embed_tokens(batch.input_ids)  # the residual stream, added to in place
        if self.spec.embed_scale is not None:  # Gemma's, Granite's: in the model's dtype, as transformers scales it
            x.mul_(torch.tensor(self.spec.embed_scale, dtype=x.dtype))
        if fused is not None and self.row_ops is not None and fused.takes(batch, x, pool):
            fused.run(x, batch, *ropes[0])  # (one table for every layer: fused layers are Llama's)
        else:
            self._layers(x, batch, pool, ropes)
        x = self.model.norm(x[batch.logits_indices])
        logits = self.lm_head(x).float()
        if self.spec.final_softcap is not None:  # Gemma 2's: cap * tanh(logits / cap)
            logits = torch.tanh(logits.div_(self.spec.final_softcap)).mul_(self.spec.final_softcap)
        return logits if self.spec.logits_scale is None else logits.div_(self.spec.logits_scale)

    def _layers(self, x: torch.Tensor, batch: ForwardBatch, pool: KVPool,
                ropes: list[tuple[torch.Tensor, torch.Tensor]]) -> None:  # fmt: skip
        """Every decoder layer over the residual stream x, in place, one operation at a time."""
        ops = self.row_ops if self.row_ops is not None and self.row_ops.takes(x) else None
        layers = self.model.layers
        h = _add_norm(x, None, layers[0].input_layernorm, ops)
        for i, layer in enumerate(layers):
            attn = layer.attention_out(layer.self_attn(h, i, batch, pool, *ropes[i], ops))
            if layer.parallel:  # the MLP reads what attention read; both join the stream
                delta = attn.add_(layer.mlp(h, ops))
            else:
                h = _add_norm(x, attn, layer.mlp_norm(), ops)
                delta = layer.mlp_out(layer.mlp(h, ops))
            if i + 1 < len(layers):
                h = _add_norm(x, delta, layers[i + 1].input_layernorm, ops)
            else:
                x.add_(delta)
