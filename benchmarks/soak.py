"""Soak: a mixed load on a real `plm serve` process for a long time; its RSS, file descriptors and threads
over time must level off (growth < 5 % after the warm-up).

    python benchmarks/soak.py [--repository repository] [--minutes 10] [--warmup-minutes 1]

Starts `plm serve` on a free loopback port, drives it with `plm loadtest`'s closed loop over a weighted mix
(benchmarks/scenarios/mixed.json: Score, PredictNext, Generate, FillMask, Embed on five models), calls
AdminService/ReloadModels every `--reload-every` seconds and a GenerateStream now and then (streams and the
admin path hold resources of their own), and samples the server's /proc every `--sample-seconds`. Growth =
(median of the last 3 samples − median of the first 3 after the warm-up) ÷ the latter. Prints the table and
the verdict, writes results/soak.json and results/soak.png; exits 1 when a growth reaches 5 %, a request
failed, the side load made no reload or no stream, the server exited non-zero, or a thread died. `--smoke`
runs seconds, everything but the growth judged.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
from _smoke import add_smoke_flag, check_threads, run  # this folder is on sys.path when run as a script
from plm.client import loadtest
from plm.client.client import PlmClient

from plm.api.v1 import admin_pb2, admin_pb2_grpc
from plm.api.v1 import plm_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]
GROWTH_LIMIT = 0.05


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(repository: Path, models: list[str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "plm.cli", "serve", "--repository", str(repository), "--port", str(port),
         "--metrics-port", "0", "--models", *models],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    target = f"127.0.0.1:{port}"
    until = time.monotonic() + 120
    while time.monotonic() < until and proc.poll() is None:
        try:
            with PlmClient(target, timeout=2) as c:
                if c.health_status("") == "SERVING":
                    return proc, target
        except grpc.RpcError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"plm serve did not start; see {log}")


def sample(pid: int) -> dict[str, float]:
    """RSS (MB), open file descriptors and threads of a process, from /proc."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {"rss_mb": int(status["VmRSS"].split()[0]) / 1024, "fds": len(os.listdir(f"/proc/{pid}/fd")),
            "threads": int(status["Threads"])}


def growth(samples: list[dict[str, float]], t0: float, warmup: float, key: str) -> dict[str, float]:
    after = [s[key] for s in samples if s["t"] - t0 >= warmup]
    if len(after) < 6:
        raise ValueError(f"only {len(after)} samples after the warm-up: run longer or sample more often")
    first, last = statistics.median(after[:3]), statistics.median(after[-3:])
    return {"first": first, "last": last, "max": max(after), "growth": (last - first) / first}


def side_load(target: str, stop: threading.Event, reload_every: float, counts: dict[str, int],
              pause: float = 1.0) -> None:
    """Admin reloads and token streams beside the main mix, a stream every `pause` seconds; every failed call
    is counted (any other exception ends the thread, and `check_threads` fails the run)."""
    with PlmClient(target, timeout=60) as c:
        admin = admin_pb2_grpc.AdminServiceStub(c.channels[0])
        next_reload = time.monotonic() + reload_every
        while not stop.wait(pause):
            try:
                if time.monotonic() >= next_reload:
                    admin.ReloadModels(admin_pb2.ReloadModelsRequest(), timeout=60)
                    counts["reloads"] += 1
                    next_reload += reload_every
                for _ in c.generate_stream("gpt", ["The king"], pb.SamplingParams(max_new_tokens=16, seed=1)):
                    pass
                counts["streams"] += 1
            except grpc.RpcError as e:
                counts[f"side_error_{e.code().name}"] = counts.get(f"side_error_{e.code().name}", 0) + 1


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = result["samples"]
    minutes = [s["t"] / 60 for s in samples]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for ax, key, label in zip(axes, ("rss_mb", "fds", "threads"), ("RSS (MB)", "open fds", "threads"), strict=True):
        ax.plot(minutes, [s[key] for s in samples])
        ax.axvline(result["config"]["warmup_minutes"], color="grey", linestyle=":")
        ax.set_xlabel("minutes")
        ax.set_title(f"{label}: {100 * result['growth'][key]['growth']:+.1f} % after warm-up")
        ax.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repository", type=Path, default=Path("repository"))
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--warmup-minutes", type=float, default=1.0)
    ap.add_argument("--sample-seconds", type=float, default=5.0)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--reload-every", type=float, default=30.0, help="seconds between AdminService reloads")
    ap.add_argument("--scenario", type=Path, default=ROOT / "benchmarks" / "scenarios" / "mixed.json")
    ap.add_argument("--out", type=Path, default=Path("results") / "soak.json")
    add_smoke_flag(ap)
    args = ap.parse_args()
    pause = 1.0
    if args.smoke:  # 2 s: a sample every 0.15 s, a reload every 0.5 s, a stream every 0.1 s
        args.minutes, args.warmup_minutes, args.sample_seconds, args.concurrency = 0.033, 0.0, 0.15, 2
        args.reload_every, pause = 0.5, 0.1

    specs = loadtest.load_scenario(args.scenario)
    models = sorted({s.model for s in specs} | {"gpt"})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    proc, target = start_server(args.repository, models, args.out.with_suffix(".server.log"))
    cfg = loadtest.LoadConfig(targets=(target,), specs=tuple(specs), inputs=tuple(loadtest.load_inputs(None)),
                              concurrency=args.concurrency, duration=args.minutes * 60, warmup=0.0)
    samples: list[dict[str, float]] = []
    stop = threading.Event()
    counts = {"reloads": 0, "streams": 0}
    t0 = time.monotonic()

    def sampler() -> None:
        while True:
            samples.append({"t": time.monotonic() - t0, **sample(proc.pid)})
            s = samples[-1]
            print(f"\r{s['t'] / 60:5.1f} min  rss {s['rss_mb']:7.1f} MB  fds {s['fds']:4.0f}  "
                  f"threads {s['threads']:3.0f}", end="", file=sys.stderr, flush=True)
            if stop.wait(args.sample_seconds):
                return

    threads = [threading.Thread(target=sampler, daemon=True),
               threading.Thread(target=side_load, args=(target, stop, args.reload_every, counts, pause), daemon=True)]
    for t in threads:
        t.start()
    try:
        load = loadtest.run_loadtest(cfg, processes=1, progress=False)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
        proc.terminate()
        exit_code = proc.wait(60)
    print(file=sys.stderr)
    check_threads()  # no verdict without the sampler's and the side load's work

    warmup = args.warmup_minutes * 60
    result: dict[str, Any] = {
        "config": {"minutes": args.minutes, "warmup_minutes": args.warmup_minutes, "concurrency": args.concurrency,
                   "scenario": str(args.scenario), "models": models, "reload_every_s": args.reload_every},
        "requests": load["summary"]["requests"], "ok": load["summary"]["ok"], "errors": load["summary"]["errors"],
        "throughput_ok_per_s": load["summary"]["throughput_ok_per_s"], "side": counts,
        "server_exit_code": exit_code,
        "growth": {key: growth(samples, 0.0, warmup, key) for key in ("rss_mb", "fds", "threads")},
        "samples": samples,
    }
    args.out.write_text(json.dumps(result, indent=1))
    plot(result, args.out.with_suffix(".png"))
    level = args.smoke or all(g["growth"] < GROWTH_LIMIT for g in result["growth"].values())
    ok = (level and not result["errors"] and counts["reloads"] > 0 and counts["streams"] > 0
          and not any(k.startswith("side_error") for k in counts) and exit_code == 0)
    print(f"soak: {args.minutes:g} min (warm-up {args.warmup_minutes:g}), {result['requests']} requests "
          f"({result['throughput_ok_per_s']:.1f} ok/s), errors {result['errors'] or 'none'}, "
          f"{counts['streams']} streams, {counts['reloads']} reloads, server exit code {exit_code}")
    print(f"{'':10} {'first':>9} {'last':>9} {'max':>9} {'growth':>8}")
    for key, g in result["growth"].items():
        print(f"{key:10} {g['first']:9.1f} {g['last']:9.1f} {g['max']:9.1f} {100 * g['growth']:+7.2f}%")
    judged = "smoke: growth not judged" if args.smoke else f"growth < {100 * GROWTH_LIMIT:.0f} % after warm-up"
    print(f"verdict: {'PASS' if ok else 'FAIL'} ({judged}, no errors, reloads and streams made); "
          f"{args.out}, {args.out.with_suffix('.png')}")
    return 0 if ok else 1


if __name__ == "__main__":
    run(main)
