"""Turns a scheduled step into one flat forward pass over the paged KV pool."""

from __future__ import annotations

import torch

from cachedattention.engine.scheduler import ScheduledSeq
from cachedattention.kvcache.kv_pool import KVPool
from cachedattention.model.batch import ForwardBatch, LayerHooks, SeqSlice
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
        batch = ForwardBatch(
            input_ids=torch.tensor(ids, dtype=torch.long, device=dev),
            positions=torch.tensor(positions, dtype=torch.long, device=dev),
            new_slots=torch.cat(slots),
            seqs=seqs,
            logits_indices=torch.tensor(logit_rows, dtype=torch.long, device=dev),
            hooks=hooks,
        )
        return batch, wants

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        return self.model(batch, self.pool)
