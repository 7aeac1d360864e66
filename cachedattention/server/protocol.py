"""Request validation for the OpenAI-compatible API."""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cachedattention.beam_search import BeamSearchParams, check_width
from cachedattention.engine.tool_choice import CALL_FORMS
from cachedattention.model.chat_template import check_template_syntax
from cachedattention.model.messages import ChatOptions, validate_messages, validate_tools
from cachedattention.sampling import (
    MAX_ABS_LOGIT_BIAS,
    MAX_LOGPROBS,
    GuidedFormError,
    SamplingParams,
    is_int,
    is_number,
)
from cachedattention.server.api_error import bad, error_body, error_response
from cachedattention.server.structured import forced_parameters, guided_fields
from cachedattention.server.tool_calls import KEEP_SPECIAL_TOKENS

log = logging.getLogger(__name__)

MAX_STOPS = 16
MAX_LOGIT_BIAS = 1024  # tokens one request may bias
MAX_TOKEN_IDS = 100_000  # stop_token_ids, allowed_token_ids
MAX_BAD_WORDS = 256  # words one request may keep out of its answer
# the fields read (or refused with a 400 when they ask for what is not supported); others are logged
FIELDS = frozenset((
    "model", "stream", "stream_options", "session_id", "n", "max_tokens", "max_completion_tokens", "temperature",
    "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids", "ignore_eos", "min_tokens", "presence_penalty",
    "frequency_penalty", "repetition_penalty", "logit_bias", "logprobs", "top_logprobs", "prompt_logprobs", "echo",
    "best_of", "suffix", "response_format", "guided_json", "guided_choice", "guided_regex", "guided_grammar",
    "guided_whitespace_pattern", "guided_decoding_backend", "structured_outputs", "allowed_token_ids",
    "include_stop_str_in_output", "truncate_prompt_tokens", "user", "add_special_tokens", "skip_special_tokens",
    "request_id", "return_tokens_as_token_ids", "bad_words", "priority", "use_beam_search", "logits_processors",
    "cache_salt", "length_penalty",
))  # fmt: skip
CHAT_FIELDS = frozenset(("messages", "tools", "tool_choice", "functions", "add_generation_prompt",
                         "continue_final_message", "chat_template_kwargs", "chat_template",
                         "include_reasoning", "reasoning_effort", "documents"))  # fmt: skip
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")
MAX_CHOICES = 16  # most choices (n) one request may ask for: each is a sequence in the batch
MAX_BATCH = 256  # most prompts one completions request may batch
COMPLETION_MAX_TOKENS = 16  # completions' max_tokens when none is given (vLLM's CompletionRequest default)
GREEDY_BELOW = 1e-5  # a smaller temperature would overflow logits / T; it means greedy anyway


@dataclass
class ParsedRequest:
    """What the engine loop needs: exactly one of prompt / messages, plus sampling and identity."""

    model: str | None
    params: SamplingParams
    stream: bool
    include_usage: bool
    session_id: str | None
    prompt: str | list[int] | None = None
    # completions: a batch of prompts (OpenAI's list of strings or of token lists), each with its n
    # choices, numbered prompt by prompt; `prompt` is then the first
    batch: list[str | list[int]] | None = None
    messages: list[dict[str, str]] | None = None
    max_tokens_asked: int | None = None  # the length the client asked for (before the model's bound); None: none
    prompt_only: bool = False  # completions' echo with max_tokens 0: the prompt (and its logprobs), no answer
    n: int = 1  # choices to generate for the prompt
    echo: bool = False  # completions: the prompt's text (and its tokens' logprobs) before the answer's
    # chat, vLLM's echo: the last message's content the answer starts with ("" when that message's role
    # is not the answer's); None: not asked for
    chat_echo: str | None = None
    role: str = "assistant"  # chat: the answer's role (vLLM's: the last message's without a generation prompt)
    prompt_logprobs: int | None = None  # vLLM's field: each prompt token's logprob and the top n, as a list
    tools: list[dict[str, Any]] | None = None  # chat: function definitions for the template
    parse_tool_calls: bool = False  # chat: answers' <tool_call> blocks become tool_calls (tool_choice auto)
    named_tool: bool = False  # tool_choice named one function: OpenAI then finishes with "stop", not "tool_calls"
    chat_options: ChatOptions | None = None  # chat: vLLM's add_generation_prompt, continue_final_message, kwargs
    add_special_tokens: bool = True  # completions: a text prompt gets the tokenizer's own (Llama's BOS)
    continuous_usage: bool = False  # vLLM's stream_options.continuous_usage_stats: usage on every chunk
    request_id: str | None = None  # vLLM's: the client's id for the request (the response's id ends with it)
    cache_salt: str | None = None  # vLLM's: cached KV is shared only with requests of the same salt
    token_ids_as_tokens: bool = False  # vLLM's return_tokens_as_token_ids: logprob tokens as "token_id:N"
    priority: int = 0  # vLLM's: the request's place under --scheduling-policy priority (lower first)
    include_reasoning: bool = True  # chat, vLLM's: with a reasoning parser, the answer's reasoning is returned
    beam: BeamSearchParams | None = None  # vLLM's use_beam_search: n beams, the choices the best n of them


def parse_json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, absurd nesting, over-long integers
        raise bad(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", code="invalid_json")
    return body


# -- field readers: each names the field it rejects ------------------------------------------------
def _text(v: str, param: str) -> str:
    """JSON may carry lone surrogates; the tokenizer cannot take them."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise bad(f"{param} is not valid Unicode text (it has a lone surrogate)", param) from None
    return v


def _number(body: dict, key: str, lo: float, hi: float = math.inf, lo_open: bool = False) -> float | None:
    """A finite number in [lo, hi] ((lo, hi] when lo_open); hi infinite: no upper bound."""
    v = body.get(key)
    if v is None:
        return None
    if not is_number(v):
        raise bad(f"{key} must be a finite number", key, "invalid_type")
    if v < lo or v > hi or (lo_open and v == lo):
        raise bad(f"{key} must be {_range_text(lo, hi, lo_open)}, got {v}", key)
    return float(v)


def _range_text(lo: float, hi: float, lo_open: bool) -> str:
    if math.isinf(hi):
        return f"a finite number {'>' if lo_open else '>='} {lo:g}"
    return f"in {'(' if lo_open else '['}{lo}, {hi}]"


def whole_number(v: object) -> int | None:
    """An integer field's value as vLLM's request models (pydantic) read one: an int, or a float
    without a fraction (`100.0`: some clients write every number as a float); None otherwise."""
    if is_int(v):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return None


def whole_numbers(v: object) -> list[int] | None:
    """A list of integers as vLLM's `list[int]` fields read one (each an int or a float without a
    fraction, given back as ints); None when `v` is not such a list."""
    if not isinstance(v, list):
        return None
    out = [whole_number(t) for t in v]
    return None if any(t is None for t in out) else out  # type: ignore[return-value]


def _integer(body: dict, key: str) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if (n := whole_number(v)) is None:
        raise bad(f"{key} must be an integer", key, "invalid_type")
    return n


def flag(body: dict, key: str, default: bool = False) -> bool:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(f"{key} must be a boolean", key, "invalid_type")
    return v


def _stop(body: dict) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("stop must be a string or a list of strings", "stop", "invalid_type")
    if any(not s for s in stops):
        raise bad("stop strings must be non-empty", "stop")
    if len(stops) > MAX_STOPS:
        raise bad(f"at most {MAX_STOPS} stop strings are supported", "stop")
    return tuple(_text(s, "stop") for s in stops)


def _session_id(body: dict, header: str | None) -> str | None:
    v = body.get("session_id")
    if v is None:
        v = header  # the body wins over the X-Session-ID header
    if v is None:
        return None
    # printable: DELETE /v1/sessions/{id} must be able to name it (a path holds no newline)
    if not isinstance(v, str) or not v or len(v) > 256 or not v.isprintable():
        raise bad("session_id must be a non-empty printable string of at most 256 characters", "session_id",
                  "invalid_type")  # fmt: skip
    return _text(v, "session_id")


def cache_salt(body: dict) -> str | None:
    """vLLM's cache_salt: a non-empty string (a tenant's), or none."""
    v = body.get("cache_salt")
    if v is not None and (not isinstance(v, str) or not v):
        raise bad("cache_salt must be a non-empty string", "cache_salt", "invalid_type")
    return v if v is None else _text(v, "cache_salt")


def _request_id(body: dict) -> str | None:
    v = body.get("request_id")
    if v is None:
        return None
    if not isinstance(v, str) or not v or len(v) > 256 or not v.isprintable():
        raise bad("request_id must be a non-empty printable string of at most 256 characters", "request_id",
                  "invalid_type")  # fmt: skip
    return _text(v, "request_id")


# fields we accept only at their neutral value (clients often send them explicitly)
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "tools": ([],),
    "functions": ([],),
    "best_of": (1,),
    "suffix": ("",),
    "logits_processors": ([],),
}
# why a field is refused, where "not supported" alone would leave a vLLM user guessing
_WHY_UNSUPPORTED = {
    "logits_processors": "a request's own logits processors are not run (vLLM's need --logits-processor-pattern, "
                         "which this server does not have)",
}  # fmt: skip


def _reject_unsupported(body: dict, chat: bool) -> None:
    taken = {"tools": chat}  # chat takes tools
    for key, ok in _NEUTRAL.items():
        if taken.get(key):
            continue
        v = body.get(key)
        if v is not None and not any(v == o for o in ok):
            why = f": {_WHY_UNSUPPORTED[key]}" if key in _WHY_UNSUPPORTED else ""
            raise bad(f"{key}={_short_repr(v)} is not supported by this server{why}", key, "unsupported_parameter")


def _short_repr(v: Any, most: int = 80) -> str:
    """A value as the client sent it, cut short (a list of processors or tools may be long)."""
    text = repr(v)
    return text if len(text) <= most else text[: most - 3] + "..."


def _logit_bias(body: dict) -> dict[int, float]:
    v = body.get("logit_bias")
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise bad("logit_bias must be an object mapping token ids to numbers", "logit_bias", "invalid_type")
    if len(v) > MAX_LOGIT_BIAS:
        raise bad(f"logit_bias may name at most {MAX_LOGIT_BIAS} tokens", "logit_bias")
    out = {}
    for key, bias in v.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 10):
            raise bad(f"logit_bias keys must be token ids (non-negative integers), got {key[:20]!r}", "logit_bias")
        if not (is_number(bias) and abs(bias) <= MAX_ABS_LOGIT_BIAS):  # any finite bias, as vLLM
            raise bad(f"logit_bias values must be finite numbers (float32's range), got {bias!r} for token {key}",
                      "logit_bias")  # fmt: skip
        out[int(key)] = float(bias)
    return out


def _logprobs(body: dict, chat: bool, limit: int = MAX_LOGPROBS) -> int | None:
    """How many alternatives each token's logprobs list (None: no logprobs). Chat: `logprobs` (a
    boolean) and `top_logprobs`; completions: `logprobs`, the number itself. `limit`: the server's
    --max-logprobs."""
    if chat:
        wanted = flag(body, "logprobs")
        top = _integer(body, "top_logprobs")
        if top is not None and not 0 <= top <= limit:
            raise bad(f"top_logprobs must be an integer in [0, {limit}], got {top}", "top_logprobs")
        if top and not wanted:
            raise bad("top_logprobs needs logprobs set to true", "top_logprobs")
        return (top or 0) if wanted else None
    v = body.get("logprobs")
    if v is None or v is False:  # a neutral false, as some clients send
        return None
    if (n := whole_number(v)) is None or not 0 <= n <= limit:
        raise bad(f"logprobs must be an integer in [0, {limit}] for completions, got {v!r}", "logprobs")
    return n


def _prompt_logprobs(body: dict, stream: bool, limit: int = MAX_LOGPROBS) -> int | None:
    v = body.get("prompt_logprobs")
    if v is None:
        return None
    if (n := whole_number(v)) is None or not 0 <= n <= limit:
        raise bad(f"prompt_logprobs must be an integer in [0, {limit}], got {v!r}", "prompt_logprobs")
    if stream:  # as vLLM
        raise bad("prompt_logprobs are not available when stream is true", "prompt_logprobs")
    return n


def sampling_params(body: dict, max_model_len: int, chat: bool = True, defaults: Mapping[str, Any] | None = None,
                    max_logprobs: int = MAX_LOGPROBS) -> SamplingParams:  # fmt: skip
    """The request's SamplingParams; `defaults` (the model's generation config) fill in the sampling
    fields it leaves out, and their max_tokens (generation_config.json's max_new_tokens) bounds every
    answer's length, as vLLM's server-wide limit. `max_logprobs`: the most logprobs it may ask for."""
    defaults = defaults or {}
    body = {**body, **{k: v for k, v in defaults.items() if k != "max_tokens" and body.get(k) is None}}
    max_tokens = _integer(body, "max_completion_tokens")
    key = "max_completion_tokens"
    if max_tokens is None:
        max_tokens, key = _integer(body, "max_tokens"), "max_tokens"
    if max_tokens is not None and max_tokens <= 0:
        raise bad(f"{key} must be a positive integer, got {max_tokens}", key)
    temperature = _number(body, "temperature", 0.0)  # as vLLM: any finite value >= 0
    top_p = _number(body, "top_p", 0.0, 1.0, lo_open=True)
    top_k = _integer(body, "top_k")
    if top_k is not None and top_k < -1:
        raise bad("top_k must be -1 or 0 (off) or a positive integer", "top_k")
    seed = _integer(body, "seed")
    if seed is not None and not -(2**63) <= seed < 2**64:
        raise bad("seed must fit in 64 bits", "seed")
    ignore_eos = flag(body, "ignore_eos")
    presence = _number(body, "presence_penalty", -2.0, 2.0)
    frequency = _number(body, "frequency_penalty", -2.0, 2.0)
    repetition = _number(body, "repetition_penalty", 0.0, lo_open=True)  # as vLLM: any finite value > 0
    if max_tokens is None:
        max_tokens = _default_max_tokens(chat, max_model_len, defaults)
    elif "max_tokens" in defaults:  # the generation config's max_new_tokens: a limit for every request (vLLM)
        max_tokens = min(max_tokens, defaults["max_tokens"])
    min_tokens = _integer(body, "min_tokens")
    if min_tokens is not None and not 0 <= min_tokens <= max_tokens:
        raise bad(f"min_tokens must be an integer in [0, max_tokens={max_tokens}], got {min_tokens}", "min_tokens")
    _reject_unsupported(body, chat)
    guided, guided_param = guided_fields(body)
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if temperature is None else (0.0 if temperature < GREEDY_BELOW else temperature),
            top_p=1.0 if top_p is None else top_p,
            top_k=max(top_k or 0, 0),
            seed=seed,
            stop=_stop(body),
            ignore_eos=ignore_eos,
            min_tokens=min_tokens or 0,
            repetition_penalty=1.0 if repetition is None else repetition,
            presence_penalty=presence or 0.0,
            frequency_penalty=frequency or 0.0,
            logit_bias=_logit_bias(body),
            logprobs=_logprobs(body, chat, max_logprobs),
            **_vllm_sampling(body, max_model_len),
            **guided,
        )
    except GuidedFormError as e:
        raise bad(f"{guided_param}: {e}", guided_param) from None
    except ValueError as e:  # what the fields checked here let through, SamplingParams' own checks catch
        raise bad(str(e)) from None


def _default_max_tokens(chat: bool, max_model_len: int, defaults: Mapping[str, Any]) -> int:
    """A request's length when it gives none, as vLLM's: chat until EOS or the end of the window (the
    engine stops there), completions 16 tokens; either within the model's own bound (its generation
    config's max_new_tokens)."""
    own = max_model_len if chat else min(COMPLETION_MAX_TOKENS, max_model_len)
    return min(defaults.get("max_tokens", own), own)


def _vllm_sampling(body: dict, max_model_len: int) -> dict[str, Any]:
    """vLLM's extra sampling fields: min_p, stop_token_ids, allowed_token_ids,
    include_stop_str_in_output, skip_special_tokens, truncate_prompt_tokens (-1: the window, less
    one token to answer)."""
    truncate = _integer(body, "truncate_prompt_tokens")
    if truncate is not None and not (truncate == -1 or truncate >= 1):
        raise bad("truncate_prompt_tokens must be -1 (the model's window) or an integer >= 1", "truncate_prompt_tokens")
    if truncate is not None and truncate > max_model_len:  # as vLLM: a cut the window itself would refuse
        raise bad(f"truncate_prompt_tokens ({truncate}) is greater than the model's window (max_model_len "
                  f"{max_model_len}); ask for at most that, or -1 for the window", "truncate_prompt_tokens")  # fmt: skip
    return dict(
        min_p=_number(body, "min_p", 0.0, 1.0) or 0.0,
        stop_token_ids=_token_ids(body, "stop_token_ids"),
        allowed_token_ids=_token_ids(body, "allowed_token_ids"),
        include_stop_str_in_output=flag(body, "include_stop_str_in_output"),
        bad_words=_bad_words(body),
        skip_special_tokens=flag(body, "skip_special_tokens", True),
        truncate_prompt_tokens=max_model_len - 1 if truncate == -1 else truncate,
    )


def _bad_words(body: dict) -> tuple[str, ...]:
    v = body.get("bad_words")
    if v is None:
        return ()
    if not isinstance(v, list) or len(v) > MAX_BAD_WORDS or not all(isinstance(w, str) and w.strip() for w in v):
        raise bad(f"bad_words must be a list of at most {MAX_BAD_WORDS} non-empty strings", "bad_words", "invalid_type")
    return tuple(_text(w, "bad_words") for w in v)


def _token_ids(body: dict, key: str) -> tuple[int, ...]:
    v = body.get(key)
    if v is None:
        return ()
    ids = whole_numbers(v)
    if ids is None or len(ids) > MAX_TOKEN_IDS or not all(t >= 0 for t in ids):
        raise bad(f"{key} must be a list of at most {MAX_TOKEN_IDS} token ids (integers >= 0)", key)
    return tuple(ids)


def _common(body: dict, session_header: str | None, max_model_len: int, chat: bool,
            defaults: Mapping[str, Any] | None = None, max_logprobs: int = MAX_LOGPROBS) -> dict[str, Any]:  # fmt: skip
    ignored = sorted(set(body) - FIELDS - (CHAT_FIELDS if chat else {"prompt"}))
    if ignored:  # as vLLM: served, with the operator told what was not used
        log.warning("fields present in the request but not used by this server: %s", ", ".join(ignored)[:500])
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("model must be a string", "model", "invalid_type")
    if model is not None:
        _text(model, "model")
    stream = flag(body, "stream")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise bad("stream_options must be an object", "stream_options", "invalid_type")
    if opts is not None and not stream:  # as OpenAI's API and vLLM: a client bug worth telling
        raise bad("stream_options is only allowed when stream is true", "stream_options")
    include_usage = flag(opts or {}, "include_usage")
    continuous_usage = flag(opts or {}, "continuous_usage_stats")  # vLLM's: usage on every chunk
    session_id = _session_id(body, session_header)
    n = _integer(body, "n")
    if n is not None and not 1 <= n <= MAX_CHOICES:
        raise bad(f"n must be an integer in [1, {MAX_CHOICES}] (this server's most choices for one request), got {n}",
                  "n")  # fmt: skip
    if (n or 1) > 1 and session_id is not None:
        raise bad("n > 1 cannot continue a session: which choice would be its next turn?", "n")
    echo = not chat and flag(body, "echo")
    if echo and body.get("truncate_prompt_tokens") is not None:
        raise bad("echo cannot be combined with truncate_prompt_tokens: the prompt echoed would not be the one "
                  "computed", "truncate_prompt_tokens")  # fmt: skip
    # echo with max_tokens 0 (what older lm-eval-harness sends to score a prompt, as vLLM takes it):
    # one token is computed with the prompt at no extra forward pass, and left out of the answer
    asked = body.get("max_completion_tokens")  # it wins over max_tokens, as sampling_params reads them
    asked = body.get("max_tokens") if asked is None else asked
    prompt_only = echo and whole_number(asked) == 0
    if prompt_only:
        body = {**body, "max_tokens": 1, "max_completion_tokens": None}
    params = sampling_params(body, max_model_len, chat, defaults, max_logprobs)
    prompt_logprobs = _prompt_logprobs(body, stream, max_logprobs)
    # echo with logprobs lists the prompt's tokens too: the engine computes them for the larger of the two
    wanted = [v for v in (prompt_logprobs, params.logprobs if echo else None) if v is not None]
    if wanted:
        params = replace(params, prompt_logprobs=max(wanted))
    return dict(
        model=model,
        params=params,
        echo=echo,
        prompt_logprobs=prompt_logprobs,
        stream=stream,
        include_usage=include_usage,
        continuous_usage=continuous_usage,  # as vLLM: with include_usage only (asked for, or forced)
        session_id=session_id,
        cache_salt=cache_salt(body),
        request_id=_request_id(body),
        priority=_integer(body, "priority") or 0,
        token_ids_as_tokens=flag(body, "return_tokens_as_token_ids"),
        max_tokens_asked=_integer(body, "max_completion_tokens") or _integer(body, "max_tokens"),  # checked above
        prompt_only=prompt_only,
        n=n or 1,
        beam=_beam_search(body, params, n or 1, session_id, echo, prompt_logprobs, max_logprobs),
    )


# what a beam search cannot honour: its beams grow by the model's most likely tokens, ranked by
# the model's own log-probabilities (the fields that would change those, or end an answer early)
_BEAM_REFUSED = ("stop", "stop_token_ids", "min_tokens", "logit_bias", "bad_words", "allowed_token_ids",
                 "presence_penalty", "frequency_penalty", "repetition_penalty")  # fmt: skip


def _guided_field(body: dict) -> str:
    """The field that asked for structured output (the first, when several did)."""
    asked = ("response_format", "guided_json", "guided_choice", "guided_regex", "guided_grammar", "structured_outputs")
    return next(k for k in asked if body.get(k) not in (None, {"type": "text"}))


def _beam_search(body: dict, params: SamplingParams, n: int, session_id: str | None, echo: bool,
                 prompt_logprobs: int | None, max_logprobs: int) -> BeamSearchParams | None:  # fmt: skip
    """vLLM's use_beam_search: n beams of at most max_tokens tokens, length_penalty (their scores'
    exponent), ignore_eos and include_stop_str_in_output; None when not asked for. What the search
    cannot honour is refused by name (vLLM's would ignore it)."""
    length_penalty = _number(body, "length_penalty", -math.inf)
    if not flag(body, "use_beam_search"):
        return None
    neutral = SamplingParams()
    asked = {"session_id": session_id is not None, "echo": echo, "prompt_logprobs": prompt_logprobs is not None,
             # (sent by the client: a model's generation config may set a penalty every request gets)
             **{k: body.get(k) is not None and getattr(params, k) != getattr(neutral, k) for k in _BEAM_REFUSED}}  # fmt: skip
    field = next((k for k, v in asked.items() if v), None)
    if field is not None:
        raise bad(f"{field} cannot be combined with use_beam_search: its beams grow by the model's most likely "
                  "tokens, ranked by their log-probabilities, and each is a choice of one answer", field)  # fmt: skip
    if params.guided:
        field = _guided_field(body)
        raise bad(f"{field} cannot be combined with use_beam_search: its beams grow by the model's most likely "
                  "tokens, whatever their form", field)  # fmt: skip
    beam = BeamSearchParams(beam_width=n, max_tokens=params.max_tokens, ignore_eos=params.ignore_eos,
                            temperature=params.temperature, length_penalty=1.0 if length_penalty is None else length_penalty,
                            include_stop_str_in_output=params.include_stop_str_in_output)  # fmt: skip
    try:
        check_width(beam, max_logprobs)
    except ValueError as e:
        raise bad(str(e), "n") from None
    return beam


def _tools(body: dict) -> tuple[list[dict[str, Any]] | None, bool, tuple[str, ...]]:
    """The function definitions; whether answers are parsed for calls (tool_choice "auto", the
    default with tools; "none" keeps the tools in the prompt and the answer as text); and the
    functions one of which the answer must call ("required": any; a named function: that one)."""
    try:
        tools = validate_tools(body.get("tools"))
    except ValueError as e:
        raise bad(str(e), getattr(e, "param", None) or "tools") from None
    choice = body.get("tool_choice")
    names = tuple(t["function"]["name"] for t in tools or ())
    if choice in (None, "auto", "none"):
        return tools, tools is not None and choice != "none", ()
    if not tools:
        raise bad("tool_choice needs tools", "tool_choice")
    if choice == "required":
        return tools, True, names
    fn = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if name not in names:
        raise bad(f"tool_choice must be 'auto', 'none', 'required' or {{'type': 'function', 'function': {{'name': "
                  f"...}}}} naming one of the tools ({', '.join(names)})", "tool_choice")  # fmt: skip
    return tools, True, (name,)


def _mistral_call_ids(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mistral's templates take call ids of 9 characters only: longer ones (another server's, or a
    client's) keep their last 9, as vLLM does, in the calls and in the tool results that answer them."""

    def short(call_id: Any) -> Any:
        return call_id[-9:] if isinstance(call_id, str) and len(call_id) > 9 else call_id

    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            m["tool_calls"] = [{**c, "id": short(c.get("id"))} for c in m["tool_calls"]]
        if "tool_call_id" in m:
            m["tool_call_id"] = short(m["tool_call_id"])
        out.append(m)
    return out


def parse_chat(body: dict, session_header: str | None, max_model_len: int, defaults: Mapping[str, Any] | None = None,
               trust_template: bool = False, max_logprobs: int = MAX_LOGPROBS, tool_format: str = "hermes",
               template_defaults: Mapping[str, Any] | None = None,
               exclude_tools_when_none: bool = False) -> ParsedRequest:  # fmt: skip
    """A chat request; `tool_format`: how the model writes a call a tool_choice forces (--tool-call-parser);
    `template_defaults`: the server's chat_template_kwargs (--default-chat-template-kwargs);
    `exclude_tools_when_none`: tool_choice "none" renders without the tools (vLLM's flag)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list of {'role': ..., 'content': ...} objects", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}] must be an object", f"messages[{i}]", "invalid_type")
    try:
        out = validate_messages(messages)
    except ValueError as e:
        raise bad(str(e), getattr(e, "param", None) or "messages") from None
    for i, m in enumerate(out):
        _text(m["content"], f"messages[{i}].content")
    if tool_format == "mistral":
        out = _mistral_call_ids(out)
    tools, parse_calls, forced = _tools(body)
    if exclude_tools_when_none and body.get("tool_choice") == "none":
        tools = None
    common = _common(body, session_header, max_model_len, chat=True, defaults=defaults, max_logprobs=max_logprobs)
    if forced:
        if common["beam"] is not None:
            raise bad("a required or named tool_choice cannot be combined with use_beam_search: its beams grow by "
                      "the model's most likely tokens, whatever their form", "tool_choice")  # fmt: skip
        if common["params"].guided:
            field = _guided_field(body)
            raise bad(f"{field} cannot be combined with a required tool call: the answer is one or the other", field)
        if tool_format not in CALL_FORMS:
            raise bad(f"tool_choice: a required or named call cannot be forced in the {tool_format!r} tool-call "
                      "format (this server has no form for it); use tool_choice \"auto\"", "tool_choice")  # fmt: skip
        parameters = forced_parameters(tools, forced)
        try:  # e.g. a name the pythonic form cannot write as a call
            common["params"] = replace(common["params"], tool_call_names=forced, tool_call_parameters=parameters,
                                       tool_call_format=tool_format)  # fmt: skip
        except ValueError as e:
            raise bad(f"tool_choice: {e}", "tool_choice") from None
    if parse_calls and tool_format in KEEP_SPECIAL_TOKENS:  # its tag is a special token: kept in the text, as vLLM
        common["params"] = replace(common["params"], skip_special_tokens=False)
    named = isinstance(body.get("tool_choice"), dict)
    options = chat_options(body, out, trust_template, template_defaults)
    role = answer_role(messages, options)
    return ParsedRequest(messages=out, tools=tools, parse_tool_calls=parse_calls, named_tool=named,
                         chat_options=options, include_reasoning=flag(body, "include_reasoning", True),
                         role=role, chat_echo=_chat_echo(body, messages, out, role), **common)  # fmt: skip


def answer_role(messages: list[dict[str, Any]], options: ChatOptions) -> str:
    """A chat answer's role, as vLLM's: the assistant's after a generation prompt, else the last
    message's own (the answer goes on with it)."""
    return "assistant" if options.add_generation_prompt else messages[-1]["role"]


def _chat_echo(body: dict, sent: list[dict[str, Any]], messages: list[dict[str, Any]], role: str) -> str | None:
    """vLLM's chat echo: the answer starts with the last message's content (its text parts joined,
    as the template saw it) when that message's role, as sent, is the answer's; else with nothing.
    None: not asked for."""
    if not flag(body, "echo"):
        return None
    return messages[-1]["content"] if sent[-1]["role"] == role else ""


def chat_options(body: dict, messages: list[dict[str, Any]], trust_template: bool = False,
                 template_defaults: Mapping[str, Any] | None = None) -> ChatOptions:  # fmt: skip
    """vLLM's chat fields: add_generation_prompt, continue_final_message, chat_template_kwargs (over
    the server's `template_defaults`; reasoning_effort is one of them), documents, add_special_tokens,
    and chat_template when the server trusts requests' templates (as vLLM's --trust-request-chat-template)."""
    template = body.get("chat_template")
    if template is not None and not trust_template:  # vLLM too refuses one unless told to trust requests' templates
        raise bad("a request's own chat_template is not run by this server: start it with --chat-template, or "
                  "with --trust-request-chat-template", "chat_template", "unsupported_parameter")  # fmt: skip
    if template is not None:
        if not isinstance(template, str) or not template.strip():
            raise bad("chat_template must be a non-empty Jinja template (a string)", "chat_template", "invalid_type")
        try:
            check_template_syntax(template)
        except ValueError as e:
            raise bad(str(e), "chat_template") from None
    kwargs = body.get("chat_template_kwargs")
    effort = body.get("reasoning_effort")
    if effort is not None:  # as vLLM's: a template variable (templates that read it act on it)
        if effort not in REASONING_EFFORTS:
            raise bad(f"reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}", "reasoning_effort")
        if kwargs is None or isinstance(kwargs, dict):
            kwargs = {"reasoning_effort": effort, **(kwargs or {})}  # chat_template_kwargs' own value wins
    if template_defaults and (kwargs is None or isinstance(kwargs, dict)):  # as vLLM's: the request's own win
        kwargs = {**template_defaults, **(kwargs or {})}
    try:
        options = ChatOptions(flag(body, "add_generation_prompt", True), flag(body, "continue_final_message"),
                              {} if kwargs is None else kwargs, template, body.get("documents"),
                              flag(body, "add_special_tokens"))  # fmt: skip
        options.check(messages)
    except ValueError as e:
        raise bad(str(e), getattr(e, "param", None)) from None
    return options


def parse_completion(body: dict, session_header: str | None, max_model_len: int,
                     defaults: Mapping[str, Any] | None = None, max_logprobs: int = MAX_LOGPROBS) -> ParsedRequest:  # fmt: skip
    prompt = body.get("prompt")
    batch = None
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        if len(prompt) > MAX_BATCH:
            raise bad(f"at most {MAX_BATCH} prompts may be batched in one request, got {len(prompt)}", "prompt")
        prompt = [_one_prompt(one, f"prompt[{i}]") for i, one in enumerate(prompt)]
        batch = prompt if len(prompt) > 1 else None  # a batch of one is that prompt
        prompt = prompt[0]
    else:
        prompt = _one_prompt(prompt, "prompt")
    # as vLLM: a text prompt gets what the tokenizer adds around a text (Llama's BOS) unless told not to
    specials = flag(body, "add_special_tokens", True)
    common = _common(body, session_header, max_model_len, chat=False, defaults=defaults, max_logprobs=max_logprobs)
    if batch is not None and common["session_id"] is not None:
        raise bad("a batch of prompts cannot continue a session: which prompt would be its next turn?", "prompt")
    return ParsedRequest(prompt=prompt, batch=batch, add_special_tokens=specials, **common)


def _one_prompt(prompt: Any, param: str) -> str | list[int]:
    """A non-empty text, or a non-empty list of token ids (floats without a fraction as ints, as vLLM's)."""
    if isinstance(prompt, str):
        if not prompt:
            raise bad(f"{param} must not be empty", param)
        _text(prompt, param)
        return prompt
    ids = whole_numbers(prompt)
    if not ids:
        raise bad(f"{param} must be a non-empty string or a non-empty list of token ids", param, "invalid_type")
    return ids


class BodyLimitMiddleware:
    """Answers 413 for a request body over max_bytes (declared or streamed), and 408 when no part of
    the body arrives for timeout_s (a stalled client holds no handler forever; a slow upload that
    keeps sending is fine), before any handler parses it."""

    DRAIN_LIMIT = 64 << 20  # read (and drop) at most this much of an oversized body so the client sees the 413

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float = 30.0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        total, more = 0, True
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_big = declared is not None and declared.isdigit() and int(declared) > self.max_bytes
        try:
            while more and not too_big:
                message = await self._next(receive)
                if message["type"] == "http.disconnect":
                    return  # the client left before sending its body
                chunks.append(message.get("body", b""))
                total += len(chunks[-1])
                more = message.get("more_body", False)
                too_big = total > self.max_bytes
            if too_big:
                await self._drain(receive, more, total)
        except asyncio.TimeoutError:  # TimeoutError itself only from Python 3.11
            if not too_big:
                msg = f"no part of the request body arrived for {self.timeout_s:g} s"
                await error_response(error_body(msg, code="request_timeout"), 408)(scope, receive, send)
                return
        if too_big:
            msg = f"the request body is larger than this server's limit of {self.max_bytes} bytes"
            await error_response(error_body(msg, code="request_too_large"), 413)(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # later calls see the disconnect

        await self.app(scope, replay, send)

    async def _next(self, receive: Receive) -> Message:
        """The next part of the body; asyncio.TimeoutError when none comes within timeout_s."""
        return await asyncio.wait_for(receive(), self.timeout_s)

    async def _drain(self, receive: Receive, more: bool, total: int) -> None:
        while more and total < self.DRAIN_LIMIT:
            message = await self._next(receive)
            if message["type"] != "http.request":
                return
            total += len(message.get("body", b""))
            more = message.get("more_body", False)
