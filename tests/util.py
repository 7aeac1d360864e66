"""Shared test helpers: logits capture from the real engine path, relative error."""

from __future__ import annotations

import torch

import cachedattention.engine.engine as engine_mod


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def capture_logits(monkeypatch) -> list[torch.Tensor]:
    """Record every logits row the engine samples from (in sampling order)."""
    seen: list[torch.Tensor] = []
    real = engine_mod.sample_batch

    def spy(logits, *rest):
        seen.extend(row.clone() for row in logits)
        return real(logits, *rest)

    monkeypatch.setattr(engine_mod, "sample_batch", spy)
    return seen
