"""Turns a scheduled step into one flat forward pass over the paged KV pool.

Index tensors are built on the CPU and moved to the device in a few transfers per step
(not per sequence): on a GPU, per-sequence copies and syncs would dominate decode steps.
"""

from __future__ import annotations

import torch

from cachedattention.engine.scheduler import ScheduledSeq
from cachedattention.kvcache.kv_pool import KVPool
from cachedattention.model.batch import DecodeGroup, ForwardBatch, LayerHooks, SeqSlice
from cachedattention.model.llama import LlamaForCausalLM


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, pool: KVPool, device: torch.device) -> None:
        self.model = model
        self.pool = pool
        self.device = device

    def build_batch(self, scheduled: list[ScheduledSeq], hooks: LayerHooks | None) -> tuple[ForwardBatch, list[int]]:
        """The flat batch, and which scheduled entries get logits (those whose tokens are all computed)."""
        ids, positions, seq_slots, new_slots, logit_rows, wants, shapes = [], [], [], [], [], [], []
        start = 0
        for i, s in enumerate(scheduled):
            req = s.request
            lo, hi = req.num_computed, req.num_computed + s.num_new
            ids.extend(req.all_token_ids[lo:hi])
            positions.extend(range(lo, hi))
            slots = KVPool.slots_for(req.pages, self.pool.page_size, 0, hi, torch.device("cpu"))
            seq_slots.append(slots)
            new_slots.append(slots[lo:hi])
            shapes.append((start, s.num_new, lo))
            if hi == req.num_tokens:
                logit_rows.append(start + s.num_new - 1)
                wants.append(i)
            start += s.num_new
        dev = self.device
        small = torch.tensor(ids + positions + logit_rows, dtype=torch.long).to(dev, non_blocking=True)
        n = len(ids)
        all_slots = torch.cat(new_slots + seq_slots).to(dev, non_blocking=True)
        seqs, off = [], n
        for (begin, num_new, context), slots in zip(shapes, seq_slots):
            seqs.append(SeqSlice(begin, num_new, context, all_slots[off : off + len(slots)], self._mask(num_new, context)))
            off += len(slots)
        decode = self._decode_group(seqs, seq_slots)
        grouped = decode is not None
        for seq, s in zip(seqs, scheduled):
            if not (grouped and _is_decode(seq)):  # the decode group gathers its padded slots anyway
                seq.first_slot = KVPool.contiguous_start(s.request.pages, self.pool.page_size, 0, seq.total_len)
        if grouped:
            seqs = [s for s in seqs if not _is_decode(s)]
        batch = ForwardBatch(
            input_ids=small[:n],
            positions=small[n : 2 * n],
            new_slots=all_slots[:n],
            seqs=seqs,
            logits_indices=small[2 * n :],
            hooks=hooks,
            decode=decode,
        )
        return batch, wants

    def _mask(self, num_new: int, context: int) -> torch.Tensor | None:
        """The bottom-right causal mask of new tokens over a cached context, for the CPU kernel.

        (CUDA takes causal_lower_right natively; the CPU kernel would materialise it in every layer.)
        """
        if self.device.type != "cpu" or context == 0 or num_new == 1:
            return None
        return torch.ones(num_new, context + num_new, dtype=torch.bool).tril(context)

    def _decode_group(self, seqs: list[SeqSlice], cpu_slots: list[torch.Tensor]) -> DecodeGroup | None:
        """Group the decoding sequences (one new token on top of a context) for one padded attention call."""
        dec = [(s, c) for s, c in zip(seqs, cpu_slots) if _is_decode(s)]
        if len(dec) < 2:
            return None
        lmax = max(s.total_len for s, _ in dec)
        slots = torch.zeros(len(dec), lmax, dtype=torch.long)
        mask = torch.zeros(len(dec), 1, 1, lmax, dtype=torch.bool)
        for i, (s, c) in enumerate(dec):
            slots[i, : s.total_len] = c
            mask[i, 0, 0, : s.total_len] = True
        rows = torch.tensor([s.start for s, _ in dec], dtype=torch.long)
        dev = self.device
        return DecodeGroup(
            rows=rows.to(dev, non_blocking=True),
            slots=slots.to(dev, non_blocking=True),
            mask=mask.to(dev, non_blocking=True),
        )

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        return self.model(batch, self.pool)


def _is_decode(s: SeqSlice) -> bool:
    return s.num_new == 1 and s.context_len > 0

