"""Worker metrics (`promptpix_` prefix), served by each worker on its own port."""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram, start_http_server

logger = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
                   600.0)
FIRST_AUTO_PORT = 9100
AUTO_PORT_TRIES = 100

JOBS_COMPLETED = Counter("promptpix_jobs_completed_total", "Jobs this worker ended", ["status"])
QUEUE_WAIT = Histogram("promptpix_queue_wait_seconds", "Submission to start of an attempt",
                       buckets=LATENCY_BUCKETS)
GENERATION = Histogram("promptpix_generation_seconds", "Sampling time of a job",
                       buckets=LATENCY_BUCKETS)
ATTEMPTS_HANDED_ON = Counter(
    "promptpix_attempts_handed_on_total",
    "Attempts that ended after their job was handed to another attempt (not a job ending)")
FINAL_WRITE_RETRIES = Counter(
    "promptpix_final_write_retries_total",
    "Final writes of a job retried because Redis was full or unreachable", ["reason"])
FINAL_WRITES_DROPPED = Counter(
    "promptpix_final_writes_dropped_total",
    "Final writes given up after PNGs waited the whole retry window")
TOKENS = Counter("promptpix_tokens_generated_total", "Sub-pixel tokens sampled")
IMAGES = Counter("promptpix_images_generated_total", "Images generated")
TOKENS_PER_S = Gauge("promptpix_sampling_tokens_per_second", "Sub-pixels per second, last job")
BATCH_JOBS = Histogram("promptpix_batch_jobs", "Jobs sampled together in one batch",
                       buckets=(1, 2, 4, 8, 16, 32, 64))
MODEL_LOADED = Gauge("promptpix_model_loaded", "1 when the model is loaded", ["checkpoint_id"])


def serve_metrics(port: int, host: str | None = None) -> int:
    """Start the metrics HTTP server on `host` (default `PROMPTPIX_WORKER_METRICS_HOST`,
    127.0.0.1); port 0 = the first free port from 9100. Returns the port."""
    if host is None:
        from .protocol import get_settings

        host = get_settings().worker_metrics_host
    logger.info("worker metrics listen on %s", host)
    if port != 0:
        start_http_server(port, addr=host)
        return port
    for candidate in range(FIRST_AUTO_PORT, FIRST_AUTO_PORT + AUTO_PORT_TRIES):
        try:
            start_http_server(candidate, addr=host)
        except OSError:
            continue
        return candidate
    raise OSError(f"no free metrics port in {FIRST_AUTO_PORT}..{candidate}")
