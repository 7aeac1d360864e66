"""Rotary position embedding: frequencies (Llama 3's scaling, or each frequency's divisor) and
rotation of pre-RoPE keys."""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from cachedattention.model.spec import ModelSpec, RopeScaling


def inv_frequencies(spec: ModelSpec, long: bool = False) -> torch.Tensor:
    """One frequency per pair of each head's dimensions: the rotating ones' (over rotary_dim, with
    their divisors: GGUF's rope_freqs, linear, YaRN, longrope's short factors or, `long`, its long
    ones), then zeros for a partial rotary's other dimensions (the loader puts those in the middle
    of each half, so one rotate_half over the whole head leaves them as they are)."""
    dim = spec.rotary_dim or spec.head_dim
    inv = 1.0 / (spec.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    divisors = spec.rope_long_freq_factors if long else spec.rope_freq_factors
    if divisors is not None:
        inv = inv / torch.tensor(divisors, dtype=torch.float64)
    elif spec.rope_scaling is not None:
        inv = _llama3(inv, spec.rope_scaling)
    return torch.cat([inv, inv.new_zeros((spec.head_dim - dim) // 2)]).float()


def _llama3(inv: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(mid, smoothed, scaled)


class RotaryEmbedding:
    """cos/sin tables for every position of the window, computed once per device and dtype; the
    layers that rotate otherwise have theirs in `layer_tables`."""

    def __init__(self, spec: ModelSpec, max_len: int, device: torch.device, dtype: torch.dtype,
                 inv: torch.Tensor | None = None) -> None:  # fmt: skip
        pos = torch.arange(max_len, dtype=torch.float32)
        # longrope: a window past the pretraining one rotates every token with the long factors, as
        # transformers does for a sequence that long (so a stored KV cache is another: its deeper
        # layers' keys came through other rotations)
        self.long = spec.rope_short_window is not None and max_len > spec.rope_short_window
        self.inv = inv_frequencies(spec, self.long) if inv is None else inv
        freqs = torch.outer(pos, self.inv)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos = emb.cos().to(device=device, dtype=dtype)
        self.sin = emb.sin().to(device=device, dtype=dtype)
        self.max_len = max_len
        # the layers that rotate otherwise: Gemma's window-typed ones (their own base, unscaled),
        # SmolLM3's without RoPE (frequencies of 0: the rotation leaves keys and queries as they are)
        self.layer_tables: dict[int, RotaryEmbedding] = {}
        if spec.local_rope_layers:
            local = replace(spec, rope_theta=spec.local_rope_theta, rope_scaling=None, rope_freq_factors=None,
                            rope_long_freq_factors=None, rope_short_window=None,
                            local_rope_layers=(), nope_layers=())  # fmt: skip
            self.layer_tables.update(dict.fromkeys(spec.local_rope_layers, RotaryEmbedding(local, max_len, device, dtype)))
        if spec.nope_layers:
            still = RotaryEmbedding(replace(spec, local_rope_layers=(), nope_layers=()), max_len, device, dtype,
                                    inv=torch.zeros_like(self.inv))  # fmt: skip
            self.layer_tables.update(dict.fromkeys(spec.nope_layers, still))

    def for_layer(self, layer: int) -> RotaryEmbedding:
        """The tables this layer rotates with."""
        return self.layer_tables.get(layer, self)

    def per_layer(self, positions: torch.Tensor, num_layers: int,
                  exact: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
        """Each layer's cos/sin for these positions, each distinct table looked up once; `exact`:
        computed in float32 (float_tables)."""
        looked_up: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        out = []
        for layer in range(num_layers):
            table = self.for_layer(layer)
            if id(table) not in looked_up:
                looked_up[id(table)] = table.float_tables(positions) if exact else table.tables(positions)
            out.append(looked_up[id(table)])
        return out

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [n, 1, head_dim] for broadcasting over heads."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)

    def float_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`tables` in float32 whatever the model's dtype: undoing a rotation with bf16 tables
        (whose cos^2 + sin^2 is not 1) adds their rounding to the keys'."""
        freqs = torch.outer(positions.float(), self.inv.to(positions.device))
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().unsqueeze(1), emb.sin().unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return rotate_into(torch.empty_like(x, dtype=torch.promote_types(x.dtype, cos.dtype)), x, cos, sin)


def rotate_into(out: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """out = x * cos + rotate_half(x) * sin, written straight into `out` (a page-pool view or a buffer).

    Three kernels and no temporaries: the loader rotates a whole history per layer, and
    the concatenating form allocated four tensors of its size each time.
    """
    half = x.shape[-1] // 2
    torch.mul(x, cos, out=out)
    out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-1)
    out[..., half:].addcmul_(x[..., :half], sin[..., half:])
    return out
