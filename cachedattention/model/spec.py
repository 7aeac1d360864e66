"""ModelSpec: the architecture facts the engine needs, parsed from a Hugging Face config.json."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from typing import Any

from cachedattention.model.gemma_config import GEMMA, gemma_config
from cachedattention.model.hybrid_config import HYBRID, hybrid_config
from cachedattention.model.quant_config import checkpoint_scheme
from cachedattention.model.rope_config import RopeScaling, rope_settings

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe", "gemma", "gemma2", "gemma3_text",
             "gemma3", "phi3", "smollm3", "granite", "granitemoe", "granitemoeshared", "ministral", "olmo2", "olmo3", "exaone4", "ernie4_5", "seed_oss",
             "helium", "glm", "glm4", "cohere", "cohere2", "mistral3", "gpt_oss", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "glm4_moe")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")  # the gated MLP's: SwiGLU, and Gemma's GeGLU
QWEN = ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe")
GRANITE = ("granite", "granitemoe", "granitemoeshared")  # Granite's four multipliers
COHERE = ("cohere", "cohere2")
# Families whose positions are absolute (learned or sinusoidal): a pre-RoPE store cannot decouple them.
ABSOLUTE_POSITION = ("gpt2", "gpt_neo", "gptj", "opt", "bloom", "bert", "gpt_bigcode")


@dataclass(frozen=True)
class MoESpec:
    """Sparse mixture-of-experts MLPs (Mixtral, Qwen2-MoE, Qwen3-MoE): each token runs through the
    top_k of num_experts gated MLPs its router picks, weighted by the router's probabilities."""

    num_experts: int
    top_k: int
    expert_intermediate_size: int
    normalize_top_k: bool  # the chosen experts' probabilities rescaled to sum to 1
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE: an expert every token runs, gated by a sigmoid
    dense_layers: tuple[int, ...] = ()  # layers with a plain MLP of the spec's intermediate_size
    # gpt-oss: a router with a bias whose top_k logits are softmaxed (not the top_k of a softmax), and
    # experts with biases whose SwiGLU is clamped: (up + 1) * g * sigmoid(alpha * g), g and up
    # clamped to swiglu_limit
    router_bias: bool = False
    softmax_top_k: bool = False
    expert_bias: bool = False
    swiglu_alpha: float | None = None
    swiglu_limit: float | None = None
    # GLM-4.5 (DeepSeek-V3's routing): sigmoid scores, chosen with a learned bias among the top
    # `groups[1]` of `groups[0]` groups of experts, weighted by their own scores (rescaled to sum to 1
    # when normalize_top_k) times routed_scale; shared experts every token runs, ungated
    sigmoid_groups: tuple[int, int] | None = None
    routed_scale: float | None = None
    shared_experts_intermediate_size: int = 0


@dataclass(frozen=True)
class ModelSpec:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    rope_scaling: RopeScaling | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    qk_norm: bool = False  # Qwen3: an RMSNorm over each head's q and k, before RoPE
    o_bias: bool = False  # attention_bias in Llama-style modeling: o_proj has one too
    mlp_bias: bool = False  # Llama's mlp_bias: gate, up and down have one
    # each frequency's divisor: a GGUF file's rope_freqs (how llama.cpp writes Llama 3.1's scaling),
    # linear scaling's factor
    rope_freq_factors: tuple[float, ...] | None = None
    moe: MoESpec | None = None
    # sliding-window attention: the layers whose queries see only the last sliding_window keys (the
    # store keeps every token all the same: other layers, and later truncation, may need them)
    sliding_window: int | None = None
    window_layers: tuple[int, ...] = ()
    # Gemma 3: its MLP's activation, the embedding scaled by sqrt(hidden), a norm after attention and
    # around the MLP (its post_attention_layernorm normalises the attention's output; GLM-4's too,
    # under other names), and the RoPE base of the layers typed for a window (whether or not the
    # window cuts), unscaled
    hidden_act: str = "silu"
    embed_scale: float | None = None  # Gemma's sqrt(hidden), Granite's embedding_multiplier
    sandwich_norms: bool = False
    # the attention's softmax scale where it is not head_dim ** -0.5 (Gemma's query_pre_attn_scalar
    # ** -0.5, Granite's attention_multiplier); the loader folds it into the query's weights
    attn_scale: float | None = None
    residual_scale: float | None = None  # Granite: each sublayer's output scaled (folded into o and down)
    logits_scale: float | None = None  # Granite: the logits divided by logits_scaling (its head is tied)
    local_rope_theta: float | None = None
    local_rope_layers: tuple[int, ...] = ()
    # SmolLM3: layers without RoPE (every fourth): their keys are stored and attended as they are
    nope_layers: tuple[int, ...] = ()
    # longrope (Phi-3.5, Phi-4-mini): the divisors past rope_short_window tokens (rope_freq_factors
    # are those within it); partial rotary (Phi-4-mini): the first rotary_dim dimensions of each head rotate
    rope_long_freq_factors: tuple[float, ...] | None = None
    rope_short_window: int | None = None
    rotary_dim: int | None = None
    # YaRN's and longrope's factor on cos and sin: q.k of the rotating dimensions scaled by its square,
    # which the loader folds into those of q (the stored keys stay the model's own)
    rope_attention_factor: float | None = None
    # the window RoPE scaling stretches the model to (YaRN: its window times its factor; linear: the
    # model's times the factor): what max_model_len may reach; not in the fingerprint (no KV depends on it)
    rope_context: int | None = None
    # OLMo 2: no norm before attention or the MLP, one after each (before the residual add); its q
    # and k norms span the whole projection, not each head
    post_norms_only: bool = False
    qk_norm_full: bool = False
    # Gemma 2's caps (Gemma 3's on logits): attention scores and logits x become cap * tanh(x / cap)
    attn_softcap: float | None = None
    final_softcap: float | None = None
    # ERNIE 4.5, Helium, GLM: RoPE over adjacent pairs of each head's dimensions (GPT-J's), not its halves; the
    # loader reorders q and k so the rotation of halves serves
    rope_interleaved: bool = False
    # Cohere: norms that centre on the mean (no bias), and layers whose attention and MLP both read
    # the one norm's output, both added to the stream
    layer_norm: bool = False
    parallel_block: bool = False
    # Command R+ (Cohere's use_qk_norm): its q and k norms hold a weight for each head
    qk_norm_per_head: bool = False
    # gpt-oss: a learned logit per head beside each query's scores, which takes its share of the
    # softmax and is then dropped (the keys' weights sum to less than 1)
    attn_sinks: bool = False

    def window(self, layer: int) -> int | None:
        """The layer's sliding window, or None when it attends to the whole context."""
        return self.sliding_window if layer in self.window_layers else None

    @property
    def any_window(self) -> int | None:
        """The sliding window of the layers that have one; None when none does."""
        return self.sliding_window if self.window_layers else None

    def norms_plus_one(self) -> bool:
        """Gemma's norms scale by (1 + w): the loader folds the 1 in."""
        return self.model_type in ("gemma", "gemma2", "gemma3_text")

    def default_context(self) -> int:
        """The window served when none is asked: a longrope model's pretraining one, where its short
        factors rotate every token as transformers does."""
        return min(self.max_position_embeddings, self.rope_short_window or self.max_position_embeddings)

    def is_sparse(self, layer: int) -> bool:
        """Whether the layer's MLP is a mixture of experts."""
        return self.moe is not None and layer not in self.moe.dense_layers

    def widest_mlp(self) -> int:
        """The most intermediate activations one token's MLP holds at once, in elements."""
        if self.moe is None:
            return self.intermediate_size
        dense = self.intermediate_size if self.moe.dense_layers else 0
        return max(dense, self.moe.expert_intermediate_size, self.moe.shared_expert_intermediate_size,
                   self.moe.shared_experts_intermediate_size)

    def kv_bytes_per_token(self, element_size: int) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * element_size

    def trained_context(self) -> int:
        """The longest window the model's positions serve: max_position_embeddings, or what its
        RoPE scaling stretches it to (as vLLM derives max_model_len)."""
        return max(self.max_position_embeddings, self.rope_context or 0)

    def fingerprint(self) -> str:
        """Stable hash of the architecture, part of every stored record's identity."""
        fields = asdict(self)
        del fields["rope_context"]
        for name, default in LATER_FIELDS.items():  # models without them keep their fingerprints
            if fields[name] == default:
                del fields[name]
        for name, default in LATER_MOE_FIELDS.items():
            if fields.get("moe") is not None and fields["moe"][name] == default:
                del fields["moe"][name]
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


# fields added after stores were written, with the value that leaves them out of the fingerprint
LATER_FIELDS = {"qk_norm": False, "o_bias": False, "mlp_bias": False, "rope_freq_factors": None, "moe": None, "sliding_window": None, "window_layers": (),
                "hidden_act": "silu", "embed_scale": None, "sandwich_norms": False, "attn_scale": None,
                "residual_scale": None, "logits_scale": None,
                "local_rope_theta": None, "local_rope_layers": (), "nope_layers": (),
                "post_norms_only": False, "qk_norm_full": False,
                "rope_long_freq_factors": None, "rope_short_window": None, "rotary_dim": None,
                "rope_attention_factor": None, "attn_softcap": None,
                "final_softcap": None, "rope_interleaved": False,
                "layer_norm": False, "parallel_block": False, "attn_sinks": False, "qk_norm_per_head": False}  # fmt: skip
LATER_MOE_FIELDS = {"router_bias": False, "softmax_top_k": False, "expert_bias": False, "swiglu_alpha": None,
                    "swiglu_limit": None, "sigmoid_groups": None, "routed_scale": None,
                    "shared_experts_intermediate_size": 0}  # fmt: skip


# families whose attention_bias puts a bias on q, k, v and o (transformers' modeling of each)
ATTENTION_BIAS = ("llama", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3_text", "smollm3", *GRANITE, "olmo2", "olmo3",
                  "cohere", "cohere2", "gpt_oss")


def _qkv_bias(model_type: str, cfg: dict[str, Any]) -> bool:
    if model_type == "qwen2":
        return True
    if model_type == "qwen2_moe":
        return bool(cfg.get("qkv_bias", True))
    if model_type == "ernie4_5":  # use_bias: every linear layer has one
        return bool(cfg.get("use_bias", False))
    if model_type == "seed_oss":  # on q, k and v by default; o's is attention_out_bias
        return bool(cfg.get("attention_bias", True))
    if model_type in ("helium", "glm", "glm4", "glm4_moe"):  # on q, k and v only
        return bool(cfg.get("attention_bias", False))
    return model_type in ATTENTION_BIAS and bool(cfg.get("attention_bias", False))


def _o_bias(model_type: str, cfg: dict[str, Any]) -> bool:
    if model_type == "ernie4_5":
        return bool(cfg.get("use_bias", False))
    if model_type == "seed_oss":
        return bool(cfg.get("attention_out_bias", False))
    return model_type in ATTENTION_BIAS and bool(cfg.get("attention_bias", False))


def _mlp_bias(model_type: str, cfg: dict[str, Any]) -> bool:
    if model_type == "ernie4_5":
        return bool(cfg.get("use_bias", False))
    return model_type in ("llama", "smollm3", "granite", "seed_oss", "helium") and bool(cfg.get("mlp_bias", False))


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    ids = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError(f"config.json's eos_token_id must be a token id or a list of them, got {value!r}")
    return ids


QWEN_MAX_WINDOW_LAYERS = 28  # transformers' default where a Qwen config that uses its window names none


# families whose modeling has a sliding window (Llama's and Granite's have none, whatever a config says)
WINDOWED = ("mistral", "ministral", "mixtral", "phi3", *QWEN, "gemma2", "gemma3_text", "smollm3", *HYBRID, "gpt_oss")
DEFAULT_WINDOW = 4096  # transformers' where a Qwen (using its window), Mistral or Ministral config names none


def _window_layers(model_type: str, cfg: dict[str, Any]) -> tuple[int, tuple[int, ...]] | None:
    """The sliding window and the layers that attend within it, as transformers reads the config
    (None: every layer sees the whole context). A window no shorter than the model's context never
    cuts, so it is none."""
    qwen = model_type in QWEN
    if model_type not in WINDOWED:
        return None
    if (qwen or model_type == "smollm3") and not cfg.get("use_sliding_window"):  # named, used only when asked
        return None
    window = cfg.get("sliding_window", DEFAULT_WINDOW if qwen or model_type in ("mistral", "ministral") else None)
    layers = int(cfg.get("num_hidden_layers", 0))
    if not window:
        return None
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"sliding_window must be a positive integer, got {window!r}")
    if window >= int(cfg.get("max_position_embeddings") or 4096):
        return None
    types = cfg.get("layer_types") or ()
    below = int(cfg.get("max_window_layers", QWEN_MAX_WINDOW_LAYERS))
    if model_type in ("mistral", "mixtral", "phi3", "qwen3_moe"):  # every layer (their modeling ignores layer_types)
        windowed = range(layers)
    elif model_type in ("gemma2", "gemma3_text", *HYBRID, "gpt_oss") or types:  # as layer_types says (Gemma 3: five
        # windowed layers, then a full one; Gemma 2: every other one; OLMo 3: every fourth full)
        windowed = [i for i, t in enumerate(types) if t == "sliding_attention"]
    elif model_type == "ministral":  # without layer_types: every layer
        windowed = range(layers)
    elif model_type == "smollm3":  # its layers without RoPE
        windowed = _nope_layers(model_type, cfg)
    elif model_type == "qwen2_moe":  # every other layer below max_window_layers
        windowed = [i for i in range(layers) if (i + 1) % 2 and i < below]
    else:  # qwen2, qwen3: from max_window_layers on
        windowed = range(below, layers)
    return (window, tuple(windowed)) if windowed else None


# transformers' defaults where a config leaves them out: (experts, per token, an expert's width, the shared one's)
MOE_DEFAULTS = {"mixtral": (8, 2, None, 0), "granitemoe": (8, 2, None, 0), "granitemoeshared": (8, 2, None, 0), "qwen2_moe": (60, 4, 1408, 5632), "qwen3_moe": (128, 8, 768, 0),
                "gpt_oss": (128, 4, None, 0), "glm4_moe": (128, 8, 1408, 0)}


def _attn_scale(cfg: dict[str, Any]) -> float | None:
    """The attention's softmax scale where the family's is not head_dim ** -0.5 (None: it is)."""
    if cfg.get("model_type") in ("gemma2", "gemma3_text"):
        return float(cfg["query_pre_attn_scalar"]) ** -0.5
    if cfg.get("model_type") in GRANITE:  # attention_multiplier itself, 1.0 when not named
        return _granite(cfg, "attention_multiplier") or 1.0
    return None


def _softcap(cfg: dict[str, Any], key: str) -> float | None:
    """Gemma's cap on attention scores or logits: cap * tanh(x / cap) (None: no cap)."""
    value = cfg.get(key)
    if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0):
        raise ValueError(f"config.json's {key} must be a positive number or null, got {value!r}")
    return None if value is None else float(value)


def _language_model_config(cfg: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """A multimodal config's text_config, with the special tokens named at its top level, and its
    tying (transformers ties the whole model's head by the top level's; images are not read: the
    vision tower's weights are left out)."""
    text = cfg.get("text_config")
    if not isinstance(text, dict) or text.get("model_type", "mistral") not in SUPPORTED:
        raise ValueError(f"{cfg.get('model_type')!r}'s text_config must be a supported language model's config")
    text = _with_top_level(cfg, {"model_type": "mistral", **text})
    return text, text["model_type"]


def _with_top_level(cfg: dict[str, Any], text: dict[str, Any]) -> dict[str, Any]:
    """A multimodal config's language model config with what its top level says for the whole
    model: the special tokens where the text's are not named, and the head's tying (transformers
    ties the whole model's head by the top level's)."""
    text = dict(text)
    for key in ("bos_token_id", "eos_token_id"):
        if cfg.get(key) is not None and text.get(key) is None:
            text[key] = cfg[key]
    if "tie_word_embeddings" in cfg:
        text["tie_word_embeddings"] = cfg["tie_word_embeddings"]
    return text


# Qwen's vision-language checkpoints: the language model each holds (text only: images are not read)
QWEN_VL = {"qwen2_vl": "qwen2", "qwen2_5_vl": "qwen2", "qwen3_vl": "qwen3", "qwen3_vl_moe": "qwen3_moe"}
MROPE_KEYS = ("mrope_section", "mrope_interleaved")


def _qwen_vl_text_config(cfg: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The language model's config of a Qwen2-VL, Qwen2.5-VL or Qwen3-VL checkpoint: its text_config
    (transformers 5, Qwen3-VL) or its top level (the hub's Qwen2-VL and Qwen2.5-VL), as the Qwen2 or
    Qwen3 model it is. Its multimodal RoPE gives a text token the same position in each of its three
    sections, so over text alone it is the plain RoPE of its base."""
    model_type = QWEN_VL[cfg["model_type"]]
    text = cfg.get("text_config")
    text = _with_top_level(cfg, text if isinstance(text, dict) else {k: v for k, v in cfg.items() if k != "vision_config"})
    for key in ("rope_parameters", "rope_scaling"):
        rope = text.get(key)
        if isinstance(rope, dict):
            rope = {k: v for k, v in rope.items() if k not in MROPE_KEYS}
            for name in ("rope_type", "type"):
                if rope.get(name) == "mrope":
                    rope[name] = "default"
            text[key] = rope
    if model_type == "qwen3_moe":  # Qwen3-VL-MoE's router rescales its top-k, whatever norm_topk_prob says
        text["norm_topk_prob"] = True
    return {**text, "model_type": model_type}, model_type


def _cohere_logit_scale(cfg: dict[str, Any]) -> float:
    value = cfg.get("logit_scale", 0.0625)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"config.json's logit_scale must be a positive number, got {value!r}")
    return float(value)


# transformers' RoPE for a gpt-oss config that names none: YaRN stretching 4096 positions by 32
GPT_OSS_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                "original_max_position_embeddings": 4096}  # fmt: skip


def _gpt_oss(cfg: dict[str, Any]) -> dict[str, Any]:
    """gpt-oss's config in the common keys, with transformers' defaults: windowed and full layers
    alternating (windowed first), YaRN. Its MXFP4 experts are dequantized at load."""
    cfg = dict(cfg)
    if not cfg.get("rope_scaling") and not (cfg.get("rope_parameters") or {}).get("rope_type"):
        cfg["rope_parameters"] = {**GPT_OSS_ROPE, "rope_theta": cfg["rope_theta"], **(cfg.get("rope_parameters") or {})}
    if cfg.get("layer_types") is None:
        cfg["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention"
                              for i in range(int(cfg["num_hidden_layers"]))]  # fmt: skip
    quant = cfg.get("quantization_config")
    if quant is not None and (not isinstance(quant, dict) or quant.get("quant_method") != "mxfp4"):
        raise ValueError(f"gpt-oss's quantization {quant!r} is not implemented (only its own MXFP4 experts)")
    return cfg


def _cohere(cfg: dict[str, Any]) -> dict[str, Any]:
    """Cohere's config in the common keys: its norms' eps."""
    return {**cfg, "rms_norm_eps": cfg.get("layer_norm_eps") or 1e-5}


def _granite(cfg: dict[str, Any], key: str) -> float | None:
    """One of Granite's multipliers (None: 1, or not Granite)."""
    value = cfg.get(key, 1.0) if cfg.get("model_type") in GRANITE else 1.0
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"config.json's {key} must be a positive number, got {value!r}")
    return None if float(value) == 1.0 else float(value)


def _positive_number(cfg: dict[str, Any], key: str, default: float) -> float:
    value = cfg.get(key, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"config.json's {key} must be a positive number, got {value!r}")
    return float(value)


def _int_field(cfg: dict[str, Any], key: str, default: int) -> int:
    value = cfg.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"config.json's {key} must be an integer, got {value!r}")
    return value


def _nope_layers(model_type: str, cfg: dict[str, Any]) -> tuple[int, ...]:
    """The layers without RoPE. SmolLM3's: no_rope_layers[i] is 0 (1: RoPE), else every interval-th
    layer; EXAONE 4's: its full layers, where the config names a window (whether or not it cuts);
    Cohere 2's: those without a window (all of them when the config names none)."""
    if model_type == "cohere2":
        windowed = cfg.get("sliding_window") is not None
        return tuple(i for i, t in enumerate(cfg["layer_types"]) if not (windowed and t == "sliding_attention"))
    if model_type == "exaone4":
        if cfg.get("sliding_window") is None:
            return ()
        return tuple(i for i, t in enumerate(cfg["layer_types"]) if t != "sliding_attention")
    if model_type != "smollm3":
        return ()
    layers = int(cfg["num_hidden_layers"])
    uses_rope = cfg.get("no_rope_layers")
    if uses_rope is None:
        interval = int(cfg.get("no_rope_layer_interval") or 4)
        uses_rope = [(i + 1) % interval != 0 for i in range(layers)]
    if len(uses_rope) != layers:
        raise ValueError(f"no_rope_layers names {len(uses_rope)} layers, the model has {layers}")
    return tuple(i for i, rope in enumerate(uses_rope) if not rope)


def _moe(model_type: str, cfg: dict[str, Any]) -> MoESpec | None:
    if model_type not in MOE_DEFAULTS:
        return None
    experts, top_k, width, shared = MOE_DEFAULTS[model_type]
    # the hub's configs say num_local_experts (Mixtral) or num_experts (Qwen); transformers 5 writes
    # either name for either family
    key = next((k for k in ("num_experts", "n_routed_experts") if k in cfg), "num_local_experts")
    experts = _int_field(cfg, key, experts)
    top_k = _int_field(cfg, "num_experts_per_tok", top_k)
    if model_type in ("mixtral", "granitemoe", "granitemoeshared"):  # every layer sparse; the top-k's weights sum to 1
        moe = MoESpec(num_experts=experts, top_k=top_k, expert_intermediate_size=int(cfg["intermediate_size"]),
                      normalize_top_k=True,  # (Granite MoE shared's: an ungated MLP beside them, 0 for none)
                      shared_experts_intermediate_size=_int_field(cfg, "shared_intermediate_size", 0))  # fmt: skip
    elif model_type == "gpt_oss":  # every layer sparse; the softmax of the top_k logits sums to 1 already
        moe = MoESpec(num_experts=experts, top_k=top_k, expert_intermediate_size=int(cfg["intermediate_size"]),
                      normalize_top_k=False, router_bias=True, softmax_top_k=True, expert_bias=True,
                      swiglu_alpha=_positive_number(cfg, "swiglu_alpha", 1.702),
                      swiglu_limit=_positive_number(cfg, "swiglu_limit", 7.0))  # fmt: skip
    elif model_type == "glm4_moe":  # its first first_k_dense_replace layers dense
        groups = (_int_field(cfg, "n_group", 1), _int_field(cfg, "topk_group", 1))
        if groups[0] < 1 or experts % groups[0] or not 0 < groups[1] <= groups[0]:
            raise ValueError(f"n_group {groups[0]} must divide the {experts} experts, and topk_group {groups[1]} be "
                             "in [1, n_group]")  # fmt: skip
        moe = MoESpec(num_experts=experts, top_k=top_k,
                      expert_intermediate_size=int(cfg.get("moe_intermediate_size") or width),
                      normalize_top_k=bool(cfg.get("norm_topk_prob", True)), sigmoid_groups=groups,
                      routed_scale=_positive_number(cfg, "routed_scaling_factor", 1.0),
                      shared_experts_intermediate_size=int(cfg.get("moe_intermediate_size") or width)
                      * _int_field(cfg, "n_shared_experts", 1),
                      dense_layers=tuple(range(min(_int_field(cfg, "first_k_dense_replace", 1),
                                                   int(cfg["num_hidden_layers"])))))  # fmt: skip
    elif not experts:  # a Qwen MoE config without experts: dense
        return None
    else:
        layers, step = int(cfg["num_hidden_layers"]), int(cfg.get("decoder_sparse_step") or 1)
        only_mlp = set(cfg.get("mlp_only_layers") or ())
        moe = MoESpec(
            num_experts=experts,
            top_k=top_k,
            expert_intermediate_size=int(cfg.get("moe_intermediate_size") or width),
            normalize_top_k=bool(cfg.get("norm_topk_prob", False)),
            shared_expert_intermediate_size=int(cfg.get("shared_expert_intermediate_size", shared) or 0)
            if model_type == "qwen2_moe" else 0,  # Qwen3-MoE has none, whatever its config names
            # transformers' rule: every decoder_sparse_step-th layer is sparse, unless listed as MLP-only
            dense_layers=tuple(i for i in range(layers) if i in only_mlp or (i + 1) % step),
        )
    if not 0 < moe.top_k <= moe.num_experts:
        raise ValueError(f"num_experts_per_tok must be in [1, {moe.num_experts}], got {moe.top_k}")
    return moe


# transformers' defaults that differ from the generic ones below, where a config leaves them out
# (the special tokens' too: a config without them still stops at its family's end of text)
FAMILY_DEFAULTS = {"phi3": {"rms_norm_eps": 1e-5, "original_max_position_embeddings": 4096, "eos_token_id": 32000,
                            "bos_token_id": 1},
                   "olmo2": {"rms_norm_eps": 1e-5, "eos_token_id": 50279},
                   "smollm3": {"rope_theta": 2_000_000.0, "max_position_embeddings": 32768, "eos_token_id": 128001,
                               "bos_token_id": 128000},
                   "olmo3": {"rms_norm_eps": 1e-5, "sliding_window": 4096, "max_position_embeddings": 2048,
                             "eos_token_id": 50279},
                   "exaone4": {"rms_norm_eps": 1e-5, "sliding_window": 4096, "max_position_embeddings": 2048,
                               "eos_token_id": 2, "bos_token_id": 0},
                   "ernie4_5": {"rms_norm_eps": 1e-5, "head_dim": 128, "tie_word_embeddings": True,
                                "rope_theta": 500_000.0, "max_position_embeddings": 131072, "eos_token_id": 2,
                                "bos_token_id": 1},
                   "seed_oss": {"head_dim": 128, "max_position_embeddings": 524288, "eos_token_id": 2, "bos_token_id": 0},
                   "helium": {"rms_norm_eps": 1e-8, "head_dim": 128, "rope_theta": 100_000.0, "eos_token_id": 2,
                              "bos_token_id": 1},
                   "cohere": {"rope_theta": 500_000.0, "tie_word_embeddings": True, "max_position_embeddings": 8192,
                              "eos_token_id": 255001, "bos_token_id": 5},
                   "cohere2": {"tie_word_embeddings": True, "sliding_window": 4096, "max_position_embeddings": 8192,
                               "eos_token_id": 255001, "bos_token_id": 5},
                   **dict.fromkeys(GRANITE, {"eos_token_id": 2, "bos_token_id": 1}),
                   "glm4_moe": {"rms_norm_eps": 1e-5, "head_dim": 128, "partial_rotary_factor": 0.5,
                                "max_position_embeddings": 131072, "intermediate_size": 10944,
                                "eos_token_id": [151329, 151336, 151338]},
                   "gpt_oss": {"rms_norm_eps": 1e-5, "head_dim": 64, "sliding_window": 128, "rope_theta": 150_000.0,
                               "max_position_embeddings": 131072, "attention_bias": True, "eos_token_id": 200002},
                   **dict.fromkeys(("glm", "glm4"), {"rms_norm_eps": 1.5625e-07, "head_dim": 128, "attention_bias": True,
                                                     "partial_rotary_factor": 0.5, "max_position_embeddings": 131072,
                                                     "eos_token_id": [151329, 151336, 151338]})}  # fmt: skip

SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def _check_shape(cfg: dict[str, Any]) -> None:
    """The fields every model's shape is read from: present (or optional), positive integers."""
    for key in (*SHAPE_FIELDS, "num_key_value_heads", "head_dim"):
        value = cfg.get(key)
        if value is None and key in SHAPE_FIELDS:
            raise ValueError(f"config.json lacks {key!r}, which every model needs")
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise ValueError(f"config.json's {key} must be a positive integer, got {value!r}")
    heads, kv_heads = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    if heads % kv_heads:
        raise ValueError(f"num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})")


MAX_CONTEXT = 1 << 27  # past any model's window (Llama 4 Scout's is 10M): a field gone wrong
MAX_LAYERS = 1 << 14  # past any model's depth (the largest have about 130): a field gone wrong


def _check_layer_count(cfg: dict[str, Any]) -> None:
    """An absurd layer count is refused before anything is built per layer (tens of GB for 10^9)."""
    layers = cfg.get("num_hidden_layers")
    if isinstance(layers, int) and not isinstance(layers, bool) and layers > MAX_LAYERS:
        raise ValueError(f"config.json's num_hidden_layers must be at most {MAX_LAYERS}, got {layers}")


def _check_unquantized(cfg: dict[str, Any]) -> None:
    """A quantized checkpoint (its quantization_config, at the top of a multimodal one's too) is read
    only where its scheme is FP8 or 4-bit integer weights (model/quant_config.py), or gpt-oss's own
    MXFP4 experts (_gpt_oss)."""
    if cfg.get("model_type") != "gpt_oss":
        checkpoint_scheme(cfg)


def _check_scalars(cfg: dict[str, Any]) -> None:
    """The fields whose wrong value would load and answer garbage (NaN, a head tied by mistake),
    or allocate a window's tables of absurd size."""
    window = cfg.get("max_position_embeddings")
    integral = isinstance(window, (int, float)) and not isinstance(window, bool) and float(window).is_integer()
    if window is not None and not (integral and 0 < window <= MAX_CONTEXT):
        raise ValueError(f"config.json's max_position_embeddings must be a positive integer up to {MAX_CONTEXT}, "
                         f"got {window!r}")  # fmt: skip
    eps = cfg.get("rms_norm_eps", 1e-6)
    if not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and 0 < eps < math.inf):
        raise ValueError(f"config.json's rms_norm_eps must be a positive finite number, got {eps!r}")
    tie = cfg.get("tie_word_embeddings")
    if tie is not None and not isinstance(tie, bool):
        raise ValueError(f"config.json's tie_word_embeddings must be true or false, got {tie!r}")


LAYER_TYPES = ("sliding_attention", "full_attention")


def _check_layer_types(cfg: dict[str, Any]) -> None:
    """layer_types, where a config names them: one of LAYER_TYPES for each layer (others, such as
    Llama 4's chunked attention, are not implemented)."""
    types, layers = cfg.get("layer_types"), cfg["num_hidden_layers"]
    if types is None:
        return
    if not isinstance(types, list) or len(types) != layers:
        raise ValueError(f"config.json's layer_types must name each of the {layers} layers, got {str(types)[:200]}")
    unknown = sorted({str(t) for t in types} - set(LAYER_TYPES))
    if unknown:
        raise ValueError(f"layer type {unknown[0]!r} is not implemented (known: {', '.join(LAYER_TYPES)})")


def spec_from_hf_config(cfg: dict[str, Any]) -> ModelSpec:
    """Validate a config.json dict and turn it into a ModelSpec (ValueError if we cannot serve it)."""
    try:
        return _spec(cfg)
    except KeyError as e:  # a field the family needs (its experts, its window...)
        raise ValueError(f"config.json lacks {e.args[0]!r}, which a {cfg.get('model_type')!r} model needs") from None
    except TypeError as e:
        raise ValueError(f"config.json has a field of the wrong type: {e}") from None


def _spec(cfg: dict[str, Any]) -> ModelSpec:
    model_type = cfg.get("model_type")
    if model_type in ABSOLUTE_POSITION:
        raise ValueError(
            f"model_type {model_type!r} uses absolute position embeddings: its KV cache cannot be stored "
            "position-free, so CachedAttention refuses it. Supported: " + ", ".join(SUPPORTED)
        )
    if model_type not in SUPPORTED:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED)}")
    cfg = {**FAMILY_DEFAULTS.get(model_type, {}), **cfg}
    _check_unquantized(cfg)
    if model_type == "mistral3":  # Mistral Small 3.1 / 3.2: the language model of a multimodal checkpoint
        cfg, model_type = _language_model_config(cfg)
    if model_type in QWEN_VL:
        cfg, model_type = _qwen_vl_text_config(cfg)
    _check_layer_count(cfg)
    gemma = model_type in GEMMA
    if gemma:
        cfg = gemma_config(cfg)
        model_type = cfg["model_type"]
    _check_shape(cfg)
    _check_scalars(cfg)
    if model_type in COHERE:
        cfg = _cohere(cfg)
    if model_type in HYBRID:
        cfg = hybrid_config(cfg)
    if model_type == "gpt_oss":
        cfg = _gpt_oss(cfg)
    _check_layer_types(cfg)
    act = cfg.get("hidden_act") or "silu"
    if act not in ACTIVATIONS:
        raise ValueError(f"the MLP's activation {act!r} is not implemented; known: {', '.join(ACTIVATIONS)}")
    window = _window_layers(model_type, cfg)
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    local_rope = model_type in ("gemma3_text", "olmo3")  # windowed layers with a RoPE of their own
    rope = rope_settings(cfg, head_dim)
    return ModelSpec(
        model_type=model_type,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=rope.theta,
        max_position_embeddings=int(cfg.get("max_position_embeddings") or 4096),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", model_type == "smollm3")),  # transformers' defaults
        qkv_bias=_qkv_bias(model_type, cfg),
        o_bias=_o_bias(model_type, cfg),
        mlp_bias=_mlp_bias(model_type, cfg),
        qk_norm=model_type in ("qwen3", "qwen3_moe", "gemma3_text", "olmo2", "olmo3", "exaone4")
        or (model_type in ("cohere", "glm4_moe") and bool(cfg.get("use_qk_norm"))),
        qk_norm_per_head=model_type == "cohere" and bool(cfg.get("use_qk_norm")),
        qk_norm_full=model_type in ("olmo2", "olmo3"),
        post_norms_only=model_type in ("olmo2", "olmo3", "exaone4"),
        rope_interleaved=model_type in ("ernie4_5", "helium", "glm", "glm4", *COHERE),
        layer_norm=model_type in COHERE,
        parallel_block=model_type in COHERE,
        attn_sinks=model_type == "gpt_oss",
        rope_freq_factors=rope.divisors,
        rope_long_freq_factors=rope.long_divisors,
        rope_short_window=rope.short_window,
        rotary_dim=rope.rotary_dim,
        rope_attention_factor=None if rope.attention_factor == 1.0 else rope.attention_factor,
        rope_context=rope.context,
        rope_scaling=rope.llama3,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_eos_ids(cfg.get("eos_token_id")),
        moe=_moe(model_type, cfg),
        sliding_window=window[0] if window else None,
        window_layers=window[1] if window else (),
        hidden_act=act,
        embed_scale=hidden**0.5 if gemma else _granite(cfg, "embedding_multiplier"),
        sandwich_norms=model_type in ("gemma2", "gemma3_text", "glm4"),
        # transformers' Gemma 3 names the attention's cap but never applies it
        attn_softcap=_softcap(cfg, "attn_logit_softcapping") if model_type == "gemma2" else None,
        final_softcap=_softcap(cfg, "final_logit_softcapping") if model_type in ("gemma2", "gemma3_text") else None,
        attn_scale=_attn_scale(cfg),
        residual_scale=_granite(cfg, "residual_multiplier"),
        logits_scale=_granite(cfg, "logits_scaling") if model_type not in COHERE else 1.0 / _cohere_logit_scale(cfg),
        local_rope_theta=float(cfg["rope_local_base_freq"]) if local_rope else None,
        local_rope_layers=tuple(i for i, t in enumerate(cfg["layer_types"]) if t == "sliding_attention")
        if local_rope else (),
        nope_layers=_nope_layers(model_type, cfg),
    )
