"""The floor under every served call: server CPU per call of a bare grpc.aio server vs `plm serve`, and what
each stage of plm's request path costs.

    python benchmarks/grpc_floor.py [--repository repository] [--duration 4] [--pairs 3] [--concurrency 16]
                                    [--baseline DIR] [--out results/grpc_floor.json]

Servers, each in its own process, driven in turn by the `plm loadtest` engine (closed loop, one text per
call) for the same time, A/B alternated `--pairs` times per method (bare first in even pairs, plm first in odd
ones); the server process's CPU (user + system, from /proc/PID/stat) over each window is divided by the calls
answered:
- `bare`: a grpc.aio handler that parses the request and returns the bytes of a response plm gave to the same
  kind of request (captured once at the start): the cost of gRPC in Python alone;
- `plm`: `plm serve` with `ngram-kn` and `bert` (ONNX Runtime on one intra-op thread, so that the time it spends
  in `session.run` is CPU time of the calling thread, which the server counts in `plm_bench_ort_cpu_seconds`, a
  counter this script adds to the server's registry; FillMask's excess is reported with and without it).
- `bare+edge`: the bare server on uvloop, making the gRPC calls plm's unary edge makes (request id from the
  metadata, time left, the id in the trailing metadata): plm − bare+edge is what plm's own code costs.
Methods: n-gram `PredictNext` and BERT `FillMask`. The median over pairs of plm − bare is the excess per call.
With `--baseline DIR ...` (folders each holding another `plm` package, e.g. a `git archive` of the commit before
a change, arranged as the installed namespace) one more server per folder, named by the folder, runs that code in
the same rotation, and the median of plm − that server per round is the change's effect (less ORT's CPU).

Then `stages`: in one child process (access log to /dev/null through the server's own buffered handler), each
stage of the request path timed alone in process CPU per call: call edge (request id, deadline), admission,
request conversion, validation, model lease, tokenising, the task, response conversion and serialisation,
request metrics, access line, the batcher's hand-off and back (a no-op model, 16 callers), and the whole
servicer method without gRPC.
Prints µs per call and writes the JSON and a PNG.

`--fill-task-ab REPOSITORY OLD_TREE ROUNDS CALLS` (alone) A/Bs FillMask's task of another tree against this
checkout's in one process (`_fill_task_ab`): no process-to-process spread, which across servers is wider than
a few µs per call. `--score-task-ab REPOSITORY OLD_TREE ROUNDS CALLS` does the same for GPT `Score`'s whole
servicer method (`_score_task_ab`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from _smoke import add_smoke_flag, bar_plot, no_errors, run  # this folder is on sys.path when run as a script
from plm.client.loadtest import LoadConfig, RequestSpec, run_loadtest
from plm.client.local_server import free_port

from plm.api.v1 import plm_pb2 as pb

SERVICE = "plm.v1.LanguageModelService"
METHODS = {"PredictNext": ("ngram-kn", pb.PredictNextRequest, ("the king is", "to be or not to",
                                                              "what light through yonder")),
           "FillMask": ("bert", pb.FillMaskRequest, ("the king is dead and the queen is here",
                                                     "to be or not to be that is the question",
                                                     "what light through yonder window breaks"))}
ORT_COUNTER = "plm_bench_ort_cpu_seconds"
EDGE = "bare+edge"  # the bare server on uvloop with the gRPC calls of plm's edge


# ------------------------------------------------------------------------------------------------ servers

def _serve_bare(port: int, responses: Path, edge: bool = False) -> None:
    """The bare server: every method answers the response bytes plm gave (identity serializer). With `edge`, on
    uvloop (as `plm serve` runs) and making the gRPC calls plm's unary edge makes on every call (the request id
    read from the metadata, the time left, the id sent back in the trailing metadata), and nothing else."""
    answers = {k: bytes.fromhex(v) for k, v in json.loads(responses.read_text()).items()}

    def handler(method: str) -> Any:
        body = answers[method]

        async def answer(request: Any, context: Any) -> bytes:
            return body

        async def answer_with_edge(request: Any, context: Any) -> bytes:
            request_id = next((v for k, v in context.invocation_metadata() or () if k == "x-request-id"), None)
            context.time_remaining()
            context.set_trailing_metadata((("x-request-id", request_id or os.urandom(8).hex()),))
            return body
        return grpc.unary_unary_rpc_method_handler(answer_with_edge if edge else answer,
                                                   request_deserializer=METHODS[method][1].FromString)

    async def main() -> None:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            SERVICE, {m: handler(m) for m in answers}),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    if edge:
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())


def _count_ort_cpu() -> None:
    """Count the CPU time ONNX Runtime's `run` takes on its calling thread in `plm_bench_ort_cpu_seconds`, a
    counter added to each Metrics' registry (with one intra-op thread that is all of ORT's CPU)."""
    from plm.service import metrics as metrics_mod
    from plm.service import runtime
    from prometheus_client import Counter

    counters: list[Any] = []
    init, ort_run = metrics_mod.Metrics.__init__, runtime.OrtSession.run

    def metrics_init(self: Any) -> None:
        init(self)
        counters.append(Counter(ORT_COUNTER, "CPU seconds in OrtSession.run (benchmark only)",
                                registry=self.registry))

    def timed_run(self: Any, *args: Any, **kwargs: Any) -> Any:
        started = time.thread_time()
        try:
            return ort_run(self, *args, **kwargs)
        finally:
            counters[-1].inc(time.thread_time() - started)

    metrics_mod.Metrics.__init__ = metrics_init  # type: ignore[method-assign]
    runtime.OrtSession.run = timed_run  # type: ignore[method-assign]


def _serve_plm(argv: list[str]) -> int:
    _count_ort_cpu()
    from plm.cli import main as cli_main

    return cli_main(["serve", *argv])


class Child:
    """A server in a child process of this script, ready once its health (or bare port) answers."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None, health: bool = True) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        self.target = f"127.0.0.1:{self.port}"
        argv = [a.replace("{port}", str(self.port)).replace("{metrics}", str(self.metrics_port)) for a in argv]
        self.proc = subprocess.Popen([sys.executable, __file__, *argv], env={**os.environ, **(env or {})},
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 180
        while self.proc.poll() is None and time.monotonic() < deadline:
            try:
                with grpc.insecure_channel(self.target) as ch:
                    grpc.channel_ready_future(ch).result(timeout=2)
                    if not health:
                        return
                    from grpc_health.v1 import health_pb2, health_pb2_grpc

                    status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        return
            except grpc.RpcError:
                pass
            except grpc.FutureTimeoutError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server {argv[:2]} did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(30)

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples named `name` with these labels, from the server's /metrics."""
        from prometheus_client.parser import text_string_to_metric_families

        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(server: Child, method: str, concurrency: int, duration: float, smoke: bool,
            plm: bool) -> dict[str, Any]:
    model, _, inputs = METHODS[method]
    cfg = LoadConfig(targets=(server.target,), specs=(RequestSpec(1.0, method, model, 1, {}),), inputs=inputs,
                     concurrency=concurrency, duration=duration, warmup=0.0)
    ort0 = server.metric(ORT_COUNTER + "_total") if plm else 0.0
    c0, t0 = _cpu_seconds(server.proc.pid), time.monotonic()
    result = run_loadtest(cfg, progress=False)
    c1, t1 = _cpu_seconds(server.proc.pid), time.monotonic()
    ort = (server.metric(ORT_COUNTER + "_total") - ort0) if plm else 0.0
    s = result["summary"]
    calls = max(s["ok"], 1)
    if smoke:
        no_errors(s["errors"], f"{method} on {server.target}")
    return {"calls": s["ok"], "calls_per_s": s["throughput_ok_per_s"],
            "server_cpu_percent": 100 * (c1 - c0) / (t1 - t0),
            "server_cpu_us_per_call": 1e6 * (c1 - c0) / calls, "ort_cpu_us_per_call": 1e6 * ort / calls,
            "client_cpu_percent": s["client_cpu_percent"], "errors": s["errors"]}


def responses(server: Child) -> dict[str, str]:
    """One response of each method from plm, as hex bytes: what the bare server answers."""
    from plm.api.v1 import plm_pb2_grpc as pb_grpc

    out = {}
    with grpc.insecure_channel(server.target) as ch:
        stub = pb_grpc.LanguageModelServiceStub(ch)
        for method, (model, request, inputs) in METHODS.items():
            text = inputs[0] if method != "FillMask" else inputs[0].replace("dead", "[MASK]")
            field = "contexts" if method == "PredictNext" else "texts"
            out[method] = getattr(stub, method)(request(model=model, **{field: [text]})).SerializeToString().hex()
    return out


# ------------------------------------------------------------------------------------------------- stages

class _Context:
    """What the gRPC edge reads from and writes to a grpc.aio context, without gRPC."""

    def __init__(self) -> None:
        self.md: tuple[tuple[str, str], ...] = (("user-agent", "grpc-python/1.85"),)

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.md

    def time_remaining(self) -> float | None:
        return None

    def set_trailing_metadata(self, md: Any) -> None:
        pass

    async def abort(self, code: Any, details: str) -> None:
        raise RuntimeError(f"{code}: {details}")


def _per_call(fn: Callable[[], Any], n: int) -> float:
    """Process CPU µs per call of `fn`, over `n` calls after a few to warm up."""
    for _ in range(min(n, 50)):
        fn()
    c0 = time.process_time()
    for _ in range(n):
        fn()
    return 1e6 * (time.process_time() - c0) / n


async def _per_call_async(make: Callable[[], Any], n: int, concurrency: int = 1) -> float:
    """Process CPU µs per call of the coroutine `make()`, `concurrency` callers at once, `n` calls in all."""
    async def caller(k: int) -> None:
        for _ in range(k):
            await make()

    await asyncio.gather(*(caller(max(1, min(n, 50) // concurrency)) for _ in range(concurrency)))
    c0 = time.process_time()
    await asyncio.gather(*(caller(n // concurrency) for _ in range(concurrency)))
    return 1e6 * (time.process_time() - c0) / (n // concurrency * concurrency)


async def _stages(repository: Path, n: int) -> dict[str, dict[str, float]]:
    from dataclasses import replace

    from plm.service import logs
    from plm.service.admission import Admission
    from plm.service.batcher import DynamicBatcher
    from plm.service.config import Batching, Runtime, ServerConfig
    from plm.service.dataplane import requests as rq
    from plm.service.dataplane import validation
    from plm.service.dataplane.plane import DataPlane
    from plm.service.frontends.grpc_edge import open_call
    from plm.service.frontends.plm_v1 import LanguageModelServicer
    from plm.service.metrics import Metrics
    from plm.service.registry import Registry
    from plm.service.tasks import fill_mask, next_word
    from plm.service.tasks.common import ids_checked

    _count_ort_cpu()
    config = replace(ServerConfig(), repository=repository, models=("ngram-kn", "bert"),
                     runtime=replace(Runtime(), intra_op_threads=1), log_buffer_seconds=1.0)
    logs.setup_logging("INFO", "text", 1.0)
    metrics = Metrics()
    registry = Registry(config, metrics)
    registry.load_all()
    for m in registry.models.values():
        await m.start()
    plane = DataPlane(registry, Admission(config.limits, metrics), metrics, config.limits)
    servicer = LanguageModelServicer(plane)
    ctx: Any = _Context()
    out: dict[str, dict[str, float]] = {}

    def common(method: str, model: str) -> dict[str, float]:
        call = open_call(plane, method, ctx)

        def admission() -> None:
            call.begin()
            call.end()

        def lease() -> None:
            call.model(model, rows=1)
            call.release()

        return {"call edge (request id, deadline)": _per_call(lambda: open_call(plane, method, ctx), n),
                "admission + leave + metrics + access line": _per_call(admission, n),
                "request metrics": _per_call(lambda: metrics.request_done(method, model, "OK", 0.001), n),
                "access line": _per_call(lambda: logs.access("0123456789abcdef", method, model, "OK", 0.001), n),
                "model lease": _per_call(lease, n)}

    # n-gram PredictNext
    ngram = registry.models["ngram-kn"]
    req = pb.PredictNextRequest(model="ngram-kn", contexts=["the king is"])
    nreq = rq.PredictNextRequest(req.model, req.contexts, None, req.include_tokens, None, None)
    params = validation.next_params(nreq, config.limits)
    served = await plane.predict_next(plane.call("PredictNext"), nreq)
    row = out["PredictNext"] = common("PredictNext", "ngram-kn")
    row["request conversion"] = _per_call(lambda: rq.PredictNextRequest(
        req.model, req.contexts, req.top_k if req.HasField("top_k") else None, req.include_tokens,
        req.beam_width if req.HasField("beam_width") else None,
        req.max_word_tokens if req.HasField("max_word_tokens") else None), n)
    row["validation"] = _per_call(lambda: validation.next_params(nreq, config.limits), n)
    row["tokenising"] = _per_call(lambda: ids_checked(ngram, params.contexts, "contexts", allow_empty=True), n)
    row["task (tokenising + n-gram top-k)"] = await _per_call_async(
        lambda: next_word.predict_next(ngram, params, None), n)
    response = await servicer.PredictNext(req, ctx)
    row["response: protobuf serialisation"] = _per_call(response.SerializeToString, n)
    row["servicer method, no gRPC (+ serialisation)"] = await _per_call_async(
        lambda: servicer.PredictNext(req, ctx), n) + row["response: protobuf serialisation"]
    del served

    # BERT FillMask
    bert = registry.models["bert"]
    freq = pb.FillMaskRequest(model="bert", texts=["the king is [MASK] and the queen is here"])
    frq = rq.FillMaskRequest(freq.model, freq.texts, None, freq.targets)
    fparams = validation.fill_mask_params(frq, config.limits)
    row = out["FillMask"] = common("FillMask", "bert")
    row["request conversion"] = _per_call(lambda: rq.FillMaskRequest(
        freq.model, freq.texts, freq.top_k if freq.HasField("top_k") else None, freq.targets), n)
    row["validation"] = _per_call(lambda: validation.fill_mask_params(frq, config.limits), n)
    row["tokenising"] = _per_call(lambda: [fill_mask._with_blanks(bert, bert.mask_id, t, "[0]")
                                           for t in fparams.texts], n)
    response = await servicer.FillMask(freq, ctx)
    row["response: protobuf serialisation"] = _per_call(response.SerializeToString, n)
    noop: DynamicBatcher[int, int] = DynamicBatcher("noop", lambda ps: list(ps), Batching(inline_max_ms=0),
                                                    metrics)
    noop.start()
    row["batcher hand-off and back (no-op model, 16 callers)"] = await _per_call_async(
        lambda: noop.submit([1], [8]), n, 16)
    await noop.close()
    ort = metrics.registry.get_sample_value(ORT_COUNTER + "_total") or 0.0
    whole = await _per_call_async(lambda: servicer.FillMask(freq, ctx), n, 16)
    ort_us = 1e6 * ((metrics.registry.get_sample_value(ORT_COUNTER + "_total") or 0.0) - ort) / (n // 16 * 16)
    row["ONNX Runtime (16 callers)"] = ort_us
    row["servicer method less ONNX Runtime, no gRPC (16 callers, + serialisation)"] = (
        whole - ort_us + row["response: protobuf serialisation"])
    for m in registry.models.values():
        await m.close()
    return out


def _time_ort(session: Any) -> list[float]:
    """Wrap `session.run` to add the thread CPU seconds of each run to the returned one-item list (reset by
    the caller): ONNX Runtime's time, to take from the process's."""
    ort, ort_run = [0.0], session.run

    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.thread_time()
        try:
            return ort_run(*args, **kwargs)
        finally:
            ort[0] += time.thread_time() - started

    session.run = timed
    return ort


async def _fill_task_ab(repository: Path, old: Path, rounds: int, calls: int) -> dict[str, list[float]]:
    """FillMask's task (`tasks/fill_mask.fill_mask` and BERT's batch top-k, `bert._batch_tops`) of the tree `old`
    against this checkout's, in one process on one BERT adapter: 16 callers, process CPU per call less ONNX
    Runtime's thread time, the two alternated `rounds` times (each first in turn); answers checked equal first."""
    import importlib.util
    from dataclasses import replace

    from plm.service.config import Runtime, ServerConfig
    from plm.service.families import bert as bert_mod
    from plm.service.metrics import Metrics
    from plm.service.registry import Registry
    from plm.service.tasks import fill_mask as new_fm

    def load(name: str, rel: str) -> Any:
        spec: Any = importlib.util.spec_from_file_location(name, old / "plm" / rel)
        module = sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    sides = {"old": (load("old_fill_mask", "service/tasks/fill_mask.py"),
                     load("old_bert", "service/families/bert.py")._batch_tops),
             "new": (new_fm, bert_mod._batch_tops)}
    config = replace(ServerConfig(), repository=repository, models=("bert",),
                     runtime=replace(Runtime(), intra_op_threads=1))
    registry = Registry(config, Metrics())
    registry.load_all()
    model: Any = registry.models["bert"]
    await model.start()
    ort = _time_ort(model.session)
    params = [new_fm.FillMaskParams(texts=(t.replace(w, "[MASK]", 1),)) for t, w in
              zip(METHODS["FillMask"][2], ("dead", "be", "yonder"), strict=True)]
    answers = {}
    for name, (fm, tops) in sides.items():
        bert_mod._batch_tops = tops
        answers[name] = [[[(*c.token_ids, c.token_str, c.log_prob, c.sequence) for c in cands]
                          for cands in r.masks] for p in params for r in await fm.fill_mask(model, p, None)]
    assert answers["old"] == answers["new"], "the two trees' FillMask answers differ"

    async def caller(fm: Any, i: int, n: int) -> None:
        for j in range(n):
            await fm.fill_mask(model, params[(i + j) % len(params)], None)

    out: dict[str, list[float]] = {"old": [], "new": []}
    for r in range(rounds):
        for name in (("old", "new") if r % 2 == 0 else ("new", "old")):
            fm, bert_mod._batch_tops = sides[name]
            await asyncio.gather(*(caller(fm, i, 5) for i in range(16)))
            ort[0], c0 = 0.0, time.process_time()
            await asyncio.gather(*(caller(fm, i, calls // 16) for i in range(16)))
            n = calls // 16 * 16
            out[name].append(1e6 * (time.process_time() - c0 - ort[0]) / n)
            print(f"round {r} {name}: {out[name][-1]:6.1f} µs per call less ORT ({1e6 * ort[0] / n:.0f} µs ORT)",
                  flush=True)
    bert_mod._batch_tops = sides["new"][1]
    await model.close()
    print(f"new − old per round: {[round(b - a, 1) for a, b in zip(out['old'], out['new'], strict=True)]}; "
          f"medians {statistics.median(out['old']):.1f} → {statistics.median(out['new']):.1f} µs")
    return out


async def _score_task_ab(repository: Path, old: Path, rounds: int, calls: int) -> dict[str, list[float]]:
    """GPT Score's whole servicer method without gRPC, serialisation included, of the tree `old` against this
    checkout's, in one process on one GPT adapter: the Score handler (frontends/plm_v1.py), the call's edge
    (dataplane/plane.py's `Call`), the task (tasks/score.py) and GPT's scoring and batch run (families/gpt.py)
    swapped as a set; 16 callers over held-out texts, process CPU per call less ONNX Runtime's thread time, the two
    alternated `rounds` times (each first in turn); answers checked bit-equal first."""
    import importlib.util
    import types
    from dataclasses import replace

    from plm.service import logs
    from plm.service.admission import Admission
    from plm.service.config import Runtime, ServerConfig
    from plm.service.dataplane import plane as plane_mod
    from plm.service.families import gpt as new_gpt
    from plm.service.frontends import plm_v1 as new_v1
    from plm.service.metrics import Metrics
    from plm.service.registry import Registry
    from plm.service.tasks import score as new_score
    from serving import held_out_texts

    def load(name: str, rel: str) -> Any:
        spec: Any = importlib.util.spec_from_file_location(name, old / "plm" / rel)
        module = sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    mods = {"old": (load("old_plm_v1", "service/frontends/plm_v1.py"), load("old_plane", "service/dataplane/plane.py"),
                    load("old_score", "service/tasks/score.py"), load("old_gpt", "service/families/gpt.py")),
            "new": (new_v1, plane_mod, new_score, new_gpt)}
    new_init = plane_mod.Call.__init__
    config = replace(ServerConfig(), repository=repository, models=("gpt",),
                     runtime=replace(Runtime(), intra_op_threads=1), log_buffer_seconds=1.0)
    logs.setup_logging("WARNING", "text", 1.0)
    metrics = Metrics()
    registry = Registry(config, metrics)
    registry.load_all()
    model: Any = registry.models["gpt"]
    await model.start()
    plane = plane_mod.DataPlane(registry, Admission(config.limits, metrics), metrics, config.limits)
    ort = _time_ort(model.session)
    servicers = {name: m[0].LanguageModelServicer(plane) for name, m in mods.items()}

    def use(name: str) -> Any:
        _, plane_side, score_side, gpt_side = mods[name]
        plane_mod.Call.__init__ = plane_side.Call.__init__ if name == "old" else new_init  # type: ignore[method-assign]
        plane_mod.score = score_side
        model.score = types.MethodType(gpt_side.GptAdapter.score, model)
        model._batcher._run = types.MethodType(gpt_side.GptAdapter._run, model)
        return servicers[name]

    requests = [pb.ScoreRequest(model="gpt", texts=[t]) for t in held_out_texts(repository)[:400]]
    ctx: Any = _Context()
    answers = {}
    for name in mods:
        servicer = use(name)
        answers[name] = [(await servicer.Score(r, ctx)).SerializeToString() for r in requests[:100]]
    assert answers["old"] == answers["new"], "the two trees' Score answers differ"

    async def caller(servicer: Any, i: int, n: int) -> None:
        for j in range(n):
            (await servicer.Score(requests[(i * 37 + j) % len(requests)], ctx)).SerializeToString()

    out: dict[str, list[float]] = {"old": [], "new": []}
    n = calls // 16 * 16
    for r in range(rounds):
        for name in (("old", "new") if r % 2 == 0 else ("new", "old")):
            servicer = use(name)
            await asyncio.gather(*(caller(servicer, i, 5) for i in range(16)))
            ort[0], c0 = 0.0, time.process_time()
            await asyncio.gather(*(caller(servicer, i, calls // 16) for i in range(16)))
            out[name].append(1e6 * (time.process_time() - c0 - ort[0]) / n)
            print(f"round {r} {name}: {out[name][-1]:6.1f} µs per call less ORT ({1e6 * ort[0] / n:.0f} µs ORT)",
                  flush=True)
    use("new")
    await model.close()
    print(f"new − old per round: {[round(b - a, 1) for a, b in zip(out['old'], out['new'], strict=True)]}; "
          f"medians {statistics.median(out['old']):.1f} → {statistics.median(out['new']):.1f} µs")
    return out


def stages(repository: Path, smoke: bool) -> dict[str, dict[str, float]]:
    """Run `_stages` in a child whose stderr (the access log) goes to /dev/null; its JSON comes back."""
    proc = subprocess.run([sys.executable, __file__, "--stages", str(repository), "100" if smoke else "3000"],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, check=True)
    result: dict[str, dict[str, float]] = json.loads(proc.stdout)
    return result


# --------------------------------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repository", type=Path, default=Path("repository"))
    ap.add_argument("--duration", type=float, default=4.0, help="seconds per measured window")
    ap.add_argument("--pairs", type=int, default=3, help="alternated bare/plm pairs per method")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--baseline", type=Path, nargs="*", default=[],
                    help="folders each with another `plm` package: one more server runs each")
    ap.add_argument("--no-stages", action="store_true", help="skip the in-process stage timings")
    ap.add_argument("--out", type=Path, default=Path("results/grpc_floor.json"))
    add_smoke_flag(ap)
    args = ap.parse_args()
    if args.smoke:
        args.duration, args.pairs = 0.1, 1
    plm_argv = ["--plm-serve", "--repository", str(args.repository), "--port", "{port}", "--metrics-port",
                "{metrics}", "--http-port", "0", "--models", "ngram-kn", "bert"]
    servers = {"plm": Child(plm_argv, env={"PLM_RUNTIME__INTRA_OP_THREADS": "1"})}
    rows: dict[str, list[dict[str, Any]]] = {}
    try:
        for folder in args.baseline:
            servers[folder.name] = Child(plm_argv, env={"PLM_RUNTIME__INTRA_OP_THREADS": "1",
                                                        "PYTHONPATH": str(folder.resolve())})
        answers = args.out.with_suffix(".responses.json")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        answers.write_text(json.dumps(responses(servers["plm"])))
        servers["bare"] = Child(["--bare-port", "{port}", str(answers)], health=False)
        servers[EDGE] = Child(["--bare-port", "{port}", str(answers), "--edge"], health=False)
        names = ["bare", *(n for n in servers if n != "bare")]
        for method in METHODS:
            for name, srv in servers.items():  # warm up: connections, ORT's first shapes
                measure(srv, method, args.concurrency, min(args.duration, 1.0), args.smoke, name not in ("bare", EDGE))
            for pair in range(args.pairs):  # a round: every server once, each first in turn
                for name in names[pair % len(names):] + names[:pair % len(names)]:
                    rows.setdefault(f"{method} {name}", []).append(measure(
                        servers[name], method, args.concurrency, args.duration, args.smoke, name not in ("bare", EDGE)))
    finally:
        for srv in servers.values():
            srv.stop()
    summary: dict[str, float] = {}
    for method in METHODS:
        bare = [r["server_cpu_us_per_call"] for r in rows[f"{method} bare"]]
        plm = [r["server_cpu_us_per_call"] for r in rows[f"{method} plm"]]
        ort = [r["ort_cpu_us_per_call"] for r in rows[f"{method} plm"]]
        summary[f"{method} bare µs/call"] = statistics.median(bare)
        summary[f"{method} plm µs/call"] = statistics.median(plm)
        edge = [r["server_cpu_us_per_call"] for r in rows[f"{method} {EDGE}"]]
        summary[f"{method} {EDGE} µs/call"] = statistics.median(edge)
        summary[f"{method} plm − bare µs/call"] = statistics.median(p - b for p, b in zip(plm, bare, strict=True))
        summary[f"{method} {EDGE} − bare µs/call"] = statistics.median(e - b for e, b in zip(edge, bare, strict=True))
        if any(ort):
            summary[f"{method} ORT µs/call"] = statistics.median(ort)
            summary[f"{method} plm − ORT − bare µs/call"] = statistics.median(
                p - o - b for p, o, b in zip(plm, ort, bare, strict=True))
        summary[f"{method} plm − ORT − {EDGE} µs/call"] = statistics.median(
            p - o - e for p, o, e in zip(plm, ort, edge, strict=True))
        for folder in args.baseline:
            base = [r["server_cpu_us_per_call"] - r["ort_cpu_us_per_call"] for r in rows[f"{method} {folder.name}"]]
            summary[f"{method} plm − {folder.name} (less ORT) µs/call"] = statistics.median(
                p - o - b for p, o, b in zip(plm, ort, base, strict=True))
    for name, rs in rows.items():
        print(f"{name:18} " + "  ".join(f"{r['server_cpu_us_per_call']:5.0f} µs ({r['calls_per_s']:5.0f}/s, "
                                        f"{r['server_cpu_percent']:3.0f}% CPU)" for r in rs))
    for key, value in summary.items():
        print(f"{key:44} {value:7.1f}")
    stage_costs = {} if args.no_stages else stages(args.repository, args.smoke)
    for method, costs in stage_costs.items():
        print(f"{method} stages, process CPU µs per call (in process, no gRPC):")
        for stage, us in costs.items():
            print(f"  {stage:70} {us:7.1f}")
    args.out.write_text(json.dumps({"concurrency": args.concurrency, "duration": args.duration, "pairs": args.pairs,
                                    "rows": rows, "summary": summary, "stages": stage_costs}, indent=1) + "\n")
    bar_plot(args.out.with_suffix(".png"), {k: v for k, v in summary.items() if "−" not in k},
             "server CPU µs per call", "plm vs a bare grpc.aio server, same response bytes")
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    if "--bare-port" in sys.argv:
        i = sys.argv.index("--bare-port")
        _serve_bare(int(sys.argv[i + 1]), Path(sys.argv[i + 2]), "--edge" in sys.argv)
    elif "--plm-serve" in sys.argv:
        sys.exit(_serve_plm(sys.argv[sys.argv.index("--plm-serve") + 1:]))
    elif "--fill-task-ab" in sys.argv:  # --fill-task-ab REPOSITORY OLD_TREE ROUNDS CALLS
        i = sys.argv.index("--fill-task-ab")
        asyncio.run(_fill_task_ab(Path(sys.argv[i + 1]), Path(sys.argv[i + 2]), int(sys.argv[i + 3]),
                                  int(sys.argv[i + 4])))
    elif "--score-task-ab" in sys.argv:  # --score-task-ab REPOSITORY OLD_TREE ROUNDS CALLS
        i = sys.argv.index("--score-task-ab")
        asyncio.run(_score_task_ab(Path(sys.argv[i + 1]), Path(sys.argv[i + 2]), int(sys.argv[i + 3]),
                                   int(sys.argv[i + 4])))
    elif "--stages" in sys.argv:
        i = sys.argv.index("--stages")
        print(json.dumps(asyncio.run(_stages(Path(sys.argv[i + 1]), int(sys.argv[i + 2])))))
    else:
        run(main)
