"""Prometheus metrics of the server (``GET /metrics``), in a registry of its own.

Requests by route and status, prompt and generated tokens, time to first token, decode speed,
cancelled and rejected requests, the queue, and the expert cache's counters (hit rate, loads, bytes,
stall time) read from the session's expert source at each scrape, and with ``--batch-size`` above 1
the running batch's steps and sizes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_RATE_BUCKETS = (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


class _ExpertCacheCollector(Collector):
    """The expert source's ``stats()`` (engine.memory.CacheStats) as metrics, read when scraped."""

    def __init__(self, stats: Callable[[], Any]):
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        if stats is None:
            return
        for name, doc, value in (
            ("moeinf_expert_cache_accesses", "Expert uses asked of the cache", stats.accesses),
            ("moeinf_expert_cache_hits", "Expert uses found resident", stats.hits),
            ("moeinf_expert_bytes_loaded", "Bytes of experts read or copied", stats.bytes_loaded),
            ("moeinf_expert_stall_seconds", "Time the compute waited for expert loads", stats.stall_s),
            ("moeinf_expert_evictions", "Experts evicted from the cache", stats.evictions),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        loads = CounterMetricFamily("moeinf_expert_loads", "Expert loads by kind", labels=["kind"])
        loads.add_metric(["demand"], stats.demand_loads)
        loads.add_metric(["prefetch"], stats.prefetch_loads)
        yield loads
        yield GaugeMetricFamily(
            "moeinf_expert_cache_hit_ratio", "Share of expert uses found resident", value=stats.hit_rate
        )
        yield GaugeMetricFamily(
            "moeinf_expert_resident_bytes", "Bytes of experts in fast memory", value=stats.resident_bytes
        )


class _BatchCollector(Collector):
    """The running batch's step counts (``Scheduler.batch_stats``), read when scraped; none at batch size 1."""

    def __init__(self, stats: Callable[[], tuple[int, int, int] | None]):
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        if stats is None:
            return
        steps, sequence_steps, peak = stats
        yield CounterMetricFamily("moeinf_batch_steps", "Forward passes of the running batch", value=steps)
        yield CounterMetricFamily(
            "moeinf_batch_sequence_steps",
            "Sequences summed over the batch's forward passes (divide by the steps: mean batch size)",
            value=sequence_steps,
        )
        yield GaugeMetricFamily(
            "moeinf_batch_size_peak", "Most sequences decoded together in one forward pass", value=peak
        )


class ServerMetrics:
    """All the server's metrics; ``render()`` is the /metrics body."""

    def __init__(
        self,
        waiting: Callable[[], int],
        running: Callable[[], int],
        loaded: Callable[[], bool],
        cache_stats: Callable[[], Any],
        batch_stats: Callable[[], tuple[int, int, int] | None] = lambda: None,
    ):
        disable_created_metrics()  # no ``*_created`` series: scrapes stay short
        r = self.registry = CollectorRegistry()
        self.requests = Counter("moeinf_requests", "HTTP requests answered", ["route", "status"], registry=r)
        self.prompt_tokens = Counter(
            "moeinf_prompt_tokens", "Prompt tokens of finished generations", registry=r
        )
        self.prompt_tokens_cached = Counter(
            "moeinf_prompt_tokens_cached",
            "Prompt tokens reused from the KV cache (not prefilled)",
            registry=r,
        )
        self.generated_tokens = Counter("moeinf_generated_tokens", "Tokens generated", registry=r)
        self.generations = Counter(
            "moeinf_generations", "Generations by how they ended", ["reason"], registry=r
        )
        self.rejected = Counter(
            "moeinf_requests_rejected", "Requests refused before generating", ["reason"], registry=r
        )
        self.time_to_first_token = Histogram(
            "moeinf_time_to_first_token_seconds",
            "From request to first generated text",
            registry=r,
            buckets=_LATENCY_BUCKETS,
        )
        self.queue_wait = Histogram(
            "moeinf_queue_wait_seconds",
            "Time a request waited for the model",
            registry=r,
            buckets=_LATENCY_BUCKETS,
        )
        self.decode_rate = Histogram(
            "moeinf_decode_tokens_per_second",
            "Decode speed of each generation",
            registry=r,
            buckets=_RATE_BUCKETS,
        )
        Gauge("moeinf_queue_waiting", "Requests waiting for the model", registry=r).set_function(waiting)
        Gauge("moeinf_queue_running", "Requests generating now", registry=r).set_function(running)
        Gauge("moeinf_model_loaded", "1 once the model is loaded", registry=r).set_function(
            lambda: float(loaded())
        )
        r.register(_ExpertCacheCollector(cache_stats))
        r.register(_BatchCollector(batch_stats))

    def finished(self, stats: Any, ttft_s: float | None, wait_s: float | None) -> None:
        """Count one generation that ran to its end (its GenerationStats)."""
        self.prompt_tokens.inc(stats.prompt_tokens)
        self.prompt_tokens_cached.inc(max(0, stats.prompt_tokens - stats.prompt_eval_count))
        self.generated_tokens.inc(stats.generated_tokens)
        self.generations.labels(stats.done_reason).inc()
        if ttft_s is not None:
            self.time_to_first_token.observe(ttft_s)
        if wait_s is not None:
            self.queue_wait.observe(wait_s)
        if stats.eval_s > 0 and stats.generated_tokens > 1:
            self.decode_rate.observe(stats.generated_tokens / stats.eval_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
