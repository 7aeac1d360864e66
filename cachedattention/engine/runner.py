"""Turns a scheduled step into one flat forward pass over the paged KV pool.

Index tensors are built on the CPU and moved to the device in a few transfers per step
(not per sequence): on a GPU, per-sequence copies and syncs would dominate decode steps.
"""

from __future__ import annotations

import logging

import torch

from cachedattention.engine.scheduler import ScheduledSeq
from cachedattention.kernels.decode_layer import DecodeLayerKernel
from cachedattention.kernels.few_rows_linear import FewRowsLinearKernel
from cachedattention.kernels.paged_decode import PagedDecodeKernel
from cachedattention.kernels.row_ops import RowOpsKernel
from cachedattention.kvcache.kv_pool import KVPool
from cachedattention.lora.batch import group_rows
from cachedattention.model.batch import DecodeGroup, ForwardBatch, LayerHooks, PagedDecode, SeqSlice, window_blocks
from cachedattention.model.fused_decode import FusedDecode
from cachedattention.model.llama import LlamaForCausalLM
from cachedattention.model.plain_attention import bottom_right_mask
from cachedattention.model.split_attention import split_applies

log = logging.getLogger(__name__)

# One more padded attention call on a CPU costs about as much as this many padded rows of context
CPU_GROUP_CALL_ROWS = 1024
# a prompt chunk attends in blocks of rows of a quarter window (at least this many) in a layer with
# a sliding window: one call over 8,192 new tokens and a window of 512 took 1.0 s a layer on a CPU,
# 0.09 s in blocks of 128 rows, 0.13 s in blocks of 512 (bench/band_blocks_timing.py)
MIN_WINDOW_BLOCK = 16


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, pool: KVPool, device: torch.device) -> None:
        self.model = model
        self.pool = pool
        self.device = device
        if device.type == "cuda":  # (bottom_right_causal's, imported here: not in the first turn's prefill)
            import torch.nn.attention.bias  # noqa: F401
        # what one more attention call costs, in padded context rows, when splitting the decoders
        # into groups of similar length: a CPU pays per row copied (measured by
        # bench/decode_timing.py), a GPU per kernel launch, so there it keeps one group
        self.group_call_rows = CPU_GROUP_CALL_ROWS if device.type == "cpu" else None
        self.window = model.spec.any_window
        self.all_windowed = len(model.spec.window_layers) == model.spec.num_layers
        # a CPU with a C compiler attends decoders straight over their pages; else padded groups
        self.decode_kernel = _load_decode_kernel(model, pool, device)
        # and runs few-row steps (decode) through kernels that read weights faster and dispatch less
        linear, row_ops = _load_few_row_kernels(model, device)
        model.use_few_row_kernels(linear, row_ops)
        # and when all of a step's rows are decoders, each layer in two C calls; over this engine's
        # pool, so it is the runner's (engines may share a model: the demo's two do)
        self.fused_decode = _fused_decode(model, pool) if linear and row_ops and self.decode_kernel else None

    def build_batch(
        self, scheduled: list[ScheduledSeq], hooks: LayerHooks | None
    ) -> tuple[ForwardBatch, list[int], list[tuple[int, int, int]], list[tuple[int, int]]]:
        """The flat batch; which scheduled entries get logits to sample from (those whose tokens are
        all computed); the prompt positions whose logits give asked-for prompt logprobs, as
        spans (scheduled index, first prompt token predicted, count), their rows after the sampled
        ones; and the rows before a speculating decoder's last, which check its speculated tokens, as
        (scheduled index, count), their rows after the prompts' ones."""
        ids, positions, new_slots, page_tables, logit_rows, wants, shapes, owners = [], [], [], [], [], [], [], []
        prompt_rows, prompt_spans, adapters, draft_rows, draft_spans = [], [], [], [], []
        start, page_size = 0, self.pool.page_size
        for i, s in enumerate(scheduled):
            req = s.request
            lo, hi = req.num_computed, req.num_computed + s.num_new
            ids.extend(req.all_token_ids[lo:hi])
            positions.extend(range(lo, hi))
            new_slots.append(KVPool.slots_for(req.pages, page_size, lo, hi, torch.device("cpu")))
            # a decoder checking speculated tokens: each of its rows a decoder of its own over the
            # pages (causal: each attends up to its own position), so the step stays one of decoders
            speculating = bool(req.draft) and s.num_new > 1 and hi == req.num_tokens
            for a, b in [(lo + j, lo + j + 1) for j in range(s.num_new)] if speculating else [(lo, hi)]:
                page_tables.append(torch.tensor(req.pages[: -(-b // page_size)], dtype=torch.long))
                shapes.append((start + a - lo, b - a, a))
                owners.append(i)
            adapters.append((req.lora, start, start + s.num_new))
            if hi == req.num_tokens:
                logit_rows.append(start + s.num_new - 1)
                wants.append(i)
                if speculating:
                    draft_rows.extend(range(start, start + s.num_new - 1))
                    draft_spans.append((i, s.num_new - 1))
            if req.prompt_logprobs is not None:
                # row r predicts token r + 1; the prompt's last row samples; a recomputed row is not counted twice
                first, last = max(lo + 1, len(req.prompt_logprobs)), min(hi, len(req.prompt_token_ids) - 1)
                if first <= last:
                    prompt_rows.extend(range(start + first - 1 - lo, start + last - lo))
                    prompt_spans.append((i, first, last - first + 1))
            start += s.num_new
        dev = self.device
        small = torch.tensor(ids + positions + logit_rows + prompt_rows + draft_rows, dtype=torch.long).to(
            dev, non_blocking=True)
        n = len(ids)
        index = torch.cat(new_slots + page_tables).to(dev, non_blocking=True)
        seqs, off = [], n
        for (begin, num_new, context), pages in zip(shapes, page_tables):
            split = self._split(num_new, context)
            blocks = self._window_blocks(num_new, context)
            # (a model whose every layer the window cuts here reads only its window blocks' masks)
            mask = None if split or (blocks and self.all_windowed) else self._mask(num_new, context)
            seqs.append(SeqSlice(begin, num_new, context, index[off : off + len(pages)], mask, split=split,
                                 window_blocks=blocks))
            off += len(pages)
        decoders = [i for i, s in enumerate(seqs) if s.is_decode]
        paged, decode = None, []
        if self.decode_kernel is not None and decoders:
            paged, grouped = self._paged_decode(seqs, page_tables, decoders), set(decoders)
        else:
            decode, grouped = self._decode_groups(seqs, page_tables, decoders)
        alone = [i for i in range(len(seqs)) if i not in grouped]  # attended through pool.read
        for i in alone:
            seqs[i].first_slot = KVPool.contiguous_start(scheduled[owners[i]].request.pages, page_size, 0,
                                                         seqs[i].total_len)  # fmt: skip
        seqs = [seqs[i] for i in alone]
        batch = ForwardBatch(
            input_ids=small[:n],
            positions=small[n : 2 * n],
            new_slots=index[:n],
            seqs=seqs,
            logits_indices=small[2 * n :],
            hooks=hooks,
            decode=decode,
            paged_decode=paged,
            lora=group_rows(adapters, n, dev, self.model.row_ops),
        )
        return batch, wants, prompt_spans, draft_spans

    def _paged_decode(self, seqs: list[SeqSlice], cpu_pages: list[torch.Tensor], dec: list[int]) -> PagedDecode:
        """The decoding sequences `dec` (indices into seqs) for the paged kernel."""
        counts = torch.tensor([0] + [len(cpu_pages[i]) for i in dec], dtype=torch.long)
        lengths = torch.tensor([seqs[i].total_len for i in dec], dtype=torch.long)
        return PagedDecode(
            kernel=self.decode_kernel,
            rows=torch.tensor([seqs[i].start for i in dec], dtype=torch.long),
            pages=torch.cat([cpu_pages[i] for i in dec]),
            page_start=counts.cumsum(0),
            lengths=lengths,
            page_size=self.pool.page_size,
            window_starts=(lengths - self.window).clamp_(min=0) if self.window is not None else None,
            storage=self.pool.storage,
        )

    def _mask(self, num_new: int, context: int) -> torch.Tensor | None:
        """The bottom-right causal mask of new tokens over a cached context, for the CPU kernel.

        (CUDA takes causal_lower_right natively; the CPU kernel would materialise it in every layer.)
        """
        if self.device.type != "cpu" or context == 0 or num_new == 1:
            return None
        return bottom_right_mask(num_new, context + num_new, self.device)

    def _window_blocks(self, num_new: int, context: int) -> list | None:
        """A prompt (chunk) whose context the sliding window cuts, in blocks of rows over the keys
        each sees; a decoder takes its last keys instead."""
        if self.window is None or context + num_new <= self.window or (num_new == 1 and context > 0):
            return None
        block = max(MIN_WINDOW_BLOCK, self.window // 4)
        return window_blocks(num_new, context, self.window, block, self.device)

    def _split(self, num_new: int, context: int) -> bool:
        """Whether this prompt attends its history and its own tokens apart (then needing no mask)."""
        return self.device.type == "cpu" and context > 0 and split_applies(num_new, context, self.pool.dtype)

    def _decode_groups(
        self, seqs: list[SeqSlice], cpu_pages: list[torch.Tensor], dec: list[int]
    ) -> tuple[list[DecodeGroup], set[int]]:
        """The decoding sequences `dec` (indices into seqs) in padded groups of similar length.

        Returns the groups and the indices of the sequences they hold; a sequence left alone
        attends by itself.
        """
        if len(dec) < 2:
            return [], set()
        groups, grouped = [], set()
        for bucket in bucket_by_length([seqs[i].total_len for i in dec], self.group_call_rows):
            if len(bucket) > 1:
                members = [dec[j] for j in bucket]
                groups.append(self._group([seqs[i] for i in members], [cpu_pages[i] for i in members]))
                grouped.update(members)
        return groups, grouped

    def _group(self, seqs: list[SeqSlice], cpu_pages: list[torch.Tensor]) -> DecodeGroup:
        pages, mask = self._padded(cpu_pages, [(0, s.total_len) for s in seqs])
        dev = self.device
        group = DecodeGroup(
            rows=torch.tensor([s.start for s in seqs], dtype=torch.long).to(dev, non_blocking=True),
            pages=pages.to(dev, non_blocking=True),
            mask=mask.to(dev, non_blocking=True),
        )
        if self.window is not None:  # each context's last window tokens, from the page holding the first
            pages, mask = self._padded(cpu_pages, [(max(0, s.total_len - self.window), s.total_len) for s in seqs])
            group.window_pages, group.window_mask = pages.to(dev, non_blocking=True), mask.to(dev, non_blocking=True)
        return group

    def _padded(self, cpu_pages: list[torch.Tensor], spans: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The pages holding each sequence's tokens [a, b), from a's page, padded with page 0; and the
        mask of those tokens in them."""
        ps = self.pool.page_size
        firsts = [a // ps for a, _ in spans]
        most = max(len(p) - f for p, f in zip(cpu_pages, firsts))
        pages = torch.zeros(len(spans), most, dtype=torch.long)  # padding reads page 0, masked out
        mask = torch.zeros(len(spans), 1, 1, most * ps, dtype=torch.bool)
        for i, (p, f, (a, b)) in enumerate(zip(cpu_pages, firsts, spans)):
            pages[i, : len(p) - f] = p[f:]
            mask[i, 0, 0, a - f * ps : b - f * ps] = True
        return pages, mask

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        return self.model(batch, self.pool, self.fused_decode)


def _load_decode_kernel(model: LlamaForCausalLM, pool: KVPool, device: torch.device) -> PagedDecodeKernel | None:
    """The paged decode kernel when it serves this engine: float32 on a CPU, a shape it takes."""
    if device.type != "cpu" or pool.dtype != torch.float32 or model.lm_head.weight.dtype != torch.float32:
        return None  # the kernel is float32 C for a CPU (over narrower pages too); a GPU keeps its fused attention
    spec = model.spec
    if spec.attn_sinks:  # the kernel's softmax has no sinks: gpt-oss decodes through torch
        return None
    kernel = PagedDecodeKernel.load()
    if kernel is None or not kernel.supports(spec.num_heads, spec.num_kv_heads, spec.head_dim, pool.page_size):
        return None
    return kernel


def _load_few_row_kernels(
    model: LlamaForCausalLM, device: torch.device
) -> tuple[FewRowsLinearKernel | None, RowOpsKernel | None]:
    """The few-rows linear kernel (AVX-512) and the row ops when they serve this model: float32 on a CPU."""
    if device.type != "cpu" or model.lm_head.weight.dtype != torch.float32:
        return None, None
    return FewRowsLinearKernel.load(), RowOpsKernel.load()


def _fused_decode(model: LlamaForCausalLM, pool: KVPool) -> FusedDecode | None:
    kernel = DecodeLayerKernel.load()
    if kernel is None:
        return None
    try:
        return FusedDecode(kernel, model, pool)
    except ValueError as exc:  # a weight or pool layout the C code does not take: one call per operation
        log.info("fused decode layers off: %s", exc)
        return None


def bucket_by_length(lengths: list[int], call_rows: int | None) -> list[list[int]]:
    """Split sequences into groups padded to their longest member, at the least cost.

    Cost of a group: `call_rows` (one more attention call, in rows) plus members x longest length.
    Sorted by length, the best split is found by dynamic programming over contiguous runs.
    Returns lists of indices into `lengths`; None: one group holding all.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    if call_rows is None or len(order) < 2:
        return [order] if order else []
    sorted_len = [lengths[i] for i in order]
    best = [0.0] + [float("inf")] * len(order)  # best[j]: cost of the shortest j sequences
    cut = [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):
        for i in range(j):  # the last group holds sorted positions i .. j-1
            cost = best[i] + call_rows + (j - i) * sorted_len[j - 1]
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], len(order)
    while j > 0:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]
