"""The measurement primitives behind /stats and /metrics, with a fake clock."""

from __future__ import annotations

import pytest

from services.errors import GenerationTimeout, QueueTimeout, TooBusy
from services.observability.request_stats import RequestCounts, classify
from services.concurrency_manager import outcome_of
from services.observability.stats import UsageStats
from services.observability.window import BucketHistogram, SlidingWindow, percentile


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_percentiles_use_the_nearest_rank():
    values = list(range(1, 101))
    assert (percentile(values, 50), percentile(values, 95), percentile(values, 99)) == (50, 95, 99)
    assert percentile([7], 99) == 7 and percentile([], 50) is None


def test_the_window_forgets_samples_older_than_its_length():
    clock = Clock()
    window = SlidingWindow(seconds=60, clock=clock)
    window.add(5.0)
    clock.now += 30
    window.add(1.0)
    assert window.percentiles((50, 95), scale=1000) == {"p50": 1000.0, "p95": 5000.0, "samples": 2}
    clock.now += 31
    assert window.values() == [1.0]


def test_histogram_buckets_are_cumulative_and_inclusive():
    histogram = BucketHistogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 3.0):
        histogram.observe(value)
    buckets, total = histogram.snapshot()
    assert buckets == [("0.1", 2), ("1.0", 3), ("+Inf", 4)]
    assert total == pytest.approx(3.65)


@pytest.mark.parametrize("status,code,outcome", [
    (200, None, "succeeded"), (400, "invalid_request", "failed"), (429, "too_many_requests", "rejected"),
    (503, "queue_timeout", "queue_timed_out"), (504, "generation_timeout", "timed_out"),
    (200, "generation_timeout", "timed_out"), (200, "client_disconnected", "cancelled"),
    (200, "internal_error", "failed"), (503, "shutting_down", "failed"),
])
def test_replies_are_classified_by_status_and_error_code(status, code, outcome):
    assert classify(status, code) == outcome


def test_errors_map_to_outcomes_by_type():
    assert outcome_of(TooBusy("busy")) == "rejected"
    assert outcome_of(QueueTimeout("late")) == "queue_timed_out"
    assert outcome_of(GenerationTimeout("slow")) == "timed_out"
    assert outcome_of(GeneratorExit()) == "cancelled" and outcome_of(ValueError()) == "failed"


def test_request_counts_group_by_route_template():
    counts = RequestCounts()
    for status in (200, 200, 404):
        counts.record("GET", "/api/v1/models/<name>", status, None if status == 200 else "model_not_found")
    counts.record("GET", None, 404, "not_found")
    summary = counts.summary()
    assert (summary["total"], summary["succeeded"], summary["failed"]) == (4, 2, 2)
    assert summary["endpoints"]["GET /api/v1/models/<name>"]["statuses"] == {"200": 2, "404": 1}
    assert summary["endpoints"]["GET <unmatched>"]["total"] == 1


def test_usage_counts_latency_only_for_completed_generations():
    stats = UsageStats(clock=Clock())
    stats.record("m", True, 5, 10, 0.0, 0.5, ttft_seconds=0.1, latency_seconds=0.6)
    stats.record("m", False, 5, 2, 0.0, 0.5, ttft_seconds=0.2, latency_seconds=9.0)
    stats.record_outcome("m", "succeeded")
    stats.record_outcome("m", "timed_out")
    summary = stats.summary()
    assert summary["latency_ms"]["samples"] == 1 and summary["latency_ms"]["p99"] == 600.0
    assert summary["ttft_ms"]["samples"] == 2
    assert summary["tokens"] == {"prompt": 10, "completion": 12}
    assert summary["tokens_per_second"] == {"recent": 12.0, "lifetime": 12.0}
    usage = stats.by_model()["m"]
    assert (usage["requests"], usage["succeeded"], usage["timed_out"], usage["generations"]) == (2, 1, 1, 2)
