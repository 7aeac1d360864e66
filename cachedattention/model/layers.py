"""Building blocks of a Llama decoder layer: linear layers that hand few-row calls to a CPU kernel,
RMSNorm, the gated MLP and the sparse mixture of them; a oneDNN-packed weight."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

from cachedattention.kernels import few_rows_linear
from cachedattention.kernels.few_rows_linear import FewRowsLinearKernel, QuantizedWeight
from cachedattention.kernels.row_ops import RowOpsKernel
from cachedattention.model.spec import MoESpec

if TYPE_CHECKING:
    from cachedattention.lora.batch import LoRASlot

log = logging.getLogger(__name__)
MAX_DEQUANTIZED = 64 << 20  # weights held only as blocks dequantized for one call at most (256 MB of float32)


class Linear(nn.Linear):
    """nn.Linear (same parameters and names) whose calls with a few float32 rows on a CPU go to the
    few-rows kernel once one is attached (decode steps: one row per decoder), which reads the GGUF
    blocks the weight came from when the loader attached them (`quantized`); a oneDNN-packed copy,
    when attached, serves the calls the kernel does not take; everything else is torch's GEMM."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.few_rows: FewRowsLinearKernel | None = None
        self.quantized: QuantizedWeight | None = None
        self.packed: OneDNNWeight | None = None
        # the blocks are the only copy (a GGUF's decoder layers on a CPU): `weight` is a placeholder
        self.blocks_only = False
        # with LoRA enabled: where this layer finds the step's adapters, and its name in theirs
        self.lora_slot: LoRASlot | None = None
        self.lora_key = ""

    def kernel_weight(self) -> torch.Tensor | QuantizedWeight:
        """What the few-rows kernel reads: the GGUF blocks when attached, else the float32 weight."""
        return self.quantized if self.quantized is not None else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        slot = self.lora_slot
        if slot is None or slot.batch is None:
            return self._base(x)
        y = self._base(x)
        slot.batch.add_to(self.lora_key, x, y)  # each adapter's scale * (x A^T) B^T, on its rows
        return y

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self.few_rows
        if self.blocks_only:  # every call on the blocks: the kernel, or dequantized for the call (into a kept buffer)
            if x.dim() != 2:  # rows, as the kernel and the slices below take them
                return self._base(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], self.out_features)
            if x.shape[0] == 0:  # (a step where no prompt ends yet asks the head for no rows)
                return x.new_zeros(0, self.out_features)
            if kernel is not None and kernel.takes(x, self.quantized, blocks_only=True):
                return kernel.run(x, self.quantized, self.bias)
            limit = few_rows_linear.MAX_ROWS_BLOCKS_ONLY
            big = self.quantized.shape[0] * self.quantized.shape[1] > MAX_DEQUANTIZED
            if kernel is not None and big and x.shape[0] > limit:
                # a large vocabulary's head (prompt logprobs of a long chunk): never a float32 copy of GBs
                return torch.cat([self._base(rows) for rows in x.split(limit)])
            if kernel is not None:
                return kernel.dequantized_linear(x, self.quantized, self.bias)
            return F.linear(x, self.quantized.dequantize().to(x.dtype), self.bias)
        weight = self.kernel_weight()
        if kernel is not None and kernel.takes(x, weight) and not _needs_grad(self.weight):
            return kernel.run(x, weight, self.bias)
        if self.packed is not None and self.bias is None:
            return self.packed.linear(x)
        return F.linear(x, self.weight, self.bias)


class Embedding(nn.Embedding):
    """nn.Embedding (same parameter and name) that, when it holds only GGUF blocks (`blocks_only`:
    its weight a placeholder, on a CPU), dequantizes just the rows it looks up."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        # no random init: the loader adopts the checkpoint's weight (and init's normal_ on the meta
        # device imports torch._dynamo, 1.3 s of every start)
        super().__init__(num_embeddings, embedding_dim, _weight=torch.empty(num_embeddings, embedding_dim))
        self.quantized: QuantizedWeight | None = None
        self.blocks_only = False

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.blocks_only:
            return self.quantized.dequantize(ids.reshape(-1)).view(*ids.shape, self.embedding_dim).to(self.weight.dtype)
        return super().forward(ids)


def _needs_grad(weight: torch.Tensor) -> bool:
    return weight.requires_grad and torch.is_grad_enabled()  # the C kernel has no backward


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused kernel, same math as below
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # normalise in float32 as the reference does, so bf16/fp16 runs stay close to it
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class LayerNorm(nn.Module):
    """Cohere's norm: mean and variance over the last dimension, a weight and no bias, in float32.
    `shape` (heads, dim): a weight for each head (Command R+'s q and k norms, over [..., heads, dim])."""

    def __init__(self, shape: int | tuple[int, int], eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(shape))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dim() == 1:
            return F.layer_norm(x.float(), (x.shape[-1],), self.weight.float(), None, self.eps).to(x.dtype)
        return (F.layer_norm(x.float(), (x.shape[-1],), None, None, self.eps) * self.weight.float()).to(x.dtype)


def make_norm(dim: int, eps: float, mean_centred: bool) -> RMSNorm | LayerNorm:
    return LayerNorm(dim, eps) if mean_centred else RMSNorm(dim, eps)


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): SwiGLU (act silu), or Gemma's GeGLU (gelu_pytorch_tanh); with
    `clamp` (alpha, limit), gpt-oss's SwiGLU: gate and up clamped to limit (gate from above only),
    then (up + 1) * gate * sigmoid(alpha * gate)."""

    def __init__(self, hidden: int, intermediate: int, act: str = "silu", bias: bool = False,
                 clamp: tuple[float, float] | None = None) -> None:  # fmt: skip
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate, bias=bias)
        self.up_proj = Linear(hidden, intermediate, bias=bias)
        self.down_proj = Linear(intermediate, hidden, bias=bias)
        self.act = act
        self.clamp = clamp

    def forward(self, x: torch.Tensor, ops: RowOpsKernel | None = None) -> torch.Tensor:
        """With the row ops (a few rows on a CPU), SiLU-times-up is one C call."""
        gate, up = self.gate_proj(x), self.up_proj(x)
        if self.clamp is not None:
            alpha, limit = self.clamp
            gate, up = gate.clamp_(max=limit), up.clamp_(-limit, limit).add_(1.0)
            return self.down_proj(torch.sigmoid(gate * alpha).mul_(gate).mul_(up))
        if self.act != "silu":
            return self.down_proj(F.gelu(gate, approximate="tanh").mul_(up))
        act = ops.silu_mul(gate, up) if ops is not None else F.silu(gate, inplace=True).mul_(up)
        return self.down_proj(act)


class SparseMoE(nn.Module):
    """Each token runs through the top_k experts (gated MLPs) its router picks, their outputs summed
    with the router's softmax probabilities (rescaled to sum to 1 when the model says so; gpt-oss's:
    the softmax of the top_k logits); Qwen2-MoE adds a shared expert every token runs, scaled by a
    sigmoid gate. Names match the checkpoints (gpt-oss's router and fused experts are renamed and
    split at load)."""

    def __init__(self, hidden: int, moe: MoESpec) -> None:
        super().__init__()
        self.top_k, self.normalize_top_k, self.softmax_top_k = moe.top_k, moe.normalize_top_k, moe.softmax_top_k
        self.sigmoid_groups, self.routed_scale = moe.sigmoid_groups, moe.routed_scale
        self.gate = Linear(hidden, moe.num_experts, bias=moe.router_bias)
        if moe.sigmoid_groups is not None:  # GLM-4.5's bias on the scores an expert is chosen by (not weighted by)
            self.gate.register_buffer("e_score_correction_bias", torch.zeros(moe.num_experts))
        clamp = (moe.swiglu_alpha, moe.swiglu_limit) if moe.swiglu_limit is not None else None
        self.experts = nn.ModuleList(GatedMLP(hidden, moe.expert_intermediate_size, bias=moe.expert_bias, clamp=clamp)
                                     for _ in range(moe.num_experts))  # fmt: skip
        self.shared_expert: GatedMLP | None = None
        if moe.shared_expert_intermediate_size:
            self.shared_expert = GatedMLP(hidden, moe.shared_expert_intermediate_size)
            self.shared_expert_gate = Linear(hidden, 1, bias=False)
        self.shared_experts: GatedMLP | None = None  # GLM-4.5's: ungated
        if moe.shared_experts_intermediate_size:
            self.shared_experts = GatedMLP(hidden, moe.shared_experts_intermediate_size)

    def forward(self, x: torch.Tensor, ops: RowOpsKernel | None = None) -> torch.Tensor:
        logits = self.gate(x).float()  # in float32 whatever the model's dtype
        if self.sigmoid_groups is not None:
            weights, chosen = self._sigmoid_route(logits)
        elif self.softmax_top_k:
            weights, chosen = torch.topk(logits, self.top_k, dim=-1)
            weights = torch.softmax(weights, dim=-1)
        else:
            weights, chosen = torch.topk(torch.softmax(logits, dim=-1), self.top_k, dim=-1)
        if self.normalize_top_k:
            weights /= weights.sum(dim=-1, keepdim=True) + (1e-20 if self.sigmoid_groups else 0.0)
        if self.routed_scale is not None:
            weights *= self.routed_scale
        weights = weights.to(x.dtype)
        out = torch.zeros_like(x)
        # one call per expert over the rows that chose it (a decode step: a few experts of one row each)
        for expert in chosen.unique().tolist():
            rows, rank = torch.nonzero(chosen == expert, as_tuple=True)
            y = self.experts[expert](x[rows], ops)
            out.index_add_(0, rows, y.mul_(weights[rows, rank, None]))
        if self.shared_expert is not None:
            out.add_(self.shared_expert(x, ops).mul_(torch.sigmoid(self.shared_expert_gate(x))))
        if self.shared_experts is not None:
            out.add_(self.shared_experts(x, ops))
        return out

    def _sigmoid_route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """GLM-4.5's (DeepSeek-V3's): sigmoid scores; the experts are chosen by score + bias, only in
        the groups whose two best such scores sum highest; each weighs its own score."""
        scores = logits.sigmoid()
        choice = scores + self.gate.e_score_correction_bias.float()
        groups, kept = self.sigmoid_groups
        if kept < groups:
            per_group = choice.view(-1, groups, choice.shape[-1] // groups)
            best = per_group.topk(min(2, per_group.shape[-1]), dim=-1)[0].sum(dim=-1)
            keep = torch.zeros_like(best, dtype=torch.bool).scatter_(1, best.topk(kept, dim=-1)[1], True)
            choice = choice.masked_fill(~keep.repeat_interleave(per_group.shape[-1], dim=1), float("-inf"))
        chosen = choice.topk(self.top_k, dim=-1)[1]
        return scores.gather(1, chosen), chosen


class OneDNNWeight:
    """A float32 linear weight also reordered for oneDNN, for a CPU.

    MKL's GEMM for a few rows against a wide weight (the vocabulary head: 49k outputs) runs at a
    third of its speed; oneDNN's packed kernel does not (bench/lm_head_timing.py). `rows` is the
    range of row counts it is used for; outside it, and wherever packing is unavailable, the plain
    weight serves.
    """

    def __init__(self, weight: torch.Tensor, rows: tuple[int, int]) -> None:
        self.weight = weight
        self.rows = rows
        self.packed: torch.Tensor | None = None
        if weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkldnn.is_available():
            try:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 8)
            except (RuntimeError, AttributeError) as exc:  # a torch without the op: plain GEMM
                log.info("oneDNN weight packing unavailable (%s)", exc)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and self.rows[0] <= x.shape[0] <= self.rows[1]:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")
        return F.linear(x, self.weight)
