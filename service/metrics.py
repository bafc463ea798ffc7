"""Every Prometheus metric of the server, defined once.

A `Metrics` object owns its own `CollectorRegistry`, so several servers can live in one process (the tests
start many). Under `plm serve --workers N` (service/workers.py) each worker writes its values to files in
`PROMETHEUS_MULTIPROC_DIR` and the supervisor serves their sum: each gauge says how workers' values combine
(`multiprocess_mode`; ignored by a single process).

Metrics are recorded at two boundaries: the request (servicer) and the batch (batcher/runtime).

No `_created` series: prometheus_client would add one beside every counter and histogram child (its creation
time), doubling the series a scrape stores. Prometheus reads them as creation times only under its
`created-timestamp-zero-ingestion` feature flag, which deploy/ does not set; otherwise it stores each as one
more series that no query, alert or dashboard here reads, and finds counter resets from the values themselves.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, start_http_server
from prometheus_client import values as prometheus_values
from prometheus_client.exposition import generate_latest

disable_created_metrics()  # before any metric exists: the switch is read as each child is created

# Latency buckets from 0.5 ms to 30 s: n-gram requests take well under a millisecond, long generations seconds.
_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)
_TOKENS = (16, 64, 256, 1024, 4096, 16384, 65536)
_RATIO = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)


def observe_many(child: Any, values: Sequence[float]) -> None:
    """Observe every value of `values` in one labelled histogram series: the sum once, each bucket touched once
    with its count, instead of a sum and a bucket update per value (each takes the value's lock). Falls back to
    `observe` per value for a series without prometheus_client's bucket layout."""
    bounds = getattr(child, "_upper_bounds", None)
    if bounds is None or len(values) < 2:
        for v in values:
            child.observe(v)
        return
    counts: dict[int, int] = {}
    for v in values:
        i = bisect.bisect_left(bounds, v)  # the first bound >= v, as observe's `amount <= bound`
        counts[i] = counts.get(i, 0) + 1
    child._sum.inc(sum(values))
    for i, n in counts.items():
        child._buckets[i].inc(n)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        # (method, model, code, protocol) → the two labelled series a finished call updates, and its running
        # totals [calls, seconds, end of the last call (epoch seconds)] for KServe's ModelStatistics. Bounded:
        # methods, codes and protocols are fixed sets, and model labels are only names the registry knows.
        self._request_series: dict[tuple[str, str, str, str], tuple[Any, Any, list[float]]] = {}
        self.inflight_now = 0  # calls in flight in this server process (set_inflight)
        self.requests = Counter(
            "plm_requests", "Calls handled, by method, model, status code (gRPC's names, under every protocol) and "
            "protocol (grpc: plm.v1 and KServe v2; http: the OpenAI-compatible API).",
            ["method", "model", "code", "protocol"], registry=r,
        )
        self.request_duration = Histogram(
            "plm_request_duration_seconds", "Call wall time from arrival to response, by protocol as plm_requests.",
            ["method", "model", "protocol"], buckets=_LATENCY, registry=r,
        )
        self.queue_wait = Histogram(
            "plm_queue_wait_seconds", "Time a request waited in its model's queue before its batch ran.",
            ["model"], buckets=_LATENCY, registry=r,
        )
        self.queue_depth = Gauge("plm_queue_depth", "Rows waiting in a model's queue.", ["model"],
                                 multiprocess_mode="livesum", registry=r)
        self.batch_size = Histogram(
            "plm_batch_size", "Rows per ONNX Runtime run.", ["model"], buckets=_SIZES, registry=r
        )
        self.batch_tokens = Histogram(
            "plm_batch_tokens", "Padded tokens (rows × length) per run.", ["model"], buckets=_TOKENS, registry=r
        )
        self.padding_efficiency = Histogram(
            "plm_padding_efficiency_ratio", "Real tokens ÷ padded tokens per run (1.0 = no padding).",
            ["model"], buckets=_RATIO, registry=r,
        )
        self.inference_duration = Histogram(
            "plm_inference_duration_seconds", "Model execution time per batch, by stage.",
            ["model", "stage"], buckets=_LATENCY, registry=r,
        )
        self.generated_tokens = Counter(
            "plm_generated_tokens", "Tokens produced by generation.", ["model"], registry=r
        )
        self.time_to_first_token = Histogram(
            "plm_time_to_first_token_seconds", "Generation: request arrival to the first token.",
            ["model"], buckets=_LATENCY, registry=r,
        )
        self.inter_token_latency = Histogram(
            "plm_inter_token_latency_seconds", "Generation: time between consecutive tokens of one sequence.",
            ["model"], buckets=_LATENCY, registry=r,
        )
        self.rejections = Counter(
            "plm_rejections",
            "Requests refused before any work, by reason: queue_full, inflight, deadline (passed while queued), "
            "deadline_admission (could not make it behind the queue), draining, unauthenticated.",
            ["model", "reason"], registry=r,
        )
        self.inflight = Gauge("plm_inflight_requests", "RPCs being handled now (all models).",
                              multiprocess_mode="livesum", registry=r)
        # One process: the gauge reads `inflight_now` when scraped, so a call sets a plain int, not the gauge's
        # locked value twice. Worker processes write their values to files the supervisor reads: there it is set.
        self._inflight_files = prometheus_values.ValueClass is not prometheus_values.MutexValue
        if not self._inflight_files:
            self.inflight.set_function(lambda: self.inflight_now)
        self.active_sequences = Gauge(
            "plm_active_sequences", "Sequences in a generation engine's running batch (each holds KV memory).",
            ["model"], multiprocess_mode="livesum", registry=r,
        )
        self.prefix_cache = Counter(
            "plm_prefix_cache_lookups", "Shared prompt prefixes (few-shot demonstrations) looked up, by result.",
            ["model", "result"], registry=r,
        )
        self.prefix_cache_bytes = Gauge(
            "plm_prefix_cache_bytes", "Keys and values of cached prompt prefixes.", ["model"],
            multiprocess_mode="livesum", registry=r,
        )
        self.execution_provider = Gauge(
            "plm_execution_provider_active", "1 for each ONNX Runtime execution provider a model's sessions use.",
            ["model", "provider"], multiprocess_mode="livemax", registry=r,
        )
        self.model_ready = Gauge("plm_model_ready", "1 when the model is loaded and serving.", ["model"],
                                 multiprocess_mode="livemin", registry=r)
        self.model_load_seconds = Gauge(
            "plm_model_load_seconds", "Time the last load of the model took.", ["model"],
            multiprocess_mode="livemax", registry=r,
        )
        self.reloads = Counter(
            "plm_model_reloads", "Repository changes applied or refused, by action (added, replaced, removed, "
            "rejected).", ["model", "action"], registry=r,
        )

    def set_inflight(self, calls: int) -> None:
        """The calls being handled now: the gauge, and `inflight_now` for the batchers' idleness test."""
        self.inflight_now = calls
        if self._inflight_files:
            self.inflight.set(calls)

    def request_done(self, method: str, model: str, code: str, seconds: float, protocol: str = "grpc") -> None:
        """Count one finished call and observe its duration (the labelled series are looked up once each)."""
        key = (method, model, code, protocol)
        series = self._request_series.get(key)
        if series is None:
            series = self._request_series[key] = (self.requests.labels(method, model, code, protocol),
                                                  self.request_duration.labels(method, model, protocol), [0, 0.0, 0.0])
        series[0].inc()
        series[1].observe(seconds)
        totals = series[2]
        totals[0] += 1
        totals[1] += seconds
        totals[2] = time.time()

    def request_totals(self, model: str) -> list[tuple[str, str, int, float, float]]:
        """(method, code, calls, seconds, end of the last call in epoch seconds) of one model's finished calls in
        this process, protocols summed: the success and failure sums of KServe's ModelStatistics."""
        merged: dict[tuple[str, str], list[float]] = {}
        for (method, name, code, _), (_, _, (calls, seconds, last)) in list(self._request_series.items()):
            if name == model:
                into = merged.setdefault((method, code), [0, 0.0, 0.0])
                into[0] += calls
                into[1] += seconds
                into[2] = max(into[2], last)
        return [(method, code, int(c), s, t) for (method, code), (c, s, t) in merged.items()]

    @staticmethod
    def model_totals(histogram: Histogram, model: str) -> tuple[int, float]:
        """(observations, their sum) of one model's series of a histogram with a `model` label, its other
        labels summed: what ModelStatistics reads from the queue wait, inference duration and batch size."""
        count, total = 0.0, 0.0
        for family in histogram.collect():
            for sample in family.samples:
                if sample.labels.get("model") != model:
                    continue
                if sample.name.endswith("_count"):
                    count += sample.value
                elif sample.name.endswith("_sum"):
                    total += sample.value
        return int(count), total

    def exposition(self) -> bytes:
        """The text exposition format, as /metrics serves it."""
        return generate_latest(self.registry)

    def serve_http(self, host: str, port: int) -> None:
        """Serve /metrics on a background thread (prometheus_client's own HTTP server)."""
        start_http_server(port, addr=host, registry=self.registry)
