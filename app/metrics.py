"""API metrics (`promptpix_` prefix, base units); `middleware.EdgeMiddleware` records the
HTTP ones.

With several uvicorn processes `app.serve` sets `PROMETHEUS_MULTIPROC_DIR` before any
process imports prometheus_client, and `/metrics` merges every process's files. Queue
depth and live workers are read from Redis at scrape time, so they are never per-process.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import redis
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from worker.protocol import JobStore

logger = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

HTTP_REQUESTS = Counter("promptpix_http_requests_total", "HTTP requests answered",
                        ["method", "route", "status"])
HTTP_DURATION = Histogram("promptpix_http_request_duration_seconds",
                          "HTTP request latency", ["route"], buckets=LATENCY_BUCKETS)
JOBS_SUBMITTED = Counter("promptpix_jobs_submitted_total", "Jobs accepted into the queue")


class ServiceCollector(Collector):
    """Gauges read from Redis at scrape time: queue depth, live workers, Redis up."""

    def __init__(self, store: JobStore) -> None:
        self.store = store

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily("promptpix_redis_up", "1 when Redis answered this scrape")
        try:
            depth = self.store.queue_depth()
            workers = sum(1 for w in self.store.live_workers() if w.get("model_id"))
        except (redis.ConnectionError, redis.TimeoutError) as e:
            logger.warning("metrics: Redis unreachable: %s", e)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield GaugeMetricFamily("promptpix_queue_depth", "Jobs waiting in the queue", value=depth)
        yield GaugeMetricFamily("promptpix_workers", "Live workers with a loaded model",
                                value=workers)


def render_metrics(store: JobStore) -> bytes:
    """Prometheus text for this process (or all processes in multiprocess mode)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        base = generate_latest(registry)
    else:
        base = generate_latest(REGISTRY)
    extra = CollectorRegistry(auto_describe=False)
    extra.register(ServiceCollector(store))
    return base + generate_latest(extra)
