"""bench/capacity.py's queue simulator against queueing theory's closed forms."""

from __future__ import annotations

import pytest

from bench.capacity import (
    Service,
    mmc_mean_wait,
    mmc_wait_quantile,
    parse_range,
    per_image_from_metrics,
    poisson_arrivals,
    simulate,
    speedup_at,
)


@pytest.mark.parametrize(("lam", "mu", "c"), [(0.7, 1.0, 1), (1.5, 1.0, 2), (3.2, 1.0, 4)])
def test_poisson_arrivals_exponential_service_match_mmc(lam: float, mu: float, c: int) -> None:
    """M/M/c: mean wait C/(c mu - lam) and the p95 from P(W > t) = C e^{-(c mu - lam) t}."""
    arrivals = poisson_arrivals(lam, 60_000 / lam, seed=3)
    s = simulate(arrivals, c, Service(1 / mu, "exp", seed=4)).summary()
    assert s["mean"] == pytest.approx(mmc_mean_wait(lam, mu, c), rel=0.08)
    assert s["p95"] == pytest.approx(mmc_wait_quantile(lam, mu, c, 0.95), rel=0.08)
    assert s["utilisation"] == pytest.approx(lam / (c * mu), rel=0.03)


def test_mm1_closed_form_is_rho_over_mu_minus_lambda() -> None:
    assert mmc_mean_wait(0.5, 1.0, 1) == pytest.approx(0.5 / (1.0 - 0.5))


def test_evenly_spaced_jobs_below_capacity_never_wait() -> None:
    arrivals = [i * 1.0 for i in range(100)]
    s = simulate(arrivals, 1, Service(0.9)).summary()
    assert s["p99"] == 0.0
    assert s["utilisation"] == pytest.approx(0.9, rel=0.01)


def test_batching_takes_queued_jobs_together() -> None:
    """Ten jobs at once, one worker, batches of 8 at 2x: the first 8 start at 0 and take
    8 * 1 / 2 = 4 s; the last 2 wait those 4 s."""
    s = simulate([0.0] * 10, 1, Service(1.0, speedup={1: 1.0, 8: 2.0}), max_batch=8)
    assert sorted(s.waits) == [0.0] * 8 + [4.0, 4.0]
    assert s.batches == 2


def test_speedup_interpolates_between_measured_points() -> None:
    points = {1: 1.0, 8: 2.89}
    assert speedup_at(1, points) == 1.0
    assert speedup_at(8, points) == 2.89
    assert speedup_at(16, points) == 2.89
    assert 1.0 < speedup_at(4, points) < 2.89


def test_per_image_time_from_worker_metrics() -> None:
    text = ("# TYPE promptpix_generation_seconds histogram\n"
            "promptpix_generation_seconds_sum 12.5\n"
            "promptpix_generation_seconds_count 20.0\n"
            "promptpix_images_generated_total 25.0\n")
    assert per_image_from_metrics(text) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="promptpix_images_generated_total"):
        per_image_from_metrics("promptpix_generation_seconds_sum 1\n")


def test_worker_range() -> None:
    assert parse_range("1-3,8") == [1, 2, 3, 8]
    with pytest.raises(ValueError, match="range"):
        parse_range("0-2")


def test_replayed_service_times_keep_their_order() -> None:
    """`replay` gives job i its own measured time: a slow spell stays together."""
    s = simulate([0.0, 0.1, 0.2], 1, Service(1.0, "replay", [1.0, 3.0, 0.5]))
    assert s.waits == pytest.approx([0.0, 0.9, 3.8])
