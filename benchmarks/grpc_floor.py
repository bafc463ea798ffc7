"""The floor under every served call: server CPU per call of a bare grpc.aio server vs `plm serve`.

    python benchmarks/grpc_floor.py [--repository repository] [--duration 5] [--out results/grpc_floor.json]

Three servers, each in its own process, each driven by the `plm loadtest` engine (closed loop, concurrency
32, one `PredictNext` per call) for the same time; the server process's CPU (user + system, from
/proc/PID/stat) over the window is divided by the calls answered:
- `bare`: a grpc.aio servicer that returns an empty PredictNextResponse (the cost of gRPC in Python alone);
- `bare + initial metadata`: the same, sending `x-request-id` as initial metadata first, as plm did before;
- `plm serve` with the n-gram model: validation, tokenizing, the n-gram distribution, top-k, metrics, the
  access log.
Prints CPU µs per call and the ratios, and writes the JSON and a PNG.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
from _smoke import add_smoke_flag, bar_plot, no_errors, run  # this folder is on sys.path when run as a script
from plm.client.loadtest import LoadConfig, RequestSpec, run_loadtest
from plm.client.local_server import LocalServer, free_port


def _serve_bare(port: int, metadata: bool) -> None:
    from plm.api.v1 import plm_pb2 as pb
    from plm.api.v1 import plm_pb2_grpc as pb_grpc

    class Bare(pb_grpc.LanguageModelServiceServicer):
        async def PredictNext(self, request: Any, context: Any) -> Any:
            if metadata:
                await context.send_initial_metadata((("x-request-id", "0123456789abcdef"),))
            return pb.PredictNextResponse(model=request.model)

    async def main() -> None:
        server = grpc.aio.server()
        pb_grpc.add_LanguageModelServiceServicer_to_server(Bare(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(target: str, pid: int, model: str, duration: float, smoke: bool = False) -> dict[str, Any]:
    cfg = LoadConfig(targets=(target,), specs=(RequestSpec(1.0, "PredictNext", model, 1, {}),),
                     inputs=("the king is", "to be or not to", "what light through yonder"), concurrency=32,
                     duration=duration, warmup=0.0)
    c0, t0 = _cpu_seconds(pid), time.monotonic()
    result = run_loadtest(cfg, progress=False)
    c1, t1 = _cpu_seconds(pid), time.monotonic()
    s = result["summary"]
    calls = s["ok"]
    if smoke:
        no_errors(s["errors"], target)
    return {"calls_per_s": s["throughput_ok_per_s"], "server_cpu_percent": 100 * (c1 - c0) / (t1 - t0),
            "server_cpu_us_per_call": 1e6 * (c1 - c0) / max(calls, 1), "client_cpu_percent": s["client_cpu_percent"],
            "errors": s["errors"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repository", type=Path, default=Path("repository"))
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--out", type=Path, default=Path("results/grpc_floor.json"))
    add_smoke_flag(ap)
    args = ap.parse_args()
    if args.smoke:
        args.duration = 0.3
    rows: dict[str, Any] = {}
    for name, metadata in (("bare", False), ("bare + initial metadata", True)):
        port = free_port()
        proc = subprocess.Popen([sys.executable, __file__, "--bare-port", str(port), *(["--md"] if metadata else [])])
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:  # imports and bind
                grpc.channel_ready_future(ch).result(timeout=60)
            rows[name] = measure(f"127.0.0.1:{port}", proc.pid, "x", args.duration, args.smoke)
        finally:
            proc.terminate()
            proc.wait(10)
    with LocalServer(args.repository, ["ngram-kn"]) as srv:
        rows["plm serve, n-gram"] = measure(srv.target, srv.proc.pid, "ngram-kn", args.duration, args.smoke)
    for name, r in rows.items():
        print(f"{name:26} {r['calls_per_s']:7.0f} calls/s  server CPU {r['server_cpu_percent']:4.0f}%  "
              f"{r['server_cpu_us_per_call']:6.0f} µs/call  client CPU {r['client_cpu_percent']:3.0f}%  "
              f"{r['errors'] or ''}")
    bare = rows["bare"]["server_cpu_us_per_call"]
    ratios = {"initial_metadata_extra_us": rows["bare + initial metadata"]["server_cpu_us_per_call"] - bare,
              "plm_ngram_vs_bare_cpu_per_call": rows["plm serve, n-gram"]["server_cpu_us_per_call"] / bare}
    print(f"initial metadata costs {ratios['initial_metadata_extra_us']:.0f} µs/call; "
          f"plm's n-gram PredictNext costs {ratios['plm_ngram_vs_bare_cpu_per_call']:.1f}× a bare gRPC call")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "ratios": ratios}, indent=1) + "\n")
    bar_plot(args.out.with_suffix(".png"), {k: r["server_cpu_us_per_call"] for k, r in rows.items()},
             "server CPU µs per PredictNext call", "the floor under every served call")
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    if "--bare-port" in sys.argv:
        _serve_bare(int(sys.argv[sys.argv.index("--bare-port") + 1]), "--md" in sys.argv)
    else:
        run(main)
