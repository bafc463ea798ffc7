#!/usr/bin/env python3
"""The CPU one streamed token costs, by thread: `GenerateStream` calls on an engine server, and the time each
thread of the server (the event loop, the engine, the rest: gRPC's poller, the log flusher) and of this client
spent per token, read from /proc (Linux) around the run.

Tokens/s on a shared 2-core machine moves by half within minutes; the CPU a token costs each thread moves far
less, and says where the served path's time goes: the event loop's share is what one message per token costs
the server (protobuf, the gRPC write and its completion, the hand-over from the engine), the client's what it
costs the reader beside it on the same cores.

Sides, each its own server, driven in turn round by round (each first in turn), `--rounds` rounds each of
`--streams` streams of exactly `--new-tokens` tokens (seeded top-k 50, as generation.py); each round is set
against the other side's round beside it, so drift slower than a round cancels out:
- by default this package at `stream_interval` 1 and at `--stream-interval` (tokens per message);
- with `--baseline DIR` (a folder holding another `plm` package arranged as the installed namespace, as
  generation.py's `--baseline`), this package and DIR's, both at `stream_interval` 1: an A/B of a change.
Prints each side's medians and the median of the paired rounds' ratios; writes --out (JSON) and a PNG of the
event loop's µs per token.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import resource
import statistics
import time
from pathlib import Path
from typing import Any

from _smoke import add_smoke_flag, bar_plot, run  # this folder is on sys.path when run as a script
from generation import stream_once, stream_until
from plm.client import PlmClient
from plm.client.local_server import LocalServer


def thread_seconds(pid: int) -> dict[str, float]:
    """CPU seconds of each thread of process `pid`, by thread id (schedstat: nanoseconds, not clock ticks)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out[tid] = int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0]) / 1e9
        except (FileNotFoundError, ProcessLookupError):  # the thread ended
            continue
    return out


def client_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measure(srv: LocalServer, model: str, streams: int, n: int) -> dict[str, float]:
    """One round of `streams` streams of `n` tokens: tokens/s, messages per token, and CPU µs per token of the
    server's event loop (its main thread), its engine (its busiest other thread), its other threads together,
    and this client process."""
    pid = srv.proc.pid
    before, client0 = thread_seconds(pid), client_seconds()
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(streams) as pool:
        results = list(pool.map(lambda i: stream_until(srv.target, model, i, n), range(streams)))
    wall = time.perf_counter() - started
    after, client1 = thread_seconds(pid), client_seconds()
    tokens = sum(t for t, _ in results)
    messages = sum(len(ts) for _, requests in results for ts in requests)
    used = {tid: after[tid] - before.get(tid, 0.0) for tid in after}
    loop = used.pop(str(pid))
    engine = max(used.values()) if used else 0.0
    us = 1e6 / tokens
    return {"tokens_per_s": tokens / wall, "messages_per_token": messages / tokens,
            "loop_us": loop * us, "engine_us": engine * us, "other_us": (sum(used.values()) - engine) * us,
            "client_us": (client1 - client0) * us}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repository", type=Path, default=Path("repository"))
    ap.add_argument("--model", default="gpt")
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=30, help="rounds per side, the sides alternated round by round")
    ap.add_argument("--stream-interval", type=int, default=4, help="the second side's stream_interval")
    ap.add_argument("--baseline", type=Path, help="an A/B of this package against this folder's instead")
    ap.add_argument("--out", type=Path, default=Path("results/stream_cpu.json"))
    add_smoke_flag(ap)
    args = ap.parse_args()
    if args.smoke:
        args.streams, args.new_tokens, args.rounds = 2, 4, 2
    env = {"PLM_RUNTIME__KV_CACHE": "true"}
    if args.baseline is not None:
        # PYTHONSAFEPATH: the working directory (a source tree, with its `plm/`) is not put first on sys.path
        sides = {"this": env, "baseline": {**env, "PYTHONPATH": str(args.baseline.resolve()), "PYTHONSAFEPATH": "1"}}
    else:
        sides = {"interval 1": env, f"interval {args.stream_interval}":
                 {**env, "PLM_STREAM_INTERVAL": str(args.stream_interval)}}
    servers = {name: LocalServer(args.repository, [args.model], e) for name, e in sides.items()}
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in sides}
    try:
        for srv in servers.values():  # warm-up: the graph's first runs, the first call's imports
            with PlmClient(srv.target, timeout=600) as c:
                stream_once(c, args.model, "hello", 4, 0)
        for r in range(args.rounds):
            order = list(sides) if r % 2 == 0 else list(sides)[::-1]
            for name in order:
                rows[name].append(measure(servers[name], args.model, args.streams, args.new_tokens))
    finally:
        for srv in servers.values():
            srv.stop()
    first, second = list(sides)
    medians = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in rows.items()}
    # Each round against the other side's round next to it: drift slower than a round cancels out.
    paired = {k: [a[k] / b[k] for a, b in zip(rows[first], rows[second], strict=True)] for k in rows[first][0]}
    ratios = {k: statistics.median(v) for k, v in paired.items()}
    for name, m in medians.items():
        print(f"median {name:>12}: " + ", ".join(f"{k} {v:.3f}" for k, v in m.items()))
    print(f"{first} ÷ {second}, median of {args.rounds} paired rounds: "
          + ", ".join(f"{k} {v:.3f} ({sum(x < 1 for x in paired[k])} of {args.rounds} below 1)"
                      for k, v in ratios.items()))
    out: dict[str, Any] = {"model": args.model, "streams": args.streams, "new_tokens": args.new_tokens,
                           "runs": rows, "medians": medians, "ratios": ratios}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    bar_plot(args.out.with_suffix(".png"), {name: m["loop_us"] for name, m in medians.items()},
             "event loop CPU µs per token", f"{args.streams} GenerateStream streams, {args.model}")


if __name__ == "__main__":
    run(main)
