"""The scheduler's step plan: chunked prefill under the token budget and the long-prefill threshold."""

import pytest

from cachedattention import LLM, SamplingParams, SchedulerConfig
from cachedattention.engine.request import Request
from cachedattention.engine.scheduler import Scheduler
from cachedattention.kvcache.page_pool import PagePool
from cachedattention.outputs import RequestMetrics


def _req(rid: str, n: int) -> Request:
    return Request(rid, list(range(n)), SamplingParams(max_tokens=50), RequestMetrics(arrival_s=0.0))


def _plan(sched: Scheduler) -> dict[str, int]:
    return {s.request.request_id: s.num_new for s in sched.schedule()}


def _finish_step(sched: Scheduler, plan: dict[str, int]) -> None:
    """What the engine does after the forward: advance each request; one whose KV covers all its
    tokens samples one more (then it decodes a token per step)."""
    for req in sched.running:
        req.num_computed += plan.get(req.request_id, 0)
        if req.num_to_compute == 0:
            req.output_token_ids.append(0)


def test_a_long_prompt_leaves_room_for_a_short_one_behind_it():
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64, long_prefill_token_threshold=32),
                      PagePool(64), page_size=4, prefix_cache=False)
    sched.add(_req("long", 100))
    plan = _plan(sched)
    assert plan == {"long": 32}  # alone, it still takes no more than the threshold
    _finish_step(sched, plan)
    sched.add(_req("short", 10))
    plan = _plan(sched)
    assert plan == {"long": 32, "short": 10}  # the long one leaves the budget's rest to the short one
    _finish_step(sched, plan)
    assert _plan(sched) == {"long": 32, "short": 1}  # short decodes; decoders are never held back


def test_without_the_threshold_a_long_prompt_takes_the_whole_budget():
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64, long_prefill_token_threshold=0),
                      PagePool(64), page_size=4, prefix_cache=False)
    sched.add(_req("long", 100))
    sched.add(_req("short", 10))
    assert _plan(sched) == {"long": 64}


def test_a_prompt_logprobs_request_computes_a_bounded_chunk_per_step():
    """Each prompt row it computes brings a row of logits: at most PROMPT_LOGPROBS_CHUNK per step."""
    from cachedattention.engine.scheduler import PROMPT_LOGPROBS_CHUNK

    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=2048), PagePool(1024), page_size=4, prefix_cache=False)
    asking = _req("asking", 1500)
    asking.prompt_logprobs = [None]
    sched.add(asking)
    sched.add(_req("plain", 1600))
    assert _plan(sched) == {"asking": PROMPT_LOGPROBS_CHUNK, "plain": 2048 - PROMPT_LOGPROBS_CHUNK}


def test_threshold_must_not_be_negative():
    with pytest.raises(ValueError, match="long_prefill_token_threshold"):
        SchedulerConfig(long_prefill_token_threshold=-1)


def test_threshold_chunks_give_the_same_tokens(tiny_dirs, monkeypatch):
    path, _ = tiny_dirs["llama"]
    prompts = [list(range(3, 3 + n)) for n in (90, 5, 41)]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    single = [LLM(model=str(path), scheduler=SchedulerConfig(long_prefill_token_threshold=0)).generate([p], params)[0]
              for p in prompts]
    llm = LLM(model=str(path), scheduler=SchedulerConfig(max_num_batched_tokens=32, long_prefill_token_threshold=8))
    chunks = []
    real = Scheduler.schedule

    def schedule(self):
        out = real(self)
        chunks.extend(s.num_new for s in out)
        return out

    monkeypatch.setattr(Scheduler, "schedule", schedule)
    assert [o.token_ids for o in llm.generate(prompts, params)] == [o.token_ids for o in single]
    assert max(chunks) == 8  # the prompts were cut at the threshold, not at the 32-token budget
    llm.engine.pages.check_integrity()


def _prio(rid: str, n: int, priority: int) -> Request:
    req = _req(rid, n)
    req.priority = priority
    return req


def test_the_priority_policy_admits_lower_values_first_and_preempts_the_lowest_priority():
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=1, policy="priority"),
                      PagePool(64), page_size=4, prefix_cache=False)  # fmt: skip
    for rid, priority in (("late-5", 5), ("first-0", 0), ("then-1", 1), ("also-0", 0)):
        sched.add(_prio(rid, 8, priority))
    assert [r.request_id for r in sched.waiting] == ["first-0", "also-0", "then-1", "late-5"]  # ties: arrival
    fcfs = Scheduler(SchedulerConfig(max_num_seqs=1), PagePool(64), page_size=4, prefix_cache=False)
    for rid, priority in (("late-5", 5), ("first-0", 0)):
        fcfs.add(_prio(rid, 8, priority))
    assert [r.request_id for r in fcfs.waiting] == ["late-5", "first-0"]
    # pages run short: the running request of the lowest priority (the largest value) gives its pages back
    tight = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=4, policy="priority"),
                      PagePool(6), page_size=4, prefix_cache=False)  # fmt: skip
    tight.add(_prio("background", 8, 9))
    _finish_step(tight, _plan(tight))
    tight.add(_prio("urgent", 8, 0))  # arrives later: the newest running request, which fcfs would preempt
    plan = _plan(tight)
    assert plan == {"background": 1, "urgent": 8}
    _finish_step(tight, plan)
    for _ in range(6):  # both decode until the pool cannot hold both
        plan = _plan(tight)
        _finish_step(tight, plan)
    assert [r.request_id for r in tight.running] == ["urgent"] and tight.num_preemptions >= 1
    assert tight.waiting[0].request_id == "background"


def test_a_priority_needs_the_priority_policy(tiny_dirs):
    path, _ = tiny_dirs["llama"]
    llm = LLM(model=str(path))
    with pytest.raises(ValueError, match="--scheduling-policy priority"):
        llm.engine.add_request([5, 6, 7], SamplingParams(max_tokens=2), priority=3)
    with pytest.raises(ValueError, match="priority must be an integer"):
        llm.engine.add_request([5, 6, 7], SamplingParams(max_tokens=2), priority="high")
    ranked = LLM(model=str(path), scheduler=SchedulerConfig(policy="priority", max_num_seqs=1))
    ids = [ranked.engine.add_request([5 + i] * 8, SamplingParams(max_tokens=2), priority=p) for i, p in enumerate((2, 1, 0))]
    finished = []
    while ranked.engine.has_unfinished():
        finished += [o.request_id for o in ranked.engine.step() if o.finished]
    assert finished == ids[::-1]  # one at a time, lowest value first
    with pytest.raises(ValueError, match="scheduling policy"):
        SchedulerConfig(policy="lifo")


def test_a_preempted_request_goes_back_in_its_place_by_priority_then_arrival():
    """As vLLM's priority policy: not ahead of the requests of its priority that arrived before it."""
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=1, policy="priority"),
                      PagePool(64), page_size=4, prefix_cache=False)  # fmt: skip
    early, running, late = _prio("early", 8, 1), _prio("running", 8, 1), _prio("late", 8, 1)
    early.metrics.arrival_s, running.metrics.arrival_s, late.metrics.arrival_s = 1.0, 2.0, 3.0
    urgent = _prio("urgent", 8, 0)
    urgent.metrics.arrival_s = 4.0
    sched.add(running)
    _plan(sched)
    for req in (early, late, urgent):  # early: say a session turn that arrived first but waited for its KV
        sched.add(req)
    assert [r.request_id for r in sched.waiting] == ["urgent", "early", "late"]
    sched.requeue(running)
    assert [r.request_id for r in sched.waiting] == ["urgent", "early", "running", "late"]


def test_a_request_preempted_during_the_step_gives_its_tokens_back_to_the_budget():
    """As vLLM's: a running request preempted while the step is planned gives back the tokens it
    had been given, to the running requests after it; and no waiting request is admitted in a step
    that had to preempt (the pages just freed are for the running ones)."""
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=12, max_num_seqs=4, policy="priority",
                                      long_prefill_token_threshold=8),
                      PagePool(9), page_size=4, prefix_cache=False)  # fmt: skip
    arrivals = iter(range(10))

    def add(rid: str, n: int, priority: int) -> None:
        req = _prio(rid, n, priority)
        req.metrics.arrival_s = float(next(arrivals))
        sched.add(req)

    add("low", 8, 9)
    _finish_step(sched, _plan(sched))  # low decodes from here
    add("high", 40, 0)
    plan = _plan(sched)
    assert plan == {"low": 1, "high": 8}
    _finish_step(sched, plan)
    add("mid", 20, 5)
    plan = _plan(sched)
    assert plan == {"low": 1, "high": 8, "mid": 3}  # 8 of the pool's 9 pages held
    _finish_step(sched, plan)
    add("next", 4, 1)
    plan = _plan(sched)
    # high's next 8 tokens need 2 pages more: low (the lowest priority) is preempted, and its token goes
    # to mid (4 tokens, not 3); "next", though of a higher priority than mid, waits for the next step
    assert plan == {"high": 8, "mid": 4} and sched.num_preemptions == 1
    assert [r.request_id for r in sched.waiting] == ["next", "low"]


def test_the_priority_victim_is_the_lowest_priority_that_arrived_last():
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=4, policy="priority"),
                      PagePool(64), page_size=4, prefix_cache=False)  # fmt: skip
    for rid, arrival in (("a", 2.0), ("b", 1.0), ("c", 3.0)):
        req = _prio(rid, 4, 7 if rid != "c" else 0)
        req.metrics.arrival_s = arrival
        sched.add(req)
    _plan(sched)
    assert [r.request_id for r in sched.running] == ["c", "b", "a"]
    c, b, a = sched.running
    sched.running = [c, a, b]  # as after b was preempted and admitted again
    assert sched._victim().request_id == "a"  # priority 7, arrived after b (not the last admitted)
