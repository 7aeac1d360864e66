"""Prometheus metrics of one server: request counters, TTFT, token counters and gauges read from
engine.stats(); vLLM's names beside them (vllm_metrics.py)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cachedattention.outputs import RequestOutput
from cachedattention.server.auth import route_path
from cachedattention.server.vllm_metrics import VLLMRequestMetrics

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TIERS = ("device", "host", "disk", "remote")
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/models", "/health", "/metrics",
             "/invocations", "/ping")  # fmt: skip
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    """All metrics live in this object's own registry (no global state: several apps may share a process)."""

    def __init__(self, model_name: str = "default") -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.vllm = VLLMRequestMetrics(r, model_name)  # the same requests under vLLM's names
        self.requests = Counter(
            "cachedattention_http_requests",
            "HTTP requests by endpoint and status code",
            ["endpoint", "status"],
            registry=r,
        )
        self.ttft = Histogram(
            "cachedattention_time_to_first_token_seconds", "Time to first token", buckets=TTFT_BUCKETS, registry=r
        )
        self.cached_tokens = Counter(
            "cachedattention_cached_prompt_tokens",
            "Prompt tokens reused instead of recomputed, by tier",
            ["tier"],
            registry=r,
        )
        self.prompt_tokens = Counter("cachedattention_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("cachedattention_generation_tokens", "Generated tokens", registry=r)
        self.finished = Counter(
            "cachedattention_requests_finished", "Finished requests by finish reason", ["finish_reason"], registry=r
        )
        for tier in TIERS:
            self.cached_tokens.labels(tier)  # present from the start, at 0

    def observe_first_token(self, out: RequestOutput) -> None:
        """Called on the engine thread when a request's first token is out (its TTFT is known then)."""
        if out.metrics.ttft_s is not None:
            self.ttft.observe(out.metrics.ttft_s)
        self.vllm.observe_first_token(out)

    def observe_token(self, out: RequestOutput) -> None:
        """Called on the engine thread for each output with new tokens."""
        self.vllm.observe_token(out)

    def observe_finished(self, out: RequestOutput) -> None:
        """Called on the engine thread for every finished request (prometheus_client is thread-safe)."""
        m = out.metrics
        for tier, n in m.cached_tokens.items():
            if n:
                self.cached_tokens.labels(tier).inc(n)
        self.prompt_tokens.inc(m.prompt_tokens)
        self.generation_tokens.inc(len(out.token_ids))
        self.finished.labels(out.finish_reason or "unknown").inc()
        self.vllm.observe(out)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _flatten(stats: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    for key, value in stats.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _flatten(value, name + "_")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield re.sub(r"[^a-zA-Z0-9_]", "_", name).lower(), float(value)


def _tier_of(parts: list[str]) -> str | None:
    return next((t for t in TIERS if t in parts), None)


class EngineStatsCollector(Collector):
    """Gauges computed at scrape time from the engine loop's stats snapshot.

    The store's stat names are read defensively: bytes per tier from a key naming a tier and
    "used" (host_bytes_used), budgets from one naming a tier and "budget", evictions from keys
    with "evict" in them, and every numeric stat also as cachedattention_engine_stat{name=...}.
    """

    def __init__(self, stats: Callable[[], dict[str, Any]]) -> None:
        self._stats = stats

    def describe(self) -> list[Metric]:
        return []  # computed per scrape; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        flat = dict(_flatten(self._stats() or {}))

        def gauge(name: str, doc: str, key: str) -> Iterator[Metric]:
            if key in flat:
                yield GaugeMetricFamily(name, doc, value=flat[key])

        yield from gauge("cachedattention_num_requests_running", "Requests being computed", "running")
        yield from gauge("cachedattention_num_requests_waiting", "Requests queued for admission", "waiting")
        yield from gauge("cachedattention_kv_pages_free", "Device KV pages free or evictable", "pages_free")
        yield from gauge("cachedattention_kv_pages_total", "Device KV pages in the pool", "pages_total")
        yield from gauge("cachedattention_kv_pages_cached", "Device pages kept as prefix cache", "pages_cached")
        yield from gauge("cachedattention_preemptions", "Requests preempted so far", "preemptions")
        used = GaugeMetricFamily("cachedattention_store_bytes", "KV bytes held per store tier", labels=["tier"])
        budget = GaugeMetricFamily("cachedattention_store_budget_bytes", "Byte budget per store tier", labels=["tier"])
        evictions = GaugeMetricFamily("cachedattention_evictions", "Evictions so far, by tier", labels=["tier", "stat"])
        hit_rate = GaugeMetricFamily("cachedattention_store_hit_rate", "Store hit rate", labels=["stat"])
        every = GaugeMetricFamily("cachedattention_engine_stat", "Every numeric engine.stats() value", labels=["name"])
        seen_tiers: set[str] = set()
        for key, value in sorted(flat.items()):
            parts = key.split("_")
            tier = _tier_of(parts)
            if tier and "used" in parts and "budget" not in parts and tier not in seen_tiers:
                seen_tiers.add(tier)
                used.add_metric([tier], value)
            if tier and "budget" in parts:
                budget.add_metric([tier], value)
            if any(p.startswith("evict") for p in parts):
                evictions.add_metric([tier or "store", key], value)
            if "hit" in parts and "rate" in parts:
                hit_rate.add_metric([key], value)
            every.add_metric([key], value)
        yield from (used, budget, evictions, hit_rate, every)


class RequestCounterMiddleware:
    """Counts every HTTP response by endpoint and status, including 413s and errors from outer layers."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = route_path(scope)
        endpoint = path if path in ENDPOINTS else "other"  # bounded label values
        status: list[int] = []

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except BaseException:
            if not status:
                status.append(500)
            raise
        finally:
            self.metrics.requests.labels(endpoint, str(status[0] if status else 500)).inc()
