"""Read a GGUF file of the Llama, Qwen2, Qwen3, Gemma 2, Gemma 3 or Phi-3 architecture, or a mixture of
experts (Mixtral's Llama with experts, Qwen2-MoE, Qwen3-MoE): its config (as a config.json dict), its
weights dequantized as a Hugging Face checkpoint holds them, and the linear layers' quantized blocks
(for the CPU few-rows kernel).

llama.cpp's converters write some things differently from the checkpoints: a Llama's q/k rows
permuted, Gemma's norms with the 1 of its (1 + w) added in, Phi-3's q/k/v and gate/up fused; and
some things not at all, which llama.cpp's runtime fixes by architecture and size, as this reader
does: Gemma 3's windowed layers (five in six, RoPE base 10000 unscaled), Gemma 2's (one in two),
and both one's query scale (1/sqrt(hidden / heads) for the 27B models, told by their layer count;
1/sqrt(head_dim) for every other size)."""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import torch

from cachedattention.kernels.few_rows_linear import QUANTIZED_KINDS, QuantizedWeight
from cachedattention.model.gguf_kquants import reexpressed_weight, reexpressible
from cachedattention.model.gguf_reader import BigEndianFile, FastGGUFReader

if TYPE_CHECKING:
    from gguf import GGUFReader

GGUFSource = Union[str, Path, "GGUFReader", FastGGUFReader]  # a file name, or a reader from open_gguf (parsed once)

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",  # the norm before the MLP (Gemma 2 and 3: see below)
    "attn_q_norm": "self_attn.q_norm",  # Qwen3
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate_inp": "mlp.gate",  # a mixture's router
    "ffn_gate_exps": "mlp.experts.{e}.gate_proj",  # every expert's weight in one tensor [experts, out, in]
    "ffn_up_exps": "mlp.experts.{e}.up_proj",
    "ffn_down_exps": "mlp.experts.{e}.down_proj",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",  # Qwen2-MoE's shared expert and its gate
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
# Gemma 2 and 3 normalize after attention and around the MLP: llama.cpp names those norms apart
_GEMMA_NORMS = {"post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
                "post_ffw_norm": "post_feedforward_layernorm"}  # fmt: skip
_PHI3_FUSED = {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}  # split by rows when read
ARCHITECTURES = ("llama", "qwen2", "qwen3", "qwen2moe", "qwen3moe", "gemma2", "gemma3", "phi3")
# the model type of a file's architecture where it is not the same (a Llama with experts is a Mixtral)
_MODEL_TYPES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gemma3": "gemma3_text"}
_MOE_ARCHITECTURES = ("qwen2moe", "qwen3moe")
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}  # llama.cpp tells the 27B models by their layer count
ROPE_FREQS = "rope_freqs.weight"  # llama.cpp's per-dimension divisors of the frequencies (Llama 3.1's scaling)
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# tensors read into the config, not weights: Llama 3.1's divisors, Phi-3's longrope factors
_CONFIG_TENSORS = (ROPE_FREQS, "rope_factors_long.weight", "rope_factors_short.weight")


def open_gguf(path: str | Path) -> FastGGUFReader | GGUFReader:
    """A reader of the file, to share between the calls below (the metadata read once)."""
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - gguf is a declared dependency
        raise ValueError("reading GGUF files needs the 'gguf' package (pip install gguf)") from e
    try:
        try:
            reader = FastGGUFReader(path)
        except BigEndianFile:
            reader = gguf.GGUFReader(path)
    except Exception as e:
        raise ValueError(f"{path} is not a readable GGUF file (truncated or damaged?): {e}") from e
    _check_data_layout(reader, path)
    return reader


def _check_data_layout(reader: FastGGUFReader | GGUFReader, path: str | Path) -> None:
    """Each tensor's bytes aligned, in the data section and overlapping no other's:
    a damaged offset or type would otherwise read another tensor's bytes as its own."""
    end = int(reader.data_offset)
    for start, name, size in sorted((int(t.data_offset), t.name, int(t.n_bytes)) for t in reader.tensors):
        if (start - int(reader.data_offset)) % int(reader.alignment):
            raise ValueError(f"{path}: tensor {name}'s data is not aligned to {reader.alignment} bytes (a damaged file)")
        if start < end:
            raise ValueError(f"{path}: tensor {name}'s data overlaps another tensor's or the metadata (a damaged file)")
        end = start + size  # (data past the file's end: the reader already failed)


def _dequantized(data: np.ndarray, t) -> np.ndarray:
    """Tensor t's `data` (all or some of its rows) as gguf dequantizes it, float32; a type gguf
    cannot dequantize is a clear error."""
    from gguf.quants import dequantize

    try:
        return dequantize(data, t.tensor_type).astype(np.float32)
    except NotImplementedError:
        raise ValueError(f"tensor {t.name} is of GGUF type {t.tensor_type.name}, which cannot be read (gguf cannot "
                         "dequantize it)") from None


def _reader(source: GGUFSource) -> FastGGUFReader | GGUFReader:
    return open_gguf(source) if isinstance(source, (str, Path)) else source


def _field(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_config(path: GGUFSource) -> dict[str, Any]:
    """The file's metadata as a Hugging Face style config dict."""
    r = _reader(path)
    arch = _field(r, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})")

    def p(name: str, default: Any = None) -> Any:
        return _field(r, f"{arch}.{name}", default)

    tensors = {t.name: t for t in r.tensors}
    for name in ("block_count", "embedding_length", "attention.head_count"):
        _positive(p(name), f"{arch}.{name}")
    _check_layers(p("block_count"), arch, tensors)
    if p("feed_forward_length") is not None or not p("expert_count"):  # (a mixture's may go without)
        _positive(p("feed_forward_length"), f"{arch}.feed_forward_length")
    if "tokenizer.ggml.tokens" not in r.fields and not p("vocab_size"):
        raise ValueError("this GGUF file has neither a vocabulary (tokenizer.ggml.tokens) nor a vocab_size")

    scaling = p("rope.scaling.type")  # llama.cpp reads a factor without a type as linear scaling
    factor = p("rope.scaling.factor", p("rope.scale_linear"))
    if scaling not in (None, "none", "linear"):
        raise ValueError(f"GGUF rope scaling {scaling!r} is not supported (only linear, and Llama 3.1's rope_freqs)")
    heads = p("attention.head_count")
    vocab = p("vocab_size") or len(_field(r, "tokenizer.ggml.tokens"))
    head_dim = p("attention.key_length", p("rope.dimension_count", p("embedding_length") // heads))
    if arch == "phi3":  # (its rope.dimension_count is the rotating part of a head)
        head_dim = p("embedding_length") // heads
    extra: dict[str, Any] = {}
    if scaling != "none" and factor not in (None, 0.0, 1.0):
        extra["rope_scaling"] = {"rope_type": "linear", "factor": float(factor)}
    if ROPE_FREQS in tensors:  # written as a tensor, not as scaling parameters: the divisors themselves
        extra["rope_freq_factors"] = [float(x) for x in np.asarray(tensors[ROPE_FREQS].data, dtype=np.float32)]
    model_type = _MODEL_TYPES.get(arch, arch)
    if p("expert_count"):
        extra.update(_experts(arch, p, tensors))
        model_type = "mixtral" if arch == "llama" else model_type
    elif arch in _MOE_ARCHITECTURES:
        raise ValueError(f"this {arch} GGUF file names no experts (expert_count)")
    if arch.startswith("gemma"):
        extra.update(_gemma(arch, p, int(head_dim)))  # (Gemma 1's files: transformers refuses them, tokenizer too)
    elif arch == "phi3":
        extra.update(_phi3(p, tensors, int(head_dim)))
    config = {
        "intermediate_size": int(p("feed_forward_length") or extra.get("moe_intermediate_size", 0)),
        **extra,
        "model_type": model_type,
        "vocab_size": int(vocab),
        "hidden_size": int(p("embedding_length")),
        "num_hidden_layers": int(p("block_count")),
        "num_attention_heads": int(heads),
        "num_key_value_heads": int(p("attention.head_count_kv", heads)),
        "head_dim": int(head_dim),
        "rms_norm_eps": float(p("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(p("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(p("context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": _field(r, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(r, "tokenizer.ggml.eos_token_id"),
    }
    _named_tensors(r, config)  # (every tensor has a place: checked before anything is read)
    return config


def _check_layers(block_count: int, arch: str, tensors: dict) -> None:
    """block_count must be the number of layers the tensors hold (blk.0 to blk.{block_count - 1}),
    checked before anything is built per layer (an absurd count would take all memory)."""
    held = {name.split(".")[1] for name in tensors if name.startswith("blk.")}
    if held != {str(i) for i in range(len(held))} or len(held) != block_count:
        named = sorted(held, key=lambda i: (not i.isdigit(), int(i) if i.isdigit() else 0, i))
        raise ValueError(f"this GGUF file's {arch}.block_count is {block_count}, but its tensors hold the layers "
                         f"{', '.join(named[:3])}{' ... ' + named[-1] if len(named) > 3 else ''}")  # fmt: skip


def _experts(arch: str, p, tensors: dict) -> dict[str, Any]:
    """A mixture's config fields, as its Hugging Face config names them (the layers without a router
    are plain MLPs: Qwen2-MoE's mlp_only_layers). llama.cpp renormalizes the chosen experts' weights
    of Mixtral and Qwen3-MoE, not Qwen2-MoE's, as transformers' configs of them say. The expert count
    and widths are checked against the first sparse layer's tensors (the other layers' shapes are
    checked at load)."""
    layers = int(p("block_count"))
    if not any(f"blk.{i}.ffn_gate_exps.weight" in tensors for i in range(layers)):
        raise ValueError("this GGUF file's experts are not stacked one tensor per layer (ffn_gate_exps), as "
                         "llama.cpp writes them since 2024: convert it again, or serve the Hugging Face folder")
    out = {"num_experts_per_tok": _positive(p("expert_used_count"), f"{arch}.expert_used_count")}
    experts = _positive(p("expert_count"), f"{arch}.expert_count")
    first = next(i for i in range(layers) if f"blk.{i}.ffn_gate_exps.weight" in tensors)
    stacked = tensors[f"blk.{first}.ffn_gate_exps.weight"]
    if len(stacked.shape) != 3 or int(stacked.shape[2]) != experts:  # (GGUF lists shapes inner first)
        raise ValueError(f"this GGUF file's {arch}.expert_count is {experts}, but blk.{first}.ffn_gate_exps is "
                         f"{[int(d) for d in stacked.shape]}, not [in, out, {experts}]")  # fmt: skip
    width = int(stacked.shape[1])  # each expert's, from its tensor
    if arch == "llama":
        return {**out, "num_local_experts": experts, "intermediate_size": width}
    out.update(num_experts=experts, norm_topk_prob=arch == "qwen3moe", moe_intermediate_size=width,
               mlp_only_layers=[i for i in range(layers) if f"blk.{i}.ffn_gate_inp.weight" not in tensors])  # fmt: skip
    if arch == "qwen2moe":
        out["shared_expert_intermediate_size"] = _shared_width(p, tensors.get(f"blk.{first}.ffn_gate_shexp.weight"), first)
    return out


def _shared_width(p, shared: Any, layer: int) -> int:
    """Qwen2-MoE's shared expert's width: its tensor's, which the metadata, when it names one, must agree with."""
    named = p("expert_shared_feed_forward_length")
    if shared is not None and len(shared.shape) != 2:
        raise ValueError(f"this GGUF file's blk.{layer}.ffn_gate_shexp is {[int(d) for d in shared.shape]}, "
                         "not a matrix")  # fmt: skip
    width = int(shared.shape[1]) if shared is not None else 0
    if named is not None and named != width:
        raise ValueError(f"this GGUF file's qwen2moe.expert_shared_feed_forward_length is {named}, but its "
                         f"shared expert (blk.{layer}.ffn_gate_shexp) is {width or 'missing'}")  # fmt: skip
    return width


def _gemma(arch: str, p, head_dim: int) -> dict[str, Any]:
    """Gemma's config fields: those the file holds, and those llama.cpp fixes by architecture and size."""
    layers, hidden, heads = p("block_count"), p("embedding_length"), p("attention.head_count")
    out: dict[str, Any] = {"hidden_activation": "gelu_pytorch_tanh"}
    big = layers == _GEMMA_27B_LAYERS[arch]
    out["query_pre_attn_scalar"] = hidden // heads if big else head_dim
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):  # (absent: Gemma 2's defaults, Gemma 3's none)
        if p(key) is not None:
            out[key] = float(p(key))
    window = p("attention.sliding_window")
    if arch == "gemma2":
        return {**out, "sliding_window": int(window or 4096)}
    out["rope_local_base_freq"] = float(p("rope.freq_base_swa", 10000.0))
    if not window:  # llama.cpp: no window named, every layer full
        return {**out, "sliding_window": None, "layer_types": ["full_attention"] * int(layers)}
    return {**out, "sliding_window": int(window), "sliding_window_pattern": 6}


def _phi3(p, tensors: dict, head_dim: int) -> dict[str, Any]:
    """Phi-3's config fields: a partial rotary (Phi-4-mini), its window (0: none), longrope's factors."""
    out: dict[str, Any] = {"sliding_window": int(p("attention.sliding_window") or 0) or None}
    rotary = int(p("rope.dimension_count", head_dim))
    if rotary != head_dim:
        out["partial_rotary_factor"] = rotary / head_dim
    named = [kind for kind in ("long", "short") if f"rope_factors_{kind}.weight" in tensors]
    if len(named) == 1:
        raise ValueError(f"this phi3 GGUF file has rope_factors_{named[0]} without the other longrope factors")
    if named:
        factors = {f"{kind}_factor": [float(x) for x in np.asarray(tensors[f"rope_factors_{kind}.weight"].data, dtype=np.float32)]
                   for kind in named}  # fmt: skip
        out["rope_scaling"] = {"rope_type": "longrope", **factors}
        key = "phi3.rope.scaling.original_context_length"
        out["original_max_position_embeddings"] = _positive(p("rope.scaling.original_context_length"), key)
    return out


def _positive(value: Any, key: str) -> int:
    """A metadata count that must be a positive integer (not an array of one per layer)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"this GGUF file's {key} must be a positive integer, got {value!r}")
    return int(value)


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaved rotary row order for q/k projections (HF uses rotate_half)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_state_dict(path: GGUFSource, config: dict[str, Any], blocks_only: Collection[str] = ()) -> dict[str, torch.Tensor]:
    """Dequantize every tensor to float32 under Hugging Face parameter names; those in `blocks_only`
    (served from their blocks alone) get a placeholder of their shape that holds no memory."""
    state: dict[str, torch.Tensor] = {}
    plus_one = config["model_type"].startswith("gemma")  # llama.cpp adds Gemma's 1 into its norms
    for name, t in _named_tensors(_reader(path), config):
        # each part's rows, from a skeleton of the tensor's outer dimensions (GGUF lists them inner first)
        skeleton = np.empty((*(int(d) for d in reversed(t.shape[1:])), 0), dtype=np.float32)
        parts = [(each, part.shape[0]) for each, part in _each_part(name, skeleton, config)]
        if all(each in blocks_only for each, _ in parts):  # never dequantized
            state.update({each: torch.zeros((), dtype=torch.float32).expand(rows, int(t.shape[0])) for each, rows in parts})
            continue
        for each, w in _each_part(name, _dequantized(t.data, t), config):
            if each.endswith("mlp.shared_expert_gate.weight"):
                w = w.reshape(1, -1)  # llama.cpp's shape is {hidden}; ours a one-row linear layer
            if plus_one and each.endswith("norm.weight"):
                w = w - np.float32(1.0)
            state[each] = torch.from_numpy(np.ascontiguousarray(w))
    return state


def gguf_quantized_weights(path: GGUFSource, config: dict[str, Any] | None = None) -> dict[str, QuantizedWeight]:
    """The weights of linear layers stored in block types the few-rows kernel reads (Q4_1, Q8_0 as
    they are; Q2_K-Q6_K, Q4_0, Q5_0, Q5_1, the IQ and TQ types re-expressed exactly; F16 and BF16 as their 16-bit values), as blocks, under Hugging Face names and row order (the
    embedding too: a tied head uses it, and a lookup of it held only as blocks). `path` is a file name or a reader from open_gguf."""
    reader = _reader(path)
    config = config or gguf_config(reader)
    out: dict[str, QuantizedWeight] = {}
    for name, t in _named_tensors(reader, config):
        kind, in_features = t.tensor_type.name, int(t.shape[0])  # GGUF lists shapes inner first
        if len(t.shape) not in (2, 3) or name.endswith(("norm.weight", "mlp.gate.weight")):
            continue  # (a router stays float32: it is small, and read in float32)
        if kind not in QUANTIZED_KINDS and not reexpressible(kind, in_features):
            continue
        for each, rows in _each_part(name, np.asarray(t.data), config):  # (a row's blocks move with it)
            if kind in QUANTIZED_KINDS:
                out[each] = QuantizedWeight.from_gguf_rows(kind, rows, in_features)
            else:
                out[each] = reexpressed_weight(kind, rows, in_features)
    return out


def gguf_checked_rows(path: GGUFSource, config: dict[str, Any]):
    """For each linear tensor of the decoder layers (not a router), the embedding and the head: its parts' names (each expert of
    a stacked one, each projection of a fused one), and the rows 0, 1 and the last of each part
    (a stacked one's first expert only) as gguf dequantizes them ({name: {row: float32 [1, in]}}),
    in Hugging Face row order: to check blocks that will have no float32 copy."""
    for name, t in _named_tensors(_reader(path), config):
        held = name.startswith("model.layers.") or name in ("model.embed_tokens.weight", "lm_head.weight")
        if not held or len(t.shape) < 2 or name.endswith("mlp.gate.weight"):
            continue
        parts = list(_each_part(name, np.asarray(t.data), config))
        rows = {}
        for each, raw in parts[:1] if "{e}" in name else parts:
            rows[each] = {r: torch.from_numpy(_dequantized(raw[r : r + 1], t))
                          for r in QuantizedWeight.checked_rows(raw.shape[0])}  # fmt: skip
        yield [each for each, _ in parts], rows


def save_blocks(blocks: dict[str, QuantizedWeight], path: Path) -> None:
    """Write blocks (from gguf_quantized_weights) to a safetensors file, kinds in its metadata."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for name, w in blocks.items():
        tensors[f"{name}.quants"], tensors[f"{name}.scales"] = w.quants, w.scales
        if w.mins is not None:
            tensors[f"{name}.mins"] = w.mins
    save_file(tensors, str(path), metadata={"kinds": json.dumps({n: w.kind for n, w in blocks.items()})})


def load_blocks(path: Path) -> dict[str, QuantizedWeight]:
    """Read a file written by save_blocks; ValueError if it is not one (the caller keeps float32)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            kinds = json.loads((f.metadata() or {})["kinds"])
            out = {}
            for name, kind in kinds.items():
                scales = f.get_tensor(f"{name}.scales")
                mins = f.get_tensor(f"{name}.mins") if f"{name}.mins" in f.keys() else None
                quants = f.get_tensor(f"{name}.quants")
                per_scale = QuantizedWeight.weights_per_scale(kind)  # (0: 16-bit values, no scales)
                shape = (quants.shape[0], scales.shape[1] * per_scale if per_scale else quants.shape[1])
                out[name] = QuantizedWeight(kind, quants, scales, mins, shape)
            return out
    except Exception as e:  # whatever a damaged file raises (safetensors' own error included)
        raise ValueError(f"{path} is not a readable blocks file: {e}") from e


def _named_tensors(reader, config: dict[str, Any]) -> list[tuple[str, Any]]:
    """(Hugging Face name, tensor) for every tensor the model uses (a stacked one's name holds {e},
    a fused one's is the checkpoint's fused name)."""
    names = dict(_LAYER_NAMES)
    if config["model_type"] in ("gemma2", "gemma3_text"):
        names.update(_GEMMA_NORMS)
    elif config["model_type"] == "phi3":
        names.update(_PHI3_FUSED)
    named, unknown = [], []
    for t in reader.tensors:
        base, _, suffix = t.name.rpartition(".")
        kind = base.split(".", 2)[2] if base.startswith("blk.") and base.count(".") >= 2 else None
        if kind in names:
            named.append((f"model.layers.{base.split('.')[1]}.{names[kind]}.{suffix}", t))
        elif base in _GLOBAL_NAMES:
            named.append((f"{_GLOBAL_NAMES[base]}.{suffix}", t))
        elif t.name not in _CONFIG_TENSORS:
            unknown.append(t.name)
    if unknown:  # left out, they would change every answer without a word (llama.cpp refuses them too)
        raise ValueError(f"this GGUF file has {len(unknown)} tensors its {config['model_type']} model has no place "
                         f"for, e.g. {unknown[:3]}: a model this engine does not implement, or a damaged file")
    return named


def _each_part(name: str, a: np.ndarray, config: dict[str, Any]):
    """(name, array) of a tensor; of each expert's part of a stacked one (its first axis); or of each
    projection's rows of a fused one (Phi-3's q, k, v and gate, up); each in Hugging Face row order
    (a Llama's q/k rows un-permuted). Raw block rows too: a row's blocks move with it."""
    for each, rows in _parts(name, a, config):
        yield each, _in_hf_row_order(each, rows, config)


def _parts(name: str, a: np.ndarray, config: dict[str, Any]):
    if "{e}" in name:
        for e in range(a.shape[0]):
            yield name.format(e=e), a[e]
    elif ".self_attn.qkv_proj." in name:
        q = config["num_attention_heads"] * config["head_dim"]
        kv = config["num_key_value_heads"] * config["head_dim"]
        for part, rows in zip(("q_proj", "k_proj", "v_proj"), np.split(a, [q, q + kv])):
            yield name.replace("qkv_proj", part), rows
    elif ".mlp.gate_up_proj." in name:
        gate, up = np.split(a, 2)
        yield name.replace("gate_up_proj", "gate_proj"), gate
        yield name.replace("gate_up_proj", "up_proj"), up
    else:
        yield name, a


def _in_hf_row_order(name: str, rows: np.ndarray, config: dict[str, Any]) -> np.ndarray:
    if config["model_type"] not in ("llama", "mixtral"):  # llama.cpp permutes the q/k rows of its Llama conversions only
        return rows
    if ".self_attn.q_proj." in name:
        return _unpermute(rows, config["num_attention_heads"])
    if ".self_attn.k_proj." in name:
        return _unpermute(rows, config["num_key_value_heads"])
    return rows
