"""Discrete-event replay of a multi-turn trace through the store's policy and ledger code.

No model runs: a session's KV bytes are its tokens x `bytes_per_token`. Jobs (turns)
arrive, wait in a FCFS queue and run `max_running` at a time for a service time derived
from their tokens. After every event the queue's session ids are published to the
policy, as the scheduler does for the real store: it prefetches disk->host, and demotes
host->disk when free host falls under the threshold. A job looks its session up when it
starts (host hit / disk hit, then loaded to host / miss) and stores history + new tokens
in host when it ends, making room with the policy's victims (write-back to disk first).

Modelling choices: a running job's KV lives on the device, so its host copy is protected
only while it is loaded; the policy's `protected()` sessions (lookahead: the prefetch
window) are never demoted to make room for the store's own moves, a result or a load that
would need that goes straight to disk / is served from disk instead. Moves take no time
unless `disk_read_bytes_s` is set: then one I/O queue serves reads in issue order, except that
jobs starting with their KV on disk read first, one after another (the prefetches in flight wait
that long more).
Misses cost no extra time unless `recompute_tok_s` is set.

With `windowed_share` (a model with sliding-window layers: that share of a token's KV bytes is
theirs), a session's host copy holds the windowed layers only of the turns a later turn's windows
can reach, as the store's `windowed_history` keeps them: its first turn, its newest, and those
ending at most `window_reach_tokens` (the window and a page) before the newest starts (each turn one
segment). Its disk copy holds every layer (written through), and a prefetch or load reads only the
layers its host copy keeps.

Each prefetch's lead time (issued to its job's start) is recorded with its bytes: the disk
bandwidth a prefetch needs to land in time is bytes / lead, and the run's read demand is all
disk -> host bytes over the makespan.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from collections.abc import Collection, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from cachedattention.sim.clairvoyant import ClairvoyantPolicy
from cachedattention.sim.trace import TraceTurn, sort_trace
from cachedattention.store.ledger import TierLedger
from cachedattention.store.policy import CachePolicy, PolicyConfig, make_policy


@dataclass(frozen=True)
class SimConfig:
    host_bytes: int
    disk_bytes: int
    bytes_per_token: int
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    service_tok_s: float = 1000.0  # new (prompt + answer) tokens served per second per job
    max_running: int = 1  # jobs served at once
    recompute_tok_s: float | None = None  # if set, a miss also prefills its history at this speed
    disk_read_bytes_s: float | None = None  # if set, disk->host moves take time (one I/O queue)
    closed_loop: bool = True  # turn k arrives think_s after turn k-1 ended (else at its trace arrival_s)
    # Hit/miss counts cover turns arriving in [measure_from_s, measure_until_s), e.g. to leave
    # out the cold start and the drain after the last session arrived; bytes moved cover all.
    measure_from_s: float = 0.0
    measure_until_s: float | None = None
    # Evict by each session's next arrival, read from the trace (Belady's rule; see clairvoyant.py):
    # a reference with foresight, not a policy the store can run. Needs policy "lookahead".
    clairvoyant: bool = False
    # A model with sliding-window layers: the share of a token's KV bytes in them, and how far back
    # from a turn's first new token its windows read (the window and a page; see the module's docstring)
    windowed_share: float = 0.0
    window_reach_tokens: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.host_bytes >= 0 and self.disk_bytes >= 0, "host_bytes and disk_bytes must be >= 0"),
            (self.bytes_per_token >= 1, "bytes_per_token must be >= 1"),
            (self.service_tok_s > 0, "service_tok_s must be > 0"),
            (self.max_running >= 1, "max_running must be >= 1"),
            (self.recompute_tok_s is None or self.recompute_tok_s > 0, "recompute_tok_s must be > 0 or None"),
            (self.disk_read_bytes_s is None or self.disk_read_bytes_s > 0, "disk_read_bytes_s must be > 0 or None"),
            (
                self.measure_until_s is None or self.measure_until_s > self.measure_from_s,
                "measure_until_s must be > measure_from_s or None",
            ),
            (0.0 <= self.windowed_share <= 1.0, "windowed_share must be within [0, 1]"),
            (self.window_reach_tokens >= 0, "window_reach_tokens must be >= 0"),
            (
                not self.clairvoyant or self.policy.name == "lookahead",
                "clairvoyant eviction extends look-ahead's prefetching: it needs policy 'lookahead'",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"SimConfig: {message} ({self})")


@dataclass
class SimResult:
    policy: str
    turns: int = 0
    turns_with_history: int = 0
    hits: int = 0  # full history found in some tier
    host_hits: int = 0
    disk_hits: int = 0  # includes prefetches still in flight when the job started
    disk_hits_on_arrival: int = 0  # of those, jobs that started as they arrived: no queue to look ahead at
    misses: int = 0
    bytes_prefetched: int = 0  # disk -> host, ahead of the job (look-ahead)
    bytes_written_back: int = 0  # to disk: host copies on eviction, results too big for host
    bytes_loaded: int = 0  # disk -> host, on demand when a job starts
    host_evictions: int = 0  # host copies dropped
    disk_evictions: int = 0  # disk copies dropped
    sessions_lost: int = 0  # times a session's KV was dropped from every tier (or had no room)
    max_queue_len: int = 0
    read_demand_bytes_s: float = 0.0  # disk -> host bytes (prefetched + loaded) / makespan
    prefetches_used: int = 0  # prefetches whose job started (in flight or landed)
    prefetch_lead_p50_s: float = 0.0  # issued -> job start, over prefetches_used
    prefetch_lead_p10_s: float = 0.0
    prefetch_rate_p50_bytes_s: float = 0.0  # bytes / lead: the read rate that lands it in time
    prefetch_rate_p90_bytes_s: float = 0.0
    mean_wait_s: float = 0.0
    makespan_s: float = 0.0
    peak_host_used: int = 0
    peak_disk_used: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.turns_with_history if self.turns_with_history else 0.0

    @property
    def host_hit_share(self) -> float:
        return self.host_hits / self.hits if self.hits else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "hit_rate": self.hit_rate, "host_hit_share": self.host_hit_share}


@dataclass
class _Job:
    turn: TraceTurn
    enqueued_s: float


class _Sim:
    """One replay's state; methods are the moves of the store."""

    def __init__(self, config: SimConfig, check: bool) -> None:
        self.config = config
        self.check = check
        self.next_use: dict[str, float] = {}  # session -> its next job's arrival (clairvoyant eviction)
        self.upcoming: dict[str, deque[float]] = {}  # open loop: each session's arrivals still to come
        self.policy: CachePolicy = (
            ClairvoyantPolicy(config.policy, self.next_use) if config.clairvoyant else make_policy(config.policy)
        )
        self.ledger = TierLedger(config.host_bytes, config.disk_bytes)
        self.result = SimResult(policy=self.policy.name)
        self.queue: list[_Job] = []
        self.running: dict[str, _Job] = {}
        self.done: list[tuple[float, int, _Job]] = []  # (end_s, seq, job) heap
        self.seq = itertools.count()
        self.ready_s: dict[str, float] = {}  # prefetches in flight: session -> landed at
        self.io_free_s = 0.0  # when the disk has served every read issued so far
        self.demand_free_s = 0.0  # when it has served the reads of the jobs already started
        self.wait_total = 0.0
        self.issued: dict[str, tuple[float, int]] = {}  # prefetched session -> (issued at, bytes)
        self.leads: list[tuple[float, int]] = []  # (lead s, bytes) of prefetches whose job started
        self.turns_of: dict[str, list[int]] = {}  # session -> its stored turns' tokens (one segment each)

    # ---- the event loop ----------------------------------------------------------------
    def run(self, trace: Sequence[TraceTurn]) -> SimResult:
        arrivals: list[tuple[float, int, TraceTurn]] = []  # heap
        later: dict[str, list[TraceTurn]] = {}  # closed loop: a session's next turns, reversed
        for turn in trace:
            if self.config.closed_loop and turn.session_id in later:
                later[turn.session_id].append(turn)
            else:
                later.setdefault(turn.session_id, [])
                heapq.heappush(arrivals, (turn.arrival_s, next(self.seq), turn))
                self.upcoming.setdefault(turn.session_id, deque()).append(turn.arrival_s)
        for turns in later.values():
            turns.reverse()
        now = 0.0
        while arrivals or self.done:
            arrival = arrivals[0][0] if arrivals else math.inf
            if self.done and self.done[0][0] <= arrival:
                now, _, job = heapq.heappop(self.done)
                sid = job.turn.session_id
                following = later[sid].pop() if self.config.closed_loop and later[sid] else None
                if following is not None:
                    heapq.heappush(arrivals, (now + following.think_s, next(self.seq), following))
                    self.upcoming[sid].append(now + following.think_s)
                self.foresee(sid)  # before its result is stored: eviction reads it
                self.finish(job, now)
            else:
                now, _, turn = heapq.heappop(arrivals)
                self.upcoming[turn.session_id].popleft()
                self.queue.append(_Job(turn, now))
                self.foresee(turn.session_id)
            self.step(now)
        self.result.makespan_s = now
        self.result.mean_wait_s = self.wait_total / max(1, self.result.turns)
        self.summarize_reads()
        return self.result

    def summarize_reads(self) -> None:
        r = self.result
        if r.makespan_s > 0:
            r.read_demand_bytes_s = (r.bytes_prefetched + r.bytes_loaded) / r.makespan_s
        r.prefetches_used = len(self.leads)
        if not self.leads:
            return
        leads = sorted(lead for lead, _ in self.leads)
        # a prefetch issued the instant its job starts needs an infinite rate: floor the lead at 1 ms
        rates = sorted(nbytes / max(lead, 1e-3) for lead, nbytes in self.leads)
        r.prefetch_lead_p50_s, r.prefetch_lead_p10_s = _quantile(leads, 0.5), _quantile(leads, 0.1)
        r.prefetch_rate_p50_bytes_s, r.prefetch_rate_p90_bytes_s = _quantile(rates, 0.5), _quantile(rates, 0.9)

    def step(self, now: float) -> None:
        for sid in self.policy.expired(self.ledger, now, protect=self.running):
            self.drop_disk(sid)  # first, so a job starting now cannot hit an expired record
        self.start_jobs(now)
        self.result.max_queue_len = max(self.result.max_queue_len, len(self.queue))
        hint = self.hint()
        self.prefetch(hint, now)
        threshold = self.policy.host_free_target(self.ledger)
        if self.ledger.host_free < threshold:
            self.make_host_room(threshold, hint, now, self.policy.protected(self.ledger, hint))
        self.result.peak_host_used = max(self.result.peak_host_used, self.ledger.host_used)
        self.result.peak_disk_used = max(self.result.peak_disk_used, self.ledger.disk_used)
        if self.check:
            self.ledger.check_integrity()

    def start_jobs(self, now: float) -> None:
        """FCFS, skipping jobs whose session has an earlier job still running or queued."""
        blocked = set(self.running)
        index = 0
        while len(self.running) < self.config.max_running and index < len(self.queue):
            job = self.queue[index]
            sid = job.turn.session_id
            if sid in blocked:
                index += 1
                continue
            blocked.add(sid)
            del self.queue[index]
            self.foresee(sid)  # its stored copy is read now and replaced when it ends: next used by the job after
            self.running[sid] = job
            kind, extra_s = self.lookup(job.turn, now)
            self.tally(kind, job, now)
            service_s = job.turn.new_tokens / self.config.service_tok_s + extra_s
            heapq.heappush(self.done, (now + service_s, next(self.seq), job))

    def foresee(self, sid: str) -> None:
        """Record when `sid` is next used: its first queued job's arrival, else its next arrival to come."""
        if not self.config.clairvoyant:
            return  # only clairvoyant eviction reads the future
        queued = next((job.enqueued_s for job in self.queue if job.turn.session_id == sid), None)
        ahead = self.upcoming[sid]
        when = queued if queued is not None else (ahead[0] if ahead else None)
        if when is None:
            self.next_use.pop(sid, None)  # never used again
        else:
            self.next_use[sid] = when

    # ---- one job -----------------------------------------------------------------------
    def lookup(self, turn: TraceTurn, now: float) -> tuple[str, float]:
        """Look a starting job's session up: ("none" | "host" | "disk" | "miss", extra service s)."""
        if turn.history_tokens == 0:
            return "none", 0.0
        need = self.host_nbytes(self.stored_turns(turn.session_id, turn.history_tokens))
        entry = self.ledger.entry(turn.session_id)
        issued = self.issued.pop(turn.session_id, None)
        if issued is not None:
            self.leads.append((now - issued[0], issued[1]))
        if entry is not None and entry.in_host and entry.host_nbytes >= need:
            self.ledger.touch(turn.session_id, now)
            late_s = self.ready_s.pop(turn.session_id, now) - now
            if late_s <= 0:
                return "host", 0.0
            # prefetched but not landed yet: the job waits for the rest, as for a disk load,
            # and a job starting after it reads behind it
            self.demand_free_s = max(self.demand_free_s, now + late_s)
            return "disk", late_s
        if entry is not None and entry.in_disk and entry.disk_nbytes >= turn.history_tokens * self.config.bytes_per_token:
            return "disk", self.load_on_demand(turn.session_id, now)
        recompute_s = turn.history_tokens / self.config.recompute_tok_s if self.config.recompute_tok_s else 0.0
        return "miss", recompute_s

    def tally(self, kind: str, job: _Job, now: float) -> None:
        """Count a started job, if it arrived inside the measuring window."""
        until = self.config.measure_until_s
        if job.enqueued_s < self.config.measure_from_s or (until is not None and job.enqueued_s >= until):
            return
        r = self.result
        r.turns += 1
        self.wait_total += now - job.enqueued_s
        if kind == "none":
            return
        r.turns_with_history += 1
        if kind == "miss":
            r.misses += 1
            return
        r.hits += 1
        if kind == "host":
            r.host_hits += 1
        else:
            r.disk_hits += 1
            r.disk_hits_on_arrival += now == job.enqueued_s

    def load_on_demand(self, sid: str, now: float) -> float:
        nbytes = self.read_nbytes(sid)
        self.ledger.touch(sid, now)
        self.result.bytes_loaded += nbytes
        hint = self.hint()  # the window stays: serving this job from disk beats demoting the next ones
        if self.make_host_room(nbytes, hint, now, self.policy.protected(self.ledger, hint) | {sid}):
            self.ledger.put_host(sid, nbytes, now)
        # else: served straight from disk; it is still a hit
        bw = self.config.disk_read_bytes_s
        if not bw:
            return 0.0
        # started jobs read first, in turn; every prefetch still in flight lands that much later
        read_s = nbytes / bw
        self.demand_free_s = max(self.demand_free_s, now) + read_s
        for other, ready in self.ready_s.items():
            if ready > now:
                self.ready_s[other] = ready + read_s
        self.io_free_s = max(self.io_free_s, now) + read_s
        return self.demand_free_s - now

    def finish(self, job: _Job, now: float) -> None:
        """Store history + new tokens in host (the disk copy, now stale, is dropped)."""
        sid = job.turn.session_id
        del self.running[sid]
        turns = self.stored_turns(sid, job.turn.history_tokens) + [job.turn.new_tokens]
        self.turns_of[sid] = turns
        nbytes = (job.turn.history_tokens + job.turn.new_tokens) * self.config.bytes_per_token
        in_host = self.host_nbytes(turns)
        self.ready_s.pop(sid, None)
        self.issued.pop(sid, None)  # a prefetch of the copy this job now replaces
        entry = self.ledger.entry(sid)
        if entry is not None and entry.in_disk and entry.disk_nbytes != nbytes:
            self.ledger.drop_disk(sid)
        entry = self.ledger.entry(sid)
        held = entry.host_nbytes if entry is not None and entry.in_host else 0
        hint = self.hint()
        # The window stays: writing this session straight to disk beats demoting the next jobs'.
        if self.make_host_room(in_host - held, hint, now, self.policy.protected(self.ledger, hint) | {sid}):
            self.ledger.put_host(sid, in_host, now)
            return
        if entry is not None and entry.in_host:  # does not fit in host at all: straight to disk
            self.ledger.drop_host(sid)
        if self.make_disk_room(nbytes, hint, now, self.running.keys() | {sid}):
            self.ledger.put_disk(sid, nbytes, now)
            self.result.bytes_written_back += nbytes
        else:
            self.result.sessions_lost += 1

    # ---- moves between tiers -----------------------------------------------------------
    def prefetch(self, hint: list[str], now: float) -> None:
        protect = self.policy.protected(self.ledger, hint)
        for sid in self.policy.prefetch(self.ledger, hint):
            entry = self.ledger.entry(sid)
            if entry is None or entry.in_host:
                continue
            nbytes = self.read_nbytes(sid)
            if not self.make_host_room(nbytes, hint, now, protect):
                break
            self.ledger.put_host(sid, nbytes, now, touch=False)
            self.result.bytes_prefetched += nbytes
            self.issued[sid] = (now, nbytes)
            self.read(sid, nbytes, now)

    def read(self, sid: str, nbytes: int, now: float) -> None:
        """Time a disk->host copy: one I/O queue, in issue order (instant without `disk_read_bytes_s`)."""
        if self.config.disk_read_bytes_s:
            self.io_free_s = max(self.io_free_s, now) + nbytes / self.config.disk_read_bytes_s
            self.ready_s[sid] = self.io_free_s

    def make_host_room(self, need: int, hint: list[str], now: float, protect: Collection[str]) -> bool:
        """Demote the policy's host victims until `need` bytes are free; all or nothing."""
        victims = self.policy.host_victims(self.ledger, need, hint, now, protect)
        if self.ledger.host_free + sum(self.ledger.entry(v).host_nbytes for v in victims) < need:
            return False  # demoting would not be enough: move nothing
        for sid in victims:
            self.demote(sid, hint, now)
        return self.ledger.host_free >= need

    def demote(self, sid: str, hint: list[str], now: float) -> None:
        """Write back to disk (unless already there), then drop the host copy."""
        entry = self.ledger.entry(sid)
        if entry is None or not entry.in_host:
            return
        if not entry.in_disk:
            turns = self.turns_of.get(sid)
            nbytes = entry.host_nbytes if turns is None else sum(turns) * self.config.bytes_per_token  # (every layer)
            if self.make_disk_room(nbytes, hint, now, self.running.keys() | {sid}):
                self.ledger.put_disk(sid, nbytes, now, touch=False)
                self.result.bytes_written_back += nbytes
            else:
                self.result.sessions_lost += 1
        self.ready_s.pop(sid, None)
        self.issued.pop(sid, None)  # a prefetch undone before its job ran
        self.ledger.drop_host(sid)
        self.result.host_evictions += 1

    def make_disk_room(self, need: int, hint: list[str], now: float, protect: Collection[str]) -> bool:
        """Drop the policy's disk victims until `need` bytes are free; all or nothing."""
        victims = self.policy.disk_victims(self.ledger, need, hint, now, protect)
        if self.ledger.disk_free + sum(self.ledger.entry(v).disk_nbytes for v in victims) < need:
            return False
        for sid in victims:
            self.drop_disk(sid)
        return self.ledger.disk_free >= need

    def drop_disk(self, sid: str) -> None:
        self.ledger.drop_disk(sid)
        self.result.disk_evictions += 1
        if self.ledger.entry(sid) is None:
            self.result.sessions_lost += 1

    def hint(self) -> list[str]:
        return [job.turn.session_id for job in self.queue]

    # ---- a session's size --------------------------------------------------------------
    def stored_turns(self, sid: str, history_tokens: int) -> list[int]:
        """The tokens of each turn the session has stored, `history_tokens` in all (a trace whose
        history does not add up to them: one segment of them all)."""
        turns = self.turns_of.get(sid, [])
        return list(turns) if sum(turns) == history_tokens else ([history_tokens] if history_tokens else [])

    def read_nbytes(self, sid: str) -> int:
        """What a disk -> host move of the session reads: the layers its host copy keeps."""
        turns = self.turns_of.get(sid)
        return self.ledger.entry(sid).disk_nbytes if turns is None else self.host_nbytes(turns)

    def host_nbytes(self, turns: Sequence[int]) -> int:
        """A host copy's bytes: every layer of the turns a later turn's windows reach, the full layers
        alone of the rest (the store's windowed_history rule; every layer of all without windows)."""
        total = sum(turns) * self.config.bytes_per_token
        if not self.config.windowed_share or len(turns) < 3:
            return total
        newest_start, end, past = sum(turns[:-1]), turns[0], 0
        for tokens in turns[1:-1]:  # (never the first: a prompt other conversations share)
            end += tokens
            if newest_start - end > self.config.window_reach_tokens:
                past += tokens
        return total - int(past * self.config.bytes_per_token * self.config.windowed_share)


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank quantile of an ascending, non-empty list."""
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def simulate(trace: Iterable[TraceTurn], config: SimConfig, *, check: bool = False) -> SimResult:
    """Replay `trace` (any order; sorted by arrival here). `check`: verify the ledger after every event."""
    return _Sim(config, check).run(sort_trace(trace))


def sweep(
    trace: Iterable[TraceTurn],
    host_list: Sequence[int],
    disk_list: Sequence[int],
    policies: Sequence[str | PolicyConfig],
    *,
    bytes_per_token: int,
    pairs: bool = False,
    **config: Any,
) -> list[dict[str, Any]]:
    """Simulate every (host, disk) budget x policy; `pairs=True` zips host_list with disk_list.

    `config`: the other SimConfig fields. Each row is the budgets, the policy name and
    the result's `to_dict()`.
    """
    if pairs and len(host_list) != len(disk_list):
        raise ValueError(f"pairs=True needs equal lists, got {len(host_list)} hosts and {len(disk_list)} disks")
    turns = sort_trace(trace)
    budgets = zip(host_list, disk_list, strict=True) if pairs else itertools.product(host_list, disk_list)
    base = SimConfig(host_bytes=0, disk_bytes=0, bytes_per_token=bytes_per_token, **config)
    rows = []
    for (host, disk), policy in itertools.product(list(budgets), policies):
        pc = policy if isinstance(policy, PolicyConfig) else replace(base.policy, name=policy)
        result = simulate(turns, replace(base, host_bytes=host, disk_bytes=disk, policy=pc))
        rows.append({"host_bytes": host, "disk_bytes": disk, **result.to_dict()})
    return rows
