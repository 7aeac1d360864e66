"""Load a model from a Hugging Face folder, a GGUF file or the embedded default; random weights for benchmarks."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cachedattention.kernels.few_rows_linear import FewRowsLinearKernel, QuantizedWeight
from cachedattention.model.embedded import BLOCKS_FILE, embedded_model_dir, rewrite_embedded_blocks
from cachedattention.model.fp8 import fp8_weights, refuse_fp8
from cachedattention.model.gguf_loader import (
    gguf_checked_rows,
    gguf_config,
    gguf_quantized_weights,
    gguf_state_dict,
    load_blocks,
    open_gguf,
)
from cachedattention.model.gguf_tokenizer import gguf_tokenizer
from cachedattention.model.hf_overrides import apply_hf_overrides
from cachedattention.model.hub_cache import existing_local_path, model_id_of_snapshot
from cachedattention.model.int4 import unpack_int4
from cachedattention.model.layers import Embedding, Linear
from cachedattention.model.llama import LlamaForCausalLM
from cachedattention.model.quant_config import (
    Fp8Scheme,
    checkpoint_scheme,
    unused_scales_set_aside,
    with_quantization_config,
)
from cachedattention.model.rope import inv_frequencies
from cachedattention.model.spec import ModelSpec, spec_from_hf_config
from cachedattention.model.tokenizer import Tokenizer
from cachedattention.model.weights_id import weights_id

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    spec: ModelSpec
    tokenizer: Tokenizer | None
    name: str
    weights_id: str  # identity of the weights, part of the store's model fingerprint


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def load_model(source: str | None, device: str, dtype: str, tokenizer: str | None = None,
               check_spec: Callable[[ModelSpec], None] | None = None,
               hf_overrides: dict[str, Any] | None = None) -> LoadedModel:  # fmt: skip
    """`source`: a folder, a GGUF file, or a Hugging Face model id in the local hub cache (a path wins);
    None: the embedded model. `tokenizer`: another folder's (or GGUF file's) tokenizer instead of the model's own (vLLM's
    --tokenizer, e.g. a GGUF file's original model folder). `check_spec` vets the model's shape as
    soon as its config is read, so a setting it refuses costs no weight loading. `hf_overrides`
    (vLLM's) are laid over the config before its shape is read."""
    refused: list[ValueError] = []  # (check_spec's own refusal: about the settings, not the overrides)

    def checked(spec: ModelSpec) -> None:
        try:
            check_spec(spec)
        except ValueError as e:
            refused.append(e)
            raise

    try:
        return _load_model(source, device, dtype, tokenizer, checked if check_spec else None, hf_overrides)
    except ValueError as e:
        if not hf_overrides or e in refused:
            raise
        raise ValueError(f"{e} (its config with hf_overrides of {', '.join(sorted(hf_overrides))})") from None


def _load_model(source: str | None, device: str, dtype: str, tokenizer: str | None,
                check_spec: Callable[[ModelSpec], None] | None, hf_overrides: dict[str, Any] | None) -> LoadedModel:  # fmt: skip
    embedded = source is None
    # a Hugging Face model id that is no path: its snapshot in the local hub cache
    path = Path(embedded_model_dir()) if embedded else existing_local_path(source)
    cpu_float32 = torch.device(device).type == "cpu" and resolve_dtype(dtype) == torch.float32
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{str(path)!r} is a file but not a .gguf; give a Hugging Face model folder or a GGUF file")
        reader = open_gguf(str(path))
        try:
            config = apply_hf_overrides(gguf_config(reader), hf_overrides)
            spec = spec_from_hf_config(config)
        except ValueError as e:  # (its messages name config.json: here the file's metadata, read as one)
            named = (str(e).replace("this GGUF file", path.name).replace("config.json's ", f"{path.name}: ")
                     .replace("config.json ", f"{path.name}: the config "))  # fmt: skip
            raise ValueError(named) from None
        if check_spec is not None:
            check_spec(spec)
        # (without the kernel no call reads blocks: none are made)
        quantized = _gguf_blocks(reader, config) if cpu_float32 and FewRowsLinearKernel.load() is not None else {}
        blocks_only = _layers_as_blocks(config, quantized, reader)
        read = gguf_state_dict(reader, config, blocks_only)
        state = to_our_weights(read, spec)
        folded = {name for name in blocks_only if name in read and state[name] is not read[name]}
        if folded:  # changed at load (a scale folded in, rows reordered): float32, from their blocks
            state.update(to_our_weights({name: quantized[name].dequantize() for name in folded}, spec))
            blocks_only -= folded
        quantized = _blocks_as_loaded(quantized, read, state, spec)
        del read  # (the weights replaced at load: not held twice while the model is built)
        blocks = lambda: quantized  # noqa: E731
    else:
        reader = None
        config = apply_hf_overrides(_read_config(path), hf_overrides)
        spec = spec_from_hf_config(config)
        if check_spec is not None:
            check_spec(spec)
        state, checkpoint_blocks = _read_checkpoint(path, config, spec, resolve_dtype(dtype), cpu_float32)
        blocks_only = set(checkpoint_blocks)
        if checkpoint_blocks:
            blocks = lambda: checkpoint_blocks  # noqa: E731
        else:
            blocks = (lambda: load_blocks(path / BLOCKS_FILE)) if (path / BLOCKS_FILE).exists() else None
    # another's (--tokenizer), else its own: one loader for both; a folder may have none (ids only)
    no_tokenizer = tokenizer is None and path.is_dir() and not _has_tokenizer(path)
    own_file = reader if tokenizer is None else None  # (its metadata read once: 0.3 s for 49,152 tokens, more for larger vocabularies)
    tok = None if no_tokenizer else load_tokenizer(tokenizer or str(path), spec.vocab_size, own_file)
    model = build_model(spec, state, torch.device(device), resolve_dtype(dtype))
    del state  # (the model holds its weights: one it replaces below is then freed at once)
    if blocks_only:  # no float32 copy to fall back on: attached, or the load fails
        attach_quantized(model, blocks(), blocks_only)
    elif blocks is not None and cpu_float32:
        _attach_blocks(model, blocks, path if embedded else None)
    elif cpu_float32 and path.is_dir():
        hold_as_halves(model)
    return LoadedModel(model, spec, tok, model_id_of_snapshot(path) or path.name, weights_id(path))


def _read_checkpoint(path: Path, config: dict, spec: ModelSpec, dtype: torch.dtype,
                     cpu_float32: bool) -> tuple[dict[str, torch.Tensor], dict[str, QuantizedWeight]]:  # fmt: skip
    """A Hugging Face folder's weights as our modules hold them; a quantized checkpoint's (FP8 or
    4-bit) held only as the few-rows kernel's blocks (a placeholder in the state, and the blocks under
    the name the loader gave the weight) where the kernel serves them and the loader leaves the
    weight as it is, else widened to float32."""
    state = _read_safetensors(path)
    scheme = None if spec.model_type == "gpt_oss" else checkpoint_scheme(config)
    if scheme is None:
        refuse_fp8(state)
        return to_our_weights(state, spec, dtype), {}
    if unused := unused_scales_set_aside(state):
        log.info("the checkpoint's %d activation and KV-cache scales are not used: activations and the KV cache "
                 "stay in the model's dtype", unused)  # fmt: skip
    as_blocks = cpu_float32 and FewRowsLinearKernel.load() is not None
    blocks, zero_biases, count = {}, set(), 0
    weights = fp8_weights(state, scheme) if isinstance(scheme, Fp8Scheme) else unpack_int4(state, scheme)
    for name, w in weights:
        count += 1
        bias = state.get(name.removesuffix(".weight") + ".bias")
        if bias is not None and not bool(bias.any()):
            zero_biases.add(id(bias))
        b = w.blocks() if as_blocks else None
        if b is not None:
            blocks[name] = b
        # (widened straight to the model's dtype: a GPU's bfloat16 model never holds every weight as float32)
        state[name] = w.dequantize().to(dtype) if b is None else torch.zeros((), dtype=torch.float32).expand(b.shape)
    read, state = state, to_our_weights(state, spec, dtype)
    _drop_loose_zero_biases(state, zero_biases, spec)
    placed = {id(t): name for name, t in state.items()}  # (a weight the loader only renamed keeps its blocks)
    ours = {name for name in placed.values() if name.startswith(PLACED)} - ({"lm_head.weight"} if spec.tie_word_embeddings else set())
    # (blocks of weights the model leaves out, a multimodal checkpoint's vision tower's, are dropped with them)
    kept = {placed[id(read[name])]: b for name, b in blocks.items() if placed.get(id(read[name])) in ours}
    changed = [name for name in blocks if id(read[name]) not in placed]
    for name in changed:  # reordered, rescaled or left out at load: widened, then through the same changes,
        # one at a time (a mixture's left-out layers, GLM-4.5's prediction layer, are never all float32 at once)
        state.update(to_our_weights({name: blocks.pop(name).dequantize()}, spec, dtype))
    log.info("%s checkpoint: %d of its %d quantized weights held as the few-rows kernel's %s blocks, the others "
             "widened to %s", scheme.method, len(kept), count, "F8" if isinstance(scheme, Fp8Scheme) else "Q4_1",
             str(dtype).removeprefix("torch."))  # fmt: skip
    return state, kept


def _drop_loose_zero_biases(state: dict[str, torch.Tensor], zero_biases: set[int], spec: ModelSpec) -> None:
    """A quantized layer's bias of zeros where the model has none (early AutoGPTQ saved one for every
    layer, a Llama's too: vLLM skips them) is left out: adding zeros changes nothing. Any other weight
    without a place is still refused (build_model)."""
    if not zero_biases:
        return
    with torch.device("meta"):
        places = set(LlamaForCausalLM(spec).state_dict())
    loose = [name for name, t in state.items() if id(t) in zero_biases and name not in places]
    for name in loose:
        del state[name]
    if loose:
        log.info("%d quantized layers' biases of zeros, which the model has no place for, are left out", len(loose))


def load_tokenizer(source: str, vocab_size: int, gguf_reader=None) -> Tokenizer:
    """The tokenizer of a Hugging Face folder or a GGUF file, for a model of `vocab_size` tokens (one
    with more is served with a warning: each request's ids are checked against the vocabulary). A
    Hugging Face model id that is no path reads its snapshot in the local hub cache. `gguf_reader`:
    the GGUF file's, already open."""
    path = existing_local_path(source, "tokenizer")
    try:
        if path.is_file():
            if path.suffix != ".gguf":
                raise ValueError("a file must be a .gguf")
            tok = gguf_tokenizer(path, gguf_reader)  # converted once, then from the cache folder
        else:
            if not _has_tokenizer(path):
                raise ValueError("the folder has no tokenizer.json, tokenizer.model or tokenizer_config.json")
            tok = Tokenizer.from_pretrained(str(path))
    except Exception as e:  # (transformers' own IndexError or KeyError for a damaged one)
        raise ValueError(f"tokenizer {source!r} cannot be loaded: {type(e).__name__}: {e}") from None
    if len(tok.hf) > vocab_size:  # e.g. a pad token added without resizing: requests reaching it are refused
        log.warning("tokenizer %r has %d tokens, more than the model's %d: a prompt holding one of those is "
                    "refused", source, len(tok.hf), vocab_size)  # fmt: skip
    return tok


def _attach_blocks(model: LlamaForCausalLM, blocks, embedded_dir: Path | None) -> None:
    """Attach the GGUF blocks; a damaged blocks file leaves the float32 weights to serve alone, except
    the embedded model's, which is our own cache: it is written again from the GGUF and read once more."""
    try:
        attach_quantized(model, blocks())
        return
    except ValueError as e:
        if embedded_dir is None:
            log.warning("GGUF blocks not used: %s", e)
            return
        log.warning("the embedded model's blocks file is damaged (%s): writing it again", e)
    rewrite_embedded_blocks(embedded_dir)
    try:
        attach_quantized(model, load_blocks(embedded_dir / BLOCKS_FILE))
    except ValueError as e:  # could not be rewritten (a read-only cache): float32 serves alone
        log.warning("GGUF blocks not used: %s", e)


def hold_as_halves(model: LlamaForCausalLM) -> int:
    """A checkpoint's bfloat16 (or float16) weights, loaded as float32 on a CPU: those of the linear
    layers (but a mixture's router, read in float32 as a GGUF's is), the embedding and the head kept
    only as their 16-bit values, which the few-rows kernel reads (half float32's memory, half the
    bytes a decode step reads; the arithmetic stays float32), each where every value is one exactly.
    Each float32 copy goes as soon as its blocks are made. Returns how many weights."""
    if FewRowsLinearKernel.load() is None:  # (the kernel serves blocks-only weights; torch would dequantize each call)
        return 0
    embedding, head = model.model.embed_tokens, model.lm_head
    tied = head.weight is embedding.weight
    held = 0
    for name, module in model.named_modules():
        if not isinstance(module, (Linear, Embedding)) or module.quantized is not None or name.endswith("mlp.gate"):
            continue
        if tied and module is head:
            continue
        halves = QuantizedWeight.from_halves(module.weight)
        if halves is None:
            continue
        placeholder = torch.nn.Parameter(torch.zeros((), dtype=torch.float32).expand(halves.shape), requires_grad=False)
        for each in (module, head) if tied and module is embedding else (module,):  # (a tied head reads the embedding's)
            each.quantized, each.blocks_only, each.weight = halves, True, placeholder
        held += 1
    if held:
        log.info("%d weights held as their 16-bit values (the checkpoint's bfloat16 or float16)", held)
    return held


def _gguf_blocks(reader, config: dict) -> dict[str, QuantizedWeight]:
    """The file's blocks for the few-rows kernel; none when they cannot be read (float32 serves)."""
    try:
        return gguf_quantized_weights(reader, config)
    except ValueError as e:
        log.warning("GGUF blocks not used: %s", e)
        return {}


def _blocks_as_loaded(quantized: dict[str, QuantizedWeight], read: dict[str, torch.Tensor],
                      state: dict[str, torch.Tensor], spec: ModelSpec) -> dict[str, QuantizedWeight]:
    """The blocks of the weights as the loader left them: a q/k weight whose head dimensions it
    reordered (a partial rotary's) gets its blocks' rows in that order; one it rescaled (Gemma 2
    27B's query scale, longrope's factor in q) has blocks no longer, and serves from float32."""
    order = qk_dim_order(spec)
    out = {}
    for name, w in quantized.items():
        if name in read and state.get(name) is not read[name]:  # changed at load
            if order is not None and name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
                w = w.take_rows(_head_rows(order, w.shape[0] // spec.head_dim, spec.head_dim))
            if not w.matches(state[name]):
                continue
        out[name] = w
    return out


def _layers_as_blocks(config: dict, quantized: dict[str, QuantizedWeight], reader) -> set[str]:
    """A GGUF's decoder layers' linear weights (a mixture's experts too: nearly all its weights),
    its embedding (looked up a few rows at a time) and head kept only as blocks on a CPU, where the
    few-rows kernel serves their calls: a quarter of float32's memory or less. A tensor whose blocks do not dequantize to gguf's own values (rows 0,
    1 and the last of each part; a stacked one's first expert) keeps float32."""
    if not quantized or FewRowsLinearKernel.load() is None:
        return set()
    trusted = set()
    for names, rows in gguf_checked_rows(reader, config):
        if not all(n in quantized for n in names):
            continue  # (float32 in the file, or a type the kernel does not read)
        if all(quantized[n].matches_rows(checked) for n, checked in rows.items()):
            trusted.update(names)
            if names == ["model.embed_tokens.weight"] and config.get("tie_word_embeddings"):
                trusted.add("lm_head.weight")  # the head is the embedding
        else:
            log.warning("the GGUF blocks of %s do not match gguf's values: it keeps float32", names[0])
    return trusted


def attach_quantized(model: LlamaForCausalLM, quantized: dict[str, QuantizedWeight],
                     blocks_only: Collection[str] = ()) -> int:  # fmt: skip
    """Give each linear layer the GGUF blocks its float32 weight was dequantized from, for the
    few-rows kernel to read (a quarter of the bytes or less); a tied head shares the embedding's.
    A layer whose blocks do not dequantize to its weight (first and last rows compared) keeps
    float32 alone. The layers in `blocks_only` have no float32 weight: their blocks serve every
    call (each must be attached). Returns how many layers got blocks."""
    attached, left = 0, set(blocks_only)
    for name, module in model.named_modules():
        if not isinstance(module, Linear):
            continue
        tied = module.weight is model.model.embed_tokens.weight  # the head, sharing the embedding
        qw = quantized.get("model.embed_tokens.weight" if tied else f"{name}.weight")
        if qw is None:
            continue
        if f"{name}.weight" in left:
            if qw.shape != tuple(module.weight.shape):
                raise ValueError(f"the GGUF blocks of {name} are {qw.shape}, its layer {tuple(module.weight.shape)}")
            module.quantized, module.blocks_only = qw, True
            left.discard(f"{name}.weight")
            attached += 1
            continue
        if not qw.matches(module.weight):
            log.warning("the GGUF blocks of %s do not match its weights: it keeps float32 alone", name)
            continue
        module.quantized = qw
        attached += 1
    embedding, key = model.model.embed_tokens, "model.embed_tokens.weight"
    if key in left:  # looked up from its blocks
        if quantized[key].shape != tuple(embedding.weight.shape):
            raise ValueError(f"the GGUF blocks of the embedding are {quantized[key].shape}, it {tuple(embedding.weight.shape)}")
        embedding.quantized, embedding.blocks_only = quantized[key], True
        left.discard(key)
    if left:  # a placeholder left in: its layer would multiply by zeros
        raise RuntimeError(f"{len(left)} GGUF weights held only as blocks found no layer, e.g. {sorted(left)[:2]}")
    return attached


PLACED = ("model.layers.", "model.norm.", "model.embed_tokens.", "lm_head.")  # where every weight must be one of ours


def build_model(spec: ModelSpec, state: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype):
    """Instantiate without initialising (meta device), then adopt the given weights."""
    held = {int(k.split(".")[2]) for k in state if k.startswith("model.layers.") and k.split(".")[2].isdigit()}
    if held and spec.num_layers > max(held) + 1:  # (before building a model of that many layers)
        raise ValueError(f"the config has {spec.num_layers} layers, but the checkpoint's weights stop at layer "
                         f"{max(held)}: a shard missing, or a config of another model")  # fmt: skip
    with torch.device("meta"):
        model = LlamaForCausalLM(spec)
    places = model.state_dict()  # (meta tensors: each weight's shape, no memory)
    expected = set(places)
    if spec.tie_word_embeddings:
        expected.discard("lm_head.weight")
    unplaced = sorted(k for k in state if k not in expected and k.startswith(PLACED) and not k.endswith("inv_freq")
                      and k != "lm_head.weight")  # (a tied head's copy: the embedding serves)
    if unplaced:  # left out, they would change every answer without a word
        raise ValueError(f"the checkpoint has {len(unplaced)} weights this engine's {spec.model_type} model has no "
                         f"place for, e.g. {unplaced[:3]}: a config option it does not implement, or a layout it "
                         "does not read (transformers 5's fused experts: save with save_pretrained)")
    state = {k: v for k, v in state.items() if k in expected or k == "lm_head.weight"}
    missing = expected - set(state)
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} weights, e.g. {sorted(missing)[:3]}")
    _check_weights(state, places)
    halves = _take_halves(model, state) if device.type == "cpu" and dtype == torch.float32 else {}
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    for name, weight in halves.items():
        module = model.get_submodule(name.removesuffix(".weight"))
        module.quantized, module.blocks_only = weight, True
    if "model.embed_tokens.weight" in halves and model.lm_head.weight is model.model.embed_tokens.weight:
        model.lm_head.quantized, model.lm_head.blocks_only = halves["model.embed_tokens.weight"], True
    return model.eval()


def _take_halves(model: LlamaForCausalLM, state: dict[str, torch.Tensor]) -> dict[str, QuantizedWeight]:
    """The checkpoint's bfloat16 and float16 weights of the layers that read 16-bit values as they
    are (linear layers but a mixture's router, the embedding, the head; rows of whole blocks of 32),
    taken as blocks (a copy of their 16 bits) and replaced in `state` by placeholders: served in
    float32 (hold_as_halves), they never get a float32 copy, so loading takes about twice the
    checkpoint's memory at most, not three times. None without the few-rows kernel, which serves them."""
    if FewRowsLinearKernel.load() is None:
        return {}
    taken = {}
    for name, t in state.items():
        owner = name.removesuffix(".weight")
        if name == "lm_head.weight" and model.spec.tie_word_embeddings:
            continue  # (a tied head is the embedding, whatever copy the checkpoint also holds)
        if t.dtype not in (torch.bfloat16, torch.float16) or t.dim() != 2 or t.shape[1] % 32 or owner.endswith("mlp.gate"):
            continue
        if not isinstance(model.get_submodule(owner) if name.endswith(".weight") else None, (Linear, Embedding)):
            continue
        # a copy of its own: safetensors maps the file, whose pages would be read in by the first
        # request (and change with the file)
        taken[name] = QuantizedWeight.from_16_bit(t.clone(memory_format=torch.contiguous_format))
    for name, weight in taken.items():
        state[name] = torch.zeros((), dtype=torch.float32).expand(weight.shape)
    return taken


FLOAT_WEIGHTS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_weights(state: dict[str, torch.Tensor], shapes: dict[str, torch.Tensor]) -> None:
    """Each weight of the shape the config gives its place, and of a float type (an integer or
    8-bit one is a quantization this engine does not read: cast, it would answer garbage)."""
    for name, w in state.items():
        if w.dtype not in FLOAT_WEIGHTS:
            raise ValueError(f"weight {name} is {str(w.dtype).replace('torch.', '')}: this engine reads float32, "
                             "float16 and bfloat16 checkpoints, FP8 ones, or a GGUF file's quantized blocks")  # fmt: skip
        want = shapes.get(name)
        if want is not None and tuple(w.shape) != tuple(want.shape):
            raise ValueError(f"weight {name} is {list(w.shape)}, but the config makes it {list(want.shape)}: the "
                             "config and the weights are of different models")  # fmt: skip


def random_model(spec: ModelSpec, device: str, dtype: str, seed: int = 0) -> LlamaForCausalLM:
    """Random weights of the given shape (benchmarks of large shapes without a download)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(spec)
    model = model.to_empty(device=torch.device(device)).to(resolve_dtype(dtype))
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    model.tie_weights()
    return model.eval()


def _read_config(path: Path) -> dict:
    cfg = path / "config.json"
    if not cfg.exists():
        raise ValueError(f"{path} has no config.json; is it a Hugging Face model folder?")
    try:
        config = json.loads(cfg.read_text())
    except (ValueError, RecursionError) as e:  # (UnicodeDecodeError is a ValueError)
        raise ValueError(f"{cfg} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{cfg} must hold a JSON object, got {type(config).__name__}")
    return with_quantization_config(config, path)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = sorted(f for f in path.glob("*.safetensors") if f.name != BLOCKS_FILE)
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = _shards(index)
    if not files:
        raise ValueError(f"{path} has no .safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except SafetensorError as e:  # (a download cut short, most often)
            raise ValueError(f"{f} is not a readable safetensors file (truncated or damaged?): {e}") from None
        except IsADirectoryError:
            raise ValueError(f"{f} is a directory, not a safetensors file") from None
    return state


def _shards(index: Path) -> list[Path]:
    """The files a sharded checkpoint's index names, each a file name in the folder."""
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (ValueError, RecursionError, AttributeError) as e:
        raise ValueError(f"{index} is not a JSON object: {e}") from None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise ValueError(f"{index} has no weight_map of weight names to shard files")
    names = sorted(set(weight_map.values()))
    outside = [f for f in names if Path(f).name != f or f in (".", "..")]
    if outside:  # a path that leaves the folder is no shard of this checkpoint
        raise ValueError(f"{index} names shard files outside its folder: {outside[:3]}")
    return [index.parent / f for f in names]


# GLM-4's four norms as Gemma's: the attention's output norm, the MLP's input and output norms
GLM4_NORMS = {".post_self_attn_layernorm.": ".post_attention_layernorm.",
              ".post_attention_layernorm.": ".pre_feedforward_layernorm.",
              ".post_mlp_layernorm.": ".post_feedforward_layernorm."}  # fmt: skip
MIXTRAL_NAMES = {".block_sparse_moe.": ".mlp.", ".w1.": ".gate_proj.", ".w3.": ".up_proj.", ".w2.": ".down_proj."}
# a multimodal checkpoint's language model (Gemma 3, Mistral 3), under the names of the text-only one
# (its vision tower is left out)
LANGUAGE_MODEL_PREFIXES = {"language_model.model.": "model.", "language_model.lm_head.": "lm_head.",
                           "model.language_model.": "model."}  # fmt: skip


def to_our_weights(state: dict[str, torch.Tensor], spec: ModelSpec,
                    dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:  # fmt: skip
    """A checkpoint's weights as our modules hold them. Phi-3 fuses q/k/v and gate/up. Mixtral's
    sparse MLP is block_sparse_moe with experts' w1/w3/w2; ours is `mlp` with gate_proj/up_proj/
    down_proj, as Qwen's MoE checkpoints have it. Gemma's norms scale by (1 + w): ours hold 1 + w.
    Scales the model applies where ours does not are folded into the weights before them: the
    attention's (ours is head_dim ** -0.5) into q's norm (Gemma) or projection (Granite), Granite's
    residual one into o_proj and down_proj (the store keeps keys and values, which none of these touch)."""
    state = {_language_model_name(name): t for name, t in state.items()}
    if spec.model_type == "mixtral":
        state = {_mixtral_name(name): t for name, t in state.items()}
    elif spec.model_type in ("granitemoe", "granitemoeshared"):
        state = _granitemoe_experts(state, spec)
    elif spec.model_type == "gpt_oss":
        state = _gpt_oss_experts(state, dtype)
    elif spec.model_type == "qwen3_moe":
        state = _stacked_experts(state, spec)
    elif spec.model_type == "glm4_moe":  # its multi-token-prediction layers, past the model's: not served
        state = {k: t for k, t in state.items() if (_layer_index(k) or 0) < spec.num_layers}
    elif spec.model_type in ("phi3", "glm", "glm4"):
        state = _split_fused(state, spec)
        if spec.model_type == "glm4":
            state = {_glm4_name(name): t for name, t in state.items()}
    elif spec.norms_plus_one():
        state.update({name: t.float() + 1.0 for name, t in state.items()
                      if name.startswith(("model.", "lm_head.")) and name.endswith("norm.weight")})  # fmt: skip
    scales = {}
    if spec.attn_scale is not None:
        scales[".self_attn.q_norm." if spec.qk_norm else ".self_attn.q_proj."] = spec.attn_scale * spec.head_dim**0.5
    if spec.residual_scale is not None:
        scales.update(dict.fromkeys((".self_attn.o_proj.", ".down_proj."), spec.residual_scale))  # experts' too
    for part, factor in scales.items():
        if factor != 1.0:  # (Gemma's query scale is often head_dim's own)
            state.update({name: t.float() * factor for name, t in state.items() if part in name})
    order = qk_dim_order(spec)
    if order is not None:
        state = _qk_dims_reordered(state, spec, order)
    if spec.rope_attention_factor is not None:
        state = _rope_factor_into_q(state, spec)
    return state


def _rope_factor_into_q(state: dict[str, torch.Tensor], spec: ModelSpec) -> dict[str, torch.Tensor]:
    """YaRN's and longrope's factor scales cos and sin, so the rotating part of q and of k: their
    q.k by its square, folded into q's rotating dimensions (its norm's where q is normed after its
    projection). A partial rotary's other dimensions, those of frequency 0 in the tables, are not scaled."""
    inv = inv_frequencies(spec)
    rotating = (torch.cat([inv, inv]) != 0).float()  # each dimension as rotate_half pairs it
    scale = 1.0 + (spec.rope_attention_factor**2 - 1.0) * rotating
    part = ".self_attn.q_norm." if spec.qk_norm else ".self_attn.q_proj."
    unscaled = {*spec.nope_layers, *spec.local_rope_layers}  # not rotated, or by their own unscaled RoPE
    out = dict(state)
    for name, t in state.items():
        if part in name and _layer_index(name) not in unscaled:
            per_dim = scale.reshape(-1, *([1] * (t.dim() - 1)))  # a head's rows, then each later head's
            out[name] = (t.float().reshape(-1, spec.head_dim, *t.shape[1:]) * per_dim).reshape(t.shape)
    return out


def _layer_index(name: str) -> int | None:
    """The decoder layer a weight's name places it in (model.layers.{i}....)."""
    parts = name.split(".")
    return int(parts[2]) if len(parts) > 2 and parts[:2] == ["model", "layers"] and parts[2].isdigit() else None


def _split_fused(state: dict[str, torch.Tensor], spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Fused projections (Phi-3's, GLM's MLP), split into ours: qkv_proj's rows are q, k, v;
    gate_up_proj's gate, up."""
    q_rows, kv_rows = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    out = {}
    for name, t in state.items():
        if name.endswith("self_attn.qkv_proj.weight"):
            parts = zip(("q_proj", "k_proj", "v_proj"), t.split([q_rows, kv_rows, kv_rows]))
            out.update({name.replace("qkv_proj", part): w for part, w in parts})
        elif name.endswith("mlp.gate_up_proj.weight"):
            gate, up = t.chunk(2)
            out.update({name.replace("gate_up_proj", "gate_proj"): gate, name.replace("gate_up_proj", "up_proj"): up})
        else:
            out[name] = t
    return out


def qk_dim_order(spec: ModelSpec) -> torch.Tensor | None:
    """Where each of a head's dimensions of q and k goes in our layout, so one rotate_half over the
    whole head rotates as the model does (None: as the checkpoint has them). q.k is the same sum in
    another order, and v is not touched.
    - Partial (Phi-4-mini, GLM): the rotating dimensions come first in each half, then half of the
      rest (frequencies of 0: they stay as they are).
    - Halves (Phi-4-mini): rotating dimension i turns with i + rotary_dim / 2.
    - Interleaved (ERNIE 4.5, Helium, GLM; GPT-J's pairs): dimensions 2i and 2i + 1 turn together,
      so the even ones go to the first half and the odd ones to the second."""
    d, rotating = spec.head_dim, spec.rotary_dim or spec.head_dim
    if not spec.rope_interleaved and rotating == d:
        return None
    turning = torch.arange(rotating)
    first, second = (turning[0::2], turning[1::2]) if spec.rope_interleaved else turning.chunk(2)
    rest = torch.arange(rotating, d).chunk(2) if rotating < d else (turning[:0], turning[:0])
    return torch.cat([first, rest[0], second, rest[1]])


def _qk_dims_reordered(state: dict[str, torch.Tensor], spec: ModelSpec, order: torch.Tensor) -> dict[str, torch.Tensor]:
    d = spec.head_dim
    out = dict(state)
    for name, t in state.items():
        if name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.weight",
                          "self_attn.k_proj.bias", "self_attn.q_norm.weight", "self_attn.k_norm.weight")):  # fmt: skip
            if name.endswith("_norm.weight") and t.dim() == 2:  # a weight per head (Command R+)
                out[name] = t[:, order]
                continue
            out[name] = t[_head_rows(order, t.shape[0] // d, d)]  # (a norm over one head: 1 head)
    return out


def _head_rows(order: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """The rows of a q/k projection (or bias, or norm) of `heads` heads with each head's dimensions
    taken in `order`."""
    return (torch.arange(heads)[:, None] * head_dim + order[None, :]).reshape(-1)


def _glm4_name(name: str) -> str:
    for old, new in GLM4_NORMS.items():  # one rename per name: GLM-4's post_attention is our pre_feedforward
        if old in name:
            return name.replace(old, new)
    return name


def _granitemoe_experts(state: dict[str, torch.Tensor], spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Granite MoE's block_sparse_moe: router.layer is our gate; each expert's rows of input_linear
    are its gate then up projections, of output_linear its down projection. Granite MoE shared's
    shared_mlp, alike, is our ungated shared experts'."""
    out = {}
    width = spec.moe.expert_intermediate_size
    for name, t in state.items():
        if ".shared_mlp." in name:
            prefix = name.split(".shared_mlp.")[0] + ".mlp.shared_experts."
            if name.endswith("input_linear.weight"):  # (any other shape is left to the shape check to name)
                half = spec.moe.shared_experts_intermediate_size
                out[prefix + "gate_proj.weight"], out[prefix + "up_proj.weight"] = t[:half], t[half:]
            elif name.endswith("output_linear.weight"):
                out[prefix + "down_proj.weight"] = t
            else:
                out[name] = t
            continue
        if ".block_sparse_moe." not in name:
            out[name] = t
            continue
        prefix = name.split(".block_sparse_moe.")[0] + ".mlp."
        if name.endswith("router.layer.weight"):
            out[prefix + "gate.weight"] = t
        elif name.endswith("input_linear.weight"):
            for e in range(t.shape[0]):
                out[f"{prefix}experts.{e}.gate_proj.weight"], out[f"{prefix}experts.{e}.up_proj.weight"] = t[e].split(width)
        elif name.endswith("output_linear.weight"):
            out.update({f"{prefix}experts.{e}.down_proj.weight": t[e] for e in range(t.shape[0])})
        else:
            out[name] = t  # left for the unplaced-weight check to name
    return out


def _stacked_experts(state: dict[str, torch.Tensor], spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Experts stacked in two tensors a layer (Qwen3-VL-MoE's): mlp.experts.gate_up_proj, each expert's
    gate then up, and mlp.experts.down_proj. The hub's files hold them as a batched product takes
    them ([E, hidden, 2 * width] and [E, width, hidden]), transformers 5 saves them as linear
    weights ([E, 2 * width, hidden] and [E, hidden, width]): the pair's shapes tell which (never
    both: that would need width == hidden == 2 * width)."""
    out = dict(state)
    hidden, width = spec.hidden_size, spec.moe.expert_intermediate_size
    for name in [n for n in state if n.endswith(".mlp.experts.gate_up_proj")]:
        prefix = name.removesuffix("gate_up_proj")
        gate_up, down = out.pop(name), out.pop(prefix + "down_proj", None)
        experts = gate_up.shape[0]
        linear = ((experts, 2 * width, hidden), (experts, hidden, width))
        batched = ((experts, hidden, 2 * width), (experts, width, hidden))
        shapes = (tuple(gate_up.shape), None if down is None else tuple(down.shape))
        if shapes not in (linear, batched):
            raise ValueError(f"{name} {shapes[0]} and its down_proj {shapes[1]} are not a layer's stacked experts "
                             f"of {hidden} x {width}")  # fmt: skip
        if shapes == batched:
            gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
        for e in range(experts):  # (contiguous: the CPU kernel takes only those)
            gate, up = (w.contiguous() for w in gate_up[e].split(width))
            out[f"{prefix}{e}.gate_proj.weight"], out[f"{prefix}{e}.up_proj.weight"] = gate, up
            out[f"{prefix}{e}.down_proj.weight"] = down[e].contiguous()
    return out


# MXFP4's 4-bit values (e2m1), by their code: the low nibble of each byte is the first of its two
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def mxfp4_dequantize(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """MXFP4 weights as float32: blocks [..., G, 16] (two 4-bit values a byte, 32 a block) and
    scales [..., G] (each block's power of two, biased by 127) -> [..., G * 32]."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not match")
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    values = torch.stack([lut[(blocks & 0x0F).int()], lut[(blocks >> 4).int()]], dim=-1).flatten(-2)
    values = torch.ldexp(values, scales.to(torch.int32).sub(127).unsqueeze(-1))
    return values.flatten(-2)


def _gpt_oss_experts(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """gpt-oss's MLP: its router is our gate; its experts are fused, gate and up interleaved on the
    last dimension of gate_up_proj [E, hidden, 2 * width] and down_proj [E, width, hidden] (each the
    transpose of a linear layer's weight), or MXFP4 blocks and scales already in linear layout, as
    the released checkpoints hold them, dequantized one expert at a time straight to the model's
    `dtype` (e2m1 times a power of two is exact in bfloat16: the float32 copy of all experts, some
    80 GB for gpt-oss-20b, is never held)."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if ".mlp.router." in name:
            out[name.replace(".mlp.router.", ".mlp.gate.")] = t
        elif ".mlp.experts." in name and not name.split(".mlp.experts.")[1][0].isdigit():
            fused[name] = t
        else:
            out[name] = t
    for name in [n for n in fused if n.endswith(("gate_up_proj", "down_proj", "gate_up_proj_blocks", "down_proj_blocks"))]:
        prefix, kind = name.split(".mlp.experts.")
        prefix, kind = prefix + ".mlp.experts.", kind.removesuffix("_blocks")
        bias = fused.pop(f"{prefix}{kind}_bias", None)
        for e, weight in enumerate(_expert_weights(fused, name, f"{prefix}{kind}_scales", dtype)):
            if kind == "gate_up_proj":
                parts = {"gate_proj": (weight[0::2], None if bias is None else bias[e, 0::2]),
                         "up_proj": (weight[1::2], None if bias is None else bias[e, 1::2])}  # fmt: skip
            else:
                parts = {"down_proj": (weight, None if bias is None else bias[e])}
            for part, (w, b) in parts.items():
                out[f"{prefix}{e}.{part}.weight"] = w.contiguous()
                if b is not None:
                    out[f"{prefix}{e}.{part}.bias"] = b.contiguous()
    out.update(fused)  # anything left (a bias without its weight): the unplaced-weight check names it
    return out


def _expert_weights(fused: dict[str, torch.Tensor], name: str, scales: str, dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """Each expert's [out, in] weight of a fused tensor, taken out of `fused`: MXFP4 blocks
    [E, out, in / 32, 16] with their scales [E, out, in / 32] (dequantized one expert at a time), or
    a tensor [E, in, out]."""
    weight = fused.pop(name)
    if name.endswith("_blocks"):
        blocks, exponents = weight, fused.pop(scales)
        yield from (mxfp4_dequantize(blocks[e], exponents[e]).to(dtype) for e in range(blocks.shape[0]))
    else:
        yield from (weight[e].t() for e in range(weight.shape[0]))


def _mixtral_name(name: str) -> str:
    if ".block_sparse_moe." in name:
        for old, new in MIXTRAL_NAMES.items():
            name = name.replace(old, new)
    return name


def _language_model_name(name: str) -> str:
    for old, new in LANGUAGE_MODEL_PREFIXES.items():
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def _has_tokenizer(path: Path) -> bool:
    return any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))
