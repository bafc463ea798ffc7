"""The per-call path's economies keep what the metrics mean: a batch's histogram observations equal one
observation per value, and the in-flight gauge read at scrape time says what was set."""

from __future__ import annotations

import pytest


def test_observe_many_equals_observe_per_value() -> None:
    """A batch's values observed at once give the same buckets, count and sum as one observation each, bounds
    included (a value equal to a bound falls in that bound's bucket)."""
    from plm.service.metrics import observe_many
    from prometheus_client import CollectorRegistry, Histogram

    values = [0.0005, 0.0004, 0.003, 0.001, 0.2, 40.0, 0.001, 0.0]
    registry = CollectorRegistry()
    h = Histogram("h", "h", ["model"], buckets=(0.0005, 0.001, 0.0025, 0.1, 1.0), registry=registry)
    for v in values:
        h.labels("one").observe(v)
    observe_many(h.labels("many"), values)
    seen: dict[str, dict[tuple[str, str | None], float]] = {"one": {}, "many": {}}
    for f in registry.collect():
        for s in f.samples:
            seen[s.labels["model"]][(s.name, s.labels.get("le"))] = s.value
    assert seen["one"].keys() == seen["many"].keys()
    for key, value in seen["one"].items():
        assert seen["many"][key] == pytest.approx(value), key


def test_inflight_gauge_reads_the_calls_in_flight() -> None:
    from plm.service.metrics import Metrics

    metrics = Metrics()
    for calls in (3, 1, 0):
        metrics.set_inflight(calls)
        assert metrics.registry.get_sample_value("plm_inflight_requests") == calls
