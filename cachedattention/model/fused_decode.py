"""Decode steps of a few rows through the decoder layers in two C calls each (kernels/decode_layer.c).

Used on a CPU in float32 when every row of the step is a decoder attended by the paged kernel; the
results equal the per-operation path's bit for bit (it runs the same kernels). The layers' weights
are described to the C code once, by address. Each step checks that every weight, bias, GGUF block,
norm and pool is still where it was (and that each linear layer still has its kernel); if not, the
fused path turns itself off for good (logged) and steps go one operation at a time.
"""

from __future__ import annotations

import itertools
import logging
import operator
import weakref
from typing import TYPE_CHECKING

import torch

from cachedattention.kernels.decode_layer import DecodeLayerKernel, LayerArgs, LayerShape, LoRATables, StepArgs
from cachedattention.kernels.few_rows_linear import MAX_ROWS
from cachedattention.kvcache.kv_pool import KVPool
from cachedattention.model.batch import ForwardBatch
from cachedattention.model.layers import Linear

if TYPE_CHECKING:
    from torch import nn

    from cachedattention.model.llama import DecoderLayer, LlamaForCausalLM

log = logging.getLogger(__name__)
MAX_LORA_TABLES = 8  # the C tables of the last few sets of adapters steps ran with
# our names of the linear layers the C layers run (decode_layer.LINEARS), within a decoder layer
LINEAR_PATHS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
                "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}  # fmt: skip


class FusedDecode:
    """One engine's decoder layers, described once over its pool, for its all-decoder steps."""

    def __init__(self, kernel: DecodeLayerKernel, model: LlamaForCausalLM, pool: KVPool) -> None:
        """Raises ValueError when a weight, norm or pool is not one the C code takes, the MLPs are
        mixtures of experts or the layers Gemma's, a layer has a sliding window, or a linear layer has no few-rows kernel attached (the per-operation path
        it reproduces would use torch)."""
        spec = model.spec
        if spec.moe is not None:
            raise ValueError("the C layers have no mixture-of-experts MLP")
        if (spec.sandwich_norms or spec.post_norms_only or spec.qk_norm_full or spec.hidden_act != "silu"
                or spec.layer_norm or spec.parallel_block):  # fmt: skip
            # (an embedding scale is applied before them)
            raise ValueError("the C layers are Llama's: no Gemma, OLMo or Cohere norms and blocks, no GeGLU")
        if spec.window_layers:
            raise ValueError("the C layers attend whole contexts: no sliding window")
        if spec.attn_softcap is not None:
            raise ValueError("the C layers are Llama's: no capped attention scores")
        if spec.local_rope_layers or spec.nope_layers:
            raise ValueError("the C layers rotate every layer with one table")
        self.watch = _Watch(model.model.layers, pool)
        if not self.watch.kernels_attached():
            raise ValueError("attach the few-rows kernel to the linear layers first")
        self.kernel, self.pool = kernel, pool
        self.shape = LayerShape(spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim,
                                spec.intermediate_size, spec.rms_norm_eps)
        self.layers = [
            LayerArgs(self.shape, _linears(layer),
                      (layer.input_layernorm.weight.detach(), layer.post_attention_layernorm.weight.detach()),
                      (pool.k[i], pool.v[i]), _head_norms(layer), index=i, storage=pool.storage)
            for i, layer in enumerate(model.model.layers)
        ]
        # by the step's adapters (weakly: a table keeps no adapter in memory past the registry's limit)
        self._lora_tables: dict[tuple[int, ...], tuple[list[weakref.ref], LoRATables]] = {}
        if len({layer.num_slots for layer in self.layers}) > 1:
            raise ValueError("the layers' pools differ in size")

    def takes(self, batch: ForwardBatch, x: torch.Tensor, pool: KVPool) -> bool:
        """Whether this step is one for the fused layers: a few float32 CPU rows, all of them decoders
        for the paged kernel, over this pool, with the weights the layers were described with."""
        paged = batch.paged_decode
        fits = (
            bool(self.layers)
            and paged is not None
            and not batch.seqs
            and not batch.decode
            and 0 < x.shape[0] <= MAX_ROWS
            and paged.rows.shape[0] == x.shape[0]
            and x.dtype == torch.float32
            and x.device.type == "cpu"
            and pool is self.pool
            and self.watch.kernels_attached()  # (if not, the per-operation path uses torch: for now)
        )
        if fits and not self.watch.unchanged():
            log.info("a decoder layer's weights, kernels or pool changed: fused decode steps are off")
            self.layers = []  # and the old weights they kept alive go
            return False
        return fits

    def run(self, x: torch.Tensor, batch: ForwardBatch, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Every layer over the residual stream x (updated in place), as LlamaForCausalLM.forward's loop."""
        paged = batch.paged_decode
        step = StepArgs(self.shape, x, cos, sin, batch.new_slots,
                        (paged.rows, paged.pages, paged.page_start, paged.lengths), paged.page_size,
                        self.layers[0].num_slots)
        if batch.lora is not None:
            groups = batch.lora.groups
            starts = torch.tensor([0, *itertools.accumulate(g.index.shape[0] for g in groups)], dtype=torch.int64)
            step.set_lora(self._tables([g.adapter for g in groups]), torch.cat([g.index for g in groups]), starts)
        s = self.shape
        # pre-RoPE K/V, which the store keeps
        kv = torch.empty(2, len(self.layers), x.shape[0], s.kv_heads, s.head_dim, dtype=torch.float32)
        hooks = batch.hooks
        for i, layer in enumerate(self.layers):
            k_pre, v = kv[0, i], kv[1, i]
            try:
                self.kernel.layer_in(layer, step, i > 0, k_pre, v)
                if hooks is not None:
                    hooks.wait_layer(i)
                self.kernel.layer_out(layer, step, k_pre, v)
            except ValueError as e:
                raise ValueError(f"decoder layer {i} of a step of {x.shape[0]} decoders: {e}") from e
        x.add_(step.delta)
        if hooks is not None:  # one hand-off for every layer: a decoder's token is saved when its turn ends
            hooks.save_layers(kv[0], kv[1])


    def _tables(self, adapters: list) -> LoRATables:
        """The C tables of these adapters' weights, in this order (kept for the next steps of the same
        adapters, a few at a time: decode steps repeat them). A table holds the adapters' tensors by
        address only: the step's batch holds the adapters while it runs, and a table is used again
        only while every adapter it was made from is alive and the same object (an id may be reused)."""
        key = tuple(map(id, adapters))
        cached = self._lora_tables.get(key)
        if cached is not None and all(ref() is a for ref, a in zip(cached[0], adapters, strict=True)):
            return cached[1]
        self._lora_tables = {k: v for k, v in self._lora_tables.items() if all(ref() is not None for ref in v[0])}
        if key not in self._lora_tables:
            if len(self._lora_tables) >= MAX_LORA_TABLES:
                self._lora_tables.pop(next(iter(self._lora_tables)))
            modules = [{name: f"model.layers.{i}.{path}" for name, path in LINEAR_PATHS.items()}
                       for i in range(len(self.layers))]  # fmt: skip
            tables = LoRATables(self.shape, len(self.layers), len(adapters),
                                lambda i, name, g: adapters[g].weights.get(modules[i][name]))  # fmt: skip
            self._lora_tables[key] = ([weakref.ref(a) for a in adapters], tables)
        return self._lora_tables[key][1]


def _linear_modules(layer: DecoderLayer) -> dict[str, Linear]:
    return {name: layer.get_submodule(path) for name, path in LINEAR_PATHS.items()}


def _linears(layer: DecoderLayer) -> dict:
    """Each linear layer's (weight the kernel reads, bias), as the per-operation path passes them."""
    return {
        name: (_detached(mod.kernel_weight()), None if mod.bias is None else mod.bias.detach())
        for name, mod in _linear_modules(layer).items()
    }


def _norms(layer: DecoderLayer) -> list[nn.Module]:
    """The layer's RMSNorms: its two, and Qwen3's norms of each head's q and k."""
    a = layer.self_attn
    return [layer.input_layernorm, layer.post_attention_layernorm, *(
        [a.q_norm, a.k_norm] if a.spec.qk_norm else [])]


def _head_norms(layer: DecoderLayer) -> tuple[torch.Tensor, torch.Tensor] | None:
    a = layer.self_attn
    return (a.q_norm.weight.detach(), a.k_norm.weight.detach()) if a.spec.qk_norm else None


def _detached(weight):
    return weight.detach() if isinstance(weight, torch.Tensor) else weight


class _Watch:
    """Notices, cheaply enough for every step, any change to what the fused layers were described
    from: a module's weight, bias, norm or GGUF blocks replaced, a tensor given new memory
    (`p.data = ...`), a layer swapped, a pool's memory moved; and whether every linear layer still
    has a few-rows kernel (any: they compute alike; engines sharing a model each attach their own)."""

    def __init__(self, layers: nn.ModuleList, pool: KVPool) -> None:
        self.layers, self.layer_objects = layers, list(layers)
        self.slots: list[tuple[dict, str, object]] = []  # (a module's dict, key, the object it held)
        self.linears: list[nn.Module] = []  # each must keep a few-rows kernel (any: they compute alike)
        for layer in layers:
            for mod in _linear_modules(layer).values():
                self.slots += [(mod._parameters, key, mod._parameters.get(key)) for key in ("weight", "bias")]
                self.slots.append((mod.__dict__, "quantized", mod.quantized))
                self.linears.append(mod)
            for norm in _norms(layer):
                self.slots.append((norm._parameters, "weight", norm._parameters["weight"]))
        # GGUF blocks are ours and frozen: only the parameters and pools can be given new memory
        self.tensors = [o for _, _, o in self.slots if isinstance(o, torch.Tensor)] + [*pool.k, *pool.v]
        self.addresses = [t.data_ptr() for t in self.tensors]
        self.keys = [(d, key) for d, key, _ in self.slots]
        self.objects = [o for _, _, o in self.slots]

    def kernels_attached(self) -> bool:
        return all(m.few_rows is not None for m in self.linears)

    def unchanged(self) -> bool:
        return (
            all(map(operator.is_, self.layers, self.layer_objects))
            and len(self.layers) == len(self.layer_objects)
            and all(map(operator.is_, [d.get(key) for d, key in self.keys], self.objects))
            and [t.data_ptr() for t in self.tensors] == self.addresses
        )

