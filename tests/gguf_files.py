"""A tiny random Hugging Face model written as a GGUF file the way llama.cpp's converter writes it:
its architecture's metadata, the tensors under llama.cpp's names (a Llama's q/k rows permuted,
Gemma's norms with its 1 added in, Phi-3's fused projections as they are, its longrope factors as
tensors), a Llama-3 scaled model's `rope_freqs` divisors, and the embedded model's tokenizer
(vocabulary 49152) or a small SentencePiece one as Gemma's and Phi-3's files hold theirs."""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Callable, Collection
from pathlib import Path

import numpy as np

from cachedattention.model.gguf_kquants import random_rows
from tests.tiny_models import make_tiny_model

_LAYER_NAMES = {
    "q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output", "gate_proj": "ffn_gate",
    "up_proj": "ffn_up", "down_proj": "ffn_down", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm", "q_norm": "attn_q_norm", "k_norm": "attn_k_norm",
    "qkv_proj": "attn_qkv", "gate_up_proj": "ffn_up",  # Phi-3's, fused as its checkpoints and llama.cpp keep them
}  # fmt: skip
_GEMMA_NORMS = {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
                "post_feedforward_layernorm": "post_ffw_norm"}  # fmt: skip


def _permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's interleaved rotary row order of a Llama's q/k projections."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_freqs(head_dim: int, theta: float, scaling: dict) -> np.ndarray:
    """Each frequency's divisor for Llama 3's scaling, computed as llama.cpp's converter does."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < old_len / high:
            out.append(1.0)
        elif wavelen > old_len / low:
            out.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


_MOE_ARCHS = {"mixtral": "llama", "qwen2-moe": "qwen2moe", "qwen3-moe": "qwen3moe"}
# what llama.cpp's runtime assumes of these files: Gemma 3's window in five layers of six, Gemma 2's
# in one of two (the tiny models' own default), both one's query scale 1/sqrt(head_dim) (hidden /
# heads for the 27B models' layer counts, 46 and 62)
_GEMMA3_LAYOUT = dict(num_hidden_layers=6, sliding_window_pattern=6, query_pre_attn_scalar=32,
                      layer_types=["sliding_attention"] * 5 + ["full_attention"])  # fmt: skip
_GGUF_SHAPES = {"gemma2": dict(query_pre_attn_scalar=32), "gemma2-27b-layers": dict(num_hidden_layers=46, query_pre_attn_scalar=16),
                "gemma3": _GEMMA3_LAYOUT, "gemma3-scaled": _GEMMA3_LAYOUT,
                "gemma3-full": dict(_GEMMA3_LAYOUT, layer_types=["full_attention"] * 6),
                "gemma3-27b-layers": dict(_GEMMA3_LAYOUT, num_hidden_layers=62, query_pre_attn_scalar=16,
                                          layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 10
                                          + ["sliding_attention"] * 2)}  # fmt: skip


def _arch(kind: str) -> str:
    if kind in _MOE_ARCHS:
        return _MOE_ARCHS[kind]
    for prefix, arch in (("llama", "llama"), ("gemma3", "gemma3"), ("gemma2", "gemma2"), ("phi", "phi3")):
        if kind.startswith(prefix):
            return arch
    return kind


# what the SentencePiece vocabulary is learned from: chat words, with a few characters only byte pieces spell
_SPM_CORPUS = ("Hello world! The quick brown fox jumps over the lazy dog. Tell me a short story about a cat. "
               "Sure, here is a story: once upon a time there was a cat who liked to sleep in the sun. "
               "What is the capital of France? The capital of France is Paris. Thank you very much.")
# SentencePiece's special pieces, llama.cpp's token types (1 normal, 2 unknown, 3 control, 6 byte)
_SPM_SPECIAL = {"gemma3": [("<pad>", 3), ("<eos>", 3), ("<bos>", 3), ("<unk>", 2), ("<mask>", 3),
                           ("<start_of_turn>", 3), ("<end_of_turn>", 3)],
                "phi3": [("<unk>", 2), ("<s>", 3), ("</s>", 3), ("<|endoftext|>", 3), ("<|user|>", 3),
                         ("<|assistant|>", 3), ("<|end|>", 3), ("<|system|>", 3)]}  # fmt: skip
# chat templates of their shape (written here): Gemma folds a system prompt into the first user turn
_SPM_TEMPLATES = {
    "gemma3": "{{ bos_token }}{% set sys = messages[0]['content'] + '\n\n' if messages[0]['role'] == 'system' else '' %}"
              "{% for m in messages if m['role'] != 'system' %}{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' "
              "else 'user') + '\n' + (sys if loop.first else '') + m['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}",
    "phi3": "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}",
}


def sentencepiece_vocab(arch: str, merges: int = 300) -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece vocabulary as a GGUF holds one: special pieces, the 256 byte pieces, then pieces
    learned by BPE over `_SPM_CORPUS` (a word starts with \u2581), best first; tokens, scores, types."""
    words = [tuple("\u2581" + w) for w in _SPM_CORPUS.split(" ")]
    pieces = sorted({c for w in words for c in w})
    for _ in range(merges):
        pairs: dict[tuple[str, str], int] = {}
        for w in words:
            for pair in zip(w, w[1:]):
                pairs[pair] = pairs.get(pair, 0) + 1
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        pieces.append(best[0] + best[1])
        words = [_merged(w, best) for w in words]
    special = _SPM_SPECIAL[arch]
    tokens = [t for t, _ in special] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [k for _, k in special] + [6] * 256 + [1] * len(pieces)
    scores = [0.0] * (len(special) + 256) + [-float(i) for i in range(len(pieces))]
    return tokens, scores, types


def _merged(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(word):
        if word[i : i + 2] == pair:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


class _PackedOnce(list):
    """One of the embedded vocabulary's arrays (its 49,152 tokens, their types, its merges): gguf's
    writer packs it value by value, a second for the three each time; `_Writer` keeps its bytes."""

    def __init__(self, values) -> None:
        super().__init__(values)
        self.packed: dict[tuple, bytes] = {}


@functools.lru_cache(maxsize=1)
def _embedded_vocabulary() -> dict[str, object]:
    from cachedattention.model.embedded import embedded_gguf_path
    from cachedattention.model.gguf_reader import FastGGUFReader

    src = FastGGUFReader(embedded_gguf_path())  # (gguf's own reader takes 4 s over this vocabulary)
    return {key: (_PackedOnce(field.value) if isinstance(field.value, list) else field.value)
            for key, field in src.fields.items() if key.startswith("tokenizer.ggml.")}  # fmt: skip


def _writer_class():
    import gguf

    class _Writer(gguf.GGUFWriter):
        """gguf's writer, packing each `_PackedOnce` array once per process: the same bytes every time
        (were `_pack_val` renamed in gguf, this is never called and the writer packs as before)."""

        def _pack_val(self, val, *args, **kwargs):
            if not isinstance(val, _PackedOnce):
                return super()._pack_val(val, *args, **kwargs)
            key = (args, tuple(sorted(kwargs.items())))
            if key not in val.packed:
                val.packed[key] = bytes(super()._pack_val(list(val), *args, **kwargs))
            return val.packed[key]

    return _Writer


def write_tiny_gguf(kind: str, folder: Path, types: dict[str, str] | None = None, sentencepiece: bool = False,
                    **overrides):
    """Write `folder/model.gguf` of a tiny random `kind` model (llama, llama-linear, qwen2, qwen3,
    gemma2, gemma2-27b-layers, gemma3, gemma3-scaled, gemma3-27b-layers, gemma3-full (no window named:
    every layer full), phi3-window, phi4-mini, and the
    mixtures mixtral, qwen2-moe, qwen3-moe: each layer's experts stacked in one tensor each);
    return the transformers model it holds (float32 tensors: the same weights exactly, unless
    `types` names a block type for some tensors, by llama.cpp's short name: attn_q, ffn_down,
    output...; those hold the weights quantized (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), or random
    super-blocks for a K-quant). `sentencepiece`: the file holds a SentencePiece vocabulary and a
    chat template of its family's shape (gemma3, phi3 kinds) instead of the embedded model's
    byte-level one. `overrides`: config fields."""
    import gguf
    from gguf.quants import quantize


    arch = _arch(kind)
    base = kind.removesuffix("-27b-layers").removesuffix("-full")
    spm = sentencepiece_vocab(arch) if sentencepiece else None
    if spm:  # (Phi-3's default, 32000, is past this vocabulary)
        overrides.setdefault("pad_token_id", spm[0].index("<pad>" if arch == "gemma3" else "<|endoftext|>"))
    hf = make_tiny_model(base, folder / "hf", vocab_size=len(spm[0]) if spm else 49152,
                         **{**_GGUF_SHAPES.get(kind, {}), **overrides})
    cfg = hf.config
    rope = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    rope = dict(rope.get("full_attention", rope))  # Gemma 3's by layer type: the full layers' is the model's
    theta = float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w = _writer_class()(str(folder / "model.gguf"), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    if arch != "gemma2":  # (as llama.cpp's converters: Gemma 2's base is llama.cpp's default, 10000)
        w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if arch != "phi3":  # (Phi-3's head is hidden / heads)
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_rope_dimension_count(int(head_dim * getattr(cfg, "partial_rotary_factor", 1.0)))
    if arch.startswith("gemma") and arch != "gemma":
        if getattr(cfg, "sliding_window", None) and kind != "gemma3-full":  # (transformers' masks need one)
            w.add_sliding_window(cfg.sliding_window)
        for cap in ("attn_logit_softcapping", "final_logit_softcapping"):
            if getattr(cfg, cap, None) is not None:
                w.add_float32(f"{arch}.{cap}", getattr(cfg, cap))
    if arch == "gemma3" and rope.get("rope_type") == "linear":  # the full layers' (Gemma 3 4B and up)
        w.add_string(f"{arch}.rope.scaling.type", "linear")
        w.add_float32(f"{arch}.rope.scaling.factor", rope["factor"])
    if arch == "phi3":
        w.add_sliding_window(getattr(cfg, "sliding_window", None) or 0)
        if rope.get("rope_type") == "longrope":
            w.add_uint32(f"{arch}.rope.scaling.original_context_length", cfg.original_max_position_embeddings)
            w.add_tensor("rope_factors_long.weight", np.array(rope["long_factor"], dtype=np.float32))
            w.add_tensor("rope_factors_short.weight", np.array(rope["short_factor"], dtype=np.float32))
    if kind in _MOE_ARCHS:
        w.add_expert_count(getattr(cfg, "num_local_experts", None) or cfg.num_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        if arch == "qwen3moe":  # (Qwen1.5-MoE's early files name neither width: the tensors say it)
            w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    if spm:
        tokens, scores, token_types = spm
        w.add_tokenizer_model("llama")  # (llama.cpp's name for a SentencePiece vocabulary; no merges stored)
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(token_types)
        bos, eos = ("<bos>", "<end_of_turn>") if arch == "gemma3" else ("<s>", "<|end|>")
        w.add_bos_token_id(tokens.index(bos))
        w.add_eos_token_id(tokens.index(eos))
        w.add_unk_token_id(tokens.index("<unk>"))
        w.add_pad_token_id(tokens.index("<pad>" if arch == "gemma3" else "<|endoftext|>"))
        w.add_add_bos_token(True)
        w.add_chat_template(_SPM_TEMPLATES[arch])
    else:
        vocabulary = _embedded_vocabulary()
        for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre"):
            w.add_string(key, vocabulary[key])
        w.add_token_list(vocabulary["tokenizer.ggml.tokens"])
        w.add_token_types(vocabulary["tokenizer.ggml.token_type"])
        w.add_token_merges(vocabulary["tokenizer.ggml.merges"])
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
    if rope.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", _rope_freqs(head_dim, theta, rope))
    elif rope.get("rope_type") == "linear" and arch == "llama":  # as older converters wrote it: the factor, no type
        w.add_float32(f"{arch}.rope.scale_linear", rope["factor"])
    state = {n: t.float().numpy() for n, t in hf.state_dict().items()}
    if kind in _MOE_ARCHS:
        state = _stacked_experts(state)
    for name, a in state.items():
        if name != "lm_head.weight" or not cfg.tie_word_embeddings:  # a tied head is the embedding
            gname, a = _gguf_tensor(name, a, cfg, arch)
            qtype = (types or {}).get(gname.split(".")[-2] if gname.startswith("blk.") else gname.split(".")[0])
            if qtype is None:
                w.add_tensor(gname, a)
            elif qtype in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "TQ1_0", "TQ2_0", "F16", "BF16"):  # the weights themselves, quantized
                w.add_tensor(gname, quantize(a, gguf.GGMLQuantizationType[qtype]), raw_dtype=gguf.GGMLQuantizationType[qtype])
            else:  # (random super-blocks: gguf's package does not quantize to K-quants)
                rng = np.random.default_rng(len(gname))
                rows = random_rows(qtype, int(np.prod(a.shape[:-1])), a.shape[-1], rng).reshape(*a.shape[:-1], -1)
                w.add_tensor(gname, rows, raw_dtype=gguf.GGMLQuantizationType[qtype])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


def written_once(tmp_path_factory, **options):
    """A getter of each kind's file, written on first use with `options` (write_tiny_gguf's):
    kind -> (its folder, the transformers model it holds)."""
    written = {}

    def get(kind: str):
        if kind not in written:
            folder = tmp_path_factory.mktemp(f"gguf-{kind}")
            written[kind] = (folder, write_tiny_gguf(kind, folder, **options))
        return written[kind]

    return get


_MOE_NAMES = {"mlp.gate.weight": "ffn_gate_inp.weight", "block_sparse_moe.gate.weight": "ffn_gate_inp.weight",
              "experts.gate": "ffn_gate_exps.weight", "experts.up": "ffn_up_exps.weight",
              "experts.down": "ffn_down_exps.weight", "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
              "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
              "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight",
              "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight"}  # fmt: skip


def _stacked_experts(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each layer's experts as llama.cpp stacks them, [experts, out, in] under `experts.gate/up/down`,
    from transformers' fused gate_up_proj (gate first) and down_proj, or from one tensor per expert
    (Mixtral's w1 / w3 / w2, the others' gate_proj / up_proj / down_proj)."""
    out: dict[str, np.ndarray] = {}
    per_expert: dict[str, dict[int, np.ndarray]] = {}
    part = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
    for name, a in state.items():
        layer = name.split(".experts.")[0] if ".experts." in name else None
        if layer is None or ".shared_expert" in name:
            out[name] = a
        elif name.endswith("experts.gate_up_proj"):
            out[f"{layer}.experts.gate"], out[f"{layer}.experts.up"] = np.split(a, 2, axis=1)
        elif name.endswith("experts.down_proj"):
            out[f"{layer}.experts.down"] = a
        else:  # layer.experts.E.w1.weight
            e, module = name.split(".experts.")[1].split(".")[:2]
            per_expert.setdefault(f"{layer}.experts.{part[module]}", {})[int(e)] = a
    for name, experts in per_expert.items():
        out[name] = np.stack([experts[e] for e in sorted(experts)])
    return out


def _gguf_tensor(name: str, a: np.ndarray, cfg, arch: str) -> tuple[str, np.ndarray]:
    layer_name = name.split(".", 3)[-1] if name.startswith("model.layers.") else ""
    for hf, gguf_name in _MOE_NAMES.items():
        if layer_name.endswith(hf) and (hf.startswith("experts.") or layer_name == hf):
            if hf == "mlp.shared_expert_gate.weight":
                a = a.reshape(-1)  # llama.cpp's shape: {hidden}
            return f"blk.{name.split('.')[2]}.{gguf_name}", np.ascontiguousarray(a)
    if name == "model.norm.weight" and arch.startswith("gemma"):
        return "output_norm.weight", a + np.float32(1.0)
    if name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        return {"model.embed_tokens.weight": "token_embd.weight", "lm_head.weight": "output.weight",
                "model.norm.weight": "output_norm.weight"}[name], a  # fmt: skip
    _, _, layer, *_, module, kind = name.split(".")  # model.layers.i.self_attn.q_proj.weight
    if arch == "llama" and module in ("q_proj", "k_proj"):
        a = _permute(a, cfg.num_attention_heads if module == "q_proj" else cfg.num_key_value_heads)
    if arch.startswith("gemma") and module.endswith("norm"):
        a = a + np.float32(1.0)  # Gemma's (1 + w), added in by the converter
    names = {**_LAYER_NAMES, **(_GEMMA_NORMS if arch in ("gemma2", "gemma3") else {})}
    return f"blk.{layer}.{names[module]}.{kind}", np.ascontiguousarray(a)


def rewritten_gguf(src: Path, dst: Path, meta: dict[str, int] | None = None, drop: Collection[str] = (),
                   change: dict[str, Callable[[np.ndarray], np.ndarray]] | None = None,
                   add: dict[str, np.ndarray] | None = None) -> Path:
    """A copy of a GGUF file with changes: `meta` uint32 fields set ({arch} in a key: the file's
    architecture), tensors dropped, changed (each a float32 array, GGUF's dimensions reversed, given
    to a function) or added (float32). The other fields' and tensors' bytes are copied as they are
    (gguf's reader and writer took seconds over a 49,152-token vocabulary)."""
    from cachedattention.model.gguf_reader import FastGGUFReader

    reader = FastGGUFReader(src)
    raw = reader.data
    arch = reader.fields["general.architecture"].contents()
    meta = {k.replace("{arch}", arch): v for k, v in (meta or {}).items()}
    fields = [bytes(raw[f.start : f.end]) for k, f in reader.fields.items() if k not in meta]
    fields += [_gguf_string(k) + struct.pack("<II", 4, v) for k, v in meta.items()]  # (4: uint32)
    tensors = []  # (name, GGUF dimensions, GGML type, data)
    for t in reader.tensors:
        if t.name in drop:
            continue
        if t.name in (change or {}):
            a = change[t.name](np.asarray(t.data).reshape([int(d) for d in reversed(t.shape)]))
            tensors.append((t.name, list(reversed(a.shape)), 0, np.ascontiguousarray(a, np.float32).tobytes()))
        else:
            tensors.append((t.name, [int(d) for d in t.shape], int(t.tensor_type), np.asarray(t.data).tobytes()))
    tensors += [(n, list(reversed(a.shape)), 0, np.ascontiguousarray(a, np.float32).tobytes()) for n, a in (add or {}).items()]
    align = reader.alignment
    infos, offset = [], 0
    for name, dims, kind, data in tensors:
        infos.append(_gguf_string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, kind, offset))
        offset += len(data) + (-len(data) % align)
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(fields)) + b"".join(fields) + b"".join(infos)
    with open(dst, "wb") as f:
        f.write(head + bytes(-len(head) % align))
        for *_, data in tensors:
            f.write(data + bytes(-len(data) % align))
    return dst


def _gguf_string(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def tensor_info_at(path: Path, tensor: str) -> tuple[int, int, int]:
    """Where `tensor`'s info in the file holds its GGML type (a uint32) and its data's offset (a
    uint64), and that offset: to damage a copy of the file in place."""
    from cachedattention.model.gguf_reader import FastGGUFReader

    reader = FastGGUFReader(path)
    at = max(f.end for f in reader.fields.values())  # (the tensors' infos follow the metadata)
    buf = memoryview(reader.data)
    for _ in reader.tensors:
        (n,) = struct.unpack_from("<Q", buf, at)
        name = str(buf[at + 8 : at + 8 + n], "utf-8")
        at += 8 + n
        (n_dims,) = struct.unpack_from("<I", buf, at)
        type_at = at + 4 + 8 * n_dims
        (offset,) = struct.unpack_from("<Q", buf, type_at + 4)
        if name == tensor:
            return type_at, type_at + 4, offset
        at = type_at + 12
    raise KeyError(tensor)


def patched(path: Path, at: int, fmt: str, value: int) -> None:
    """Write `value` (a struct format's) at byte `at` of the file."""
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(struct.pack(fmt, value))
