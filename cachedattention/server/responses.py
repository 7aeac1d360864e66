"""OpenAI's Responses API: POST /v1/responses (streamed or not), GET and DELETE /v1/responses/{id}.

A stored response (`store`, true by default) keeps its conversation on the server; a request that
names it in `previous_response_id` sends only what is new, and its turn runs in the same session
of the KV store as the turns before it: the conversation's history is not computed again.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
import weakref
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from cachedattention.model.tokenizer import Tokenizer
from cachedattention.outputs import RequestOutput
from cachedattention.server.api_error import APIError, aborted_error, as_api_error, bad
from cachedattention.server.logprobs import LogprobFormatter
from cachedattention.server.protocol import ParsedRequest, parse_json_object
from cachedattention.server.reasoning import Reasoning, Split, reasoning_delta, split_answer
from cachedattention.server.responses_request import (
    ResponsesRequest,
    in_responses_terms,
    previous_id,
    read_request,
    trim_conversation,
)
from cachedattention.server.responses_store import ResponseStore, SharedResponses, StoredResponse
from cachedattention.server.stream_text import stream_delta
from cachedattention.server.tool_calls import ToolCall, ToolCallParser, for_request

if TYPE_CHECKING:
    from cachedattention.server.app import OpenAIRoutes


LOCAL_ONLY_PRUNE = 4096  # ids of responses not shared, past which those no longer stored are forgotten
# an "auto" conversation's stored text is kept within this many bytes per token of the window (about
# eight windows of text): the engine keeps only the latest window of it anyway
CONVERSATION_BYTES_PER_TOKEN = 32


def _not_found(response_id: str, param: str | None = None) -> APIError:
    return APIError(404, f"Response with id {response_id!r} not found.", "not_found", param)


def _room(parsed: ParsedRequest, truncation: str) -> int | None:
    """The answer's length that must fit in the window after the prompt (None: no check)."""
    if parsed.session_id is None:
        return parsed.max_tokens_asked  # as chat: the prompt and the length asked for must fit
    if truncation == "disabled":
        return parsed.max_tokens_asked or 1  # the whole conversation must fit, with room to answer
    return None  # "auto": the store drops the session's oldest turns to fit


class _Answer:
    """One response object for one engine request: its output items, status and usage."""

    def __init__(self, rid: str, model: str, req: ResponsesRequest, parsed: ParsedRequest,
                 tokenizer: Tokenizer | None, tool_parser: ToolCallParser,
                 reasoning: Reasoning | None = None) -> None:  # fmt: skip
        self.id, self.model, self.req, self.parsed = rid, model, req, parsed
        self.tool_parser = tool_parser
        self.created_at = int(time.time())
        self.message_id = f"msg_{uuid.uuid4().hex}"
        self.tokenizer = tokenizer
        self.logprobs = parsed.params.logprobs is not None
        self.reasoning = reasoning  # with --reasoning-parser: the thinking, an output item of its own
        self.reasoning_id = f"rs_{uuid.uuid4().hex}"

    def thinking(self, out: RequestOutput, final: bool = True) -> Split:
        """The answer's reasoning (None: none) and the rest of its text."""
        return split_answer(self.reasoning, out, self.tokenizer, final)

    def reasoning_tokens(self, out: RequestOutput) -> int:
        return self.reasoning.tokens(out, self.tokenizer) if self.reasoning is not None else 0

    def split(self, out: RequestOutput) -> tuple[str | None, list[ToolCall]]:
        """The answer's text after its reasoning and its tool calls (when tools may be called; with
        parallel_tool_calls false, the first one only, as OpenAI promises at most one)."""
        text = self.thinking(out).content
        if not self.parsed.parse_tool_calls:
            return text, []
        text, calls = self.tool_parser.parse(text)
        return text, calls if self.req.echo["parallel_tool_calls"] else calls[:1]

    def reasoning_item(self, text: str, status: str) -> dict[str, Any]:
        return {"type": "reasoning", "id": self.reasoning_id, "status": status, "summary": [],
                "content": [{"type": "reasoning_text", "text": text}] if text else []}  # fmt: skip

    def logprob_entries(self, logprobs: list | None) -> list[dict[str, Any]]:
        if not self.logprobs or not logprobs:
            return []
        return LogprobFormatter(self.tokenizer, chat=True).render(logprobs)["content"]

    def text_part(self, text: str, logprobs: list | None) -> dict[str, Any]:
        part: dict[str, Any] = {"type": "output_text", "text": text, "annotations": []}
        if self.logprobs:
            part["logprobs"] = self.logprob_entries(logprobs)
        return part

    def message(self, text: str, logprobs: list | None, status: str) -> dict[str, Any]:
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant",
                "content": [self.text_part(text, logprobs)]}  # fmt: skip

    @staticmethod
    def call_item(call: ToolCall) -> dict[str, Any]:
        return {"type": "function_call", "id": f"fc_{call.id.removeprefix('call_')}", "call_id": call.id,
                "name": call.name, "arguments": call.arguments, "status": "completed"}  # fmt: skip

    def output(self, out: RequestOutput) -> list[dict[str, Any]]:
        reasoning, _, closed = self.thinking(out)
        text, calls = self.split(out)
        status = "incomplete" if out.finish_reason == "length" else "completed"
        items = [self.reasoning_item(reasoning, "completed" if closed else status)] if reasoning else []
        logprobs = out.logprobs[self.reasoning_tokens(out) :] if out.logprobs is not None else None  # the text's own
        if not calls and not (reasoning and not text):  # an answer cut in its reasoning has no message
            items.append(self.message(text or "", logprobs, status))
        elif text and text.strip():  # a reply that only calls tools (after blank text) has no message
            items.append(self.message(text, None, status))
        return items + [self.call_item(c) for c in calls]

    def assistant_turn(self, out: RequestOutput) -> dict[str, Any]:
        """The answer as the chat message the next turn's conversation holds (its reasoning as
        `reasoning_content`, which reasoning models' templates read)."""
        reasoning, rest, _ = self.thinking(out)
        text, calls = self.split(out)
        turn: dict[str, Any] = {"role": "assistant", "content": rest if not calls else text or ""}
        if reasoning:
            turn["reasoning_content"] = reasoning
        if calls:
            turn["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name,
                                   "arguments": c.arguments}} for c in calls]  # fmt: skip
        return turn

    def usage(self, out: RequestOutput) -> dict[str, Any]:
        prompt, answer = out.metrics.prompt_tokens, len(out.token_ids)
        return {"input_tokens": prompt, "input_tokens_details": out.metrics.cached_details(),
                "output_tokens": answer, "output_tokens_details": {"reasoning_tokens": self.reasoning_tokens(out)},
                "total_tokens": prompt + answer}  # fmt: skip

    def body(self, out: RequestOutput | None, status: str = "in_progress",
             error: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
        """The response object: without `out`, as `status` says (in progress, queued, or a
        background response cancelled or failed), or finished with `out`."""
        params = self.parsed.params
        body: dict[str, Any] = {
            "id": self.id, "object": "response", "created_at": self.created_at, "model": self.model,
            "status": status, "error": error, "incomplete_details": None, "output": [], "usage": None,
            **self.req.echo, "store": self.req.store, "temperature": params.temperature, "top_p": params.top_p,
            "service_tier": "default",
        }  # fmt: skip
        if out is not None:
            incomplete = out.finish_reason == "length"
            body.update(status="incomplete" if incomplete else "completed", output=self.output(out),
                        usage=self.usage(out),
                        incomplete_details={"reason": "max_output_tokens"} if incomplete else None)  # fmt: skip
        return body


class ResponsesRoutes:
    """The Responses API over the chat routes' engine requests."""

    def __init__(self, routes: OpenAIRoutes, store: ResponseStore, shared: SharedResponses | None = None) -> None:
        self.routes = routes
        self.store = store
        self.shared = shared  # with a remote tier: responses stored there too, for every replica
        self._local_only: set[str] = set()  # stored here, but not on the remote tier's server (its writes failed)
        self._background: dict[str, _Background] = {}  # background responses still being generated here
        # responses created here whose answer is not stored yet: an entry leaves when the task that
        # stores it ends, or with the answer itself (a stream whose client left before it started)
        self._unstored: weakref.WeakValueDictionary[str, _Answer] = weakref.WeakValueDictionary()

    def register(self, app: Any) -> None:
        app.add_api_route("/v1/responses", self.create, methods=["POST"])
        app.add_api_route("/v1/responses/{response_id}", self.retrieve, methods=["GET"])
        app.add_api_route("/v1/responses/{response_id}", self.delete, methods=["DELETE"])
        app.add_api_route("/v1/responses/{response_id}/input_items", self.input_items, methods=["GET"])
        app.add_api_route("/v1/responses/{response_id}/cancel", self.cancel, methods=["POST"])

    async def retrieve(self, response_id: str) -> dict[str, Any]:
        running = self._background.get(response_id)
        if running is not None:  # a background response still being generated: as it stands
            return running.answer.body(None)
        stored = await self._lookup(response_id)
        if stored is None:
            raise _not_found(response_id)
        return stored.body

    async def input_items(self, response_id: str, request: Request) -> dict[str, Any]:
        """The stored response's input items, a page at a time (OpenAI's after, limit, order)."""
        stored = await self._lookup(response_id)
        if stored is None:
            raise _not_found(response_id)
        query = request.query_params
        order = query.get("order", "desc")
        if order not in ("asc", "desc"):
            raise bad("order must be 'asc' or 'desc'", "order")
        limit = query.get("limit", "20")
        if not (limit.isascii() and limit.isdigit() and 1 <= int(limit) <= 100):
            raise bad("limit must be an integer from 1 to 100", "limit")
        items = list(stored.input_items)[:: 1 if order == "asc" else -1]
        start = 0
        if "after" in query:
            start = next((i + 1 for i, item in enumerate(items) if item.get("id") == query["after"]), -1)
            if start < 0:
                raise bad(f"after: {query['after']!r} is not an input item of this response", "after")
        page = items[start : start + int(limit)]
        return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": start + int(limit) < len(items)}  # fmt: skip

    def _in_progress(self, response_id: str) -> bool:
        """Still being generated on this replica (streamed, awaited or in the background), or
        generated and not stored yet (its engine request has ended; its answer is being stored)."""
        return (response_id in self._unstored or response_id in self._background
                or self.routes.loop.in_progress(response_id))  # fmt: skip

    async def delete(self, response_id: str) -> dict[str, Any]:
        if self._in_progress(response_id):  # (deleted now, it would be stored when it ends)
            raise APIError(409, f"Response {response_id!r} is still in progress: delete it once it has finished "
                           "(a background one can be cancelled first).", "response_in_progress")  # fmt: skip
        held = False
        if self.shared is not None:
            try:
                held = await asyncio.to_thread(self.shared.delete, response_id)
            except OSError:
                raise APIError(503, "the shared store of responses cannot be reached: the response was not deleted; "
                               "retry", "store_unavailable", type_="server_error") from None  # fmt: skip
        self._local_only.discard(response_id)
        if not (self.store.delete(response_id) or held):
            raise _not_found(response_id)
        return {"id": response_id, "object": "response", "deleted": True}

    async def _lookup(self, response_id: str) -> StoredResponse | None:
        """The stored response. With a remote tier, the server's copy counts (any replica may have
        stored it, or deleted it); this replica's own serves while the server cannot be reached, and
        for responses whose sharing failed."""
        if self.shared is None:
            return self.store.get(response_id)
        try:
            shared = await asyncio.to_thread(self.shared.get, response_id)
        except OSError:
            return self.store.get(response_id)
        if shared is not None:
            self.store.put(response_id, shared)
            self._local_only.discard(response_id)
            return shared
        if response_id in self._local_only:
            return self.store.get(response_id)
        self.store.delete(response_id)  # deleted (or evicted) on the server: gone for every replica
        return None

    async def _keep(self, response_id: str, stored: StoredResponse) -> None:
        self.store.put(response_id, stored)
        # shared before the client has the response: its next request may go to any replica
        if self.shared is not None and not await asyncio.to_thread(self.shared.put, response_id, stored):
            self._local_only.add(response_id)
            if len(self._local_only) > LOCAL_ONLY_PRUNE:
                self._local_only = {rid for rid in self._local_only if rid in self.store}

    async def create(self, request: Request) -> Response:
        routes = self.routes
        body = parse_json_object(await request.body())
        prev_id = previous_id(body)
        prev = await self._lookup(prev_id) if prev_id is not None else None
        if prev_id is not None and self._in_progress(prev_id):
            raise APIError(400, f"Response {prev_id!r} is still in progress: continue it once it has finished.",
                           "invalid_value", "previous_response_id")  # fmt: skip
        if prev_id is not None and prev is None:
            raise _not_found(prev_id, "previous_response_id")
        req = read_request(body, prev.conversation if prev else [], reasons=routes.reasoning_parser is not None)
        try:  # in a worker thread, as chat's: a large schema or grammar compiles there
            parsed = await asyncio.to_thread(routes.chat_parser(), req.chat_body, request.headers.get("x-session-id"),
                                             routes.max_model_len, routes.loop.engine.sampling_defaults)  # fmt: skip
        except APIError as e:
            raise in_responses_terms(e) from None
        lora = routes.check_model(parsed.model)
        rid = f"resp_{uuid.uuid4().hex}"
        # the conversation's turns share one session of the KV store: the one it started in ("auto"
        # truncation needs one even for a response that is not stored)
        auto = req.truncation == "auto"
        session = parsed.session_id or (prev.session_id if prev else None) or (rid if req.store or auto else None)
        parsed = routes.keep_tags(replace(parsed, session_id=session))
        streams = await routes._submit(rid, parsed, _room(parsed, req.truncation), truncate=auto, render_aside=True,
                                       lora=lora)  # fmt: skip
        answer = _Answer(rid, routes.answer_model(lora), req, parsed, routes.loop.engine.tokenizer,
                         for_request(routes.tool_parser, parsed.tools),
                         routes.reasoning_of(parsed))
        self._unstored[rid] = answer
        if parsed.stream:
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            events = self._events(streams[0], answer, prev)
            return StreamingResponse(events, media_type="text/event-stream", headers=headers)
        if req.echo["background"]:
            running = self._background[rid] = _Background(answer, streams[0])
            running.task = asyncio.create_task(self._run_background(running, prev))
            return JSONResponse(answer.body(None, status="queued"))
        try:
            (out,) = await routes._collect(request, streams)
            return JSONResponse(await self._finish(answer, out, prev))
        finally:
            self._unstored.pop(rid, None)

    async def _run_background(self, running: _Background, prev: StoredResponse | None) -> None:
        """Generate a background response to its end, then store it: completed (or incomplete),
        cancelled, or failed with the error."""
        answer, stream = running.answer, running.stream
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    err = as_api_error(item)
                    failed = answer.body(None, status="failed", error={"code": err.code, "message": err.message})
                    await self._keep(answer.id, self._stored(answer, failed, prev))
                    return
                if item.finish_reason == "abort":
                    status = "cancelled" if running.cancelled else "failed"
                    error = None if running.cancelled else {"code": "server_error", "message": "the server stopped"}
                    await self._keep(answer.id, self._stored(answer, answer.body(None, status=status, error=error), prev))
                    return
                if item.finished:
                    await self._finish(answer, item, prev)
                    return
        finally:
            self._background.pop(answer.id, None)
            self._unstored.pop(answer.id, None)

    @staticmethod
    def _stored(answer: _Answer, body: dict[str, Any], prev: StoredResponse | None) -> StoredResponse:
        """A background response that ended without an answer: kept so its id reads back, and its
        conversation (the one it continued, and its input) goes on from it."""
        conversation = (prev.conversation if prev else []) + answer.req.input_messages
        return StoredResponse(body, conversation, answer.parsed.session_id, tuple(answer.req.items))

    async def cancel(self, response_id: str) -> dict[str, Any]:
        """Stop a background response still being generated (OpenAI's cancel); one that has ended is
        returned as it is."""
        running = self._background.get(response_id)
        if running is not None:
            running.cancelled = True
            self.routes.loop.abort(running.stream.request_id)
            await asyncio.shield(running.task)
        stored = await self._lookup(response_id)
        if stored is None:
            raise _not_found(response_id)
        if not stored.body.get("background"):
            raise APIError(400, "Only a background response can be cancelled.", "invalid_value")
        return stored.body

    async def _finish(self, answer: _Answer, out: RequestOutput, prev: StoredResponse | None) -> dict[str, Any]:
        body = answer.body(out)
        if answer.req.store:
            history = prev.conversation if prev else []
            conversation = history + answer.req.input_messages + [answer.assistant_turn(out)]
            if answer.req.truncation == "auto":  # the engine cuts the prompt to fit; the stored text is bounded too
                conversation = trim_conversation(conversation, CONVERSATION_BYTES_PER_TOKEN * self.routes.max_model_len)
            stored = StoredResponse(body, conversation, answer.parsed.session_id, tuple(answer.req.items))
            await self._keep(answer.id, stored)
        return body

    async def _events(self, stream: Any, answer: _Answer, prev: StoredResponse | None) -> AsyncIterator[str]:
        """Server-sent events as OpenAI's: created, in_progress, the message's text deltas, each
        output item done, then completed (or incomplete); an error event if the request fails."""
        events = _EventWriter()
        yield events.send("response.created", response=answer.body(None))
        yield events.send("response.in_progress", response=answer.body(None))
        text = _StreamedText(answer, events)
        done = False
        try:
            while not done:
                item = await stream.get()
                if isinstance(item, BaseException) or item.finish_reason == "abort":
                    err = aborted_error() if isinstance(item, RequestOutput) else as_api_error(item)
                    yield events.send("error", code=err.code, message=err.message, param=err.param)
                    return
                done = item.finished
                if not done:
                    for event in text.progress(item):
                        yield event
            body = await self._finish(answer, item, prev)
            self._unstored.pop(answer.id, None)  # (stored: deletable, while its last events go out)
            for event in text.finish(body, item):
                yield event
            first_call = sum(o["type"] != "function_call" for o in body["output"])
            for event in _call_events(events, body, first_index=first_call):
                yield event
            kind = "response.incomplete" if body["status"] == "incomplete" else "response.completed"
            yield events.send(kind, response=body)
        finally:
            self._unstored.pop(answer.id, None)
            if not done:  # the client went away, or the server is cancelling us
                self.routes.loop.abort(stream.request_id)


class _Background:
    """A background response being generated: its answer, the engine's stream, the task reading it."""

    def __init__(self, answer: _Answer, stream: Any) -> None:
        self.answer, self.stream = answer, stream
        self.task: asyncio.Task | None = None
        self.cancelled = False


class _StreamedText:
    """The message item's events as its text grows (after the reasoning item's, when the answer
    reasons): opened at the first text that is surely not a tool call, then deltas (with their
    tokens' logprobs), then its done events."""

    def __init__(self, answer: _Answer, events: _EventWriter) -> None:
        self.answer, self.events = answer, events
        self.thought = _StreamedThought(answer, events)
        self.sent, self.opened, self.logprobs_sent = "", False, 0
        self.ids = {"item_id": answer.message_id, "output_index": 0, "content_index": 0}

    def progress(self, out: RequestOutput) -> list[str]:
        split = self.answer.thinking(out, final=False)
        events = self.thought.progress(split)
        text = split.content
        if self.answer.parsed.parse_tool_calls:  # from a <tool_call> on, text waits for the end (it may be a call)
            text = text[: self.answer.tool_parser.plain_text_end(text)]
            if not text.strip():
                return events  # blank text before a call is no message
        return events + self._send(stream_delta(text, self.sent, self.answer.parsed.params.stop), out)

    def finish(self, body: dict[str, Any], out: RequestOutput) -> list[str]:
        events = self.thought.finish(body)
        message = next((o for o in body["output"] if o["type"] == "message"), None)
        if message is None:
            return events
        part = message["content"][0]
        tail = part["text"][len(self.sent) :] if part["text"].startswith(self.sent) else ""
        events += self._send(tail, out, force=True)
        send, index = self.events.send, self.ids["output_index"]
        events.append(send("response.output_text.done", **self.ids, text=part["text"], logprobs=part.get("logprobs", [])))
        events.append(send("response.content_part.done", **self.ids, part=part))
        events.append(send("response.output_item.done", output_index=index, item=message))
        return events

    def _send(self, delta: str, out: RequestOutput, force: bool = False) -> list[str]:
        events = []
        if not self.opened and (delta or force):
            self.opened = True
            self.ids["output_index"] = int(self.thought.opened)  # after the reasoning item
            self.logprobs_sent = self.answer.reasoning_tokens(out)  # the reasoning's tokens are not the text's
            item = {**self.answer.message("", None, "in_progress"), "content": []}
            events.append(self.events.send("response.output_item.added", output_index=self.ids["output_index"],
                                           item=item))  # fmt: skip
            part = self.answer.text_part("", [])
            events.append(self.events.send("response.content_part.added", **self.ids, part=part))
        if delta:
            new = (out.logprobs or [])[self.logprobs_sent :]
            self.logprobs_sent += len(new)
            self.sent += delta
            lps = self.answer.logprob_entries(new)
            events.append(self.events.send("response.output_text.delta", **self.ids, delta=delta, logprobs=lps))
        return events


class _StreamedThought:
    """The reasoning item's events (output index 0): opened at its first text, deltas, and done as
    soon as </think> closes it (before the message's events begin)."""

    def __init__(self, answer: _Answer, events: _EventWriter) -> None:
        self.answer, self.events = answer, events
        self.sent, self.opened, self.done = "", False, False
        self.ids = {"item_id": answer.reasoning_id, "output_index": 0, "content_index": 0}

    def progress(self, split: Split) -> list[str]:
        if not split.reasoning or self.done:
            return []
        events = self._send(reasoning_delta(split, self.sent, self.answer.parsed.params.stop))
        if split.closed and self.opened:
            events += self._finish(self.answer.reasoning_item(split.reasoning, "completed"))
        return events

    def finish(self, body: dict[str, Any]) -> list[str]:
        item = next((o for o in body["output"] if o["type"] == "reasoning"), None)
        if item is None or self.done:
            return []
        text = item["content"][0]["text"]
        return self._send(text[len(self.sent) :] if text.startswith(self.sent) else "", force=True) + self._finish(item)

    def _finish(self, item: dict[str, Any]) -> list[str]:
        self.done = True
        send = self.events.send
        text = item["content"][0]["text"]
        return [send("response.reasoning_text.done", **self.ids, text=text),
                send("response.content_part.done", **self.ids, part=item["content"][0]),
                send("response.output_item.done", output_index=0, item=item)]  # fmt: skip

    def _send(self, delta: str, force: bool = False) -> list[str]:
        events = []
        if not self.opened and (delta or force):
            self.opened = True
            item = self.answer.reasoning_item("", "in_progress")
            events.append(self.events.send("response.output_item.added", output_index=0, item=item))
            part = {"type": "reasoning_text", "text": ""}
            events.append(self.events.send("response.content_part.added", **self.ids, part=part))
        if delta:
            self.sent += delta
            events.append(self.events.send("response.reasoning_text.delta", **self.ids, delta=delta))
        return events


def _call_events(events: _EventWriter, body: dict[str, Any], first_index: int) -> list[str]:
    """Each function call in the output, whole: added, its arguments, done."""
    out = []
    calls = [o for o in body["output"] if o["type"] == "function_call"]
    for index, call in enumerate(calls, first_index):
        out.append(events.send("response.output_item.added", output_index=index,
                               item={**call, "arguments": "", "status": "in_progress"}))  # fmt: skip
        ids = {"item_id": call["id"], "output_index": index}
        out.append(events.send("response.function_call_arguments.delta", **ids, delta=call["arguments"]))
        out.append(events.send("response.function_call_arguments.done", **ids, arguments=call["arguments"],
                               name=call["name"]))  # fmt: skip
        out.append(events.send("response.output_item.done", output_index=index, item=call))
    return out


class _EventWriter:
    """Numbered server-sent events: `event: TYPE` and a JSON body with the type and sequence number."""

    def __init__(self) -> None:
        self.sequence = 0

    def send(self, kind: str, **fields: Any) -> str:
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"
