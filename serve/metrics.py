"""GET /metrics: the server's state and latencies in Prometheus' text format (prometheus-client).

    gpt_requests_total{status}             HTTP requests answered, by status code
    gpt_requests_cancelled_total           requests that ended before their sequences did (the client
                                           went away, or stopped a stream)
    gpt_time_to_first_token_seconds        a request's wait for its first token (histogram)
    gpt_inter_token_latency_seconds        the gap between a sequence's tokens (histogram)
    gpt_request_latency_seconds            a request from arrival to its last token (histogram)
    gpt_prompt_tokens_total, gpt_generation_tokens_total
    gpt_queue_depth                        sequences waiting for room in the batch
    gpt_running_sequences                  sequences in the batch
    gpt_cache_slots{state="busy"|"free"}   the batch's room (--max-batch)
    gpt_kv_cache_bytes                     KV cache held by the sequences in the batch
    gpt_prefix_cache_lookups_total         prompts prefilled with the prefix cache on (serve/prefix.py)
    gpt_prefix_cache_hits_total            ... that found a cached prefix
    gpt_prefix_cache_tokens_reused_total   prompt tokens copied from the prefix cache, not computed
    gpt_prefix_cache_evictions_total       blocks evicted, least recently used first
    gpt_prefix_cache_bytes, gpt_prefix_cache_blocks   what it holds (never past --prefix-cache-mb)

Gauges are read when /metrics is scraped; nothing is computed per token but two histogram updates.

Imports no torch.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:
    from serve.scheduler import Request, Scheduler

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
    """The server's metrics, in a registry of their own (one per app)."""

    def __init__(self, scheduler: Scheduler, max_batch: int):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("gpt_requests", "HTTP requests answered, by status code", ["status"], registry=r)
        self.cancelled = Counter("gpt_requests_cancelled", "requests that ended before their sequences did",
                                 registry=r)
        self.ttft = Histogram("gpt_time_to_first_token_seconds", "time from a request's arrival to its first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("gpt_inter_token_latency_seconds", "time between two tokens of a sequence",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("gpt_request_latency_seconds", "time from a request's arrival to its last token",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("gpt_prompt_tokens", "prompt tokens of the requests admitted", registry=r)
        self.generation_tokens = Counter("gpt_generation_tokens", "tokens generated", registry=r)
        Gauge("gpt_queue_depth", "sequences waiting for room in the batch", registry=r).set_function(
            lambda: len(scheduler.waiting))
        Gauge("gpt_running_sequences", "sequences in the batch", registry=r).set_function(lambda: len(scheduler.batch))
        slots = Gauge("gpt_cache_slots", "the batch's room for sequences (--max-batch)", ["state"], registry=r)
        slots.labels("busy").set_function(lambda: len(scheduler.batch))
        slots.labels("free").set_function(lambda: max(0, max_batch - len(scheduler.batch)))
        Gauge("gpt_kv_cache_bytes", "bytes of KV cache held by the sequences in the batch", registry=r).set_function(
            lambda: scheduler.batch.cache_bytes_in_use())
        r.register(PrefixCollector(scheduler))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def middleware(self, app):
        """ASGI middleware that counts every answer by its status, refusals of the guard included."""
        async def counted(scope, receive, send):
            if scope["type"] != "http":
                return await app(scope, receive, send)

            async def send_counted(message):
                if message["type"] == "http.response.start":
                    self.requests.labels(str(message["status"])).inc()
                await send(message)
            return await app(scope, receive, send_counted)
        return counted


class PrefixCollector:
    """The prefix cache's counts, read from it when /metrics is scraped (zeros when reuse is off)."""

    COUNTS = {"lookups": "prompts prefilled with the prefix cache on", "hits": "prompts that found a cached prefix",
              "tokens_reused": "prompt tokens copied from the prefix cache instead of computed",
              "evictions": "prefix cache blocks evicted, least recently used first"}

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler

    def describe(self):
        return []

    def collect(self):
        prefix = getattr(self.scheduler.batch, "prefix", None)
        for name, text in self.COUNTS.items():
            yield CounterMetricFamily(f"gpt_prefix_cache_{name}", text, value=getattr(prefix, name, 0))
        yield GaugeMetricFamily("gpt_prefix_cache_bytes", "bytes the prefix cache holds",
                                value=prefix.bytes if prefix else 0)
        yield GaugeMetricFamily("gpt_prefix_cache_blocks", "blocks the prefix cache holds",
                                value=len(prefix.entries) if prefix else 0)


class RequestTimer:
    """One request's latencies, observed as its events arrive in the event loop."""

    def __init__(self, metrics: ServerMetrics | None, request: Request):
        self.metrics, self.started = metrics, request.arrived
        self.first: float | None = None
        self.last: dict[int, float] = {}  # id(sequence) -> when its last token arrived
        if metrics is not None:
            metrics.prompt_tokens.inc(sum(len(s.prompt_ids) for s in request.sequences))

    def token(self, sequence) -> None:
        if self.metrics is None:
            return
        now = time.monotonic()
        if self.first is None:
            self.first = now
            self.metrics.ttft.observe(now - self.started)
        previous = self.last.get(id(sequence))
        if previous is not None:
            self.metrics.itl.observe(now - previous)
        self.last[id(sequence)] = now

    def end(self, request: Request, cancelled: bool) -> None:
        if self.metrics is None:
            return
        self.metrics.generation_tokens.inc(sum(len(s.generated) for s in request.sequences))
        if cancelled:
            self.metrics.cancelled.inc()
        else:
            self.metrics.e2e.observe(time.monotonic() - self.started)
