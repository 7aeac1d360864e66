"""The background thread that owns the (not thread-safe) engine: it takes new requests and aborts from a queue
between steps, steps every running request as one batch, and hands outputs to per-request asyncio queues."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from cachedattention.engine.engine import LLMEngine
from cachedattention.errors import InvalidRequest
from cachedattention.lora.adapter import LoRAAdapter
from cachedattention.lora.request import LoRARequest
from cachedattention.model.messages import ChatOptions
from cachedattention.model.tokenizer import Kept
from cachedattention.outputs import RequestOutput
from cachedattention.sampling import SamplingParams

log = logging.getLogger(__name__)

ACCEPTED = "accepted"  # first event of a stream: the engine took the request
_STOP = object()
IDLE_REFRESH_S = 0.5


class ServerDraining(Exception):
    """New requests are refused: the server is shutting down."""


@dataclass
class Job:
    """One request for the engine: exactly one of prompt / messages (rendered on the engine thread)."""

    request_id: str
    params: SamplingParams
    session_id: str | None = None
    prompt: str | list[int] | None = None
    messages: list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None  # function definitions for the chat template
    chat_options: ChatOptions | None = None  # continue the last message, template variables
    stream_text: bool = False
    # the prompt plus max_tokens must fit the window (as in vLLM), the length asked for (before the model's
    # generation config bounds it); None: no check (a session then drops old history to fit)
    check_room: int | None = None
    save_to_store: bool = True  # n > 1: only the first choice saves its KV (the prompt's is the same)
    truncate: bool = True  # False: a session's conversation is served whole (the Responses API's truncation "disabled")
    priority: int = 0  # vLLM's: the request's place under --scheduling-policy priority (lower first)
    cache_salt: str | None = None  # vLLM's: cached KV is shared only with requests of the same salt
    # the LoRA adapter its `model` names, or that adapter read already (None: the base model)
    lora_request: LoRARequest | LoRAAdapter | None = None
    add_special_tokens: bool = True  # a text prompt gets the tokenizer's own around it (Llama's BOS)
    # the messages already rendered (a request's own chat template: off the engine thread) and what
    # truncation keeps of them (its head and its newest turn)
    rendered: tuple[list[int], Kept] | None = None
    log_output: bool = True  # --enable-log-outputs logs it when it finishes (a beam search's steps: no)


def describe(job: Job) -> str:
    """The request log's line (--enable-log-requests): what was asked, not the prompt's text."""
    if job.messages is not None:
        prompt = f"{len(job.messages)} message(s)"
    elif isinstance(job.prompt, str):
        prompt = f"a prompt of {len(job.prompt)} characters"
    else:
        prompt = f"a prompt of {len(job.prompt or ())} tokens"
    return (f"received request {job.request_id}: session {job.session_id or '-'}, {prompt}, "
            f"max_tokens {job.params.max_tokens}, {'streamed' if job.stream_text else 'not streamed'}")


class RequestStream:
    """Events of one request, filled from the engine thread, read on the event loop.

    Events: ACCEPTED, then RequestOutputs (the last one finished); or one exception instead
    (ValueError: the request was invalid; anything else: a server fault). An output not read yet
    is replaced by the next one, which holds all it did (its new tokens joined): a reader that
    falls behind (a client that stops reading its stream) holds one output, not one per step.
    """

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.request_id = request_id
        self._loop = loop
        self._items: deque[Any] = deque()
        self._ready = asyncio.Event()

    def put(self, item: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._push, item)
        except RuntimeError:  # the event loop is closed: nobody listens any more
            pass

    def _push(self, item: Any) -> None:
        last = self._items[-1] if self._items else None
        if isinstance(item, RequestOutput) and isinstance(last, RequestOutput):
            self._items[-1] = replace(item, new_token_ids=last.new_token_ids + item.new_token_ids)
        else:
            self._items.append(item)
        self._ready.set()

    async def get(self) -> Any:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()


def _resolve(future: asyncio.Future, result: Any) -> None:
    """Settle an event-loop future from the engine thread: its result, or the exception given."""

    def settle() -> None:
        if future.done():
            return
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)

    try:
        future.get_loop().call_soon_threadsafe(settle)
    except RuntimeError:  # the event loop is closed: nobody waits any more
        pass


class EngineLoop:
    def __init__(self, engine: LLMEngine, on_finished: Callable[[RequestOutput], None] | None = None,
                 log_requests: bool = False, on_first_token: Callable[[RequestOutput], None] | None = None,
                 on_token: Callable[[RequestOutput], None] | None = None, log_outputs: bool = False,
                 max_log_len: int | None = None) -> None:  # fmt: skip
        self.engine = engine
        self._on_finished = on_finished
        self._on_first_token = on_first_token  # TTFT is observed when it happens, as vLLM's, not at finish
        self._on_token = on_token  # each output with new tokens (inter-token latencies, as they happen)
        self._first_seen: set[str] = set()  # running requests whose first token was observed (engine thread)
        self.log_requests = log_requests  # vLLM's --enable-log-requests: one INFO line per request received
        # vLLM's --enable-log-outputs: one INFO line per request finished, with its text (the first
        # max_log_len characters of it, --max-log-len)
        self.log_outputs = log_outputs
        self.max_log_len = max_log_len
        self._unlogged: set[str] = set()  # running requests whose outputs are not logged (a beam search's steps)
        self._cmds: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}  # engine thread only
        self._cond = threading.Condition()
        self._active: set[str] = set()  # submitted, not yet finished (guarded by _cond)
        self._accepting = True
        self._closed = False
        self._stopped = False  # the engine's thread has stopped: nothing more is taken (guarded by _cond)
        self._aborting = False  # abort_in_flight was called: no follow-up is taken (guarded by _cond)
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._stats: dict[str, Any] = self._read_stats()

    # -- event-loop side ------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    @property
    def accepting(self) -> bool:
        return self._accepting

    def in_progress(self, request_id: str) -> bool:
        """Whether a request submitted under this id has not finished yet."""
        with self._cond:
            return request_id in self._active

    def submit(self, job: Job, loop: asyncio.AbstractEventLoop, follow_up: bool = False) -> RequestStream:
        """`follow_up`: a later step of a request in progress (a beam search's), taken while the
        server drains, until the engine's thread stops."""
        stream = RequestStream(job.request_id, loop)
        with self._cond:
            if self._stopped or not (self._accepting or (follow_up and not self._aborting)):
                raise ServerDraining("the server is shutting down and takes no new requests")
            if job.request_id in self._active:  # a client's request_id given twice: the first keeps it
                raise InvalidRequest(f"request id {job.request_id!r} is already in use by a request in progress",
                                     "request_id")  # fmt: skip
            self._active.add(job.request_id)
            if not job.log_output:  # (under the lock, as _settle takes it away)
                self._unlogged.add(job.request_id)
            # (under the lock: a command put once the thread stopped would never be answered)
            self._cmds.put(("add", job, stream))
        if self.log_requests:
            log.info("%s", describe(job))
        return stream

    def hold(self, request_id: str) -> None:
        """A request in progress between its engine requests (a beam search's steps): shutdown waits
        for it as for any, and its id is taken until `release`. ServerDraining when draining."""
        with self._cond:
            if self._stopped or not self._accepting:
                raise ServerDraining("the server is shutting down and takes no new requests")
            if request_id in self._active:
                raise InvalidRequest(f"request id {request_id!r} is already in use by a request in progress",
                                     "request_id")  # fmt: skip
            self._active.add(request_id)

    def release(self, request_id: str) -> None:
        self._settle(request_id)

    def abort(self, request_id: str) -> None:
        """Stop a request and free its pages (no-op when it already finished)."""
        with self._cond:
            if request_id not in self._active:
                return
        self._cmds.put(("abort", request_id))

    def forget_session(self, session_id: str, cache_salt: str | None = None,
                       lora_request: LoRARequest | None = None) -> asyncio.Future:  # fmt: skip
        """Forget a session (of that cache salt and LoRA adapter) on the engine's thread (its page pool is that
        thread's); the future resolves to whether it was held, or to the engine's error."""
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        if not self._accepting:
            raise ServerDraining("the server is shutting down")
        self._cmds.put(("forget", session_id, future, cache_salt, lora_request))
        return future

    def stats(self) -> dict[str, Any]:
        """The engine's stats as of the last step (a snapshot: reading the engine here would race)."""
        return self._stats

    def begin_drain(self) -> None:
        # no lock: this runs inside a signal handler, and a plain assignment is atomic
        self._accepting = False

    def abort_in_flight(self) -> None:
        """Abort every running and queued request (on the engine's thread): each answers as aborted
        (503 `request_aborted`, a stream's error event), while its handler is still there to say so;
        a request between its engine requests (a beam search's steps) is refused its next one."""
        with self._cond:
            self._aborting = True
        self._cmds.put(("abort_all",))

    def shutdown(self, grace_s: float) -> None:
        """Refuse new requests, let in-flight ones finish for up to grace_s, abort the rest, flush the store."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._accepting = False
            if self._thread.is_alive():
                if not self._cond.wait_for(lambda: not self._active, timeout=grace_s):
                    log.warning("grace period over: aborting %d in-flight request(s)", len(self._active))
        if self._thread.is_alive():
            self._cmds.put(_STOP)  # the thread aborts what is left, then exits
            self._thread.join()
        self.engine.close()  # flushes pending store saves to disk

    # -- engine thread --------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                idle = not self.engine.has_unfinished()
                if not self._handle_commands(block=idle):
                    break
                if self.engine.has_unfinished():
                    self._step()
                self._stats = self._read_stats()
        except BaseException:  # a bug: fail everything rather than leave clients hanging
            log.exception("engine loop crashed")
        finally:
            with self._cond:
                self._accepting = False  # nobody would serve a new request now
                self._stopped = True
            self._abort_all()
            self._fail_queued()
            self._stats = self._read_stats()

    def _handle_commands(self, block: bool) -> bool:
        """Apply queued adds/aborts; False once asked to stop."""
        try:
            # idle: wake now and then anyway, so the stats snapshot follows the store's background saves
            cmd = self._cmds.get(timeout=IDLE_REFRESH_S) if block else self._cmds.get_nowait()
        except queue.Empty:
            return True
        while True:
            if cmd is _STOP:
                return False
            if cmd[0] == "add":
                self._add(cmd[1], cmd[2])
            elif cmd[0] == "forget":
                self._forget(*cmd[1:])
            elif cmd[0] == "abort_all":
                self._abort_all()
            else:
                out = self._safe_abort(cmd[1])
                if out is not None:
                    self._deliver([out])
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                return True

    def _add(self, job: Job, stream: RequestStream) -> None:
        try:
            if job.rendered is not None:
                prompt, (head, tail, starts) = job.rendered
            else:
                prompt = job.prompt if job.messages is None else self._render(job)
                # the system prompt and the newest turn, which a session's context-overflow truncation
                # keeps (as LLM.chat does)
                head, tail, starts = self.kept_lengths(job, prompt)
            # a session's conversation is checked whole, before the store drops its oldest turns to fit
            before = job.check_room is not None and job.session_id is not None and not isinstance(prompt, str)
            if before:
                self._check_room(len(prompt), job.check_room)
            self.engine.add_request(
                prompt, job.params, request_id=job.request_id, session_id=job.session_id, stream_text=job.stream_text,
                head_tokens=head, tail_tokens=tail, turn_starts=starts, save_to_store=job.save_to_store,
                add_special_tokens=job.add_special_tokens,
                truncate=job.truncate, priority=job.priority, cache_salt=job.cache_salt,
                lora_request=job.lora_request,
            )
            if job.check_room is not None and not before:
                try:  # as the engine holds it: tokenized, cut to truncate_prompt_tokens
                    self._check_room(len(self.engine.requests[job.request_id].prompt_token_ids), job.check_room)
                except ValueError:
                    self.engine.abort(job.request_id)
                    raise
        except Exception as e:  # ValueError: bad input (-> 400); anything else is ours (-> 500)
            if not isinstance(e, ValueError):
                log.exception("add_request failed for %s", job.request_id)
            self._settle(job.request_id)
            stream.put(e)
            return
        self._streams[job.request_id] = stream
        stream.put(ACCEPTED)

    def _forget(self, session_id: str, future: asyncio.Future, cache_salt: str | None = None,
                lora_request: LoRARequest | None = None) -> None:  # fmt: skip
        try:
            result: Any = self.engine.forget_session(session_id, cache_salt, lora_request)
        except Exception as e:  # ValueError: the client's (-> 4xx); OSError: the remote store's (-> 503)
            if not isinstance(e, (ValueError, OSError)):
                log.exception("forgetting session %r failed", session_id)
            result = e
        _resolve(future, result)

    def _check_room(self, n: int, asked: int) -> None:
        """ValueError if a prompt of n tokens plus the max_tokens asked for passes the window."""
        window = self.engine.max_model_len
        if n + asked > window:
            raise ValueError(
                f"the prompt has {n} tokens and max_tokens asks for {asked} more, past the model's "
                f"window of {window} tokens; shorten the prompt or lower max_tokens"
            )

    def kept_lengths(self, job: Job, prompt: list[int]) -> Kept:
        if job.messages is None or job.session_id is None:
            return Kept(0, 0)
        return self.engine.tokenizer.kept_lengths(job.messages, prompt, job.tools, job.chat_options)

    def render(self, job: Job) -> tuple[list[int], Kept]:
        """The job's prompt ids and what truncation keeps of them, rendered on the caller's thread (a
        request's own chat template may run long: not on the engine's thread, where every stream would wait)."""
        prompt = self._render(job)
        return prompt, self.kept_lengths(job, prompt)

    def _render(self, job: Job) -> list[int]:
        import jinja2

        if self.engine.tokenizer is None:
            raise ValueError("this model has no tokenizer; use /v1/completions with token ids")
        try:
            return self.engine.tokenizer.encode_chat(job.messages, tools=job.tools, options=job.chat_options)
        except jinja2.TemplateError as e:  # the template itself rejects the conversation (role order...)
            raise ValueError(f"the chat template rejected the messages: {e}") from None

    def _step(self) -> None:
        try:
            outs = self.engine.step()
        except Exception:
            log.exception("engine step failed; aborting the running requests")
            for rid in list(self._streams):
                self._safe_abort(rid)
                self._fail(rid, RuntimeError("the engine failed while running this request"))
            return
        self._deliver(outs)

    def _deliver(self, outs: list[RequestOutput]) -> None:
        for out in outs:
            stream = self._streams.get(out.request_id)
            if out.metrics.first_token_s is not None and out.request_id not in self._first_seen:
                self._first_seen.add(out.request_id)
                self._observe(self._on_first_token, out)
            if out.new_token_ids:
                self._observe(self._on_token, out)
            if out.finished:
                self._streams.pop(out.request_id, None)
                self._first_seen.discard(out.request_id)
                logged = out.request_id not in self._unlogged
                self._settle(out.request_id)
                self._observe(self._on_finished, out)
                if logged:
                    self.log_output(out)
            if stream is not None:  # (a request that failed alone: its client gets the server's error)
                stream.put(RuntimeError("the engine failed while running this request")
                           if out.finish_reason == "error" else out)  # fmt: skip

    def log_output(self, out: RequestOutput) -> None:
        """vLLM's --enable-log-outputs: one INFO line for a finished request, its text cut at --max-log-len."""
        if self.log_outputs:
            text = out.text if self.max_log_len is None else out.text[: self.max_log_len]
            log.info("finished request %s: %d tokens, finish reason %s, output %r", out.request_id,
                     len(out.token_ids), out.finish_reason, text)  # fmt: skip

    @staticmethod
    def _observe(observer: Callable[[RequestOutput], None] | None, out: RequestOutput) -> None:
        if observer is not None:
            try:
                observer(out)
            except Exception:
                log.exception("metrics observer failed")

    def _safe_abort(self, request_id: str) -> RequestOutput | None:
        try:
            return self.engine.abort(request_id)
        except Exception:
            log.exception("abort of %s failed", request_id)
            return None

    def _abort_all(self) -> None:
        for rid in list(self._streams):
            out = self._safe_abort(rid)
            if out is not None:
                self._deliver([out])
            else:
                self._fail(rid, RuntimeError("the request was dropped"))

    def _fail_queued(self) -> None:
        while True:
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                return
            if cmd is not _STOP and cmd[0] == "add":
                self._settle(cmd[1].request_id)
                cmd[2].put(ServerDraining("the server is shutting down"))
            elif cmd is not _STOP and cmd[0] == "forget":
                _resolve(cmd[2], ServerDraining("the server is shutting down"))

    def _fail(self, request_id: str, error: Exception) -> None:
        stream = self._streams.pop(request_id, None)
        self._settle(request_id)
        if stream is not None:
            stream.put(error)

    def _settle(self, request_id: str) -> None:
        with self._cond:
            self._active.discard(request_id)
            self._unlogged.discard(request_id)
            self._cond.notify_all()

    def _read_stats(self) -> dict[str, Any]:
        try:
            stats = dict(self.engine.stats())
        except Exception:
            log.exception("engine.stats() failed")
            return getattr(self, "_stats", {})
        stats["in_flight"] = len(self._streams)
        return stats
