"""Turns a scheduled step into one flat forward pass over the paged KV pool."""

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
        ids, positions, slots, seqs, logit_rows, wants = [], [], [], [], [], []
        start = 0
        ps = self.pool.page_size
        for i, s in enumerate(scheduled):
            req = s.request
            lo, hi = req.num_computed, req.num_computed + s.num_new
            ids.extend(req.all_token_ids[lo:hi])
            positions.extend(range(lo, hi))
            seq_slots = KVPool.slots_for(req.pages, ps, 0, hi, self.device)
            slots.append(seq_slots[lo:hi])
            seqs.append(SeqSlice(start=start, num_new=s.num_new, context_len=lo, slots=seq_slots))
            if hi == req.num_tokens:
                logit_rows.append(start + s.num_new - 1)
                wants.append(i)
            start += s.num_new
        dev = self.device
        decode = self._decode_group(seqs)
        batch = ForwardBatch(
            input_ids=torch.tensor(ids, dtype=torch.long, device=dev),
            positions=torch.tensor(positions, dtype=torch.long, device=dev),
            new_slots=torch.cat(slots),
            seqs=seqs,
            logits_indices=torch.tensor(logit_rows, dtype=torch.long, device=dev),
            hooks=hooks,
            decode=decode,
        )
        if decode is not None:
            batch.seqs = [s for s in seqs if not (s.num_new == 1 and s.context_len > 0)]
        return batch, wants

    def _decode_group(self, seqs: list[SeqSlice]) -> DecodeGroup | None:
        """Group the decoding sequences (one new token on top of a context) for one padded attention call."""
        dec = [s for s in seqs if s.num_new == 1 and s.context_len > 0]
        if len(dec) < 2:
            return None
        lmax = max(s.total_len for s in dec)
        slots = torch.zeros(len(dec), lmax, dtype=torch.long, device=self.device)
        mask = torch.zeros(len(dec), 1, 1, lmax, dtype=torch.bool, device=self.device)
        for i, s in enumerate(dec):
            slots[i, : s.total_len] = s.slots
            mask[i, 0, 0, : s.total_len] = True
        rows = torch.tensor([s.start for s in dec], dtype=torch.long, device=self.device)
        return DecodeGroup(rows=rows, slots=slots, mask=mask)

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        return self.model(batch, self.pool)
