"""The HTTP APIs (OpenAI-compatible, and plm.v1 as JSON) against plm.v1 gRPC on the same work, in one process.

    python benchmarks/http_vs_grpc.py [--repository repository] [--seconds 5] [--rounds 3] [--out DIR/x.json]

Embed (one sentence, gpt: plm.v1 `Embed` vs `POST /v1/embeddings` with base64, the OpenAI SDKs' default) and
Generate (one prompt, exactly 8 new tokens by min = max, gpt's KV-cache engine: plm.v1 `Generate` vs
`POST /v1/completions`), each at concurrency 1 and 32: that many asyncio clients calling back to back for
`--seconds`. The same two calls also go as plm.v1 JSON (`POST /plm.v1.LanguageModelService/Embed` and
`/Generate`, the gRPC requests' JSON). Clients: grpc.aio's plm.v1 stub and an aiohttp session (keep-alive
connections), both in this process. Protocols alternate within each round (the order rotates every round), so
drift on a shared machine falls on all. Prints and writes (JSON + PNG) each cell's throughput and p50 latency
per protocol and HTTP ÷ gRPC (JSON ÷ gRPC beside it), the medians over rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import grpc
from _smoke import add_smoke_flag, bar_plot, run  # this folder is on sys.path when run as a script
from google.protobuf import json_format
from plm.client.local_server import LocalServer

from plm.api.v1 import plm_pb2 as pb
from plm.api.v1 import plm_pb2_grpc as pb_grpc

MODEL = "gpt"
TEXT = "The king is dead, long live the king."
PROMPT = "The king"
NEW_TOKENS = 8
CONCURRENCY = (1, 32)
TASKS = ("Embed", "Generate")
PROTOCOLS = ("grpc", "http", "json")  # plm.v1 gRPC, the OpenAI-compatible API, plm.v1 as JSON over HTTP

Call = Callable[[], Awaitable[None]]


async def drive(call: Call, concurrency: int, seconds: float) -> tuple[float, float]:
    """(calls per second, p50 latency in seconds) of `concurrency` clients calling back to back."""
    for _ in range(3):  # warm-up: connections, the model's first batches
        await call()
    latencies: list[float] = []
    stop = time.perf_counter() + seconds

    async def client() -> None:
        while time.perf_counter() < stop:
            t = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - t)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return len(latencies) / (time.perf_counter() - started), statistics.median(latencies)


EMBED = pb.EmbedRequest(model=MODEL, texts=[TEXT])
GENERATE = pb.GenerateRequest(model=MODEL, prompts=[PROMPT], sampling=pb.SamplingParams(
    max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, seed=1))


def grpc_calls(stub: pb_grpc.LanguageModelServiceStub) -> dict[str, Call]:
    async def embed_call() -> None:
        await stub.Embed(EMBED, timeout=60)

    async def gen_call() -> None:
        await stub.Generate(GENERATE, timeout=60)

    return {"Embed": embed_call, "Generate": gen_call}


def post_calls(session: aiohttp.ClientSession, base: str, paths: dict[str, tuple[str, bytes]]) -> dict[str, Call]:
    """Per task, a call that POSTs its JSON body to its path and reads the answer."""
    headers = {"Content-Type": "application/json"}

    async def post(path: str, body: bytes) -> None:
        async with session.post(base + path, data=body, headers=headers) as r:
            await r.read()
            if r.status != 200:
                raise RuntimeError(f"{path}: HTTP {r.status}: {await r.text()}")

    def call(path: str, body: bytes) -> Call:
        return lambda: post(path, body)

    return {task: call(path, body) for task, (path, body) in paths.items()}


def http_calls(session: aiohttp.ClientSession, base: str) -> dict[str, Call]:
    return post_calls(session, base, {
        "Embed": ("/v1/embeddings",
                  json.dumps({"model": MODEL, "input": [TEXT], "encoding_format": "base64"}).encode()),
        "Generate": ("/v1/completions", json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": NEW_TOKENS,
                                                    "min_tokens": NEW_TOKENS, "seed": 1}).encode())})


def json_calls(session: aiohttp.ClientSession, base: str) -> dict[str, Call]:
    service = "/plm.v1.LanguageModelService"
    return post_calls(session, base, {
        task: (f"{service}/{task}", json_format.MessageToJson(message).encode())
        for task, message in (("Embed", EMBED), ("Generate", GENERATE))})


async def measure(server: LocalServer, seconds: float, rounds: int) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """cell ("Embed c=1") → protocol → one (throughput, p50) per round."""
    assert server.http_url is not None
    out: dict[str, dict[str, list[tuple[float, float]]]] = {}
    connector = aiohttp.TCPConnector(limit=0)
    async with grpc.aio.insecure_channel(server.target) as channel, aiohttp.ClientSession(connector=connector) as s:
        calls = {"grpc": grpc_calls(pb_grpc.LanguageModelServiceStub(channel)), "http": http_calls(s, server.http_url),
                 "json": json_calls(s, server.http_url)}
        for r in range(rounds):
            order = PROTOCOLS[r % len(PROTOCOLS):] + PROTOCOLS[:r % len(PROTOCOLS)]
            for task in TASKS:
                for c in CONCURRENCY:
                    cell = out.setdefault(f"{task} c={c}", {p: [] for p in PROTOCOLS})
                    for proto in order:
                        cell[proto].append(await drive(calls[proto][task], c, seconds))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repository", type=Path, default=Path("repository"))
    ap.add_argument("--seconds", type=float, default=5.0, help="per cell, protocol and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("results/http_vs_grpc.json"))
    add_smoke_flag(ap)
    args = ap.parse_args()
    if args.smoke:
        args.seconds, args.rounds = 0.1, 1
    server = LocalServer(args.repository, [MODEL], {"PLM_RUNTIME__KV_CACHE": "true"}, http=True)
    try:
        raw = asyncio.run(measure(server, args.seconds, args.rounds))
    finally:
        server.stop()
    rows: dict[str, dict[str, float]] = {}
    print(f"\n{MODEL}: HTTP (OpenAI-compatible) and plm.v1 JSON vs gRPC (plm.v1), medians of {args.rounds} "
          f"round(s) of {args.seconds:g} s")
    print(f"{'cell':16} {'gRPC calls/s':>12} {'HTTP calls/s':>12} {'HTTP÷gRPC':>9} {'gRPC p50 ms':>11} "
          f"{'HTTP p50 ms':>11} {'HTTP÷gRPC':>9} {'JSON÷gRPC calls/s':>17} {'JSON÷gRPC p50':>13}")
    for cell, by in raw.items():
        g_rps, h_rps, j_rps = (statistics.median(x[0] for x in by[p]) for p in PROTOCOLS)
        g_p50, h_p50, j_p50 = (statistics.median(x[1] for x in by[p]) for p in PROTOCOLS)
        rows[cell] = {"grpc_calls_per_s": g_rps, "http_calls_per_s": h_rps, "throughput_http_vs_grpc": h_rps / g_rps,
                      "grpc_p50_ms": g_p50 * 1e3, "http_p50_ms": h_p50 * 1e3, "p50_http_vs_grpc": h_p50 / g_p50,
                      "json_calls_per_s": j_rps, "json_p50_ms": j_p50 * 1e3,
                      "throughput_json_vs_grpc": j_rps / g_rps, "p50_json_vs_grpc": j_p50 / g_p50}
        print(f"{cell:16} {g_rps:12.0f} {h_rps:12.0f} {h_rps / g_rps:9.2f} {g_p50 * 1e3:11.2f} {h_p50 * 1e3:11.2f} "
              f"{h_p50 / g_p50:9.2f} {j_rps / g_rps:17.2f} {j_p50 / g_p50:13.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": MODEL, "seconds": args.seconds, "rounds": args.rounds,
                                    "new_tokens": NEW_TOKENS, "cells": rows,
                                    "raw": {c: {p: [list(x) for x in xs] for p, xs in by.items()}
                                            for c, by in raw.items()}}, indent=1) + "\n")
    bar_plot(args.out.with_suffix(".png"), {c: r["throughput_http_vs_grpc"] for c, r in rows.items()},
             "HTTP ÷ gRPC throughput", "OpenAI-compatible HTTP vs plm.v1 gRPC (1.0 = equal)")
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    run(main)
