"""`plm loadtest`: the load-testing harness — scenarios, closed/open-loop drivers, and the report.

This module owns everything about generating load against one or several plm servers and reporting it:
scenario parsing and validation, the request mix, the asyncio drivers (closed loop: N clients; open loop: Poisson
arrivals with a bounded number of calls in flight), multi-process fan-out, percentiles, the server's own view
scraped from its Prometheus endpoint (deltas over the measured window), the stdout table, the JSON and the PNG.

Two protocols carry the same scenarios: plm.v1 gRPC (a target `host:port`) and the OpenAI-compatible HTTP API
(a target `http://host:port`, the server's `--http-port`), where Generate is `POST /v1/completions` and Embed
`POST /v1/embeddings` with the scenario's fields under OpenAI's names; an HTTP error is reported under the status
name its body's `code` gives, so both protocols' reports read alike.

The pure parts (`parse_scenario`, `percentiles`, `prometheus_delta`, `merge_results`, `summarize`) take and return
plain data so the tests can call them directly.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import math
import multiprocessing as mp
import sys
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

RPCS = ("Score", "PredictNext", "Generate", "FillMask", "Embed")

# Per-RPC optional fields of a scenario entry and their types. Anything else is a typo and rejected, so a
# misspelt `max_new_token` does not silently run with the server's default.
_PARAMS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "Score": {"add_eos": bool, "per_token": bool},
    "PredictNext": {"top_k": int, "include_tokens": bool, "beam_width": int, "max_word_tokens": int},
    "Generate": {"max_new_tokens": int, "min_new_tokens": int, "temperature": (int, float), "top_k": int,
                 "top_p": (int, float), "repetition_penalty": (int, float), "seed": int, "truncate_prompt": bool,
                 "stop": list},
    "FillMask": {"top_k": int},
    "Embed": {"pooling": str, "normalize": bool, "nearest_k": int, "include_tokens": bool},
}
_COMMON = {"weight", "rpc", "model", "texts_per_request"}
# Over HTTP: the endpoint of each RPC the OpenAI-compatible API serves, and each field's OpenAI parameter name.
HTTP_ENDPOINTS = {"Generate": "/v1/completions", "Embed": "/v1/embeddings"}
_HTTP_FIELDS: dict[str, dict[str, str]] = {
    "Generate": {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "temperature": "temperature",
                 "top_k": "top_k", "top_p": "top_p", "repetition_penalty": "repetition_penalty", "seed": "seed",
                 "stop": "stop"},
    "Embed": {},  # /v1/embeddings takes the model's default pooling, unnormalised, as plm.v1's Embed default
}
_SAMPLING = ("max_new_tokens", "min_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed",
             "stop")

# Used when no --inputs file is given: short, varied sentences (questions, numbers, names, punctuation), so the
# request lengths and therefore the padding vary the way real traffic does. The held-out corpus needs the cache.
BUILTIN_INPUTS = (
    "The cat sat on the mat and looked out of the window.",
    "She opened the door slowly.",
    "In 1969, two astronauts walked on the surface of the moon.",
    "Where did you put the keys to the car?",
    "The stock market fell sharply after the announcement.",
    "He said that he would be late for dinner tonight.",
    "Rain is expected across the north of the country tomorrow.",
    "I have never seen such a beautiful garden.",
    "The committee will meet again next Tuesday to discuss the budget.",
    "A small boat drifted towards the harbour at dawn.",
    "Why is the sky blue?",
    "The children were playing football in the park.",
    "Our new restaurant serves fresh fish every day.",
    "The old man told a long story about the war.",
    "Please send me the report before Friday.",
    "Scientists have discovered a new species of frog in the rainforest.",
    "The train to London was delayed by forty minutes.",
    "My sister is learning to play the piano.",
    "It was the best of times, it was the worst of times.",
    "The government announced new measures to reduce pollution.",
    "He quickly finished his coffee and left the house.",
    "What time does the museum open on Sundays?",
    "The river flooded the village after three days of heavy rain.",
    "They bought a house near the sea.",
    "The team won the championship for the third year in a row.",
    "Music can change the way people feel.",
    "The doctor advised him to get more sleep.",
    "A thousand people gathered in the square to hear the speech.",
    "The book was much better than the film.",
    "Every morning she walks her dog along the beach.",
)


# ------------------------------------------------------------------------------------------------- scenario


@dataclass(frozen=True)
class RequestSpec:
    """One weighted entry of a scenario: which RPC on which model, with which extra fields."""

    weight: float
    rpc: str
    model: str
    texts_per_request: int = 1
    params: dict[str, Any] = field(default_factory=dict)


def parse_scenario(data: Any) -> list[RequestSpec]:
    """Validate a scenario (`{"requests": [{weight, rpc, model, ...}, ...]}`); ValueError names the bad field."""
    if not isinstance(data, dict) or not isinstance(data.get("requests"), list) or not data["requests"]:
        raise ValueError("scenario: 'requests' must be a non-empty list of {weight, rpc, model, ...}")
    specs = []
    for i, entry in enumerate(data["requests"]):
        where = f"requests[{i}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: must be an object")
        rpc = entry.get("rpc")
        if rpc not in RPCS:
            raise ValueError(f"{where}.rpc: {rpc!r} is not one of {', '.join(RPCS)}")
        weight = entry.get("weight", 1)
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"{where}.weight: must be a number > 0, got {weight!r}")
        model = entry.get("model")
        if not isinstance(model, str) or not model:
            raise ValueError(f"{where}.model: must be a non-empty string, got {model!r}")
        n = entry.get("texts_per_request", 1)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{where}.texts_per_request: must be an integer ≥ 1, got {n!r}")
        params = {}
        for key, value in entry.items():
            if key in _COMMON:
                continue
            allowed = _PARAMS[rpc]
            if key not in allowed:
                raise ValueError(f"{where}.{key}: unknown field for {rpc} (known: {', '.join(sorted(allowed))})")
            if (isinstance(value, bool) and allowed[key] is not bool) or not isinstance(value, allowed[key]):
                raise ValueError(f"{where}.{key}: wrong type {type(value).__name__}")
            params[key] = value
        if rpc == "Embed" and params.get("pooling", "mean") not in ("mean", "cls", "none"):
            raise ValueError(f"{where}.pooling: must be mean, cls or none")
        specs.append(RequestSpec(float(weight), rpc, model, n, params))
    return specs


def load_scenario(path: Path) -> list[RequestSpec]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    return parse_scenario(data)


def load_inputs(path: Path | None) -> list[str]:
    if path is None:
        return list(BUILTIN_INPUTS)
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path}: no non-empty lines")
    return lines


def mask_one_word(text: str, rng: np.random.Generator) -> str:
    """Replace one random word by [MASK] (a cloze: the model sees the same sentence length as the original)."""
    words = text.split()
    words[int(rng.integers(len(words)))] = "[MASK]"
    return " ".join(words)


def build_request(spec: RequestSpec, texts: list[str]) -> Any:
    """The protobuf request for one scenario entry and its input texts."""
    from plm.api.v1 import plm_pb2 as pb

    p = spec.params
    if spec.rpc == "Score":
        return pb.ScoreRequest(model=spec.model, texts=texts, **p)
    if spec.rpc == "PredictNext":
        return pb.PredictNextRequest(model=spec.model, contexts=texts, **p)
    if spec.rpc == "Generate":
        sampling = pb.SamplingParams(**{k: v for k, v in p.items() if k in _SAMPLING})
        # Long inputs plus max_new_tokens can exceed a tiny model's window; a load test wants load, not refusals.
        return pb.GenerateRequest(model=spec.model, prompts=texts, sampling=sampling,
                                  truncate_prompt=p.get("truncate_prompt", True))
    if spec.rpc == "FillMask":
        return pb.FillMaskRequest(model=spec.model, texts=texts, **p)
    pooling = {"mean": pb.POOLING_MEAN, "cls": pb.POOLING_CLS, "none": pb.POOLING_NONE}[p.get("pooling", "mean")]
    return pb.EmbedRequest(model=spec.model, texts=texts, pooling=pooling,
                           **{k: v for k, v in p.items() if k != "pooling"})


def is_http(target: str) -> bool:
    return target.startswith(("http://", "https://"))


def check_protocol(targets: Sequence[str], specs: Sequence[RequestSpec]) -> bool:
    """Whether the run speaks HTTP (every target a URL) rather than gRPC (none); ValueError for a mix of the two,
    or for a scenario entry the OpenAI-compatible API cannot carry (another RPC, a field it has no name for)."""
    http = [is_http(t) for t in targets]
    if any(http) and not all(http):
        raise ValueError("targets: give all as http(s)://host:port (OpenAI-compatible HTTP) or none (gRPC)")
    if not any(http):
        return False
    for i, spec in enumerate(specs):
        if spec.rpc not in HTTP_ENDPOINTS:
            raise ValueError(f"requests[{i}].rpc: {spec.rpc} has no OpenAI-compatible endpoint; over HTTP use "
                             + ", ".join(f"{r} ({e})" for r, e in HTTP_ENDPOINTS.items()))
        for key in spec.params:
            if key not in _HTTP_FIELDS[spec.rpc]:
                raise ValueError(f"requests[{i}].{key}: {HTTP_ENDPOINTS[spec.rpc]} has no such parameter")
    return True


def build_http_body(spec: RequestSpec, texts: list[str]) -> bytes:
    """The JSON body of one scenario entry for its OpenAI-compatible endpoint (HTTP_ENDPOINTS)."""
    if spec.rpc == "Generate":
        body: dict[str, Any] = {"model": spec.model, "prompt": texts}
        body.update((_HTTP_FIELDS["Generate"][k], v) for k, v in spec.params.items())
    else:
        body = {"model": spec.model, "input": texts}
    return json.dumps(body).encode()


def http_code(status: int, body: bytes) -> str:
    """The status name of a failed HTTP call: its OpenAI error body's `code` (plm's status, lower-cased)."""
    try:
        code = json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        code = None
    return code.upper() if isinstance(code, str) and code else f"HTTP_{status}"


# ---------------------------------------------------------------------------------------------- the driver


@dataclass(frozen=True)
class LoadConfig:
    """Everything one worker needs (picklable: it crosses to `spawn`ed processes)."""

    targets: tuple[str, ...]
    specs: tuple[RequestSpec, ...]
    inputs: tuple[str, ...]
    concurrency: int | None = None  # closed loop when set
    rate: float | None = None  # open loop (requests/s) when set
    duration: float = 10.0
    requests: int | None = None  # stop after this many measured requests instead of after `duration`
    warmup: float = 2.0
    max_in_flight: int = 1000
    timeout: float = 30.0
    seed: int = 0
    worker: int = 0
    # TCP connections per target per process. Server workers on one port (SO_REUSEPORT) and L4 balancers
    # spread connections, not calls: one connection keeps every call on one server process. gRPC only.
    connections: int = 1

    @property
    def http(self) -> bool:
        """The OpenAI-compatible HTTP API (targets are URLs; run_loadtest checks they all are) or plm.v1 gRPC."""
        return is_http(self.targets[0])


# Indices into each worker's shared progress counters.
_SENT, _OK, _ERR = 0, 1, 2


class _GrpcTransport:
    """plm.v1 over `connections` gRPC channels per target; `call` returns the status name."""

    def __init__(self, cfg: LoadConfig) -> None:
        import grpc

        from plm.api.v1 import plm_pb2_grpc as pb_grpc

        self.timeout = cfg.timeout
        # A channel's own subchannel pool: channels to one target would otherwise share one connection.
        options = [("grpc.use_local_subchannel_pool", 1)] if cfg.connections > 1 else []
        # No retry policy is configured, so no call is ever retried; turning retries off skips gRPC's retry
        # machinery, which buffers every call's messages.
        options.append(("grpc.enable_retries", 0))
        self.targets = [t for _ in range(max(1, cfg.connections)) for t in cfg.targets]
        self.channels = [grpc.aio.insecure_channel(t, options=options) for t in self.targets]
        self.stubs = [pb_grpc.LanguageModelServiceStub(c) for c in self.channels]
        self.rpc_error = grpc.aio.AioRpcError

    async def call(self, k: int, spec: RequestSpec, texts: list[str]) -> str:
        try:
            await getattr(self.stubs[k], spec.rpc)(build_request(spec, texts), timeout=self.timeout)
        except self.rpc_error as e:
            return str(e.code().name)
        return "OK"

    async def close(self) -> None:
        for c in self.channels:
            await c.close()


class _HttpTransport:
    """The OpenAI-compatible API over one aiohttp session: HTTP/1.1 carries one call per connection at a time,
    so its keep-alive pool grows to the calls in flight (no limit) and `connections` does not apply."""

    def __init__(self, cfg: LoadConfig) -> None:
        import aiohttp

        self.targets = [t.rstrip("/") for t in cfg.targets]
        self.headers = {"Content-Type": "application/json", "X-Request-Timeout": f"{cfg.timeout:g}"}
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                             timeout=aiohttp.ClientTimeout(total=cfg.timeout))

    async def call(self, k: int, spec: RequestSpec, texts: list[str]) -> str:
        url = self.targets[k] + HTTP_ENDPOINTS[spec.rpc]
        try:
            async with self.session.post(url, data=build_http_body(spec, texts), headers=self.headers) as resp:
                body = await resp.read()  # read to the end either way: the connection goes back to the pool
                return "OK" if resp.status == 200 else http_code(resp.status, body)
        except TimeoutError:  # the client's deadline, as gRPC's
            return "DEADLINE_EXCEEDED"

    async def close(self) -> None:
        await self.session.close()


class _Worker:
    """One event loop's load: its channels, its request mix, its records (measured window only)."""

    def __init__(self, cfg: LoadConfig, counters: Any, t0_wall: float) -> None:
        self.cfg = cfg
        self.counters = counters
        self.rng = np.random.default_rng([cfg.seed, cfg.worker])
        weights = np.array([s.weight for s in cfg.specs], dtype=np.float64)
        self.cum_probs = np.cumsum(weights / weights.sum())
        self._spec_draws: collections.deque[int] = collections.deque()  # drawn ahead, 4096 at a time (`_draw`)
        self._input_draws: collections.deque[int] = collections.deque()
        self.transport = _HttpTransport(cfg) if cfg.http else _GrpcTransport(cfg)
        self.channel_targets = self.transport.targets
        # Workers start on different targets so K processes × round-robin spread evenly.
        n = len(self.channel_targets)
        self.rr = itertools.cycle([(cfg.worker + i) % n for i in range(n)])
        # Seconds since the run's shared start (t0_wall), on this process's monotonic clock.
        self.perf0 = time.perf_counter() - (time.time() - t0_wall)
        self.measure_from = cfg.warmup
        self.measure_until = cfg.warmup + cfg.duration if cfg.requests is None else math.inf
        self.records: list[list[Any]] = []  # [send_s, latency_ms, rpc, model, target, code]
        self.measured_sent = 0
        self.arrivals = 0  # open loop: measured arrivals, sent or dropped
        self.dropped = 0
        self.in_flight = 0
        self.cpu_start: float | None = None
        self.last_done = self.measure_from

    def now(self) -> float:
        return time.perf_counter() - self.perf0

    def _draw(self, queue: collections.deque[int], draw: Callable[[int], np.ndarray]) -> int:
        """The next of numbers drawn 4096 at a time: numpy's per-call overhead (`choice` with weights above all)
        was a large share of the load generator's CPU per call, on cores it shares with the server."""
        if not queue:
            queue.extend(draw(4096).tolist())
        return queue.popleft()

    def _draw_spec(self, n: int) -> np.ndarray:
        return np.searchsorted(self.cum_probs, self.rng.random(n), side="right").clip(0, len(self.cum_probs) - 1)

    def _draw_input(self, n: int) -> np.ndarray:
        return self.rng.integers(len(self.cfg.inputs), size=n)

    def _take_slot(self, t: float) -> bool:
        """True when a request sent at `t` is measured and may still be sent; False stops the run."""
        if t < self.measure_from:
            return True
        if self.cpu_start is None:
            self.cpu_start = time.process_time()
        if self.cfg.requests is not None:
            return self.measured_sent < self.cfg.requests
        return t < self.measure_until

    async def _call(self, t_send: float) -> None:
        spec = self.cfg.specs[self._draw(self._spec_draws, self._draw_spec)]
        texts = [self.cfg.inputs[self._draw(self._input_draws, self._draw_input)]
                 for _ in range(spec.texts_per_request)]
        if spec.rpc == "FillMask":
            texts = [mask_one_word(t, self.rng) for t in texts]
        k = next(self.rr)
        measured = t_send >= self.measure_from
        if measured:
            self.measured_sent += 1
        self.counters[_SENT] += 1
        self.in_flight += 1
        start = time.perf_counter()
        try:
            code = await self.transport.call(k, spec, texts)
        except Exception as e:  # a client-side failure must be counted, not kill the run
            code = f"CLIENT_{type(e).__name__}"
        finally:
            self.in_flight -= 1
        latency_ms = (time.perf_counter() - start) * 1000.0
        self.counters[_OK if code == "OK" else _ERR] += 1
        if measured:
            self.records.append([round(t_send, 6), round(latency_ms, 4), spec.rpc, spec.model,
                                 self.channel_targets[k], code])
            self.last_done = max(self.last_done, self.now())

    async def closed_loop(self, clients: int) -> None:
        async def client() -> None:
            while self._take_slot(t := self.now()):
                await self._call(t)

        await asyncio.gather(*(client() for _ in range(clients)))

    async def open_loop(self, rate: float) -> None:
        tasks: set[asyncio.Task[None]] = set()
        next_t = self.now()
        while True:
            # Poisson arrivals: the schedule is fixed in advance of the answers, so a slow server cannot slow it;
            # when the loop falls behind it sends at once to catch up rather than skipping arrivals.
            next_t += float(self.rng.exponential(1.0 / rate))
            delay = next_t - self.now()
            if delay > 0:
                await asyncio.sleep(delay)
            if not self._take_slot(next_t):
                break
            measured = next_t >= self.measure_from
            self.arrivals += measured
            if self.in_flight >= self.cfg.max_in_flight:
                self.dropped += measured
                continue
            task = asyncio.create_task(self._call(next_t))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)

    async def run(self) -> dict[str, Any]:
        delay = -self.now()  # wait for the shared start so every process's clock 0 is the same instant
        if delay > 0:
            await asyncio.sleep(delay)
        try:
            if self.cfg.rate is not None:
                await self.open_loop(self.cfg.rate)
            else:
                await self.closed_loop(self.cfg.concurrency or 1)
        finally:
            await self.transport.close()
        cpu = time.process_time() - self.cpu_start if self.cpu_start is not None else 0.0
        end = self.last_done if self.cfg.requests is not None else max(self.measure_until, self.last_done)
        return {"records": self.records, "arrivals": self.arrivals, "dropped": self.dropped,
                "window": [self.measure_from, end], "cpu_s": cpu, "worker": self.cfg.worker}


def _run_worker(cfg: LoadConfig, counters: Any, t0_wall: float) -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        return await _Worker(cfg, counters, t0_wall).run()

    return asyncio.run(go())


def _process_main(cfg: LoadConfig, counters: Any, t0: Any, ready: Any, results: Any) -> None:
    """Entry point of one `--processes` worker: report ready, wait for the shared start time, run, send results."""
    import grpc  # noqa: F401  (import before signalling ready, so start-up cost is not inside the run)

    ready.release()
    while t0.value == 0.0:
        time.sleep(0.005)
    try:
        results.put(_run_worker(cfg, counters, t0.value))
    except BaseException as e:
        results.put({"error": f"worker {cfg.worker}: {type(e).__name__}: {e}"})


def split_evenly(total: int, k: int) -> list[int]:
    """`total` split into k integer parts that differ by at most one."""
    return [total // k + (1 if i < total % k else 0) for i in range(k)]


# ----------------------------------------------------------------------------------------------- Prometheus


def _histogram_totals(text: str, models: set[str] | None) -> dict[str, float]:
    """`{name_sum: x, name_count: n}` for every histogram, summed over label sets (restricted to `models`)."""
    from prometheus_client.parser import text_string_to_metric_families

    totals: dict[str, float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if not (s.name.endswith("_sum") or s.name.endswith("_count")):
                continue
            if models is not None and s.labels.get("model") not in models:
                continue
            totals[s.name] += s.value
    return totals


def prometheus_delta(before: str, after: str, models: set[str] | None = None) -> dict[str, Any]:
    """The server's view of a window, from two scrapes of its /metrics text (before, after).

    Queue wait is per request row, inference per batch (all stages summed), so the two means answer
    "did requests wait for the model, or for their turn?".
    """
    b, a = _histogram_totals(before, models), _histogram_totals(after, models)

    def d(name: str) -> float:
        return a.get(name, 0.0) - b.get(name, 0.0)

    def mean(metric: str, scale: float = 1.0) -> float | None:
        n = d(f"{metric}_count")
        return d(f"{metric}_sum") / n * scale if n > 0 else None

    return {
        "queue_wait": {"sum_s": d("plm_queue_wait_seconds_sum"), "count": d("plm_queue_wait_seconds_count"),
                       "mean_ms": mean("plm_queue_wait_seconds", 1000.0)},
        "inference": {"sum_s": d("plm_inference_duration_seconds_sum"),
                      "count": d("plm_inference_duration_seconds_count"),
                      "mean_ms": mean("plm_inference_duration_seconds", 1000.0)},
        "batch_size_mean": mean("plm_batch_size"),
        "batches": d("plm_batch_size_count"),
        "padding_efficiency_mean": mean("plm_padding_efficiency_ratio"),
    }


def scrape(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return str(r.read().decode("utf-8"))


# ------------------------------------------------------------------------------------------------- results


def percentiles(values_ms: Sequence[float]) -> dict[str, float | None]:
    """p50/p90/p95/p99/max/mean of latencies in ms (linear interpolation, numpy's default); None when empty."""
    keys = ("p50", "p90", "p95", "p99", "max", "mean")
    if len(values_ms) == 0:
        return dict.fromkeys(keys)
    v = np.asarray(values_ms, dtype=float)
    p = np.percentile(v, [50, 90, 95, 99])
    return {"p50": float(p[0]), "p90": float(p[1]), "p95": float(p[2]), "p99": float(p[3]),
            "max": float(v.max()), "mean": float(v.mean())}


def merge_results(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One result from the workers': records concatenated (by send time), counts and CPU summed, window spanned."""
    records = sorted((r for p in parts for r in p["records"]), key=lambda r: r[0])
    return {
        "records": records,
        "arrivals": sum(p["arrivals"] for p in parts),
        "dropped": sum(p["dropped"] for p in parts),
        "window": [min(p["window"][0] for p in parts), max(p["window"][1] for p in parts)],
        "cpu_s": sum(p["cpu_s"] for p in parts),
        "cpu_s_by_worker": [p["cpu_s"] for p in parts],
    }


def summarize(merged: dict[str, Any], rate: float | None = None) -> dict[str, Any]:
    """Throughput, latency percentiles (ok requests) per RPC and overall, errors by status, per-target counts."""
    recs = merged["records"]
    window = max(merged["window"][1] - merged["window"][0], 1e-9)
    ok = [r for r in recs if r[5] == "OK"]
    by_rpc: dict[str, dict[str, Any]] = {}
    for rpc in sorted({r[2] for r in recs}):
        mine = [r for r in recs if r[2] == rpc]
        mine_ok = [r[1] for r in mine if r[5] == "OK"]
        by_rpc[rpc] = {"models": sorted({r[3] for r in mine}), "requests": len(mine), "ok": len(mine_ok),
                       "ok_per_s": len(mine_ok) / window, "latency_ms": percentiles(mine_ok)}
    summary: dict[str, Any] = {
        "window_s": window,
        "requests": len(recs),
        "ok": len(ok),
        "errors": dict(Counter(r[5] for r in recs if r[5] != "OK")),
        "throughput_ok_per_s": len(ok) / window,
        "latency_ms": percentiles([r[1] for r in ok]),
        "by_rpc": by_rpc,
        "by_target": dict(Counter(r[4] for r in recs)),
        "client_cpu_percent": 100.0 * merged["cpu_s"] / window,
        "client_cpu_percent_by_worker": [100.0 * c / window for c in merged.get("cpu_s_by_worker", [])],
    }
    if rate is not None:
        summary["open_loop"] = {"nominal_rate": rate, "offered_per_s": merged["arrivals"] / window,
                                "achieved_per_s": len(recs) / window, "dropped_by_client": merged["dropped"]}
    return summary


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def format_report(result: dict[str, Any]) -> str:
    """The readable table printed at the end of a run."""
    s, cfg = result["summary"], result["config"]
    mode = (f"open loop, {cfg['rate']:g} req/s Poisson" if cfg["rate"] is not None
            else f"closed loop, concurrency {cfg['concurrency']}")
    lines = [f"plm loadtest — {mode}, {cfg['processes']} process(es), {len(cfg['targets'])} target(s), "
             f"{cfg.get('protocol', 'gRPC plm.v1')}",
             f"window {s['window_s']:.2f} s after {cfg['warmup']:g} s warm-up: {s['requests']} requests, "
             f"{s['ok']} ok, {s['requests'] - s['ok']} errors, throughput {s['throughput_ok_per_s']:.1f} ok/s"]
    if "open_loop" in s:
        o = s["open_loop"]
        lines.append(f"offered {o['offered_per_s']:.1f} req/s (nominal {o['nominal_rate']:g}), achieved "
                     f"{o['achieved_per_s']:.1f} req/s answered, dropped by the client {o['dropped_by_client']}")
    lines.append("")
    head = f"{'RPC':12} {'models':24} {'requests':>8} {'ok':>7} {'ok/s':>8}"
    head += "".join(f"{k:>9}" for k in ("p50", "p90", "p95", "p99", "max")) + "  (ms)"
    lines += [head, "-" * len(head)]
    rows = [(rpc, ",".join(r["models"]), r["requests"], r["ok"], r["ok_per_s"], r["latency_ms"])
            for rpc, r in s["by_rpc"].items()]
    rows.append(("all", "", s["requests"], s["ok"], s["throughput_ok_per_s"], s["latency_ms"]))
    for rpc, models, n, n_ok, rate, lat in rows:
        lines.append(f"{rpc:12} {models[:24]:24} {n:>8} {n_ok:>7} {rate:>8.1f}"
                     + "".join(f"{_fmt(lat[k], '.2f'):>9}" for k in ("p50", "p90", "p95", "p99", "max")))
    lines.append("")
    errs = ", ".join(f"{k} {v}" for k, v in sorted(s["errors"].items())) or "none"
    lines.append(f"errors by status: {errs}")
    lines.append("requests by target: " + ", ".join(f"{t} {n}" for t, n in s["by_target"].items()))
    per_worker = ", ".join(f"{c:.0f}%" for c in s["client_cpu_percent_by_worker"])
    lines.append(f"client CPU: {s['client_cpu_percent']:.0f}% of one core (per process: {per_worker})"
                 + ("  ← the client may be the bottleneck: try --processes" if
                    any(c > 80 for c in s["client_cpu_percent_by_worker"]) else ""))
    srv = result.get("server")
    if srv:
        q, inf = srv["queue_wait"], srv["inference"]
        lines.append(f"server (/metrics delta): queue wait mean {_fmt(q['mean_ms'], '.2f')} ms over "
                     f"{q['count']:.0f} rows; inference mean {_fmt(inf['mean_ms'], '.2f')} ms over "
                     f"{inf['count']:.0f} runs; batch size mean {_fmt(srv['batch_size_mean'], '.2f')} over "
                     f"{srv['batches']:.0f} batches; padding efficiency mean "
                     f"{_fmt(srv['padding_efficiency_mean'], '.2f')}")
    elif result.get("server_error"):
        lines.append(f"server (/metrics): {result['server_error']}")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    """Latency CDF per RPC (log x) and latency over time (errors as red crosses) — ok requests."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = result["records"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    for rpc in sorted({r[2] for r in recs}):
        lat = np.sort([r[1] for r in recs if r[2] == rpc and r[5] == "OK"])
        if len(lat):
            ax1.plot(lat, np.arange(1, len(lat) + 1) / len(lat), label=f"{rpc} (n={len(lat)})")
            ax2.scatter([r[0] for r in recs if r[2] == rpc and r[5] == "OK"],
                        [r[1] for r in recs if r[2] == rpc and r[5] == "OK"], s=4, alpha=0.5, label=rpc)
    errs = [r for r in recs if r[5] != "OK"]
    if errs:
        ax2.scatter([r[0] for r in errs], [r[1] for r in errs], s=12, marker="x", color="red", label="errors")
    ax1.set(xscale="log", xlabel="latency (ms)", ylabel="fraction of requests ≤ x", title="Latency CDF per RPC")
    ax2.set(yscale="log", xlabel="send time (s since start)", ylabel="latency (ms)", title="Latency over time")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(result["report_title"], fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------- orchestration


class _Progress(threading.Thread):
    """Rewrites one stderr line every second from the workers' shared counters."""

    def __init__(self, counters: list[Any], start_wall: Callable[[], float], enabled: bool) -> None:
        super().__init__(daemon=True)
        self.counters, self.start_wall, self.enabled = counters, start_wall, enabled
        self.stop_event = threading.Event()

    def run(self) -> None:
        last_ok, last_t = 0, time.time()
        while not self.stop_event.wait(1.0):
            if not self.enabled or self.start_wall() == 0.0:
                continue
            sent = sum(c[_SENT] for c in self.counters)
            ok = sum(c[_OK] for c in self.counters)
            err = sum(c[_ERR] for c in self.counters)
            now = time.time()
            rate = (ok - last_ok) / max(now - last_t, 1e-9)
            last_ok, last_t = ok, now
            print(f"\r{now - self.start_wall():6.1f} s  sent {sent}  ok {ok}  {rate:7.1f} ok/s  errors {err}   ",
                  end="", file=sys.stderr, flush=True)

    def finish(self) -> None:
        self.stop_event.set()
        self.join()
        if self.enabled:
            print(file=sys.stderr, flush=True)


def run_loadtest(cfg: LoadConfig, processes: int = 1, metrics_url: str | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """Run the load, merge the workers, scrape /metrics around the measured window; return the full result."""
    if (cfg.concurrency is None) == (cfg.rate is None):
        raise ValueError("give exactly one of concurrency (closed loop) or rate (open loop)")
    if cfg.concurrency is not None and cfg.concurrency < processes:
        raise ValueError(f"--concurrency {cfg.concurrency} < --processes {processes}: each process needs a client")
    if processes < 1:
        raise ValueError(f"--processes must be ≥ 1, got {processes}")
    if check_protocol(cfg.targets, cfg.specs) and cfg.connections != 1:
        raise ValueError("--connections applies to gRPC; over HTTP each call in flight has a connection of its own")
    k = processes
    concs = split_evenly(cfg.concurrency, k) if cfg.concurrency is not None else [None] * k
    reqs = split_evenly(cfg.requests, k) if cfg.requests is not None else [None] * k
    cfgs = [LoadConfig(**{**asdict(cfg), "specs": cfg.specs, "concurrency": concs[i], "requests": reqs[i],
                          "rate": cfg.rate / k if cfg.rate is not None else None, "worker": i}) for i in range(k)]

    ctx = mp.get_context("spawn")  # fork is unsafe once gRPC threads exist (the tests run a server in-process)
    counters = [ctx.Array("q", 3, lock=False) for _ in range(k)]
    t0 = ctx.Value("d", 0.0, lock=False)
    scrapes: dict[str, str] = {}
    scrape_errors: list[str] = []

    def scrape_before() -> None:
        delay = t0.value + cfg.warmup - time.time()
        if delay > 0:
            time.sleep(delay)
        try:
            scrapes["before"] = scrape(metrics_url)  # type: ignore[arg-type]
        except OSError as e:
            scrape_errors.append(f"scrape failed: {e}")

    prog = _Progress(counters, lambda: float(t0.value), progress)
    prog.start()
    try:
        if k == 1:
            t0.value = time.time() + 0.05
            scraper = threading.Thread(target=scrape_before, daemon=True) if metrics_url else None
            if scraper:
                scraper.start()
            parts = [_run_worker(cfgs[0], counters[0], t0.value)]
        else:
            ready, results = ctx.Semaphore(0), ctx.Queue()
            procs = [ctx.Process(target=_process_main, args=(cfgs[i], counters[i], t0, ready, results), daemon=True)
                     for i in range(k)]
            for p in procs:
                p.start()
            for _ in range(k):
                ready.acquire()
            t0.value = time.time() + 0.2  # the same start instant for every process
            scraper = threading.Thread(target=scrape_before, daemon=True) if metrics_url else None
            if scraper:
                scraper.start()
            # Bounded wait: a worker that dies without reporting (killed, crashed in C) must not hang the run.
            budget = cfg.warmup + (cfg.duration if cfg.requests is None else 3600.0) + cfg.timeout + 60.0
            parts = [results.get(timeout=budget) for _ in range(k)]
            for p in procs:
                p.join(timeout=10)
            failed = [p["error"] for p in parts if "error" in p]
            if failed:
                raise RuntimeError("; ".join(failed))
        if scraper:
            scraper.join()
    finally:
        prog.finish()

    merged = merge_results(parts)
    result: dict[str, Any] = {
        "config": {"targets": list(cfg.targets), "concurrency": cfg.concurrency, "rate": cfg.rate,
                   "duration": cfg.duration, "requests": cfg.requests, "warmup": cfg.warmup,
                   "max_in_flight": cfg.max_in_flight, "timeout": cfg.timeout, "seed": cfg.seed,
                   "processes": k, "protocol": _protocol(cfg), "scenario": [asdict(s) for s in cfg.specs]},
        "summary": summarize(merged, cfg.rate),
        "record_fields": ["send_s", "latency_ms", "rpc", "model", "target", "code"],
        "records": merged["records"],
        "window": merged["window"],
    }
    if metrics_url:
        try:
            after = scrape(metrics_url)
            if "before" in scrapes:
                result["server"] = prometheus_delta(scrapes["before"], after, {s.model for s in cfg.specs})
        except OSError as e:
            scrape_errors.append(f"scrape failed: {e}")
        if scrape_errors:
            result["server_error"] = "; ".join(scrape_errors)
    mode = f"rate {cfg.rate:g}/s" if cfg.rate is not None else f"concurrency {cfg.concurrency}"
    result["report_title"] = f"plm loadtest: {mode}, {k} process(es), {_protocol(cfg)}, {', '.join(cfg.targets)}"
    return result


def _protocol(cfg: LoadConfig) -> str:
    if not cfg.http:
        return "gRPC plm.v1"
    return "HTTP OpenAI API (" + ", ".join(f"{r} as {HTTP_ENDPOINTS[r]}" for r in
                                          sorted({s.rpc for s in cfg.specs})) + ")"


def write_outputs(result: dict[str, Any], out: Path) -> Path:
    """`out` (JSON, everything) and the PNG beside it; returns the PNG's path."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1), encoding="utf-8")
    png = out.with_suffix(".png")
    plot(result, png)
    return png


def main(args: Any) -> int:
    """The `plm loadtest` verb (arguments parsed by plm.cli)."""
    try:
        specs = load_scenario(args.scenario) if args.scenario else parse_scenario(
            {"requests": [{"weight": 1, "rpc": "Score", "model": args.model}]})
        inputs = load_inputs(args.inputs)
        if args.concurrency is None and args.rate is None:
            args.concurrency = 1
        if args.concurrency is not None and args.rate is not None:
            raise ValueError("--concurrency (closed loop) and --rate (open loop) are exclusive")
        cfg = LoadConfig(targets=tuple(t.strip() for t in args.target.split(",") if t.strip()), specs=tuple(specs),
                         inputs=tuple(inputs), concurrency=args.concurrency, rate=args.rate,
                         duration=args.duration, requests=args.requests, warmup=args.warmup,
                         max_in_flight=args.max_in_flight, timeout=args.timeout, seed=args.seed,
                         connections=args.connections)
        result = run_loadtest(cfg, processes=args.processes, metrics_url=args.metrics_url,
                              progress=not args.quiet)
    except (ValueError, OSError) as e:
        print(f"plm loadtest: {e}", file=sys.stderr)
        return 2
    print(format_report(result))
    if args.out:
        png = write_outputs(result, args.out)
        print(f"\nwrote {args.out} and {png}")
    return 0
