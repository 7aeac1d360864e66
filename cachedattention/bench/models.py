"""The model a benchmark runs on: a checkpoint, the embedded default, or random weights of a known shape."""

from __future__ import annotations

import argparse

from cachedattention.model.loader import LoadedModel, load_model, random_model
from cachedattention.model.spec import spec_from_hf_config

SHAPES = {
    # Llama-3-8B: the shape of DESIGN.md's measured anchors
    "llama3-8b": dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
        max_position_embeddings=131072, rms_norm_eps=1e-5,
    ),
    # ~110M parameters, long window: CPU runs with histories beyond the embedded model's comfort
    "llama-110m": dict(
        vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
        num_attention_heads=12, num_key_value_heads=4, head_dim=64, rope_theta=500000.0,
        max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,  # the turn bench's 32k history fits
    ),
}


def bench_model(args: argparse.Namespace) -> LoadedModel:
    if args.random_shape is None:
        return load_model(args.model, args.device, args.dtype)
    cfg = {"model_type": "llama", **SHAPES[args.random_shape]}
    spec = spec_from_hf_config(cfg)
    model = random_model(spec, args.device, args.dtype, seed=args.seed)
    return LoadedModel(model, spec, None, f"random-{args.random_shape}", f"random-{args.random_shape}-{args.seed}")
