"""Per-request sampling parameters and the sampler that applies them to logits."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from functools import cached_property
from typing import Any

import torch

from cachedattention.config import MAX_LOGPROBS  # noqa: F401 (the limit's name where callers look for it)
from cachedattention.engine import json_schema
from cachedattention.engine.grammar import grammar_automaton
from cachedattention.engine.guided import Automaton
from cachedattention.engine.regex import regex_automaton
from cachedattention.engine.tool_choice import CALL_FORMS, tool_call_automaton


class GuidedFormError(ValueError):
    """A guided answer's form (a schema, a pattern, a grammar) that cannot be followed: the server
    names the request field it came from."""


# vLLM's StructuredOutputsParams fields, as this engine's SamplingParams fields; and the ones it refuses
STRUCTURED_FIELDS = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar",
                     "json_object": "json_object"}  # fmt: skip
STRUCTURED_UNSUPPORTED = ("structural_tag", "whitespace_pattern", "disable_any_whitespace")
# vLLM's words, for a StructuredOutputsParams that names no constraint
NO_STRUCTURED_CONSTRAINT = ("You must use one kind of structured outputs constraint but none are specified "
                            f"(one of {', '.join(STRUCTURED_FIELDS)})")  # fmt: skip
GUIDED_FIELDS = ("json_object", "json_schema", "choice", "regex", "grammar", "tool_call_names")  # at most one per request
# most choices (n) of one prompt: each is an engine request, all added before the first step, so
# n=10**30 (a typo, a wrong field) would fill memory for hours instead of failing
MAX_N = 1 << 16
# the float fields, kept as floats: an int past int64 (temperature=10**30) is no scalar torch takes
FLOAT_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")


@dataclass(frozen=True)
class StructuredOutputsParams:
    """vLLM's: the one form an answer is held to, given as SamplingParams(structured_outputs=...):
    a JSON schema (`json`, a dict or its text), a pattern, a choice, a GBNF grammar, or any JSON
    object. Read into SamplingParams' own fields; whitespace options and structural tags are refused."""

    json: str | Mapping[str, Any] | None = None
    regex: str | None = None
    choice: Sequence[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    whitespace_pattern: str | None = None
    structural_tag: str | None = None

    def __post_init__(self) -> None:
        # as vLLM's: exactly one kind of constraint is named (None: not named)
        named = [k for k in (*STRUCTURED_FIELDS, "structural_tag") if getattr(self, k) is not None]
        if not named:
            raise ValueError(NO_STRUCTURED_CONSTRAINT)
        if len(named) > 1:
            raise ValueError(f"You can only use one kind of structured outputs constraint but multiple are "
                             f"specified: {', '.join(named)}")  # fmt: skip


GuidedDecodingParams = StructuredOutputsParams  # (vLLM's older name)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. temperature 0 means greedy."""

    n: int = 1  # vLLM's: completions of the prompt (LLM.generate and chat run one request for each)
    max_tokens: int | None = 16  # vLLM's default; None: until the end of the context window
    temperature: float = 1.0
    top_k: int = 0  # 0 (or vLLM's -1, kept as 0): off
    top_p: float = 1.0
    min_p: float = 0.0  # vLLM's: tokens less likely than min_p times the most likely one are dropped (0: off)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False  # vLLM's: the stop string that ended the answer stays in its text
    skip_special_tokens: bool = True  # vLLM's: special tokens (<|im_end|>, ...) are left out of the text
    min_tokens: int = 0  # no EOS, stop token or stop string before this many tokens
    allowed_token_ids: tuple[int, ...] = ()  # vLLM's: sample only among these (empty: any)
    # vLLM's: words the answer never contains (each as the tokenizer writes it, with and without a
    # leading space: the engine fills bad_words_ids, the token sequences kept out)
    bad_words: tuple[str, ...] = ()
    bad_words_ids: tuple[tuple[int, ...], ...] = field(default=(), repr=False)
    truncate_prompt_tokens: int | None = None  # vLLM's: keep the prompt's last k tokens (None: all)
    # vLLM's penalties: repetition over prompt and output (> 1 discourages), presence and frequency
    # over the output (OpenAI's: logit -= frequency * count + presence * (count > 0))
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # added to a token's logit, {token id: a finite bias} (kept as sorted pairs: hashable)
    logit_bias: Mapping[int, float] | tuple[tuple[int, float], ...] = ()
    # None: no logprobs; n: each generated token's log-probability and the n most likely tokens'
    # (under the model's own distribution: before penalties, bias and temperature, as vLLM)
    logprobs: int | None = None
    # None: none; n: each prompt token's log-probability given the tokens before it (the first has
    # none) and the n most likely tokens'. Such a request computes its whole prompt (as vLLM): cached
    # KV gives no logits for the positions it covers
    prompt_logprobs: int | None = None
    # guided answers (engine/guided.py), at most one of: OpenAI's response_format json_object (the
    # answer is one JSON object); json_schema (a JSON document valid under this schema, a dict or its
    # JSON text, kept as text: engine/json_schema.py); choice (exactly one of these strings, vLLM's
    # guided_choice); regex (text the pattern matches whole, vLLM's guided_regex: engine/regex.py);
    # grammar (text a GBNF grammar's root derives, vLLM's guided_grammar: engine/grammar.py);
    # tool_choice "required" or a named function (one call of one of these functions, written as
    # tool_call_format says, engine/tool_choice.py; tool_call_parameters: each one's parameters
    # schema as JSON text, "" for any object, in the same order, or none at all)
    json_object: bool = False
    json_schema: str | Mapping[str, Any] | None = None
    choice: tuple[str, ...] = ()
    regex: str | None = None
    grammar: str | None = None
    tool_call_names: tuple[str, ...] = ()
    tool_call_parameters: tuple[str, ...] = ()
    tool_call_format: str = "hermes"  # how the model writes a call: engine/tool_choice.py's CALL_FORMS
    # vLLM's StructuredOutputsParams (or its older GuidedDecodingParams, or a dict of their fields):
    # json, regex, choice, grammar, json_object, read into the fields above
    structured_outputs: Any = field(default=None, repr=False)
    guided_decoding: Any = field(default=None, repr=False)
    detokenize: bool = True  # vLLM's: False leaves the answer's text empty (token ids only)
    extra_args: Mapping[str, Any] | None = field(default=None, compare=False)  # vLLM's: kept for the caller, unused
    output_kind: Any = field(default=None, compare=False)  # vLLM's RequestOutputKind: LLM returns final outputs
    # filled in by the engine: the model's end-of-sequence ids
    eos_token_ids: tuple[int, ...] = field(default=(), repr=False)
    # the guided answer's automaton, compiled once: (what it was compiled from, the automaton); kept
    # by dataclasses.replace (the engine's copy with eos_token_ids), compiled again if the form changes
    _compiled: tuple[tuple, Automaton | None] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        # lists as tuples (a frozen, hashable value); None as none, as vLLM takes it; one string is
        # one item, not its letters
        for name in ("stop", "stop_token_ids", "allowed_token_ids", "tool_call_names", "choice", "bad_words",
                     "tool_call_parameters", "bad_words_ids"):  # fmt: skip
            object.__setattr__(self, name, _as_tuple(getattr(self, name), name))
        object.__setattr__(self, "logit_bias", _bias_pairs(self.logit_bias))
        object.__setattr__(self, "tool_call_parameters", tuple(_schema_text(p) or "" for p in self.tool_call_parameters))
        self._read_structured_outputs()
        object.__setattr__(self, "json_schema", _schema_text(self.json_schema))
        if not is_int(self.n) or not 1 <= self.n <= MAX_N:
            raise ValueError(f"n must be an integer in [1, {MAX_N}] (completions of the prompt), got {self.n!r}")
        if self.max_tokens is not None and (not is_int(self.max_tokens) or self.max_tokens <= 0):
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r} (or None: to the window's end)")
        if not (is_number(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if not is_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"top_k must be an integer >= 0 (0 or -1 disables it), got {self.top_k!r}")
        object.__setattr__(self, "top_k", max(self.top_k, 0))
        if not (is_number(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if not (is_number(self.min_p) and 0.0 <= self.min_p <= 1.0):
            raise ValueError(f"min_p must be a number in [0, 1] (0 is off), got {self.min_p!r}")
        if self.seed is not None and not (is_int(self.seed) and -(2**63) <= self.seed < 2**64):
            raise ValueError(f"seed must be None or an integer in [-2**63, 2**64), got {self.seed!r}")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}")
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens", "json_object", "detokenize"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not self.detokenize and self.stop:  # (as vLLM: stop strings are found in the text)
            raise ValueError("stop strings need the answer's text: they cannot be used with detokenize=False")
        if self.extra_args is not None and not isinstance(self.extra_args, Mapping):
            raise ValueError(f"extra_args must be a dict, got {type(self.extra_args).__name__}")
        self._check_guided()
        self._check_adjustments()
        for name in FLOAT_FIELDS:  # (each checked above: a finite number)
            object.__setattr__(self, name, float(getattr(self, name)))

    def clone(self) -> SamplingParams:
        """A copy (vLLM's clone; these params are frozen, so a copy is only for code written for vLLM)."""
        return replace(self)

    def _read_structured_outputs(self) -> None:
        """vLLM's structured_outputs (or guided_decoding): its json, regex, choice, grammar or
        json_object read into this engine's own fields; what this engine does not do is refused."""
        given = [(n, v) for n, v in (("structured_outputs", self.structured_outputs),
                                     ("guided_decoding", self.guided_decoding)) if v is not None]  # fmt: skip
        if len(given) > 1:
            raise ValueError("structured_outputs and guided_decoding cannot both be given (one is the other's old name)")
        if not given:
            return
        name, spec = given[0]
        values = _structured_values(name, spec)
        unsupported = sorted(k for k in STRUCTURED_UNSUPPORTED if values[k] not in (None, False, "", ()))
        if unsupported:
            raise ValueError(f"{name}.{unsupported[0]} is not supported by this engine's guided decoding")
        named = [k for k in STRUCTURED_FIELDS if values[k] not in (None, False, [], ())]
        if not named:  # (else the answer would silently go unconstrained)
            raise ValueError(f"{name}: {NO_STRUCTURED_CONSTRAINT}")
        for theirs in named:
            ours = STRUCTURED_FIELDS[theirs]
            if getattr(self, ours) not in (None, False, ()):
                raise ValueError(f"{name}.{theirs} and {ours} cannot both be given")
            object.__setattr__(self, ours, _as_tuple(values[theirs], ours) if ours == "choice" else values[theirs])
        object.__setattr__(self, name, None)  # (read into the fields above: compared and hashed by them)

    def _check_guided(self) -> None:
        if not all(isinstance(n, str) and n for n in self.tool_call_names):
            raise ValueError("tool_call_names must be non-empty function names")
        if not isinstance(self.tool_call_format, str) or self.tool_call_format not in CALL_FORMS:
            raise ValueError(f"tool_call_format must be one of {', '.join(CALL_FORMS)}, got {self.tool_call_format!r}")
        if self.tool_call_parameters and len(self.tool_call_parameters) != len(self.tool_call_names):
            raise ValueError("tool_call_parameters must hold one schema per name in tool_call_names (or none)")
        if not all(isinstance(c, str) and c for c in self.choice):
            raise ValueError("choice must be non-empty strings")
        for name, what in (("regex", "a pattern"), ("grammar", "GBNF")):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str):
                raise GuidedFormError(f"{name} must be a string ({what}), got {type(v).__name__}")
        given = [n for n in GUIDED_FIELDS if getattr(self, n) not in (None, False, ())]
        if len(given) > 1:
            raise ValueError(f"{given[0]} and {given[1]} cannot be combined: the answer is one or the other")
        form = self._guided_form()
        if self._compiled is None or self._compiled[0] != form:
            try:  # a form that cannot be followed is refused here, with its place named
                automaton = self._compile_guided()
            except ValueError as e:
                raise e if isinstance(e, GuidedFormError) else GuidedFormError(str(e)) from None
            object.__setattr__(self, "_compiled", (form, automaton))

    def _guided_form(self) -> tuple:
        name = self.guided_field
        return () if name is None else (name, getattr(self, name), self.tool_call_parameters, self.tool_call_format)

    def guided_automaton(self) -> Automaton | None:
        """The automaton of the answers allowed (compiled once, when the params were made), or None
        when the answer is free."""
        return self._compiled[1]

    def _compile_guided(self) -> Automaton | None:
        if self.json_object:
            return json_schema.JSON_OBJECT
        if self.json_schema is not None:
            return json_schema.schema_automaton(self.json_schema)
        if self.choice:
            return json_schema.choice_automaton(self.choice)
        if self.regex is not None:
            return regex_automaton(self.regex)
        if self.grammar is not None:
            return grammar_automaton(self.grammar)
        if self.tool_call_names:
            return tool_call_automaton(self.tool_call_names, self.tool_call_parameters, self.tool_call_format)
        return None

    def _check_adjustments(self) -> None:
        if not all(isinstance(w, str) and w.strip() for w in self.bad_words):
            raise ValueError("bad_words must be non-empty strings")
        if not all(isinstance(w, (list, tuple)) for w in self.bad_words_ids):
            raise ValueError(f"bad_words_ids must be lists of token ids, got {self.bad_words_ids!r}")
        object.__setattr__(self, "bad_words_ids", tuple(tuple(w) for w in self.bad_words_ids))
        if not all(w and all(is_int(t) and t >= 0 for t in w) for w in self.bad_words_ids):
            raise ValueError("bad_words_ids must be non-empty sequences of token ids")
        for name in ("stop_token_ids", "allowed_token_ids"):
            if not all(is_int(t) and t >= 0 for t in getattr(self, name)):
                raise ValueError(f"{name} must be token ids (integers >= 0), got {getattr(self, name)!r}")
        k = self.truncate_prompt_tokens
        if k is not None and not (is_int(k) and k >= 1):
            raise ValueError(f"truncate_prompt_tokens must be None or an integer >= 1, got {k!r}")
        if not is_int(self.min_tokens) or not 0 <= self.min_tokens <= (self.max_tokens or self.min_tokens):
            raise ValueError(f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], got {self.min_tokens!r}")
        if not (is_number(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be a number > 0 (1 is off), got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not (is_number(v) and -2.0 <= v <= 2.0):
                raise ValueError(f"{name} must be a number in [-2, 2], got {v!r}")
        for name in ("logprobs", "prompt_logprobs"):  # the most a request may ask for is the engine's max_logprobs
            v = getattr(self, name)
            if v is not None and not (is_int(v) and v >= 0):
                raise ValueError(f"{name} must be None or an integer >= 0, got {v!r}")

    @property
    def guided(self) -> bool:
        """Whether the answer is held to a form (JSON, a schema, a choice, a pattern, a grammar, a tool call)."""
        return self.guided_field is not None

    @property
    def guided_field(self) -> str | None:
        """The guided field that is set (one of GUIDED_FIELDS), or None."""
        return next((n for n in GUIDED_FIELDS if getattr(self, n) not in (None, False, ())), None)

    @property
    def greedy(self) -> bool:
        # a vanishing temperature is greedy: dividing logits by it would overflow to inf
        return self.temperature < 1e-5

    @property
    def adjusts_logits(self) -> bool:
        """Whether the sampler changes this request's logits before picking (bias, min_tokens, penalties,
        allowed tokens)."""
        return bool(self.logit_bias or self.min_tokens or self.repetition_penalty != 1.0 or self.presence_penalty
                    or self.frequency_penalty or self.allowed_token_ids or self.bad_words_ids)  # fmt: skip


def choice_params(params: SamplingParams, i: int) -> SamplingParams:
    """The params of a prompt's choice i of n: one completion, and seeds seed, seed + 1, ... so that
    seeded choices differ (and repeat)."""
    seed = params.seed if params.seed is None or not i else (params.seed + i) % 2**64
    return replace(params, n=1, seed=seed)


def _as_tuple(value: Any, name: str) -> tuple:
    """A list field's value as a tuple: None as empty, one string as one item."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    paired = name in ("tool_call_names", "tool_call_parameters")  # (matched by position: a set's order is none)
    unordered = isinstance(value, (set, frozenset))
    if isinstance(value, (bytes, bytearray, Mapping)) or not isinstance(value, Sequence) and not unordered or unordered and paired:
        raise ValueError(f"{name} must be a list, got {type(value).__name__} {value!r:.80}")
    return tuple(value)


def _structured_values(name: str, spec: Any) -> dict[str, Any]:
    """The constraint fields (and the refused options) of vLLM's StructuredOutputsParams, read from
    its object (by name: its other fields are its own business) or from a dict of them, whose keys
    must be StructuredOutputsParams' fields: a misspelt one would leave the answer unconstrained."""
    read = (*STRUCTURED_FIELDS, *STRUCTURED_UNSUPPORTED)
    if not isinstance(spec, Mapping):
        return {k: getattr(spec, k, None) for k in read}
    known = [f.name for f in fields(StructuredOutputsParams)]
    unknown = sorted(str(k) for k in spec if k not in known)
    if unknown:
        raise ValueError(f"{name} has unknown key(s) {', '.join(map(repr, unknown))}: its keys are "
                         f"StructuredOutputsParams' fields ({', '.join(known)})")  # fmt: skip
    return {k: spec.get(k) for k in read}


def _schema_text(schema: str | Mapping[str, Any] | None) -> str | None:
    """A schema kept as JSON text: a frozen, hashable field."""
    if schema is None or isinstance(schema, str):
        return schema
    if not isinstance(schema, Mapping):
        raise GuidedFormError(f"a JSON schema must be a dict or its JSON text, got {type(schema).__name__}")
    try:
        return json.dumps(schema)
    except (TypeError, ValueError) as e:
        raise GuidedFormError(f"the JSON schema cannot be written as JSON: {e}") from None
    except RecursionError:
        raise GuidedFormError("the JSON schema is nested too deeply") from None


def is_int(v: object) -> bool:
    """An int that is not a bool (JSON's true would pass isinstance(v, int))."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: object) -> bool:
    """A finite int or float that fits a float (math.isfinite overflows on a 400-digit int)."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


# any finite bias, as vLLM takes it; float32's range so that a bias added to a logit stays a number
MAX_ABS_LOGIT_BIAS = float(torch.finfo(torch.float32).max)


def _bias_pairs(bias: Mapping[int, float] | Sequence[tuple[int, float]] | None) -> tuple[tuple[int, float], ...]:
    if bias is not None and not isinstance(bias, (Mapping, list, tuple)):
        raise ValueError(f"logit_bias must map token ids to numbers, got {type(bias).__name__}")
    pairs = bias.items() if isinstance(bias, Mapping) else (bias or ())
    out = {}
    for pair in pairs:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise ValueError("logit_bias must map token ids to numbers")
        token, value = pair
        if not (is_int(token) and token >= 0):
            raise ValueError(f"logit_bias keys must be token ids (integers >= 0), got {token!r}")
        if not (is_number(value) and abs(value) <= MAX_ABS_LOGIT_BIAS):
            raise ValueError(f"logit_bias values must be finite numbers (float32's range), got {value!r} for token {token}")
        out[token] = float(value)
    return tuple(sorted(out.items()))


@dataclass(frozen=True)
class Logprob:
    """vLLM's Logprob: a token's log-probability, its rank (1: the most likely) and its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass(frozen=True)
class TokenLogprob(Mapping):
    """A generated token's log-probability under the model, its rank (1: the most likely token) and
    the most likely tokens with theirs, most likely first. Read as vLLM's logprobs too: a dict of
    token id to Logprob, the token's own first, then the most likely ones (`decoded`: their texts,
    filled in by LLM's outputs)."""

    token_id: int
    logprob: float
    rank: int
    top: tuple[tuple[int, float], ...] = ()
    decoded: Mapping[int, str] | None = field(default=None, compare=False, repr=False)

    @cached_property
    def _entries(self) -> dict[int, Logprob]:
        """Built once, on first read as a dict (a frozen entry's never change)."""
        text = (self.decoded or {}).get
        entries = {self.token_id: Logprob(self.logprob, self.rank, text(self.token_id))}
        for rank, (token, logprob) in enumerate(self.top, 1):
            entries.setdefault(token, Logprob(logprob, rank, text(token)))
        return entries

    def __getitem__(self, token: int) -> Logprob:
        return self._entries[token]

    def __iter__(self):
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def token_logprob(logits: torch.Tensor, token: int, top_n: int) -> TokenLogprob:
    """The log-probability of `token` in one row of raw logits, and the top_n alternatives."""
    return token_logprobs(logits[None], [token], top_n)[0]


def token_logprobs(logits: torch.Tensor, tokens: Sequence[int], top_n: int) -> list[TokenLogprob]:
    """Row i's log-probability of tokens[i] in raw logits [rows, vocab], its rank, and the top_n."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    index = torch.tensor(list(tokens), dtype=torch.long, device=lp.device)[:, None]
    values = lp.gather(1, index)
    ranks = ((lp > values).sum(dim=1) + 1).tolist()
    tops: list[tuple[tuple[int, float], ...]] = [()] * len(ranks)
    if top_n:
        top_values, top_ids = torch.topk(lp, min(top_n, lp.shape[1]), dim=1)
        tops = [tuple(zip(i, v)) for i, v in zip(top_ids.tolist(), top_values.tolist())]
    return [TokenLogprob(t, v, r, top) for t, v, r, top in zip(tokens, values[:, 0].tolist(), ranks, tops)]


def adjust_logits(
    logits: torch.Tensor, params: SamplingParams, prompt_ids: Sequence[int], output_ids: Sequence[int]
) -> torch.Tensor:
    """A copy of one row of logits with the request's allowed tokens, bias, bad words, min_tokens and
    penalties applied, in vLLM's order: allowed tokens, bias, bad words and min_tokens, then
    repetition, frequency and presence penalties."""
    row = logits.to(torch.float32, copy=True)
    dev = row.device
    if params.allowed_token_ids:
        keep = torch.tensor(params.allowed_token_ids, device=dev)
        allowed = row[keep]
        row.fill_(float("-inf"))
        row[keep] = allowed
    if params.logit_bias:
        ids = torch.tensor([t for t, _ in params.logit_bias], device=dev)
        row.index_add_(0, ids, torch.tensor([b for _, b in params.logit_bias], device=dev))
    banned_words = _bad_word_ends(params.bad_words_ids, output_ids)
    if banned_words:  # the token that would complete a bad word after what is written
        row[torch.tensor(banned_words, device=dev)] = float("-inf")
    if len(output_ids) < params.min_tokens:
        banned = sorted(set(params.eos_token_ids) | set(params.stop_token_ids))
        if banned:
            row[torch.tensor(banned, device=dev)] = float("-inf")
    if params.repetition_penalty != 1.0:
        seen = torch.tensor([*prompt_ids, *output_ids], device=dev).unique()
        vals = row[seen]
        scaled = torch.where(vals > 0, vals / params.repetition_penalty, vals * params.repetition_penalty)
        # a token already ruled out (-inf) stays out, and a 0 stays 0: a penalty of 1e-300 is 0 in
        # float32, and -inf * 0 (or 0 * a penalty past float32's range) would be NaN
        row[seen] = torch.where(torch.isfinite(vals) & (vals != 0), scaled, vals)
    if (params.presence_penalty or params.frequency_penalty) and output_ids:
        ids, counts = torch.tensor(list(output_ids), device=dev).unique(return_counts=True)
        row[ids] -= params.frequency_penalty * counts.to(row.dtype) + params.presence_penalty
    # a tiny repetition penalty divides a logit past float32's range: the largest finite value keeps
    # such tokens the likeliest without turning the softmax into NaN
    return row.clamp_(max=torch.finfo(row.dtype).max)


def _bad_word_ends(words: Sequence[Sequence[int]], output_ids: Sequence[int]) -> list[int]:
    """The last token of each bad word whose other tokens end the output so far (a one-token word: always)."""
    out = []
    for word in words:
        head = len(word) - 1
        if head == 0 or (len(output_ids) >= head and list(output_ids[len(output_ids) - head :]) == list(word[:head])):
            out.append(word[-1])
    return out


def make_generator(params: SamplingParams, device: str) -> torch.Generator | None:
    """One generator per seeded request, so its samples do not depend on its batch mates."""
    if params.seed is None or params.greedy:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(params.seed)
    return gen


def sample_batch(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    histories: list[tuple[Sequence[int], Sequence[int]]],
    constraints: Sequence[Any] | None = None,
) -> list[int]:
    """Next token of every row: plain greedy rows in one argmax (one device sync), the rest one by
    one. `histories` holds each row's (prompt, output) token ids, which the penalties look at;
    `constraints` a row's JSON mode (its mask(row) keeps the tokens that may come next), or None."""
    greedy = logits.argmax(dim=-1).tolist()
    constraints = constraints or [None] * len(params)
    out = []
    for g, row, p, gen, (prompt, output), rule in zip(greedy, logits, params, generators, histories, constraints):
        if p.adjusts_logits:
            row = adjust_logits(row, p, prompt, output)
        if rule is not None:
            row = rule.mask(row)
        if (p.adjusts_logits or rule is not None) and not bool(torch.isfinite(row).any()):
            # the request's own rules leave no token (allowed_token_ids all bad words or held back by
            # min_tokens...): it ends here, its batch mates go on
            out.append(p.eos_token_ids[0] if p.eos_token_ids else g)
            continue
        if p.adjusts_logits or rule is not None:
            g = int(torch.argmax(row)) if p.greedy else g
        out.append(g if p.greedy else sample(row, p, gen))
    return out


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Pick the next token from one row of float32 logits."""
    if params.greedy:
        return int(torch.argmax(logits))
    logits = (logits.float() / params.temperature).clamp_(max=torch.finfo(torch.float32).max)  # (as above)
    if params.top_k and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.min_p > 0.0:  # relative to the most likely token, after temperature (as vLLM)
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep the smallest set whose mass reaches top_p (the first token always stays)
        drop = torch.cumsum(sorted_probs, dim=-1) - sorted_probs > params.top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))
