"""What one Score call costs through each client path, against the same `plm serve` process.

    python benchmarks/protocol_overhead.py [--repository repository] [--calls 300] [--out results/protocol.json]

Paths: the bare generated plm.v1 stub (the reference), the SDK's `PlmClient` (request builder, deadline,
retry loop, round-robin pick), `AsyncPlmClient`, and tritonclient's `infer` on the KServe v2 model
`<model>:score` (BYTES tensors in and out, plus the translation to and from plm.v1 on the server). Calls go
one after another (no batching), on `ngram-kn` (microseconds of work: the overhead dominates) and `gpt`.
Prints the median and p90 latency of each path and its median's ratio to the bare stub's, from one run, and
writes them to the JSON and a PNG.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import numpy as np
from _smoke import Servers, add_smoke_flag, bar_plot, run  # this folder is on sys.path when run as a script
from plm.client import AsyncPlmClient, PlmClient

from plm.api.v1 import plm_pb2 as pb
from plm.api.v1 import plm_pb2_grpc as pb_grpc

TEXT = "The king is dead, long live the king."


def timed(fn: Callable[[], object], calls: int) -> list[float]:
    for _ in range(max(10, calls // 10)):  # warm-up: connections, caches, the model's first batches
        fn()
    out = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


async def timed_async(fn: Callable[[], Awaitable[object]], calls: int) -> list[float]:
    for _ in range(max(10, calls // 10)):
        await fn()
    out = []
    for _ in range(calls):
        t = time.perf_counter()
        await fn()
        out.append(time.perf_counter() - t)
    return out


def measure(target: str, model: str, calls: int) -> dict[str, list[float]]:
    import tritonclient.grpc as tc

    results: dict[str, list[float]] = {}
    with grpc.insecure_channel(target) as ch:
        stub = pb_grpc.LanguageModelServiceStub(ch)
        req = pb.ScoreRequest(model=model, texts=[TEXT])
        results["bare plm.v1 stub"] = timed(lambda: stub.Score(req, timeout=30), calls)
    with PlmClient(target, timeout=30) as c:
        results["PlmClient (SDK, sync)"] = timed(lambda: c.score(model, [TEXT]), calls)

    async def run_async() -> list[float]:
        async with AsyncPlmClient(target, timeout=30) as ac:
            return await timed_async(lambda: ac.score(model, [TEXT]), calls)

    results["AsyncPlmClient (SDK, asyncio)"] = asyncio.run(run_async())
    triton = tc.InferenceServerClient(target)
    text = tc.InferInput("TEXT", [1], "BYTES")
    text.set_data_from_numpy(np.array([TEXT.encode()], dtype=object))
    results["tritonclient ModelInfer"] = timed(lambda: triton.infer(f"{model}:score", [text]), calls)
    triton.close()
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repository", type=Path, default=Path("repository"))
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--out", type=Path, default=Path("results/protocol.json"))
    add_smoke_flag(ap)
    args = ap.parse_args()
    if args.smoke:
        args.calls = 10
    rows: dict[str, dict[str, dict[str, float]]] = {}
    models, env = ("ngram-kn", "gpt"), {"PLM_RUNTIME__KV_CACHE": "true"}
    servers = Servers(args.repository, args.smoke, [([model], env) for model in models])
    for model in models:
        with servers.start([model], env) as server:
            results = measure(server.target, model, args.calls)
        base = statistics.median(results["bare plm.v1 stub"])
        print(f"\n{model}: Score of one sentence, {args.calls} sequential calls per path")
        print(f"{'path':32} {'median µs':>10} {'p90 µs':>10} {'× bare':>7}")
        rows[model] = {}
        for path, xs in results.items():
            med, p90 = statistics.median(xs), float(np.percentile(xs, 90))
            rows[model][path] = {"median_us": med * 1e6, "p90_us": p90 * 1e6, "vs_bare": med / base}
            print(f"{path:32} {med * 1e6:10.0f} {p90 * 1e6:10.0f} {med / base:7.2f}")
    servers.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"calls": args.calls, "text": TEXT, "models": rows}, indent=1) + "\n")
    bar_plot(args.out.with_suffix(".png"), {f"{model}: {path}": r["median_us"] for model, paths in rows.items()
                                            for path, r in paths.items()}, "median µs per Score call",
             "one Score call through each client path", log=True)
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    run(main)
