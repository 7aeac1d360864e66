"""The model a benchmark runs on: a checkpoint, the embedded default, or random weights of a known shape."""

from __future__ import annotations

import argparse

from cachedattention.bench.shapes import SHAPES
from cachedattention.model.loader import LoadedModel, load_model, random_model
from cachedattention.model.spec import spec_from_hf_config


def bench_model(args: argparse.Namespace) -> LoadedModel:
    if args.random_shape is None:
        return load_model(args.model, args.device, args.dtype)
    cfg = {"model_type": "llama", **SHAPES[args.random_shape]}  # (a shape may name another family)
    spec = spec_from_hf_config(cfg)
    model = random_model(spec, args.device, args.dtype, seed=args.seed)
    return LoadedModel(model, spec, None, f"random-{args.random_shape}", f"random-{args.random_shape}-{args.seed}")
