"""The OpenAI-compatible HTTP server: FastAPI routes over the engine loop, and `cachedattention serve`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import importlib.metadata
import json
import logging
import logging.config
import math
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cachedattention.beam_search import one_token_params
from cachedattention.cli_vllm import uvicorn_options
from cachedattention.config import EngineConfig
from cachedattention.engine.engine import LLMEngine
from cachedattention.errors import SessionBusy
from cachedattention.lora.adapter import LoRAAdapter
from cachedattention.lora.request import LoRARequest
from cachedattention.model.messages import ChatOptions
from cachedattention.model.tokenizer import Tokenizer
from cachedattention.outputs import RequestOutput
from cachedattention.sampling import choice_params
from cachedattention.server.access_log import quiet_endpoints
from cachedattention.server.api_error import APIError, aborted_error, as_api_error, bad, error_body, error_response
from cachedattention.server.auth import ApiKeyMiddleware, RootPathMiddleware, api_keys_from, checked_api_keys
from cachedattention.server.beam import BeamSearches
from cachedattention.server.engine_loop import ACCEPTED, EngineLoop, Job, RequestStream, ServerDraining
from cachedattention.server.logprobs import LogprobFormatter
from cachedattention.server.metrics import CONTENT_TYPE, EngineStatsCollector, RequestCounterMiddleware, ServerMetrics
from cachedattention.server.protocol import (
    BodyLimitMiddleware,
    ParsedRequest,
    parse_chat,
    parse_completion,
    parse_json_object,
)
from cachedattention.server.reasoning import (
    Reasoning,
    ReasoningParser,
    Split,
    reasoning_delta,
    split_answer,
)
from cachedattention.server.request_id import RequestIdMiddleware, client_request_id, engine_request_id
from cachedattention.server.responses import ResponsesRoutes
from cachedattention.server.responses_store import ResponseStore, SharedResponses
from cachedattention.server.stream_text import stream_delta
from cachedattention.server.tokenize import detokenize, tokenize
from cachedattention.server.tool_calls import HermesCalls, ToolCall, ToolCallParser, for_request, tool_call_parser
from cachedattention.server.vllm_metrics import VLLMStatsCollector, cache_config_info
from cachedattention.uvicorn_run import check_port_free, run_until_signal

log = logging.getLogger(__name__)
# vLLM's variable (and ours) that opens the routes adding and taking away LoRA adapters at run time
RUNTIME_LORA_ENV = ("CACHEDATTENTION_ALLOW_RUNTIME_LORA_UPDATING", "VLLM_ALLOW_RUNTIME_LORA_UPDATING")

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GRACE_S = 30.0
ABORT_ANSWER_S = 5.0  # after the grace, time for aborted requests' handlers to answer before uvicorn cancels them
DEFAULT_RESPONSES_STORE_BYTES = 256 << 20


def default_model_name(engine: LLMEngine) -> str:
    return EMBEDDED_NAME if engine.config.model is None else engine.loaded.name


def model_root(engine: LLMEngine) -> str:
    """What /v1/models' cards give as `root`: the model as the server was told it (vLLM's, its path
    or hub id, not the hub cache's snapshot it loaded); the embedded model's name when it was given none."""
    config = engine.config
    if config.model is None:
        return EMBEDDED_NAME
    return config.model_given if config.model_given is not None else config.model


def model_permission(created: int) -> dict[str, Any]:
    """vLLM's ModelPermission, as its cards carry one: what a client may do with the model."""
    return {"id": f"modelperm-{uuid.uuid4().hex}", "object": "model_permission", "created": created,
            "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
            "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False, "organization": "*",
            "group": None, "is_blocking": False}  # fmt: skip


class _Format:
    """OpenAI's response and chunk objects for one request (one choice per engine request)."""

    def __init__(
        self, request_id: str, model: str, chat: bool, include_usage: bool, tokenizer: Tokenizer | None = None,
        logprobs: int | None = None, echoes: list[Echo] | None = None, prompt_logprobs: int | None = None,
        tool_calls: bool = False, named_tool: bool = False, tool_parser: ToolCallParser = HermesCalls,
        continuous_usage: bool = False, token_ids: bool = False, reasoning: Reasoning | None = None, n: int = 1,
        role: str = "assistant", chat_echo: str | None = None,
    ) -> None:  # fmt: skip
        self.id = request_id
        self.model = model
        self.chat = chat
        self.include_usage = include_usage
        self.tokenizer = tokenizer
        self.logprobs = logprobs  # None: the request asked for no logprobs; n: alternatives per token
        self.echoes = echoes  # completions' echo: each choice's prompt, sent before its answer
        self.n = n  # choices per prompt (a batch's prompts each have n, one after the other)
        self.tool_calls = tool_calls  # chat: answers' tool calls are returned as tool_calls
        self.tool_parser = tool_parser  # how the model writes them (--tool-call-parser)
        self.named_tool = named_tool  # tool_choice named the function: finish_reason stays "stop"
        self.prompt_logprobs = prompt_logprobs  # vLLM's prompt_logprobs=n (None: not asked for)
        self._logprob_formats: dict[int, LogprobFormatter] = {}  # each choice's (completions' offsets run on)
        self.token_ids = token_ids  # vLLM's return_tokens_as_token_ids: logprob tokens as "token_id:N"
        self.continuous_usage = continuous_usage  # vLLM's continuous_usage_stats: usage on every chunk
        self.progress: dict[int, RequestOutput] = {}  # each streamed choice's latest output (its usage so far)
        self.reasoning = reasoning  # chat, with --reasoning-parser: thinking apart from the answer
        self.role = role  # chat: the answer's role
        self.chat_echo = chat_echo  # chat, vLLM's echo: the text each answer's content starts with
        self.created = int(time.time())

    def split(self, out: RequestOutput, final: bool = True) -> Split:
        """A chat answer's reasoning and the rest, its content (where tool calls are looked for)."""
        return split_answer(self.reasoning, out, self.tokenizer, final)

    def _formatter(self, index: int) -> LogprobFormatter:
        if index not in self._logprob_formats:
            self._logprob_formats[index] = LogprobFormatter(self.tokenizer, self.chat, self.token_ids)
        return self._logprob_formats[index]

    def _logprobs(self, index: int, logprobs: list | None) -> dict[str, Any] | None:
        if self.logprobs is None or logprobs is None:
            return None
        return self._formatter(index).render(logprobs)

    def _echo_logprobs(self, index: int, out: RequestOutput, joint: str) -> dict[str, Any] | None:
        """The echoed prompt's tokens in completions' lists (their offsets into the echoed text)."""
        if self.logprobs is None or out.prompt_logprobs is None:
            return None
        echo = self.echoes[index]
        return self._formatter(index).render_prompt(out.prompt_logprobs, out.prompt_token_ids, echo.text, self.logprobs,
                                                    echo.as_sent, bool(joint), echo.hidden)  # fmt: skip

    def _joint(self, out: RequestOutput) -> str:
        """What joins the echoed prompt to the answer: the answer's text is decoded alone, and a
        SentencePiece decoder drops its first word's leading space, which follows a prompt."""
        tok, ids = self.tokenizer, out.token_ids
        if tok is None or not ids:
            return ""
        context = out.prompt_token_ids[-4:]
        lead, alone = tok.decode(context + ids[:1])[len(tok.decode(context)) :], tok.decode(ids[:1])
        return lead[: len(lead) - len(alone)] if len(lead) > len(alone) and lead.endswith(alone) else ""

    def _vllm_prompt_logprobs(self, out: RequestOutput) -> list | None:
        if self.prompt_logprobs is None or out.prompt_logprobs is None:
            return None
        return LogprobFormatter(self.tokenizer, False, self.token_ids).prompt_logprobs(out.prompt_logprobs,
                                                                                         self.prompt_logprobs)

    def usage(self, outs: list[RequestOutput]) -> dict[str, Any]:
        """Each prompt once (its n choices share it), the completions of all choices."""
        firsts = outs[:: self.n]
        prompt, completion = sum(o.metrics.prompt_tokens for o in firsts), sum(len(o.token_ids) for o in outs)
        details = firsts[0].metrics.cached_details()
        for other in firsts[1:]:  # a batch's prompts: their reuse summed
            more = other.metrics.cached_details()
            details["cached_tokens"] += more["cached_tokens"]
            details["truncated_tokens"] += more["truncated_tokens"]
            for tier, count in more["cached_tokens_by_tier"].items():
                details["cached_tokens_by_tier"][tier] += count
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": details}  # fmt: skip

    def full(self, outs: list[RequestOutput]) -> dict[str, Any]:
        choices = []
        for i, out in enumerate(outs):
            called, head = False, None
            if self.chat:
                choice = {"index": i, "message": self._message(out)}
                called = "tool_calls" in choice["message"]
            elif self.echoes is None:
                choice = {"index": i, "text": out.text}
            else:
                joint = self._joint(out)
                choice = {"index": i, "text": self.echoes[i].text + joint + out.text}
                head = self._echo_logprobs(i, out, joint)
            logprobs = self._logprobs(i, out.logprobs)
            if head is not None and logprobs is not None:  # the prompt's tokens, then the answer's
                logprobs = {k: head[k] + logprobs[k] for k in head}
            choice.update(logprobs=logprobs, finish_reason=self.finish_reason(out, called), stop_reason=out.stop_reason)
            if not self.chat and self.prompt_logprobs is not None:
                choice["prompt_logprobs"] = self._vllm_prompt_logprobs(out)
            choices.append(choice)
        obj = "chat.completion" if self.chat else "text_completion"
        body = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices,
                "usage": self.usage(outs)}  # fmt: skip
        if self.chat and self.prompt_logprobs is not None:  # as vLLM: once, beside the choices (one prompt)
            body["prompt_logprobs"] = self._vllm_prompt_logprobs(outs[0])
        return body

    def _message(self, out: RequestOutput) -> dict[str, Any]:
        reasoning, text, _ = self.split(out)
        content, calls = self.tool_parser.parse(text) if self.tool_calls else (text, [])
        message: dict[str, Any] = {"role": self.role, "content": content if calls else text}
        if self.reasoning is not None:
            message.update(self.reasoning.fields(reasoning))
            message["content"] = message["content"] or None  # as vLLM's: no text after the reasoning is none
        if self.chat_echo is not None:  # as vLLM's: before whatever content the answer has (none: "")
            message["content"] = self.chat_echo + (message["content"] or "")
        if calls:
            message["tool_calls"] = [c.as_json() for c in calls]
        return message

    def finish_reason(self, out: RequestOutput, called: bool) -> str | None:
        """As OpenAI: "tool_calls" when the answer called tools (but "stop" for a named tool_choice)."""
        return "tool_calls" if called and not self.named_tool else out.finish_reason

    def tool_calls_chunk(self, calls: list[ToolCall], index: int) -> str:
        """A streamed choice's tool calls, each whole in one delta (OpenAI clients join deltas by index)."""
        delta = {"tool_calls": [c.as_json(k) for k, c in enumerate(calls)]}
        return self._event([{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}])

    def echo_chunk(self, index: int, out: RequestOutput) -> str:
        """Completions' streamed echo: the prompt's text (and its tokens' logprobs) before the answer's."""
        joint = self._joint(out)
        choice = {"index": index, "text": self.echoes[index].text + joint,
                  "logprobs": self._echo_logprobs(index, out, joint), "finish_reason": None}  # fmt: skip
        return self._event([choice])

    def chunk(
        self, text: str | None = None, finish_reason: str | None = None, role: bool = False,
        logprobs: list | None = None, index: int = 0, reasoning: str | None = None, stop_reason: int | str | None = None,
    ) -> str:  # fmt: skip
        """One streamed choice; `logprobs`: those of the tokens generated since the last chunk;
        `reasoning`: more of the answer's reasoning (chat, with a reasoning parser); the last one's
        `stop_reason` (vLLM's: the stop token id or string that ended the answer)."""
        lps = self._logprobs(index, logprobs)
        if self.chat:
            delta: dict[str, Any] = {"role": self.role, "content": ""} if role else {}
            if text is not None:
                delta["content"] = text
            if reasoning is not None and self.reasoning is not None:
                delta.update(self.reasoning.fields(reasoning))
            choice = {"index": index, "delta": delta, "logprobs": lps, "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": text or "", "logprobs": lps, "finish_reason": finish_reason}
        if finish_reason is not None:
            choice["stop_reason"] = stop_reason
        return self._event([choice])

    def usage_chunk(self, outs: list[RequestOutput]) -> str:
        return self._event([], self.usage(outs))

    def _event(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> str:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        data: dict[str, Any] = {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                                "choices": choices}  # fmt: skip
        index = choices[0]["index"] if choices else None
        if self.continuous_usage and usage is None and index in self.progress:  # as vLLM: that choice's tokens
            usage = self.usage([self.progress[index]])
        if self.include_usage:
            data["usage"] = usage  # OpenAI sends usage: null on every chunk but the last
        return sse(data)


def package_version() -> str:
    try:
        return importlib.metadata.version("cachedattention")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree (PYTHONPATH), not installed
        return "unknown"


def sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class OpenAIRoutes:
    """The HTTP handlers; everything engine-side goes through the EngineLoop."""

    def __init__(self, loop: EngineLoop, metrics: ServerMetrics, model_names: Sequence[str], max_model_len: int,
                 trust_request_chat_template: bool = False, named: bool = True,
                 tool_parser: ToolCallParser = HermesCalls, token_ids_as_tokens: bool = False,
                 reasoning_parser: ReasoningParser | None = None, force_include_usage: bool = False,
                 template_defaults: Mapping[str, Any] | None = None,
                 loras: Sequence[LoRARequest] = (), exclude_tools_when_none: bool = False) -> None:  # fmt: skip
        self.loop = loop
        self.exclude_tools_when_none = exclude_tools_when_none  # vLLM's --exclude-tools-when-tool-choice-none
        self.loras = {r.lora_name: r for r in loras}  # the adapters a request's `model` may name (--lora-modules)
        self.unloaded: dict[str, LoRARequest] = {}  # taken away at run time: their sessions may still be forgotten
        # vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter, with LoRA on and its variable set
        self.runtime_lora = loop is not None and loop.engine.loras is not None and any(
            os.environ.get(name, "").strip().lower() in ("1", "true") for name in RUNTIME_LORA_ENV)
        self.template_defaults = dict(template_defaults or {})  # chat_template_kwargs' (--default-chat-template-kwargs)
        self.token_ids_as_tokens = token_ids_as_tokens  # vLLM's --return-tokens-as-token-ids
        self.trust_template = trust_request_chat_template
        self.tool_parser = tool_parser  # how the model writes tool calls (--tool-call-parser)
        self.reasoning_parser = reasoning_parser  # how the model writes its reasoning (--reasoning-parser)
        self.force_include_usage = force_include_usage  # streamed answers end with usage, asked for or not
        self.metrics = metrics
        self.model_names = list(dict.fromkeys(model_names))  # answers carry the first, as vLLM's
        self.model_name = self.model_names[0]
        # names given by the operator are answered exactly (as vLLM); the default (a file's name) also without its suffix
        self.aliases = {*self.model_names, "default"} | (set() if named else {Path(self.model_name).stem})
        self.max_model_len = max_model_len
        self.beams = BeamSearches(loop, max_model_len)  # use_beam_search's searches under way
        self.created = int(time.time())

    def register(self, app: FastAPI) -> None:
        app.add_api_route("/v1/chat/completions", self.chat, methods=["POST"])
        app.add_api_route("/v1/completions", self.completions, methods=["POST"])
        app.add_api_route("/v1/models", self.models, methods=["GET"])
        app.add_api_route("/health", self.health, methods=["GET"])
        # load balancers' probes; its own route, kept out of the schema (one operation id per route)
        app.add_api_route("/health", self.health, methods=["HEAD"], include_in_schema=False)
        app.add_api_route("/metrics", self.prometheus, methods=["GET"])
        app.add_api_route("/tokenize", self.tokenize, methods=["POST"])
        app.add_api_route("/detokenize", self.detokenize, methods=["POST"])
        app.add_api_route("/version", self.version, methods=["GET"])
        app.add_api_route("/v1/sessions/{session_id:path}", self.forget_session, methods=["DELETE"])
        if self.runtime_lora:
            app.add_api_route("/v1/load_lora_adapter", self.load_lora_adapter, methods=["POST"])
            app.add_api_route("/v1/unload_lora_adapter", self.unload_lora_adapter, methods=["POST"])
        # SageMaker's routes, as vLLM serves them: its probe (GET; POST too, its own route out of the
        # schema) and one route for inference
        app.add_api_route("/ping", self.health, methods=["GET"])
        app.add_api_route("/ping", self.health, methods=["POST"], include_in_schema=False)
        app.add_api_route("/invocations", self.invocations, methods=["POST"])

    async def chat(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def invocations(self, request: Request) -> Response:
        """SageMaker's inference route, as vLLM's: by the body's shape, a chat (messages) or a
        completion (prompt), answered as that route answers it."""
        body = parse_json_object(await request.body())  # (Starlette keeps the body for the route's own read)
        if "messages" in body or "prompt" in body:
            return await self._generate(request, chat="messages" in body)
        raise bad("/invocations serves a chat completion request (with messages) or a completion request "
                  "(with a prompt); this body has neither", "messages")  # fmt: skip

    async def models(self) -> dict[str, Any]:
        root = model_root(self.loop.engine)
        cards = [{"id": name, "object": "model", "created": self.created, "owned_by": "cachedattention", "root": root,
                  "parent": None, "max_model_len": self.max_model_len, "permission": [model_permission(self.created)]}
                 for name in self.model_names]  # fmt: skip
        cards += [{"id": name, "object": "model", "created": self.created, "owned_by": "cachedattention",
                   "root": lora.path, "parent": self.model_name, "max_model_len": self.max_model_len,
                   "permission": [model_permission(self.created)]} for name, lora in self.loras.items()]  # fmt: skip
        return {"object": "list", "data": cards}

    async def health(self) -> JSONResponse:
        stats = self.loop.stats()
        numbers = {k: v for k, v in stats.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        body = {"status": "ok" if self.loop.accepting else "draining", "model": self.model_name, **numbers}
        return JSONResponse(body, status_code=200 if self.loop.accepting else 503)

    async def prometheus(self) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    async def forget_session(self, session_id: str, cache_salt: str | None = None,
                             model: str | None = None) -> dict[str, Any]:  # fmt: skip
        """Forget a conversation's KV wherever it is kept (this server's tiers and the remote one);
        `?cache_salt=`: the one its turns were salted with; `?model=`: the LoRA adapter they ran with
        (its earlier files too, or one taken away since)."""
        lora = self.unloaded.get(model) or self.check_model(model)  # (a name loaded again is no longer unloaded)
        try:
            held = await self.loop.forget_session(session_id, cache_salt, lora)
        except SessionBusy as e:
            raise APIError(409, str(e), "session_busy", "session_id") from None
        except (ServerDraining, ValueError) as e:
            raise as_api_error(e) from None
        except OSError as e:
            raise APIError(503, f"the remote store cannot be reached ({e}): the session is not forgotten there; "
                           "retry", "store_unavailable", type_="server_error") from None  # fmt: skip
        if not held:
            raise APIError(404, f"session {session_id!r} is not held by this server", "not_found", "session_id")
        return {"id": session_id, "object": "session", "deleted": True}

    async def load_lora_adapter(self, request: Request) -> Response:
        """vLLM's: {"lora_name", "lora_path", "load_inplace"} adds an adapter requests may name, read
        now (in a worker thread): one that cannot be served is a 400 here, not at its first request.
        `load_inplace` replaces one of that name (its conversations' KV stays theirs: it is keyed by
        the files' fingerprint)."""
        body = parse_json_object(await request.body())
        name, path = _lora_field(body, "lora_name"), _lora_field(body, "lora_path")
        inplace = body.get("load_inplace", False)
        if not isinstance(inplace, bool):
            raise bad("load_inplace must be true or false", "load_inplace", "invalid_type")
        if name in self.aliases:
            raise bad(f"{name!r} is this server's model's name, not an adapter's", "lora_name")
        if name in self.loras and not inplace:
            raise bad(f"The lora adapter {name!r} has already been loaded.", "lora_name")
        lora = LoRARequest(name, max((r.lora_int_id for r in self.loras.values()), default=0) + 1, path)
        registry = self.loop.engine.loras
        try:
            adapter = await asyncio.to_thread(registry.read, lora)
        except ValueError as e:
            raise bad(str(e), "lora_path") from None
        registry.replace(lora, adapter)
        self.loras[name] = lora
        self.unloaded.pop(name, None)
        return Response(f"Success: LoRA adapter {name!r} added successfully.", media_type="text/plain")

    async def unload_lora_adapter(self, request: Request) -> Response:
        """vLLM's: {"lora_name"} takes an adapter away (requests running with it finish with it)."""
        name = _lora_field(parse_json_object(await request.body()), "lora_name")
        lora = self.loras.pop(name, None)
        if lora is None:
            raise APIError(404, f"The lora adapter {name!r} cannot be found.", "not_found", "lora_name")
        self.unloaded[name] = lora
        self.loop.engine.loras.forget(name)
        return Response(f"Success: LoRA adapter {name!r} removed successfully.", media_type="text/plain")

    async def version(self) -> dict[str, str]:
        return {"version": package_version()}

    async def tokenize(self, request: Request) -> dict[str, Any]:
        body, tok = await self._tokenizer_request(request)
        # off the event loop: a long prompt takes a while, and answers stream meanwhile
        return await asyncio.to_thread(tokenize, tok, body, self.max_model_len, self.trust_template,
                                       self.template_defaults)  # fmt: skip

    async def detokenize(self, request: Request) -> dict[str, Any]:
        body, tok = await self._tokenizer_request(request)
        return await asyncio.to_thread(detokenize, tok, body, self.loop.engine.spec.vocab_size)

    async def _tokenizer_request(self, request: Request) -> tuple[dict[str, Any], Tokenizer]:
        body = parse_json_object(await request.body())
        self.check_model(body.get("model"))  # (an adapter's tokenizer is the model's)
        tok = self.loop.engine.tokenizer
        if tok is None:
            raise APIError(400, "this model was loaded without a tokenizer", "no_tokenizer")
        return body, tok

    def keep_tags(self, parsed: ParsedRequest) -> ParsedRequest:
        """A chat request whose reasoning parser reads special tokens (gpt-oss's harmony) has them
        kept in its answer's text; the parser takes them out of what the client sees."""
        if self.reasoning_parser is None or not self.reasoning_parser.keeps_special_tokens:
            return parsed
        return replace(parsed, params=replace(parsed.params, skip_special_tokens=False))

    def reasoning_of(self, parsed: ParsedRequest) -> Reasoning | None:
        """How a chat request's answers are split into reasoning and content (None: no parser)."""
        if self.reasoning_parser is None:
            return None
        params = parsed.params
        engine = self.loop.engine
        shaped_from_start = params.guided and not engine.guided_after_reasoning
        return Reasoning(self.reasoning_parser, shaped_from_start, parsed.include_reasoning, params.skip_special_tokens,
                         engine.reasoning_tags)  # fmt: skip

    def check_model(self, model: Any) -> LoRARequest | None:
        """The LoRA adapter a request's `model` names (None: the model itself); 404 for a name this
        server does not serve."""
        if model is not None and not isinstance(model, str):  # (every route's answer, /tokenize's too)
            raise bad("model must be a string", "model", "invalid_type")
        if model is not None and model in self.loras:
            return self.loras[model]
        if model is not None and model not in self.aliases:
            served = " or ".join(map(repr, [*self.model_names, *self.loras]))
            raise APIError(404, f"the model {model!r} does not exist; this server serves {served}", "model_not_found",
                           "model")  # fmt: skip
        return None

    def answer_model(self, lora: LoRARequest | None) -> str:
        """The model an answer names: the adapter's name, as vLLM's, or the model's first name."""
        return self.model_name if lora is None else lora.lora_name

    # -- generation -------------------------------------------------------------------------------
    def chat_parser(self) -> Callable[..., ParsedRequest]:
        """parse_chat with this server's settings (body, session header, window, sampling defaults to give)."""
        return functools.partial(parse_chat, trust_template=self.trust_template, tool_format=self.tool_parser.name,
                                 template_defaults=self.template_defaults, max_logprobs=self.loop.engine.max_logprobs,
                                 exclude_tools_when_none=self.exclude_tools_when_none)  # fmt: skip

    async def _generate(self, request: Request, chat: bool) -> Response:
        body = parse_json_object(await request.body())
        parse = self.chat_parser() if chat else functools.partial(parse_completion,
                                                                     max_logprobs=self.loop.engine.max_logprobs)
        # in a worker thread: compiling a large schema or grammar must not hold up other requests' streams
        parsed = await asyncio.to_thread(parse, body, request.headers.get("x-session-id"), self.max_model_len,
                                         self.loop.engine.sampling_defaults)  # fmt: skip
        lora = self.check_model(parsed.model)
        parsed = self.keep_tags(parsed) if chat else parsed
        given = client_request_id(request.headers, parsed.request_id)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{given or uuid.uuid4().hex}"
        submit = self._search if parsed.beam is not None else self._submit
        streams = await submit(engine_request_id(rid, given is not None), parsed,
                               parsed.max_tokens_asked if parsed.session_id is None else None,
                               lora=lora)  # fmt: skip
        tok = self.loop.engine.tokenizer
        echoes = None
        if parsed.echo:  # each prompt's, as sent or its ids' text (encodes: in a worker thread), for its choices
            prompts = parsed.batch or [parsed.prompt]
            once = await asyncio.to_thread(lambda: [Echo.of(p, tok, parsed.add_special_tokens) for p in prompts])
            echoes = [echo for echo in once for _ in range(parsed.n)]
        include_usage = parsed.include_usage or (self.force_include_usage and parsed.stream)
        fmt = _Format(rid, self.answer_model(lora), chat, include_usage, tok, parsed.params.logprobs, echoes,
                      parsed.prompt_logprobs, parsed.parse_tool_calls, parsed.named_tool,
                      for_request(self.tool_parser, parsed.tools),
                      include_usage and parsed.continuous_usage, parsed.token_ids_as_tokens or self.token_ids_as_tokens,
                      self.reasoning_of(parsed) if chat else None, parsed.n, parsed.role,
                      parsed.chat_echo)  # fmt: skip
        if parsed.stream:
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return StreamingResponse(self._events(streams, fmt, parsed), media_type="text/event-stream", headers=headers)
        outs = await self._collect(request, streams)
        return JSONResponse(fmt.full([_prompt_only(o) for o in outs] if parsed.prompt_only else outs))

    async def _submit(self, rid: str, parsed: ParsedRequest, check_room: int | None, truncate: bool = True,
                      render_aside: bool = False, lora: LoRARequest | LoRAAdapter | None = None,
                      log_output: bool = True) -> list[RequestStream]:  # fmt: skip
        """One engine request per choice (n > 1: seeds seed, seed + 1, ... so that seeded choices
        differ), n for each prompt of a batch in turn; each accepted, or all withdrawn and the first
        error raised. `check_room`: the
        answer's length that must fit in the window after the prompt (None: no check); `truncate`:
        whether a session's conversation may be cut to fit; `render_aside`: render the messages in
        a worker thread (a long conversation must not hold up the engine's thread); `lora`: the
        adapter its `model` names, read in a worker thread if it is not loaded (an adapter's files
        read on the engine's thread would hold up every stream), or the adapter, read already."""
        lora = await self._read_adapter(lora)
        streams: list[RequestStream] = []
        rendered = None
        prompts = parsed.batch or [parsed.prompt]
        choices = [(prompt, i) for prompt in prompts for i in range(parsed.n)]
        try:
            for k, (prompt, i) in enumerate(choices):
                params = choice_params(parsed.params, i)
                job = Job(rid if len(choices) == 1 else f"{rid}-{k}", params, parsed.session_id, prompt,
                          parsed.messages, parsed.tools, parsed.chat_options, stream_text=parsed.stream,
                          check_room=check_room,
                          save_to_store=i == 0, add_special_tokens=parsed.add_special_tokens,
                          truncate=truncate, priority=parsed.priority, cache_salt=parsed.cache_salt,
                          lora_request=lora, log_output=log_output)  # fmt: skip
                own_template = parsed.chat_options is not None and parsed.chat_options.template is not None
                if parsed.messages is not None and (own_template or render_aside):
                    if rendered is None:  # a request's own template may run long: in a worker thread, once
                        rendered = await asyncio.to_thread(self.loop.render, job)
                    job.rendered = rendered
                streams.append(self.loop.submit(job, asyncio.get_running_loop()))
            firsts = [await s.get() for s in streams]
            refused = next((k for k, f in enumerate(firsts) if f is not ACCEPTED), None)
            if refused is not None:
                error = as_api_error(firsts[refused])
                if parsed.batch is not None and error.status == 400:  # which prompt of the batch
                    error.param = f"prompt[{refused // parsed.n}]"
                    error.message = f"{error.param}: {error.message}"
                raise error
        except BaseException as e:  # refused, draining, or cancelled (forced shutdown): free the pages
            for s in streams:
                self.loop.abort(s.request_id)
            if isinstance(e, (ServerDraining, ValueError)):  # ValueError: a request's own template refused it
                raise as_api_error(e) from None
            raise
        return streams

    async def _read_adapter(self, lora: LoRARequest | LoRAAdapter | None) -> LoRAAdapter | None:
        """The adapter a request's `model` names, read in a worker thread (400 if it cannot be)."""
        if lora is None or isinstance(lora, LoRAAdapter):
            return lora
        try:
            return await asyncio.to_thread(self.loop.engine.loras.adapter, lora)
        except ValueError as e:
            raise bad(str(e), "model") from None

    async def _search(self, rid: str, parsed: ParsedRequest, check_room: int | None,
                      lora: LoRARequest | None = None) -> list[RequestStream]:  # fmt: skip
        """use_beam_search: the search's first step submitted as any request (one per prompt: its
        prompt rendered, checked and cut as any), the rest run by the search with the same adapter
        object (one unloaded meanwhile is not read again); its choices' streams."""
        first = replace(one_token_params(parsed.beam, parsed.params.logprobs or 0),
                        truncate_prompt_tokens=parsed.params.truncate_prompt_tokens)  # fmt: skip
        adapter = await self._read_adapter(lora)
        try:  # (shutdown waits for the search, not only for the step under way)
            self.loop.hold(rid)
        except (ServerDraining, ValueError) as e:
            raise as_api_error(e) from None
        try:
            firsts = await self._submit(f"{rid}-first", replace(parsed, n=1, params=first), check_room, lora=adapter,
                                        log_output=False)  # fmt: skip
        except BaseException:
            self.loop.release(rid)
            raise
        return self.beams.start(rid, firsts, parsed, adapter)  # (which releases it when the search ends)

    def _abort(self, request_id: str) -> None:
        """Abort a choice's engine request, or cancel the beam search it is a choice of."""
        if not self.beams.cancel(request_id):
            self.loop.abort(request_id)

    async def _collect(self, request: Request, streams: list[RequestStream]) -> list[RequestOutput]:
        watcher = asyncio.create_task(self._abort_on_disconnect(request, [s.request_id for s in streams]))
        outs: list[RequestOutput | None] = [None] * len(streams)

        async def drain(i: int, stream: RequestStream) -> None:
            # every choice read as its outputs come: each carries all its tokens so far, and
            # outputs left queued behind a slower reader would pile up
            while outs[i] is None or not outs[i].finished:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise as_api_error(item)
                outs[i] = item

        drains = [asyncio.create_task(drain(i, s)) for i, s in enumerate(streams)]
        try:
            await asyncio.gather(*drains)  # the first error raises at once
        finally:
            for task in drains:
                task.cancel()
            client_gone = watcher.done() and not watcher.cancelled()
            watcher.cancel()
            for stream, out in zip(streams, outs):
                if out is None or not out.finished:
                    self._abort(stream.request_id)
        if any(out.finish_reason == "abort" for out in outs):
            # 499 (nginx's "client closed request") keeps these apart from shutdown aborts in /metrics
            raise APIError(499, "the client closed the request", "client_closed") if client_gone else aborted_error()
        return outs

    async def _abort_on_disconnect(self, request: Request, request_ids: list[str]) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        for rid in request_ids:
            self._abort(rid)

    async def _events(self, streams: list[RequestStream], fmt: _Format, parsed: ParsedRequest) -> AsyncIterator[str]:
        """The choices' chunks as they come (each tagged with its index), then usage and [DONE]."""
        choices = [_StreamedChoice(i) for i in range(len(streams))]
        merged: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        # a choice's next output is taken from its stream only once its last one was read: a client
        # that stops reading leaves one output per choice waiting (its stream merges the later ones)
        taken = [asyncio.Event() for _ in streams]

        async def pump(i: int, stream: RequestStream) -> None:
            while True:
                item = await stream.get()
                prompt_only = parsed.prompt_only and isinstance(item, RequestOutput)
                merged.put_nowait((i, _prompt_only(item) if prompt_only else item))
                if isinstance(item, BaseException) or item.finished:
                    return
                await taken[i].wait()
                taken[i].clear()

        pumps = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        failed = False
        try:
            if fmt.chat:
                for c in choices:
                    yield fmt.chunk(role=True, index=c.index)
                for c in choices if fmt.chat_echo else ():  # vLLM's echo: the last message's text, once
                    yield fmt.chunk(fmt.chat_echo, index=c.index)
            while not all(c.done for c in choices):
                i, item = await merged.get()
                taken[i].set()
                c = choices[i]
                if isinstance(item, RequestOutput):
                    fmt.progress[i] = item  # continuous usage: the tokens so far
                first = not c.echoed and isinstance(item, RequestOutput) and item.finish_reason != "abort"
                if fmt.echoes is not None and first:
                    c.echoed = True  # the first output: the prompt is computed, its logprobs known
                    yield fmt.echo_chunk(i, item)
                if isinstance(item, BaseException) or item.finish_reason == "abort":
                    failed = True
                    err = aborted_error() if isinstance(item, RequestOutput) else as_api_error(item)
                    yield sse(err.body())
                    break
                if item.finished:
                    c.done, c.out = True, item
                    reasoning, answer, _ = fmt.split(item)
                    if reasoning is not None and reasoning.startswith(c.reasoning_sent):
                        thought = reasoning[len(c.reasoning_sent) :]
                        if thought:
                            yield fmt.chunk(reasoning=thought, logprobs=c.new_logprobs(item), index=i)
                    content, calls = fmt.tool_parser.parse(answer) if fmt.tool_calls else (answer, [])
                    text = (content or "") if calls else answer
                    tail, lps = text[len(c.sent) :], c.new_logprobs(item)
                    if tail or lps:
                        yield fmt.chunk(tail, logprobs=lps, index=i)
                    if calls:
                        yield fmt.tool_calls_chunk(calls, i)
                    reason = fmt.finish_reason(item, bool(calls))
                    yield fmt.chunk(None if fmt.chat else "", finish_reason=reason, index=i, stop_reason=item.stop_reason)
                    continue
                split = fmt.split(item, final=False)
                reasoning, answer = split.reasoning, split.content
                if reasoning is not None:
                    thought = reasoning_delta(split, c.reasoning_sent, parsed.params.stop)
                    if thought:
                        c.reasoning_sent += thought
                        yield fmt.chunk(reasoning=thought, logprobs=c.new_logprobs(item), index=i)
                # with tools, text from a <tool_call> on waits for the end (it may be a call)
                shown = answer[: fmt.tool_parser.plain_text_end(answer)] if fmt.tool_calls else answer
                delta = stream_delta(shown, c.sent, parsed.params.stop)
                if delta:
                    c.sent += delta
                    yield fmt.chunk(delta, logprobs=c.new_logprobs(item), index=i)
            if not failed and fmt.include_usage:
                yield fmt.usage_chunk([c.out for c in choices])
            yield "data: [DONE]\n\n"
        finally:
            for task in pumps:
                task.cancel()
            for c, stream in zip(choices, streams):
                if not c.done:  # the client went away, a sibling failed, or the server cancelled us
                    self._abort(stream.request_id)


def _prompt_only(out: RequestOutput) -> RequestOutput:
    """An echo with max_tokens 0: the output without the token computed alongside the prompt."""
    if out.finish_reason == "abort":
        return out
    return replace(out, token_ids=[], new_token_ids=[], text="", logprobs=None if out.logprobs is None else [],
                   finish_reason="length" if out.finished else None)  # fmt: skip


@dataclass(frozen=True)
class Echo:
    """Completions' echo of one prompt: its text (the client's string, or its ids decoded), whether
    that is the client's string, and how many tokens the tokenizer put before it (a BOS)."""

    text: str
    as_sent: bool
    hidden: int

    @classmethod
    def of(cls, prompt: str | list[int], tok: Tokenizer | None, add_special_tokens: bool) -> Echo:
        if not isinstance(prompt, str):
            return cls(tok.decode(prompt) if tok else "", False, 0)
        return cls(prompt, True, tok.added_prefix(prompt) if add_special_tokens and tok is not None else 0)


@dataclass
class _StreamedChoice:
    """What one streamed choice has sent so far."""

    index: int
    sent: str = ""
    reasoning_sent: str = ""
    logprobs_sent: int = 0
    echoed: bool = False
    done: bool = False
    out: RequestOutput | None = None

    def new_logprobs(self, out: RequestOutput) -> list | None:
        """The logprobs of tokens no chunk carried yet (they go with the next text sent)."""
        if out.logprobs is None:
            return None
        new, self.logprobs_sent = out.logprobs[self.logprobs_sent :], len(out.logprobs)
        return new


def _install_error_handlers(app: FastAPI) -> None:
    async def api_error(_: Request, e: APIError) -> Response:
        return error_response(e.body(), e.status)

    async def validation_error(_: Request, e: RequestValidationError) -> Response:
        errors = e.errors()
        first = errors[0] if errors else {}
        param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        msg = f"{param}: {first.get('msg')}" if param else str(first.get("msg", "invalid request"))
        return error_response(error_body(msg, code="invalid_value", param=param), 400)

    async def http_error(_: Request, e: StarletteHTTPException) -> Response:
        codes = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        body = error_body(str(e.detail), kind, codes.get(e.status_code, str(e.status_code)))
        response = error_response(body, e.status_code)
        response.headers.update(getattr(e, "headers", None) or {})
        return response

    async def unexpected(_: Request, e: Exception) -> Response:
        log.exception("unhandled error", exc_info=e)
        return error_response(error_body("internal server error", "server_error", "internal_error"), 500)

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)


def create_app(
    engine_or_config: LLMEngine | EngineConfig,
    served_model_name: str | Sequence[str] | None = None,
    max_body_bytes: int = 1 << 20,
    body_timeout_s: float = 30.0,
    grace_s: float = DEFAULT_GRACE_S,
    api_keys: Sequence[str] = (),
    allowed_origins: Sequence[str] = ("*",),
    allowed_methods: Sequence[str] = ("*",),
    allowed_headers: Sequence[str] = ("*",),
    allow_credentials: bool = False,
    trust_request_chat_template: bool = False,
    responses_store_bytes: int = DEFAULT_RESPONSES_STORE_BYTES,
    log_requests: bool = False,
    tool_call_format: str = "hermes",
    return_tokens_as_token_ids: bool = False,
    reasoning_parser_name: str | None = None,
    force_include_usage: bool = False,
    root_path: str = "",
    disable_docs: bool = False,
    request_id_headers: bool = False,
    default_chat_template_kwargs: Mapping[str, Any] | None = None,
    lora_modules: Sequence[tuple[str, str]] = (),
    exclude_tools_when_none: bool = False,
    log_outputs: bool = False,
    max_log_len: int | None = None,
) -> FastAPI:
    """A FastAPI app that owns the engine: the engine loop starts with the app and stops (flushing the
    store) with it. `served_model_name`: the names requests may give (answers carry the first). With
    `api_keys`, the /v1 routes answer 401 unless given one of them (vLLM's --api-key). Browsers on
    `allowed_origins` may call it (CORS; any origin by default, as vLLM; none when empty) with those
    methods and headers, and credentials if allowed. `trust_request_chat_template`: a request's own
    chat_template is rendered (in transformers' sandbox), as vLLM's --trust-request-chat-template.
    /v1/responses keeps stored responses (for previous_response_id) within `responses_store_bytes`.
    `tool_call_format`: how the model writes tool calls (hermes, llama3_json, mistral, granite, phi4_mini_json, pythonic, qwen3_coder, openai; vLLM's --tool-call-parser);
    `return_tokens_as_token_ids`: logprob tokens as "token_id:N" (vLLM's flag; also a request field).
    `reasoning_parser_name`: how the model writes its reasoning (qwen3, deepseek_r1, seed_oss, openai_gptoss; vLLM's
    --reasoning-parser): chat answers return it apart from their content. `force_include_usage`: every
    streamed answer ends with its usage (vLLM's --enable-force-include-usage). `root_path`: the path
    prefix a proxy serves the app under (kept in the URL or not, both route); `disable_docs`: no
    /openapi.json either (vLLM's --disable-fastapi-docs; /docs and /redoc are never served).
    `log_requests`: one INFO line per request received (vLLM's --enable-log-requests). `request_id_headers`:
    every answer carries X-Request-Id (vLLM's --enable-request-id-headers); `default_chat_template_kwargs`:
    chat template variables every chat gets unless its own chat_template_kwargs set them (vLLM's
    --default-chat-template-kwargs). `lora_modules`: (name, folder) of each LoRA adapter a request's
    `model` may name (vLLM's --lora-modules; the engine's LoRA enabled), each read at start.
    `exclude_tools_when_none`: a chat whose tool_choice is "none" renders without its tools (vLLM's
    --exclude-tools-when-tool-choice-none). `log_outputs`: one INFO line per request finished, with
    its text, the first `max_log_len` characters of it (vLLM's --enable-log-outputs, --max-log-len)."""
    if not body_timeout_s > 0:
        raise ValueError(f"body_timeout_s must be > 0, got {body_timeout_s}")
    if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int) or max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be a positive integer, got {max_body_bytes!r}")
    if not 0 <= grace_s < math.inf:
        raise ValueError(f"grace_s must be a finite number >= 0, got {grace_s}")
    api_keys = checked_api_keys(api_keys)
    ChatOptions(template_kwargs=default_chat_template_kwargs or {})  # its names checked before the model loads
    names = [served_model_name] if isinstance(served_model_name, str) else list(served_model_name or [])
    if not all(isinstance(n, str) and n.strip() for n in names):
        raise ValueError(f"served model names must be non-empty strings, got {names!r}")
    engine = engine_or_config if isinstance(engine_or_config, LLMEngine) else LLMEngine(engine_or_config)
    if reasoning_parser_name is not None:  # the engine's too: guided answers reason first
        engine.use_reasoning_parser(reasoning_parser_name)
    if engine.spec.model_type == "gpt_oss" and (reasoning_parser_name, tool_call_format) != ("openai_gptoss", "openai"):
        log.warning("gpt-oss answers in harmony: serve it with --reasoning-parser openai_gptoss and "
                    "--tool-call-parser openai, or its chat answers keep their channels as text")  # fmt: skip
    model_names = names or [default_model_name(engine)]
    loras = _lora_modules(engine, lora_modules, model_names)
    metrics = ServerMetrics(model_names[0])
    loop = EngineLoop(engine, on_finished=metrics.observe_finished, log_requests=log_requests,
                      on_first_token=metrics.observe_first_token, on_token=metrics.observe_token,
                      log_outputs=log_outputs, max_log_len=max_log_len)  # fmt: skip
    metrics.registry.register(EngineStatsCollector(loop.stats))
    cache_info = cache_config_info(engine.config.cache, engine.pool.num_pages)
    metrics.registry.register(VLLMStatsCollector(loop.stats, model_names[0], cache_info))
    routes = OpenAIRoutes(loop, metrics, model_names, engine.max_model_len,
                          trust_request_chat_template, named=bool(names),
                          tool_parser=tool_call_parser(tool_call_format),
                          token_ids_as_tokens=return_tokens_as_token_ids,
                          reasoning_parser=engine.reasoning_parser,
                          force_include_usage=force_include_usage,
                          template_defaults=default_chat_template_kwargs, loras=loras,
                          exclude_tools_when_none=exclude_tools_when_none)  # fmt: skip
    if allow_credentials and "*" in allowed_origins:
        log.warning("--allow-credentials with any origin: every web page may call this server with its users' "
                    "cookies; name the origins (--allowed-origins)")  # fmt: skip

    responses = ResponseStore(responses_store_bytes, _responses_file(engine))

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loop.start()
        try:
            yield
        finally:
            await asyncio.to_thread(loop.shutdown, grace_s)
            responses.close()

    app = FastAPI(title="CachedAttention", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None if disable_docs else "/openapi.json")
    app.state.engine_loop = loop
    app.state.metrics = metrics
    app.state.model_name = routes.model_name
    routes.register(app)
    ResponsesRoutes(routes, responses, _shared_responses(engine)).register(app)
    _install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes, timeout_s=body_timeout_s)
    if api_keys:  # outside the body limit: a request without a key is refused before its body is read
        app.add_middleware(ApiKeyMiddleware, keys=api_keys)
    if allowed_origins:  # outside the key check: preflights are answered, and a 401 is readable by the page
        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=list(allowed_methods),
                           allow_headers=list(allowed_headers), allow_credentials=allow_credentials)
    app.add_middleware(RequestCounterMiddleware, metrics=metrics)  # also counts the 413s and 401s
    if request_id_headers:  # outside the others: their own answers (401, 413) carry it too
        app.add_middleware(RequestIdMiddleware)
    if root_path:  # outermost: every layer reads the route path under it (auth.route_path)
        app.add_middleware(RootPathMiddleware, root_path=root_path)
    return app


def _responses_file(engine: LLMEngine) -> Path | None:
    """Stored responses live beside the disk tier, so that a restart continues their conversations."""
    store = engine.config.store
    return Path(store.store_dir) / "responses.db" if engine.store is not None and store.store_dir else None


def _shared_responses(engine: LLMEngine) -> SharedResponses | None:
    """With a remote tier, stored responses are on its server too, for every replica."""
    remote = engine.store.store.remote if engine.store is not None else None
    return SharedResponses(remote.tier) if remote is not None else None


def _lora_field(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value.strip():
        raise bad(f"{name} must be a non-empty string", name, "invalid_type" if value is not None else "missing")
    return value.strip()


def _lora_modules(engine: LLMEngine, modules: Sequence[tuple[str, str]], model_names: list[str]) -> list[LoRARequest]:
    """--lora-modules' adapters as LoRARequests (ids 1, 2, ... in order), each read now: a folder
    that cannot be served stops the start, not its first request."""
    if modules and engine.loras is None:
        raise ValueError("LoRA modules need LoRA enabled (--enable-lora)")
    names = [name for name, _ in modules]
    if len(set(names)) < len(names) or set(names) & {*model_names, "default"}:
        raise ValueError(f"each LoRA module needs a name of its own, not the model's: got {names}")
    loras = [LoRARequest(name, i, path) for i, (name, path) in enumerate(modules, start=1)]
    for lora in loras:  # (past --max-cpu-loras the earliest are let go again, and read when asked for)
        engine.loras.adapter(lora)
    return loras


def _configure_logging(config: dict | None) -> None:
    """This server's log lines as --log-config-file says (uvicorn applies it to its own loggers
    again), or INFO lines on stderr; a configuration logging cannot apply is said before the model loads."""
    if config is None:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        return
    try:
        logging.config.dictConfig(config)
    except (ValueError, TypeError, AttributeError, ImportError) as e:
        raise ValueError(f"--log-config-file: Python's logging cannot apply it: {e}") from None


def serve(args: argparse.Namespace) -> int:
    """`cachedattention serve`: run until SIGTERM/SIGINT, then drain in-flight requests and flush the store."""
    from cachedattention.cli import engine_config

    listening = uvicorn_options(args)  # its files checked before the model loads
    _configure_logging(listening.get("log_config"))
    grace_s = getattr(args, "shutdown_grace_s", None)
    grace_s = DEFAULT_GRACE_S if grace_s is None else float(grace_s)
    keys = api_keys_from(getattr(args, "api_key", None), os.environ)
    engine_cfg = engine_config(args)  # the flags checked first: a usage error is said whatever the port
    if getattr(args, "uds", None) is None:
        check_port_free(args.host, args.port)  # a port in use said now, not once the model has loaded
    app = create_app(engine_cfg, args.served_model_name, args.max_body_bytes, grace_s=grace_s,
                     body_timeout_s=getattr(args, "body_timeout_s", 30.0), api_keys=keys,
                     allowed_origins=getattr(args, "allowed_origins", ("*",)),
                     allowed_methods=getattr(args, "allowed_methods", ("*",)),
                     allowed_headers=getattr(args, "allowed_headers", ("*",)),
                     allow_credentials=getattr(args, "allow_credentials", False),
                     trust_request_chat_template=getattr(args, "trust_request_chat_template", False),
                     responses_store_bytes=getattr(args, "responses_store_bytes", DEFAULT_RESPONSES_STORE_BYTES),
                     tool_call_format=getattr(args, "tool_call_parser", None) or "hermes",
                     return_tokens_as_token_ids=getattr(args, "return_tokens_as_token_ids", False),
                     reasoning_parser_name=getattr(args, "reasoning_parser", None),
                     force_include_usage=getattr(args, "enable_force_include_usage", False),
                     root_path=getattr(args, "root_path", ""),
                     disable_docs=getattr(args, "disable_fastapi_docs", False),
                     log_requests=getattr(args, "enable_log_requests", False),
                     request_id_headers=getattr(args, "enable_request_id_headers", False),
                     default_chat_template_kwargs=getattr(args, "default_chat_template_kwargs", None),
                     lora_modules=getattr(args, "lora_modules", None) or (),
                     exclude_tools_when_none=getattr(args, "exclude_tools_when_tool_choice_none", False),
                     log_outputs=getattr(args, "enable_log_outputs", False),
                     max_log_len=getattr(args, "max_log_len", None))
    loop: EngineLoop = app.state.engine_loop
    config = uvicorn.Config(
        app, host=args.host, port=args.port, lifespan="on",
        # past the grace the engine aborts what runs, and each handler answers so; only after that margin
        # does uvicorn cancel the handlers (a cancelled one answers a bare 500, or cuts its stream)
        timeout_graceful_shutdown=int(math.ceil(grace_s + ABORT_ANSWER_S)),
        log_level=getattr(args, "uvicorn_log_level", None),  # None: uvicorn's own (info)
        **listening,
    )
    quiet_endpoints(getattr(args, "disable_access_log_for_endpoints", ()), getattr(args, "root_path", ""))
    try:
        return run_until_signal(_DrainingServer(config, loop, grace_s))
    finally:
        loop.shutdown(0.0)  # no-op after the lifespan shutdown; after a forced exit it still flushes the store


class _DrainingServer(uvicorn.Server):
    """uvicorn.Server that, on SIGTERM/SIGINT, first makes new requests answer 503, then shuts down as usual.

    uvicorn stops listening at once, so a new connection is refused; the 503 reaches requests that
    arrive on connections already open (keep-alive), while the in-flight ones finish."""

    def __init__(self, config: uvicorn.Config, loop: EngineLoop, grace_s: float) -> None:
        super().__init__(config)
        self.engine_loop = loop
        self.grace_s = grace_s
        self._abort_timer: threading.Timer | None = None

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.engine_loop.begin_drain()
        if self._abort_timer is None:  # the first signal starts the grace period; a second one forces exit
            # the requests still running when it ends are aborted here, not by uvicorn's cancelling
            # their handlers (at grace + ABORT_ANSWER_S), so that each client is told why
            self._abort_timer = threading.Timer(self.grace_s, self.engine_loop.abort_in_flight)
            self._abort_timer.daemon = True
            self._abort_timer.start()
        super().handle_exit(sig, frame)
