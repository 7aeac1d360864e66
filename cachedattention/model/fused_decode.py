"""Decode steps of a few rows through the decoder layers in two C calls each (kernels/decode_layer.c).

Used on a CPU in float32 when every row of the step is a decoder attended by the paged kernel; the
results equal the per-operation path's bit for bit (it runs the same kernels). The layers' weights
are described to the C code once; if a module's weight, bias, GGUF blocks or norm is replaced
afterwards, the step notices and takes the per-operation path until `FusedDecode` is rebuilt.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from cachedattention.kernels.decode_layer import DecodeLayerKernel, LayerArgs, LayerShape, StepArgs
from cachedattention.kernels.few_rows_linear import MAX_ROWS
from cachedattention.kvcache.kv_pool import KVPool
from cachedattention.model.batch import ForwardBatch

if TYPE_CHECKING:
    from cachedattention.model.llama import DecoderLayer, LlamaForCausalLM


class FusedDecode:
    def __init__(self, kernel: DecodeLayerKernel, model: LlamaForCausalLM, pool: KVPool) -> None:
        """Raises ValueError when a weight, norm or pool is not one the C code takes."""
        spec = model.spec
        self.kernel, self.pool = kernel, pool
        self.shape = LayerShape(spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim,
                                spec.intermediate_size, spec.rms_norm_eps)
        self.decoder_layers = list(model.model.layers)
        self.sources = _sources(self.decoder_layers)
        self.layers = [
            LayerArgs(self.shape, _linears(layer),
                      (layer.input_layernorm.weight.detach(), layer.post_attention_layernorm.weight.detach()),
                      (pool.k[i], pool.v[i]))
            for i, layer in enumerate(self.decoder_layers)
        ]

    def takes(self, batch: ForwardBatch, x: torch.Tensor, pool: KVPool) -> bool:
        """Whether this step is one for the fused layers: a few float32 CPU rows, all of them decoders
        for the paged kernel, over this pool, with the weights the layers were described with."""
        paged = batch.paged_decode
        return (
            paged is not None
            and not batch.seqs
            and not batch.decode
            and 0 < x.shape[0] <= MAX_ROWS
            and paged.rows.shape[0] == x.shape[0]
            and x.dtype == torch.float32
            and x.device.type == "cpu"
            and pool is self.pool
            and _same(_sources(self.decoder_layers), self.sources)
        )

    def run(self, x: torch.Tensor, batch: ForwardBatch, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Every layer over the residual stream x (updated in place), as LlamaForCausalLM.forward's loop."""
        paged = batch.paged_decode
        step = StepArgs(self.shape, x, cos, sin, batch.new_slots,
                        (paged.rows, paged.pages, paged.page_start, paged.lengths), paged.page_size,
                        self.layers[0].num_slots)
        s = self.shape
        kv = torch.empty(2, len(self.layers), x.shape[0], s.kv_heads, s.head_dim)  # pre-RoPE, kept by the store
        hooks = batch.hooks
        for i, layer in enumerate(self.layers):
            k_pre, v = kv[0, i], kv[1, i]
            self.kernel.layer_in(layer, step, i > 0, k_pre, v)
            if hooks is not None:
                hooks.save_layer(i, k_pre, v)
                hooks.wait_layer(i)
            self.kernel.layer_out(layer, step, k_pre, v)
        x.add_(step.delta)


def _linears(layer: DecoderLayer) -> dict:
    a, m = layer.self_attn, layer.mlp
    modules = {"q": a.q_proj, "k": a.k_proj, "v": a.v_proj, "o": a.o_proj,
               "gate": m.gate_proj, "up": m.up_proj, "down": m.down_proj}
    return {
        name: (mod.quantized if mod.quantized is not None else mod.weight.detach(),
               None if mod.bias is None else mod.bias.detach())
        for name, mod in modules.items()
    }


def _sources(layers: list[DecoderLayer]) -> list[object]:
    """The objects the fused layers were described from: replaced ones mean stale pointers."""
    out: list[object] = []
    for layer in layers:
        a, m = layer.self_attn, layer.mlp
        for mod in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj):
            out += (mod._parameters["weight"], mod._parameters.get("bias"), mod.quantized)
        out += (layer.input_layernorm._parameters["weight"], layer.post_attention_layernorm._parameters["weight"])
    return out


def _same(now: list[object], then: list[object]) -> bool:
    return len(now) == len(then) and all(a is b for a, b in zip(now, then))
