"""Prometheus metrics, one registry per app (so several apps in one process never collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("salmon_requests_total", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("salmon_request_latency_seconds", "Request latency by endpoint", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.batch_items = Histogram("salmon_batch_items", "Items per model batch",
                                     buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=r)
        self.batch_tokens = Histogram("salmon_batch_tokens", "Tokens per model batch",
                                      buckets=(64, 256, 1024, 4096, 16384, 65536), registry=r)
        self.tokens = Counter("salmon_tokens_total", "Tokens processed by the model (incl. cached)", registry=r)
        self.cached_tokens = Counter("salmon_cached_tokens_total", "Tokens served from the prefix cache", registry=r)
        self.tokens_per_second = Gauge("salmon_tokens_per_second", "Throughput of the last batch", registry=r)
        self.queue_depth = Gauge("salmon_queue_items", "Items waiting to be scored", registry=r)
        self.reloads = Counter("salmon_reloads_total", "Model reloads by outcome", ["outcome"], registry=r)
        self.cache_bytes = Gauge("salmon_prefix_cache_bytes", "Bytes held by the prefix cache", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
