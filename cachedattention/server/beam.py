"""vLLM's use_beam_search on the server: a search runs in steps of one-token engine requests (every
beam of every prompt of the request in one step, their shared prefixes served by the device prefix
cache), and its best beams become the request's choices, all delivered when the search ends."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

from cachedattention.beam_search import BeamSearch, BeamSearchSequence
from cachedattention.lora.adapter import LoRAAdapter
from cachedattention.outputs import RequestMetrics, RequestOutput
from cachedattention.sampling import TokenLogprob
from cachedattention.server.engine_loop import ACCEPTED, EngineLoop, Job, RequestStream, ServerDraining
from cachedattention.server.protocol import ParsedRequest


class BeamSearches:
    """The searches under way, by their choices' request ids: the server cancels one (and the steps it
    is running) when its client goes away, as it aborts an engine request."""

    def __init__(self, loop: EngineLoop, max_model_len: int) -> None:
        self.loop = loop
        self.max_model_len = max_model_len
        self._tasks: dict[str, asyncio.Task] = {}

    def start(self, request_id: str, firsts: list[RequestStream], parsed: ParsedRequest,
              lora: LoRAAdapter | None) -> list[RequestStream]:  # fmt: skip
        """The choices' streams (n per prompt, the best beam first) of the search `parsed` asks for,
        whose first step (one engine request per prompt, accepted) is `firsts`, held under
        `request_id` (released when it ends). Each stream gets its choice's finished output, or the
        error."""
        loop = asyncio.get_running_loop()
        ids = [f"{request_id}-{k}" for k in range(len(firsts) * parsed.beam.beam_width)]
        outs = [RequestStream(rid, loop) for rid in ids]
        search = _Search(self.loop, self.max_model_len, parsed, lora)
        task = asyncio.create_task(_deliver(search, firsts, ids, outs))
        for rid in ids:
            self._tasks[rid] = task
        task.add_done_callback(lambda _: self._ended(request_id, ids))
        return outs

    def _ended(self, request_id: str, ids: list[str]) -> None:
        for rid in ids:
            self._tasks.pop(rid, None)
        self.loop.release(request_id)

    def cancel(self, request_id: str) -> bool:
        """Cancel the search a choice belongs to; False when `request_id` is no search's."""
        task = self._tasks.get(request_id)
        if task is None:
            return False
        task.cancel()
        return True


async def _deliver(search: _Search, firsts: list[RequestStream], ids: list[str], outs: list[RequestStream]) -> None:
    """Each prompt searched side by side; their choices put in order, or the first error in every one."""
    w = search.width
    tasks = [asyncio.create_task(search.run(first, ids[k * w : (k + 1) * w])) for k, first in enumerate(firsts)]
    try:
        found = await asyncio.gather(*tasks)
    except asyncio.CancelledError:  # the client went away: a reader still there sees its choices aborted
        for out in outs:
            out.put(_aborted(out.request_id))
        raise
    except Exception as e:  # a step refused, or a fault: every choice reports it
        for out in outs:
            out.put(e)
        return
    finally:  # one prompt's failure, or the client gone: every search stops (nothing to do for one ended)
        for task in tasks:
            task.cancel()
        for first in firsts:
            search.loop.abort(first.request_id)
    for out, result in zip(outs, (r for each in found for r in each), strict=True):
        out.put(result)


class _Search:
    """One request's search, prompt by prompt (each with its own steps, run side by side)."""

    def __init__(self, loop: EngineLoop, max_model_len: int, parsed: ParsedRequest, lora: LoRAAdapter | None) -> None:
        self.loop = loop
        self.max_model_len = max_model_len
        self.beam = parsed.beam
        self.width = parsed.beam.beam_width
        self.logprobs = parsed.params.logprobs  # the answer's (None: not asked for)
        self.skip_special_tokens = parsed.params.skip_special_tokens
        self.priority = parsed.priority
        self.cache_salt = parsed.cache_salt
        self.lora = lora

    async def run(self, first: RequestStream, ids: list[str]) -> list[RequestOutput]:
        """A prompt's beam_width choices, from its first step's request on."""
        out = await _finished(first)
        if out.finish_reason in ("abort", "error"):
            return [_failed(out, rid) for rid in ids]
        prompt = out.prompt_token_ids
        room = self.max_model_len - len(prompt)  # (the answer must fit the window, as any answer)
        eos = self.loop.engine.tokenizer.eos_token_id if self.loop.engine.tokenizer is not None else None
        search = BeamSearch([prompt], replace(self.beam, max_tokens=min(self.beam.max_tokens, room)), eos,
                            self.logprobs or 0)  # fmt: skip
        search.pending()
        search.advance([out])
        step = 0
        while beams := search.pending():
            step += 1
            outputs = await self._step(f"{ids[0]}-step{step}", beams, search)
            failed = next((o for o in outputs if o.finish_reason in ("abort", "error")), None)
            if failed is not None:
                return [_failed(failed, rid) for rid in ids]
            search.advance(outputs)
        best = search.best(lambda tokens: "")[0].sequences
        if len(best) < self.width:  # (a vocabulary of fewer than 2 x beam_width tokens)
            raise RuntimeError(f"the search found {len(best)} beams, fewer than the {self.width} asked for")
        choices = [self._choice(rid, beam, out, len(prompt), eos) for rid, beam in zip(ids, best, strict=True)]
        for choice in choices:  # (each as the search built it: its steps are not logged)
            self.loop.log_output(choice)
        return choices

    async def _step(self, request_id: str, beams: list[list[int]], search: BeamSearch) -> list[RequestOutput]:
        """Each beam one token further: one engine request each, aborted if the search is cancelled."""
        loop = asyncio.get_running_loop()
        streams = []
        try:
            for b, tokens in enumerate(beams):
                job = Job(f"{request_id}-{b}", search.one_token, prompt=tokens, save_to_store=False,
                          priority=self.priority, cache_salt=self.cache_salt, lora_request=self.lora,
                          log_output=False)  # fmt: skip
                streams.append(self.loop.submit(job, loop, follow_up=True))  # (a drain lets the search end)
            return list(await asyncio.gather(*(_finished(s) for s in streams)))
        except ServerDraining:  # the grace is over (abort_in_flight), or the engine stopped: aborted
            return [_aborted(request_id) for _ in beams]
        finally:
            for s in streams:
                self.loop.abort(s.request_id)  # (nothing to do for one finished)

    def _choice(self, request_id: str, beam: BeamSearchSequence, first: RequestOutput, prompt_len: int,
                eos: int | None) -> RequestOutput:  # fmt: skip
        """A beam as its choice's finished output: its tokens past the prompt (the end of sequence
        left out unless include_stop_str_in_output) and their logprobs."""
        stopped = beam.finish_reason == "stop"
        shown = beam.tokens[prompt_len : len(beam.tokens) - 1 if stopped else None]
        tokens = beam.tokens[prompt_len:] if stopped and self.beam.include_stop_str_in_output else shown
        tokenizer = self.loop.engine.tokenizer
        text = tokenizer.decode(shown, skip_special_tokens=self.skip_special_tokens) if tokenizer is not None else ""
        logprobs = None
        if self.logprobs is not None:
            logprobs = [TokenLogprob(t, entry[t].logprob, entry[t].rank or 0, entry.top[: self.logprobs])
                        for t, entry in zip(tokens, beam.logprobs)]  # fmt: skip
        now = time.perf_counter()  # (the engine's clock)
        metrics = replace(first.metrics, generated_tokens=len(tokens), last_token_s=now, finish_s=now)
        return RequestOutput(request_id, first.prompt_token_ids, tokens, text, True, beam.finish_reason, metrics,
                             stop_reason=eos if stopped else None, new_token_ids=list(tokens), logprobs=logprobs,
                             prompt=first.prompt)  # fmt: skip


async def _finished(stream: RequestStream) -> RequestOutput:
    """A one-token request's finished output (its acceptance skipped); its error raised."""
    while True:
        item = await stream.get()
        if isinstance(item, BaseException):
            raise item
        if item is not ACCEPTED and item.finished:
            return item


def _aborted(request_id: str) -> RequestOutput:
    """A choice that ends aborted, with no answer."""
    metrics = RequestMetrics(arrival_s=time.perf_counter())
    return RequestOutput(request_id, [], [], "", True, "abort", metrics)


def _failed(out: RequestOutput, request_id: str) -> RequestOutput:
    """A step aborted (the server shutting down) or failed: each choice ends so, with no answer."""
    return replace(out, request_id=request_id, token_ids=[], text="", new_token_ids=[], logprobs=None)
