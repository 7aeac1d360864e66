"""vLLM's Prometheus metrics, under vLLM's names and its model_name label, beside this server's own:
dashboards, alerts and autoscalers written for a vLLM server (vllm:num_requests_waiting,
vllm:kv_cache_usage_perc, vllm:time_to_first_token_seconds, ...) read this one unchanged."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cachedattention.config import CacheConfig
from cachedattention.outputs import RequestMetrics, RequestOutput

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)
# vLLM's for the time between tokens (inter-token latency, time per output token)
TOKEN_GAP_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                     40.0, 80.0)  # fmt: skip


class VLLMRequestMetrics:
    """Counters and histograms observed as each request finishes; TTFT at its first token and the
    time between tokens at each token, as vLLM's."""

    def __init__(self, registry: CollectorRegistry, model_name: str) -> None:
        self.model_name = model_name
        label = ["model_name"]

        def histogram(name: str, doc: str, buckets: tuple) -> Histogram:
            return Histogram(f"vllm:{name}", doc, label, buckets=buckets, registry=registry)

        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prefill tokens processed", label, registry=registry)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generation tokens processed", label,
                                         registry=registry)  # fmt: skip
        self.success = Counter("vllm:request_success", "Finished requests, by finish reason",
                               [*label, "finished_reason"], registry=registry)  # fmt: skip
        self.prefix_queries = Counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                      label, registry=registry)  # fmt: skip
        self.prefix_hits = Counter("vllm:prefix_cache_hits", "Prompt tokens found in the device prefix cache",
                                   label, registry=registry)  # fmt: skip
        self.ttft = histogram("time_to_first_token_seconds", "Time to first token", LATENCY_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Request latency, arrival to finish", LATENCY_BUCKETS)
        self.queue = histogram("request_queue_time_seconds", "Time queued before admission", LATENCY_BUCKETS)
        self.prefill = histogram("request_prefill_time_seconds", "Admission to first token", LATENCY_BUCKETS)
        self.decode = histogram("request_decode_time_seconds", "First token to finish", LATENCY_BUCKETS)
        self.prompt_len = histogram("request_prompt_tokens", "Prompt tokens per request", TOKEN_BUCKETS)
        self.generation_len = histogram("request_generation_tokens", "Generated tokens per request", TOKEN_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time from a request's token to its next", TOKEN_GAP_BUCKETS)
        # vLLM's name for the same (until its 0.11; dropped in 0.13): dashboards of its earlier releases read it
        self.tpot = histogram("time_per_output_token_seconds", "Time from a request's token to its next (vLLM's "
                              "name before inter_token_latency_seconds)", TOKEN_GAP_BUCKETS)  # fmt: skip
        self.request_tpot = histogram("request_time_per_output_token_seconds", "Per request: first token to last, "
                                      "over the tokens after the first", TOKEN_GAP_BUCKETS)  # fmt: skip
        for metric in (self.prompt_tokens, self.generation_tokens, self.prefix_queries, self.prefix_hits, self.ttft,
                       self.e2e, self.queue, self.prefill, self.decode, self.prompt_len, self.generation_len,
                       self.itl, self.tpot, self.request_tpot):  # fmt: skip
            metric.labels(model_name)  # each series there from the start, at 0 (as vLLM's): rate() works at once

    def observe_first_token(self, out: RequestOutput) -> None:
        m = out.metrics
        if m.first_token_s is not None:
            self.ttft.labels(self.model_name).observe(max(0.0, m.first_token_s - m.arrival_s))

    def observe_token(self, out: RequestOutput) -> None:
        """A request's newest token: its gap from the one before (none for its first)."""
        gap = out.metrics.token_gap_s
        if gap is not None:
            self.itl.labels(self.model_name).observe(max(0.0, gap))
            self.tpot.labels(self.model_name).observe(max(0.0, gap))

    def observe(self, out: RequestOutput) -> None:
        m, name = out.metrics, self.model_name
        generated = len(out.token_ids)
        self.prompt_tokens.labels(name).inc(m.prompt_tokens)
        self.generation_tokens.labels(name).inc(generated)
        self.success.labels(name, out.finish_reason or "abort").inc()
        self.prefix_queries.labels(name).inc(m.prompt_tokens)
        self.prefix_hits.labels(name).inc(m.cached_tokens.get("device", 0))
        self.prompt_len.labels(name).observe(m.prompt_tokens)
        self.generation_len.labels(name).observe(generated)
        self.request_tpot.labels(name).observe(mean_token_time(m, generated))
        for histogram, start, end in ((self.e2e, m.arrival_s, m.finish_s),
                                      (self.queue, m.arrival_s, m.scheduled_s),
                                      (self.prefill, m.scheduled_s, m.first_token_s),
                                      (self.decode, m.first_token_s, m.finish_s)):  # fmt: skip
            if start is not None and end is not None:
                histogram.labels(name).observe(max(0.0, end - start))


def mean_token_time(m: RequestMetrics, generated: int) -> float:
    """vLLM's time per output token of one request: its first token to its last, over the tokens
    after the first (the first comes with the prompt); 0 for fewer than two tokens, as vLLM's."""
    if generated < 2 or m.first_token_s is None or m.last_token_s is None:
        return 0.0
    return max(0.0, m.last_token_s - m.first_token_s) / (generated - 1)


def cache_config_info(cache: CacheConfig, num_pages: int) -> dict[str, str]:
    """vllm:cache_config_info's labels: the cache's settings as vLLM names them, each a string."""
    return {"block_size": str(cache.page_size), "cache_dtype": cache.kv_cache_dtype,
            "enable_prefix_caching": str(cache.enable_prefix_cache),
            "gpu_memory_utilization": str(cache.gpu_memory_utilization), "num_gpu_blocks": str(num_pages)}  # fmt: skip


class VLLMStatsCollector(Collector):
    """vLLM's gauges (and its preemption counter), read from the engine's stats at scrape time."""

    def __init__(self, stats: Callable[[], dict[str, Any]], model_name: str,
                 cache_info: dict[str, str] | None = None) -> None:  # fmt: skip
        self._stats = stats
        self.model_name = model_name
        self.cache_info = cache_info or {}

    def describe(self) -> list[Metric]:
        return []  # computed per scrape

    def collect(self) -> Iterator[Metric]:
        stats = self._stats() or {}
        label = [self.model_name]

        def gauge(name: str, doc: str, value: Any) -> Iterator[Metric]:
            if isinstance(value, (int, float)):
                family = GaugeMetricFamily(f"vllm:{name}", doc, labels=["model_name"])
                family.add_metric(label, float(value))
                yield family

        yield from gauge("num_requests_running", "Requests in model execution batches", stats.get("running"))
        yield from gauge("num_requests_waiting", "Requests waiting to be processed", stats.get("waiting"))
        total, free = stats.get("pages_total"), stats.get("pages_free")
        if isinstance(total, int) and isinstance(free, int) and total > 0:
            usage = 1.0 - free / total  # pages held by requests (cached pages count as free: evictable)
            yield from gauge("kv_cache_usage_perc", "KV-cache usage: 1 means 100 percent", usage)
            yield from gauge("gpu_cache_usage_perc", "KV-cache usage (vLLM's V0 name)", usage)
        if isinstance(stats.get("lora_max"), int):  # vLLM's: its labels say it, its value when they did
            info = GaugeMetricFamily("vllm:lora_requests_info", "Running stats on LoRA requests",
                                     labels=["max_lora", "waiting_lora_adapters", "running_lora_adapters"])  # fmt: skip
            info.add_metric([str(stats["lora_max"]), ",".join(stats.get("lora_waiting", ())),
                             ",".join(stats.get("lora_running", ()))], time.time())  # fmt: skip
            yield info
        if self.cache_info:  # vLLM's: the cache's configuration in its labels (cache_dtype, block_size, ...), 1
            info = GaugeMetricFamily("vllm:cache_config_info", "Information of the KV cache's configuration",
                                     labels=list(self.cache_info))  # fmt: skip
            info.add_metric(list(self.cache_info.values()), 1.0)
            yield info
        counters = [("num_preemptions", "Preemptions so far", "preemptions"),
                    ("spec_decode_num_drafts", "Speculative proposals checked", "spec_drafts"),
                    ("spec_decode_num_draft_tokens", "Speculated tokens checked", "spec_draft_tokens"),
                    ("spec_decode_num_accepted_tokens", "Speculated tokens the model wrote alike", "spec_accepted_tokens")]  # fmt: skip
        for name, doc, key in counters:  # (a counter only where the engine counts it: speculation on)
            if isinstance(stats.get(key), int):
                family = CounterMetricFamily(f"vllm:{name}", doc, labels=["model_name"])
                family.add_metric(label, float(stats[key]))
                yield family
