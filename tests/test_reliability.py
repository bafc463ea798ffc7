"""Keeping promises under faults, over real gRPC: deadlines, the global in-flight limit, overload at 10× capacity
and SIGTERM under load on a real `plm serve` process.

The figures these tests print (capacity, burst, p99, RSS, recovery) are recorded in docs/reliability.md.
Cost: about 35 s on the shared 2-core development machine, most of it the two `plm serve` subprocess tests.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from plm.client.local_server import free_port
from plm.service.batcher import DynamicBatcher
from plm.service.config import Batching, Limits
from plm.service.errors import DeadlineExceeded
from plm.service.metrics import Metrics
from prometheus_client.parser import text_string_to_metric_families

from plm.api.v1 import plm_pb2 as pb
from plm.api.v1 import plm_pb2_grpc as pb_grpc
from tests.conftest import ROOT, ServerThread, make_config

TEXT = "the king is dead and the queen is in the tower of london"


def _samples(text: str, name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels`, from a text exposition."""
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == name and labels.items() <= s.labels.items())


# ------------------------------------------------------------------------------------- deadlines, unit


def _delta(before: str, after: str, name: str, **labels: str) -> float:
    return _samples(after, name, **labels) - _samples(before, name, **labels)


def test_batcher_deadline_paths() -> None:
    """Both deadline paths of the batcher, with a model run we hold still: a row whose deadline passes while
    queued never runs; a request that cannot make its deadline behind the queue is refused at admission."""
    gate = threading.Event()
    ran: list[str] = []

    def run(payloads: list[str]) -> list[str]:
        gate.wait(10)
        ran.extend(payloads)
        time.sleep(0.02)  # every batch takes ≥ 20 ms: the admission estimate has a batch time to work with
        return payloads

    async def scenario() -> tuple[BaseException | str, ...]:
        metrics = Metrics()
        b: DynamicBatcher[str, str] = DynamicBatcher("m", run, Batching(max_batch_size=1, max_queue_delay_ms=0),
                                                     metrics)
        b.start()
        now = time.monotonic
        blocker = asyncio.ensure_future(b.submit(["blocker"], [1]))  # holds the worker at the gate
        await asyncio.sleep(0.05)
        late = asyncio.ensure_future(b.submit(["late"], [1], deadline=now() + 0.05))  # expires while queued
        await asyncio.sleep(0.1)
        gate.set()
        results = await asyncio.gather(blocker, late, return_exceptions=True)
        await b.submit(["warm"], [1])  # a second batch: the first (cold) one does not count for the estimate
        backlog = [asyncio.ensure_future(b.submit([f"q{i}"], [1])) for i in range(20)]  # ≥ 20 × 20 ms queued
        await asyncio.sleep(0)
        refused = await asyncio.gather(b.submit(["hopeless"], [1], deadline=now() + 0.1), return_exceptions=True)
        await asyncio.gather(*backlog)
        await b.close()
        text = metrics.exposition().decode()
        assert _samples(text, "plm_rejections_total", reason="deadline") == 1
        assert _samples(text, "plm_rejections_total", reason="deadline_admission") == 1
        return (*results, *refused)

    blocker, late, hopeless = asyncio.run(scenario())
    assert blocker == ["blocker"]
    assert isinstance(late, DeadlineExceeded) and "was not run" in late.message
    assert isinstance(hopeless, DeadlineExceeded) and "cannot be met" in hopeless.message
    assert "late" not in ran and "hopeless" not in ran


# ----------------------------------------------------------------------------- deadlines and limits, gRPC


BACKLOG_ROWS = 192  # texts in each of the backlog's 16 calls


@pytest.fixture(scope="module")
def slow_gpt(tiny_repo: Path) -> Iterator[ServerThread]:
    """gpt one row per run (a slow model on purpose) with room for a long queue, and few calls in flight."""
    srv = ServerThread(make_config(
        tiny_repo, models=("gpt",), limits=Limits(max_inflight_requests=24, max_inputs_per_request=BACKLOG_ROWS),
        model_batching={"gpt": Batching(max_batch_size=1, max_queue_delay_ms=0, max_queue_size=4096)}))
    yield srv
    srv.stop()


def _score(stub: pb_grpc.LanguageModelServiceStub, n: int, timeout: float) -> tuple[grpc.StatusCode, str]:
    try:
        stub.Score(pb.ScoreRequest(model="gpt", texts=[TEXT] * n), timeout=timeout)
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as e:
        return e.code(), e.details() or ""


def test_deadline_behind_a_backlog_never_runs(slow_gpt: ServerThread) -> None:
    """A backlog of 16 × 192 rows (one ONNX run each); calls with a 0.2 s deadline sent behind it are refused
    (at admission or from the queue) and never run: the rows run are exactly the backlog's rows. The backlog is
    sized so that admission's estimate of the wait (queued rows × the fastest recent run) is several times the
    deadline: at 16 × 64 rows it was only 1.4–2 times, and a run of fast batches let the short calls in."""
    before = slow_gpt.running.metrics.exposition().decode()
    with grpc.insecure_channel(slow_gpt.target) as ch, concurrent.futures.ThreadPoolExecutor(24) as pool:
        stub = pb_grpc.LanguageModelServiceStub(ch)
        backlog = [pool.submit(_score, stub, BACKLOG_ROWS, 120) for _ in range(16)]
        time.sleep(0.3)  # the backlog is queued and the batcher has a batch time
        short = [pool.submit(_score, stub, 1, 0.2) for _ in range(6)]
        short_codes = [f.result() for f in short]
        backlog_codes = [f.result() for f in backlog]
        assert all(code == grpc.StatusCode.OK for code, _ in backlog_codes), [c for c in backlog_codes if c[1]]
    after = slow_gpt.running.metrics.exposition().decode()
    assert {code for code, _ in short_codes} == {grpc.StatusCode.DEADLINE_EXCEEDED}
    assert any("cannot be met" in details for _, details in short_codes)  # the server said so, not the client
    rows = _delta(before, after, "plm_batch_size_sum")
    assert rows == 16 * BACKLOG_ROWS  # not one row of the expired calls ran
    refused = sum(_delta(before, after, "plm_rejections_total", reason=r) for r in ("deadline", "deadline_admission"))
    assert refused >= 1


def test_inflight_limit_refuses_fast_and_health_still_answers(slow_gpt: ServerThread) -> None:
    before = slow_gpt.running.metrics.exposition().decode()
    with grpc.insecure_channel(slow_gpt.target) as ch, concurrent.futures.ThreadPoolExecutor(64) as pool:
        stub = pb_grpc.LanguageModelServiceStub(ch)
        calls = [pool.submit(_score, stub, 8, 120) for _ in range(64)]
        time.sleep(0.2)
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        results = [f.result() for f in calls]
    assert health.status == health_pb2.HealthCheckResponse.SERVING  # probes are not subject to the limit
    codes = Counter(code for code, _ in results)
    assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    assert all("max_inflight_requests 24" in d for c, d in results if c == grpc.StatusCode.RESOURCE_EXHAUSTED)
    after = slow_gpt.running.metrics.exposition().decode()
    rows = _delta(before, after, "plm_batch_size_sum")
    assert rows == 8 * codes[grpc.StatusCode.OK]  # a refused call never reached the model
    inflight = _delta(before, after, "plm_rejections_total", reason="inflight")
    assert inflight == codes[grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert _samples(after, "plm_inflight_requests") == 0  # every place given back


STREAMS = 64  # long streams sent before the short Generate


def test_generation_that_expires_while_waiting_is_never_prefilled(tiny_repo: Path) -> None:
    """The KV-cache engine runs one sequence at a time here; a Generate with a short deadline behind long
    streams never starts: the time-to-first-token histogram counts only the long ones. (Over gRPC the
    client's cancellation at its deadline also drops the waiting sequence; the engine's own check covers a
    cancellation that arrives late.)"""
    srv = ServerThread(make_config(tiny_repo, models=("gpt",), model_batching={"gpt": Batching(max_batch_size=1)}))
    long = pb.GenerateRequest(model="gpt", prompts=["The king"],
                              sampling=pb.SamplingParams(temperature=5.0, seed=3, max_new_tokens=60))
    try:
        before = srv.running.metrics.exposition().decode()
        engine = srv.running.registry.get("gpt").engine
        with grpc.insecure_channel(srv.target) as ch, concurrent.futures.ThreadPoolExecutor(STREAMS) as pool:
            stub = pb_grpc.LanguageModelServiceStub(ch)
            streams = [pool.submit(lambda: list(stub.GenerateStream(long, timeout=120))) for _ in range(STREAMS)]
            until = time.monotonic() + 30
            # Most streams wait: the queue holds over 27 × 60 steps, far beyond the short call's deadline
            # however fast the engine steps (at 24 streams and 0.2 s the faster engine sometimes got there).
            # Twice as many streams as that are sent: on a loaded machine the client's threads may send them
            # slower than the engine finishes them, and the queue must still reach that depth.
            while engine.active < 28 and time.monotonic() < until:
                time.sleep(0.002)
            assert engine.active >= 28, f"the queue never reached 28 sequences ({engine.active}): nothing to test"
            with pytest.raises(grpc.RpcError) as e:
                stub.Generate(pb.GenerateRequest(model="gpt", prompts=["O"]), timeout=0.1)
            for f in streams:
                f.result()
        after = srv.running.metrics.exposition().decode()
    finally:
        srv.stop()
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert _delta(before, after, "plm_time_to_first_token_seconds_count") == STREAMS  # the expired one never ran


# --------------------------------------------------------------------------- a real `plm serve` process


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    target: str
    metrics_url: str
    log: Path

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def metrics(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=10) as r:
            return r.read().decode()  # type: ignore[no-any-return]


def _plm_serve(repo: Path, tmp: Path, env: dict[str, str], *args: str) -> Iterator[Served]:
    port, mport = free_port(), free_port()
    log = tmp / "serve.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "plm.cli", "serve", "--repository", str(repo), "--port", str(port),
         "--metrics-port", str(mport), *args],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **env}, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    served = Served(proc, f"127.0.0.1:{port}", f"http://127.0.0.1:{mport}/metrics", log)
    try:
        with grpc.insecure_channel(served.target) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            until = time.monotonic() + 120
            while True:
                try:
                    if health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == 1:
                        break
                except grpc.RpcError:
                    pass
                assert proc.poll() is None and time.monotonic() < until, log.read_text()
                time.sleep(0.2)
        yield served
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


@dataclass
class Outcome:
    code: str
    accepted: bool  # the server admitted the call: its request id came back (a call refused at the edge has none)
    seconds: float
    details: str = ""


async def _aio_score(stub: pb_grpc.LanguageModelServiceStub, texts: int, timeout: float) -> Outcome:
    t0 = time.perf_counter()
    call = stub.Score(pb.ScoreRequest(model="gpt", texts=[TEXT] * texts), timeout=timeout)
    details = ""
    try:
        await call
        code = "OK"
    except grpc.RpcError as e:
        code, details = e.code().name, e.details() or ""
    # The edge sets x-request-id in the trailing metadata once admission let the call in; a refusal comes first.
    accepted = any(k == "x-request-id" for k, _ in (await call.trailing_metadata() or ()))
    return Outcome(code, accepted, time.perf_counter() - t0, details)


@pytest.fixture()
def serve_gpt(tiny_repo: Path, tmp_path: Path) -> Iterator[Served]:
    # One ONNX Runtime thread: the other core is left to the event loops (the server's and the test's client).
    env = {"PLM_LIMITS__MAX_INFLIGHT_REQUESTS": "16", "PLM_LIMITS__MAX_INPUTS_PER_REQUEST": "256",
           "PLM_BATCHING__MAX_QUEUE_SIZE": "512", "PLM_GRACE_SECONDS": "20", "PLM_RUNTIME__INTRA_OP_THREADS": "1"}
    yield from _plm_serve(tiny_repo, tmp_path, env, "--models", "gpt")


@pytest.mark.timeout(240)
def test_sigterm_under_load_fails_no_accepted_request(serve_gpt: Served) -> None:
    """SIGTERM while unary calls and token streams run: health turns NOT_SERVING first, new calls are
    refused with UNAVAILABLE, every admitted call and stream finishes OK, and the process exits 0."""
    outcomes: list[Outcome] = []
    streams: list[int] = []
    seen: list[int] = []

    async def scenario() -> None:
        async with grpc.aio.insecure_channel(serve_gpt.target) as ch:
            stub = pb_grpc.LanguageModelServiceStub(ch)
            watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=""))

            async def watcher() -> None:
                async for r in watch:
                    seen.append(r.status)
                    if r.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                        watch.cancel()  # an open Watch would hold the drain for its whole grace period

            async def stream() -> None:
                finish = 0
                async for ev in stub.GenerateStream(pb.GenerateRequest(
                        model="gpt", prompts=["the king", "a queen"],
                        sampling=pb.SamplingParams(max_new_tokens=48, temperature=0.0)), timeout=120):
                    finish += ev.finish_reason != pb.FINISH_REASON_UNSPECIFIED
                streams.append(finish)

            async def client() -> None:
                while True:
                    o = await _aio_score(stub, 4, 60)
                    outcomes.append(o)
                    if o.code == "UNAVAILABLE" and not o.accepted:
                        return  # refused: the server is draining or gone

            watch_task = asyncio.ensure_future(watcher())
            clients = [asyncio.ensure_future(client()) for _ in range(8)]
            gens = [asyncio.ensure_future(stream()) for _ in range(3)]
            await asyncio.sleep(1.5)
            serve_gpt.proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(asyncio.gather(*clients, *gens), 60)
            await asyncio.gather(watch_task, return_exceptions=True)

    asyncio.run(scenario())
    assert serve_gpt.proc.wait(60) == 0, serve_gpt.log.read_text()[-3000:]
    accepted = [o for o in outcomes if o.accepted]
    assert len(accepted) > 20  # there was load when the signal came
    assert {o.code for o in accepted} == {"OK"}, Counter((o.code, o.accepted) for o in outcomes)
    assert {o.code for o in outcomes if not o.accepted} <= {"UNAVAILABLE"}, \
        Counter((o.code, o.details[:80]) for o in outcomes if not o.accepted)
    assert streams == [2, 2, 2]  # every stream in flight finished both its sequences
    assert seen[0] == health_pb2.HealthCheckResponse.SERVING and seen[-1] == health_pb2.HealthCheckResponse.NOT_SERVING
    log = serve_gpt.log.read_text()
    assert "shutting down: draining" in log and "stopped" in log
    print(f"\nSIGTERM under load: {len(accepted)} admitted calls all OK, "
          f"{sum(not o.accepted for o in outcomes)} refused with UNAVAILABLE, 3 streams finished, exit 0")


def test_a_call_sent_as_the_last_call_in_flight_ends_is_refused_not_cancelled(tiny_repo: Path) -> None:
    """During the drain: a client whose next call leaves shortly after its stream (the last call in flight)
    ended hears UNAVAILABLE from admission ("shutting down; retry"), not gRPC closing the port under it (a
    CANCELLED or a bare connection error, which clients do not take as "try another replica"); then the server
    stops. Before the quiet period this call met the closing port."""
    from plm.client.client import PlmClient

    srv = ServerThread(make_config(tiny_repo, models=("gpt",)))
    try:
        with PlmClient(srv.target) as c:
            stream = c.generate_stream("gpt", ["The king"], pb.SamplingParams(
                temperature=0.0, max_new_tokens=24, min_new_tokens=24))
            next(stream)  # admitted and generating
            stopping = asyncio.run_coroutine_threadsafe(srv.running.stop(grace=10.0), srv.loop)
            deadline = time.monotonic() + 10
            while not srv.running.admission.draining and time.monotonic() < deadline:
                time.sleep(0.001)
            assert sum(len(ev.token_ids) for ev in stream) > 0  # the stream in flight finishes during the drain
            time.sleep(0.1)  # the client's next call: a moment later (the drain polls every 20 ms)
            with pytest.raises(grpc.RpcError) as refused:
                c.stub.Score(pb.ScoreRequest(model="gpt", texts=["To be."]), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()
            assert "shutting down" in (refused.value.details() or "")
        stopping.result(timeout=15)
    finally:
        srv.loop.call_soon_threadsafe(srv.loop.stop)
        srv.thread.join(timeout=10)


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def _closed_loop(stub: pb_grpc.LanguageModelServiceStub, seconds: float, texts: int,
                       clients: int = 8) -> list[Outcome]:
    out: list[Outcome] = []
    end = time.perf_counter() + seconds

    async def client() -> None:
        while time.perf_counter() < end:
            out.append(await _aio_score(stub, texts, 30))

    await asyncio.gather(*(client() for _ in range(clients)))
    return out


def _burst(target: str, rate: float, seconds: float, texts: int, started: Any, results: Any) -> None:
    """Open loop at `rate` calls/s for `seconds` (in its own process: its backlog of thousands of pending
    calls must not slow the event loop that measures the recovery)."""
    async def go() -> list[tuple[str, bool, float]]:
        async with grpc.aio.insecure_channel(target) as ch:
            stub = pb_grpc.LanguageModelServiceStub(ch)
            calls: list[asyncio.Task[Outcome]] = []
            started.set()
            t0 = time.perf_counter()
            while (elapsed := time.perf_counter() - t0) < seconds:
                calls += [asyncio.ensure_future(_aio_score(stub, texts, 60))
                          for _ in range(int(elapsed * rate) - len(calls))]
                await asyncio.sleep(0.005)
            offered = len(calls) / (time.perf_counter() - t0)
            done = await asyncio.gather(*calls)
            return [(o.code, o.accepted, o.seconds) for o in done] + [("offered", False, offered)]

    results.put(asyncio.run(go()))


@pytest.mark.timeout(240)
def test_overload_at_ten_times_capacity(serve_gpt: Served) -> None:
    """Capacity first (closed loop), then an open-loop burst at 10× it for 3 s: the excess is refused before
    it reaches the model, admitted calls all succeed, the queue wait stays bounded, RSS stays bounded, and
    throughput is back within 5 s after the burst (the issue's bounds; generous, for a shared machine)."""
    # 256 rows per call: heavy calls keep 10× capacity (in calls) within what one Python client can offer and
    # what the server's event loop can refuse on 2 cores.
    texts, seconds = 256, 3.0
    base_p99: list[float] = []
    async def measure(stub: pb_grpc.LanguageModelServiceStub) -> float:
        await _closed_loop(stub, 1.0, texts, clients=2)  # warm-up
        base = await _closed_loop(stub, 3.0, texts, clients=2)  # 2 × 256 rows: the queue (512) never refuses
        assert {o.code for o in base} == {"OK"}
        base_p99.append(_percentile([o.seconds for o in base], 99))
        return len(base) / 3.0

    async def recover(stub: pb_grpc.LanguageModelServiceStub, burst_end: float) -> tuple[float, list[int]]:
        windows: list[int] = []
        while time.perf_counter() - burst_end < 5.0:
            window = await _closed_loop(stub, 0.5, texts, clients=2)
            windows.append(sum(o.code == "OK" for o in window))
            if all(o.code == "OK" for o in window) and len(window) >= 0.5 * capacity * 0.5:
                return time.perf_counter() - burst_end, windows
        return float("inf"), windows

    async def with_stub(fn: Any, *args: Any) -> Any:
        async with grpc.aio.insecure_channel(serve_gpt.target) as ch:
            return await fn(pb_grpc.LanguageModelServiceStub(ch), *args)

    capacity = asyncio.run(with_stub(measure))
    before = serve_gpt.metrics()
    rss_base = rss_peak = serve_gpt.rss_mb()
    ctx = multiprocessing.get_context("spawn")
    started, results = ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=_burst, args=(serve_gpt.target, 10 * capacity, seconds, texts, started, results))
    proc.start()
    assert started.wait(60)
    burst_end = time.perf_counter() + seconds
    while time.perf_counter() < burst_end:
        rss_peak = max(rss_peak, serve_gpt.rss_mb())
        time.sleep(0.05)
    recovered_after, windows = asyncio.run(with_stub(recover, burst_end))
    burst = results.get(timeout=120)
    proc.join(30)
    after = serve_gpt.metrics()

    offered = burst.pop()[2]
    codes = Counter((code, accepted) for code, accepted, _ in burst)
    ok = [sec for code, _, sec in burst if code == "OK"]
    rows = _delta(before, after, "plm_batch_size_sum")
    waits = {b: _delta(before, after, "plm_queue_wait_seconds_bucket", le=b) for b in ("1.0", "+Inf")}
    report = dict(capacity=capacity, base_p99=base_p99[0], offered=offered, calls=len(burst), ok=len(ok),
                  ok_p50=_percentile(ok, 50), ok_p99=_percentile(ok, 99), queue_wait_le_1s=waits["1.0"] / waits["+Inf"],
                  rss_base_mb=rss_base, rss_peak_mb=rss_peak, recovered_after=recovered_after)
    print(f"\noverload: {codes}; recovery windows (OK calls per 0.5 s) {windows}\n"
          + ", ".join(f"{k}={v:.3f}" for k, v in report.items()))
    assert offered >= 5 * capacity, report  # the client really overloaded the server (target: 10×)
    refused = codes[("RESOURCE_EXHAUSTED", True)] + codes[("RESOURCE_EXHAUSTED", False)]
    # gRPC's HTTP/2 transport may reset excess streams itself (CANCELLED before any handler: never admitted).
    assert set(codes) <= {("OK", True), ("RESOURCE_EXHAUSTED", True), ("RESOURCE_EXHAUSTED", False),
                          ("CANCELLED", False)}, codes
    assert refused > 0 and len(ok) > 0, codes
    server_codes = {s.labels["code"] for fam in text_string_to_metric_families(after) for s in fam.samples
                    if s.name == "plm_requests_total"}
    assert server_codes <= {"OK", "RESOURCE_EXHAUSTED"}  # no admitted call failed or was cancelled
    assert rows == texts * (len(ok) + sum(windows)), report  # refused calls never reached the model
    # The server's promise: a bounded queue bounds the wait of what it admits. (Client-side latency, printed
    # above, adds the burst client's own event-loop backlog on this 2-core machine.)
    assert report["queue_wait_le_1s"] >= 0.99, report
    assert rss_peak - rss_base < 150, report  # MB: bounded queues, not a pile of pending requests
    assert recovered_after <= 5.0, report
