"""Generation throughput: the KV-cache engine vs the same server recomputing every step vs raw ONNX Runtime.

    python benchmarks/generation.py [--repository repository] [--streams 1 4 16] [--new-tokens 64]
                                    [--rounds 5] [--stream-interval 4] [--device cpu|cuda]

Starts two `plm serve` processes on loopback over the same model folder — the engine on (KV cache, continuous
batching) and off (each step re-reads the whole sequence through the dynamic batcher) — and drives each with
1, 4 and 16 concurrent GenerateStream calls of `--new-tokens` tokens each (seeded top-k sampling with
`min_new_tokens` = `max_new_tokens`, so every request makes exactly that many, as the `transformers` reference
below does with no EOS token and vLLM's benchmarks do with `ignore_eos`; `--stop-at-eos` lets a sampled EOS end a
request and starts the next one until the stream has its tokens, the workload before 2026-11-23 08:00 UTC; each
round records its requests), `--rounds` times each,
reporting the median round (the raw decode step likewise: the median request's mean step). A third server, the
engine with `stream_interval` (tokens sent per message), runs the most streams once more.
References: a raw ONNX Runtime greedy loop over the same decoder graph, one request after another and with
as many rows at once as the most streams (its decode steps' tokens/s: what the graph computes for that batch),
and Hugging Face `transformers` generating (KV cache on) with the same weights (`weights.npz`), one request
after another and the same prompts as one left-padded batch with the engine's sampling. Each reference runs at
one thread (the engine's decoder on 2 cores) and at one per core (2 for torch), and the faster counts: on a
machine where another process holds a core a thread pool can be several times slower, which would flatter the
engine. Also
times Classify (8 demonstrations × 4 labels × 16 queries) with prefix reuse (engine) and without: whole sequences
on the server without the engine, and on the engine server with `prefix_reuse = false`. Prints
the ratios measured in this one run, and writes results/generation.json and results/generation.png.

`--baseline DIR --pairs N` is an A/B of the engine's code instead: one engine server on this package and one on
DIR's (a folder holding another `plm` package arranged as the installed namespace, e.g. a `git archive` of the
commit before a change, as grpc_floor.py's `--baseline`), the most streams driven on each in turn, N pairs, each
side first in turn; prints each pair's tokens/s and their ratio, and nothing else runs.

`--device cuda` (a GPU machine with onnxruntime-gpu): the servers pick the GPU themselves (automatic
providers); the raw loop runs the decoder on CUDA with its keys and values bound on the GPU (IO binding), and
`transformers` generates on the GPU.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import re
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from _smoke import Servers, add_smoke_flag, run  # this folder is on sys.path when run as a script
from plm.client.client import PlmClient
from plm.service.runtime import run_bound

from plm.api.v1 import plm_pb2 as pb

PROMPTS = ["The king", "Good morrow, my lord", "O Romeo", "What light through yonder window", "My liege",
           "Now is the winter", "Friends, Romans", "To be, or not"]


def stream_once(c: PlmClient, model: str, prompt: str, n: int, seed: int,
                fixed: bool = True) -> tuple[int, list[float]]:
    """One GenerateStream (`fixed`: exactly `n` tokens, no EOS); returns tokens generated and the arrival times
    of the token messages."""
    times: list[float] = []
    tokens = 0
    sampling = pb.SamplingParams(temperature=1.0, top_k=50, seed=seed, max_new_tokens=n,
                                 min_new_tokens=n if fixed else 0)
    for ev in c.generate_stream(model, [prompt], sampling):
        if ev.token_ids:
            tokens += len(ev.token_ids)
            times.append(time.perf_counter())
    return tokens, times


def stream_until(target: str, model: str, i: int, n: int, fixed: bool = True) -> tuple[int, list[list[float]]]:
    """Stream requests one after another on one channel until `n` tokens came (a sampled EOS ends a request
    early); returns the tokens and each request's message arrival times. (A channel per request, as before
    2026-11-23, put a TCP and HTTP/2 handshake on both processes' cores before every request.)"""
    tokens, times = 0, []
    with PlmClient(target, timeout=600) as c:
        for attempt in range(16):
            t, ts = stream_once(c, model, PROMPTS[(i + attempt) % len(PROMPTS)], n - tokens, 1000 * attempt + i,
                                fixed)
            tokens += t
            times.append(ts)
            if tokens >= n:
                break
    return tokens, times


def _inter_token_seconds(metrics_url: str) -> tuple[float, float]:
    """The server's own plm_inter_token_latency_seconds histogram: (sum, count) over every model."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    total = sum(float(v) for v in re.findall(r"^plm_inter_token_latency_seconds_sum\{[^}]*\} (\S+)", text, re.M))
    count = sum(float(v) for v in re.findall(r"^plm_inter_token_latency_seconds_count\{[^}]*\} (\S+)", text, re.M))
    return total, count


def drive(target: str, model: str, streams: int, n: int, metrics_url: str | None = None,
          rounds: int = 5, fixed: bool = True) -> dict[str, float]:
    """`streams` concurrent streams of `n` tokens each, `rounds` times; the median round's figures (one round
    of 64 tokens takes a fraction of a second, and a shared machine's slow spells move single rounds by ±30 %)."""
    with PlmClient(target, timeout=600) as c:
        stream_once(c, model, PROMPTS[0], 4, 0)  # warm-up
    per_round: list[dict[str, float]] = []
    for _ in range(rounds):
        before = _inter_token_seconds(metrics_url) if metrics_url else (0.0, 0.0)
        started = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(streams) as pool:
            results = list(pool.map(lambda i: stream_until(target, model, i, n, fixed), range(streams)))
        wall = time.perf_counter() - started
        tokens = sum(t for t, _ in results)
        # Gaps between messages of one request: the first token of the next request is not an inter-token gap.
        gaps = [b - a for _, requests in results for ts in requests for a, b in itertools.pairwise(ts)]
        row = {"tokens": tokens, "requests": sum(len(requests) for _, requests in results), "seconds": wall,
               "tokens_per_s": tokens / wall,
               "mean_inter_token_ms": 1000 * float(np.mean(gaps)) if gaps else float("nan")}
        if metrics_url:  # the server's view: between the engine's events of one sequence, before gRPC
            after = _inter_token_seconds(metrics_url)
            count = after[1] - before[1]
            row["server_mean_inter_token_ms"] = 1000 * (after[0] - before[0]) / count if count else float("nan")
        per_round.append(row)
    out: dict[str, Any] = {"streams": streams, "rounds": per_round}
    for key in per_round[0]:
        out[key] = float(np.median([r[key] for r in per_round]))
    return out


def raw_ort(folder: Path, manifest: dict[str, Any], requests: int, n: int, device: str = "cpu",
            batch: int = 1, threads: int = 0) -> dict[str, float]:
    """Greedy decoding with the bare decoder graph, one request of `batch` prompts (BOS + 4 tokens each, so no
    padding) after another; on CUDA the presents stay on the GPU as the next step's pasts (IO binding), as the
    engine keeps them. tokens/s counts every row's tokens: at `batch` 16 it is what the graph computes for the
    engine's 16 streams, with nothing around it but argmax. `threads`: ONNX Runtime's intra-op threads (0 = one
    per core)."""
    dec = manifest["graphs"]["decoder"]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    provider = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"
    sess = ort.InferenceSession(str(folder / dec["file"]), opts, providers=[provider])
    layers, heads, dim = dec["n_layer"], dec["n_head"], dec["head_dim"]
    pasts = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    presents = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    step_times: list[float] = []
    tokens = 0
    started = time.perf_counter()
    for r in range(requests):
        ids = np.array([[0] + [5 + (r + j + k) % 50 for k in range(4)] for j in range(batch)], dtype=np.int64)
        kv = [np.zeros((batch, heads, 0, dim), dtype=np.float32)] * len(pasts)
        mask = np.ones_like(ids)
        pos = np.repeat(np.arange(ids.shape[1], dtype=np.int64)[None], batch, axis=0)
        for _ in range(n):
            t0 = time.perf_counter()
            feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, **dict(zip(pasts, kv, strict=True))}
            if device == "cuda":
                host, kv = run_bound(sess, ["next_logprobs"], presents, feeds)
                logprobs = host["next_logprobs"]
            else:
                out = sess.run(["next_logprobs", *presents], feeds)
                logprobs, kv = out[0], out[1:]
            step_times.append(time.perf_counter() - t0)
            tokens += batch
            pos = np.full((batch, 1), mask.shape[1], dtype=np.int64)
            ids = np.argmax(logprobs, axis=1)[:, None].astype(np.int64)
            mask = np.ones((batch, mask.shape[1] + 1), dtype=np.int64)
    wall = time.perf_counter() - started
    # Each request's mean step (its first step, the cold one, left out of the first), then the median request:
    # a slow spell of the machine moves a few requests, not the figure.
    per_request = [np.mean(step_times[r * n + (r == 0):(r + 1) * n]) for r in range(requests)]
    step = float(np.median(per_request))
    return {"requests": requests, "batch": batch, "threads": threads, "tokens": tokens, "seconds": wall,
            "tokens_per_s": tokens / wall,
            "mean_decode_step_ms": 1000 * step, "decode_tokens_per_s": batch / step}


def _hf_model(folder: Path, manifest: dict[str, Any], device: str, threads: int = 2) -> tuple[Any, Any]:
    """`transformers`' GPT2LMHeadModel with the model's weights (`weights.npz`), and the model's tokenizer."""
    import torch
    from plm.export.hf_gpt2 import load_weights, to_hf_gpt2
    from plm.models.gpt import GPTConfig
    from tokenizers import Tokenizer

    if device == "cpu":
        torch.set_num_threads(threads)
    hf = to_hf_gpt2(load_weights(folder / manifest["weights"], GPTConfig(**manifest["config"]))).to(device)
    return hf, Tokenizer.from_file(str(folder / manifest["tokenizer"]["file"]))


def hf_sequential(folder: Path, manifest: dict[str, Any], requests: int, n: int,
                  device: str = "cpu", threads: int = 2) -> dict[str, float]:
    """Hugging Face `transformers` generating with the same weights (KV cache on), one request after another."""
    import torch

    hf, tok = _hf_model(folder, manifest, device, threads)
    tokens = 0
    started = time.perf_counter()
    with torch.no_grad():
        for r in range(requests):
            ids = torch.tensor([[0, *tok.encode(PROMPTS[r % len(PROMPTS)], add_special_tokens=False).ids]],
                               device=device)
            out = hf.generate(ids, max_new_tokens=n, do_sample=True, top_k=50, eos_token_id=None, pad_token_id=0)
            tokens += out.shape[1] - ids.shape[1]
    wall = time.perf_counter() - started
    return {"requests": requests, "threads": threads, "tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall}


def hf_batched(folder: Path, manifest: dict[str, Any], prompts: int, n: int, rounds: int,
               device: str = "cpu", threads: int = 2) -> dict[str, float]:
    """`transformers` generating `prompts` prompts as one batch (left-padded, with their attention mask: GPT-2
    takes each row's positions from it), the engine's sampling (temperature 1, top-k 50, exactly `n` new
    tokens), `rounds` times; the median round. `threads`: torch's CPU threads."""
    import torch

    hf, tok = _hf_model(folder, manifest, device, threads)
    rows = [[0, *tok.encode(PROMPTS[i % len(PROMPTS)], add_special_tokens=False).ids] for i in range(prompts)]
    width = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    seconds = []
    tokens = 0
    with torch.no_grad():
        hf.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=True, top_k=50, eos_token_id=None,
                    pad_token_id=0)  # warm-up
        for r in range(rounds):
            torch.manual_seed(r)
            started = time.perf_counter()
            out = hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=True,
                              top_k=50, temperature=1.0, eos_token_id=None, pad_token_id=0)
            seconds.append(time.perf_counter() - started)
            tokens = int(out.shape[0] * (out.shape[1] - width))
    wall = float(np.median(seconds))
    return {"prompts": prompts, "threads": threads, "tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall}


def classify_timing(target: str, model: str, repeats: int = 3, shots: int = 8) -> float:
    """Seconds per Classify call of `shots` demonstrations × 4 labels × 16 queries (best of `repeats`)."""
    demos = [pb.Demonstration(text=PROMPTS[i % len(PROMPTS)], label=["comedy", "tragedy", "history", "poetry"][i % 4])
             for i in range(shots)]
    req = pb.ClassifyRequest(model=model, demonstrations=demos, labels=["comedy", "tragedy", "history", "poetry"],
                             queries=[f"{p}!" for p in PROMPTS * 2], template="{text} = {label}\n")
    best = float("inf")
    with PlmClient(target, timeout=600) as c:
        c.stub.Classify(req)  # warm-up (and, with the engine, the prefix enters its cache)
        for _ in range(repeats):
            started = time.perf_counter()
            c.stub.Classify(req)
            best = min(best, time.perf_counter() - started)
    return best


def ab(repository: Path, model: str, streams: int, n: int, rounds: int, baseline: Path, pairs: int,
       fixed: bool) -> dict[str, Any]:
    """The engine server on this package (`this`) and on `baseline`'s, alternated `pairs` times (each first in
    turn), `streams` streams on each: tokens/s per pair and this ÷ baseline."""
    from plm.client.local_server import LocalServer

    env = {"PLM_RUNTIME__KV_CACHE": "true"}
    servers = {"this": LocalServer(repository, [model], env, metrics=True),
               # PYTHONSAFEPATH: the working directory (this source tree, with its `plm/`) is not put first on sys.path
               "baseline": LocalServer(repository, [model], {**env, "PYTHONPATH": str(baseline.resolve()),
                                                             "PYTHONSAFEPATH": "1"}, metrics=True)}
    out: dict[str, Any] = {"this": [], "baseline": [], "ratio": []}
    try:
        for pair in range(pairs):
            order = ["this", "baseline"] if pair % 2 == 0 else ["baseline", "this"]
            for name in order:
                srv = servers[name]
                out[name].append(drive(srv.target, model, streams, n, srv.metrics_url, rounds, fixed)["tokens_per_s"])
            out["ratio"].append(out["this"][-1] / out["baseline"][-1])
            print(f"pair {pair + 1} ({order[0]} first): this {out['this'][-1]:8.1f} tokens/s, baseline "
                  f"{out['baseline'][-1]:8.1f}: this ÷ baseline {out['ratio'][-1]:.3f}", flush=True)
    finally:
        for srv in servers.values():
            srv.stop()
    out["median_ratio"] = float(np.median(out["ratio"]))
    print(f"{streams} streams, this ÷ {baseline}: median {out['median_ratio']:.3f} over {pairs} pairs")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repository", type=Path, default=Path("repository"))
    ap.add_argument("--model", default="gpt")
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5, help="rounds per stream count; the median round is reported")
    ap.add_argument("--stream-interval", type=int, default=4,
                    help="also the most streams on a server with this stream_interval (tokens per message)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="where the raw loop and transformers run (the servers choose for themselves)")
    ap.add_argument("--stop-at-eos", action="store_true",
                    help="let a sampled EOS end a request (the stream then starts another) instead of fixed lengths")
    ap.add_argument("--baseline", type=Path,
                    help="an A/B of the engine's code against this folder's plm package instead of the full run")
    ap.add_argument("--pairs", type=int, default=3, help="with --baseline: alternated pairs")
    ap.add_argument("--out", type=Path, default=Path("results/generation.json"))
    add_smoke_flag(ap)
    args = ap.parse_args()
    if args.baseline is not None:
        if args.smoke:
            args.streams, args.new_tokens, args.rounds, args.pairs = [2], 4, 1, 1
        manifest = json.loads((args.repository / args.model / "manifest.json").read_text())
        n = min(args.new_tokens, int(manifest["max_length"]) - 16)
        result = ab(args.repository, args.model, max(args.streams), n, args.rounds, args.baseline, args.pairs,
                    not args.stop_at_eos)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"model": args.model, "ab": result}, indent=2) + "\n")
        return
    repeats, shots = 3, 8  # Classify's timing: best of `repeats` calls of `shots` demonstrations
    ort_threads, torch_threads = (1, 0), (1, 2)  # the references' thread settings (below)
    if args.smoke:  # a tiny model's window holds one demonstration; the references at one thread per core
        args.streams, args.new_tokens, args.rounds, repeats, shots = [1, 2], 4, 1, 1, 1
        ort_threads, torch_threads = (0,), (2,)
    folder = args.repository / args.model
    manifest = json.loads((folder / "manifest.json").read_text())
    window = int(manifest["max_length"])
    n = min(args.new_tokens, window - 16)
    rows: dict[str, list[dict[str, float]]] = {"engine": [], "recompute": [], "engine_interval": []}
    classify_s: dict[str, float] = {}
    interval = f"engine, stream_interval {args.stream_interval}"
    # Classify: the prefix's keys and values reused ("engine") vs whole sequences: through the engine server with
    # prefix_reuse off ("whole", timed on the third server) and without the engine at all ("recompute").
    modes = {"engine": {"PLM_RUNTIME__KV_CACHE": "true"}, "recompute": {"PLM_RUNTIME__KV_CACHE": "false"},
             "engine_interval": {"PLM_STREAM_INTERVAL": str(args.stream_interval),
                                 "PLM_RUNTIME__PREFIX_REUSE": "false"}}
    # A smoke run's two servers: the engine's settings together, and the one without the engine.
    servers = Servers(args.repository, args.smoke, [([args.model], modes["engine"]),
                                                    ([args.model], modes["engine_interval"])])
    for mode, env in modes.items():
        with servers.start([args.model], env, metrics=True, shared=mode != "recompute") as srv:
            key = "whole" if mode == "engine_interval" else mode
            classify_s[key] = classify_timing(srv.target, args.model, repeats, shots)
            print(f"{key:9} Classify {shots} demos × 4 labels × 16 queries: {classify_s[key] * 1000:.1f} ms",
                  flush=True)
            for s in args.streams if mode != "engine_interval" else [max(args.streams)]:
                rows[mode].append(drive(srv.target, args.model, s, n, srv.metrics_url, args.rounds,
                                        not args.stop_at_eos))
                r = rows[mode][-1]
                print(f"{mode:9} {s:3d} streams: {r['tokens_per_s']:8.1f} tokens/s, "
                      f"inter-token {r['mean_inter_token_ms']:.2f} ms", flush=True)
    servers.close()
    most = max(args.streams)
    raw = min((raw_ort(folder, manifest, most, n, args.device, threads=t) for t in ort_threads),
              key=lambda r: r["mean_decode_step_ms"])
    print(f"raw ORT sequential: {raw['tokens_per_s']:8.1f} tokens/s, decode step {raw['mean_decode_step_ms']:.2f} ms")
    # The batched references at one thread (the engine's decoder setting on 2 cores) and at one per core: the
    # faster is the reference, so a busy core that slows a thread pool does not flatter the engine.
    raw_b = max((raw_ort(folder, manifest, args.rounds, n, args.device, batch=most, threads=t) for t in ort_threads),
                key=lambda r: r["decode_tokens_per_s"])
    print(f"raw ORT batch {most} ({raw_b['threads'] or 'all'} threads, the faster): "
          f"{raw_b['decode_tokens_per_s']:8.1f} tokens/s in its decode steps "
          f"({raw_b['mean_decode_step_ms']:.2f} ms a step), {raw_b['tokens_per_s']:8.1f} tokens/s overall")
    hf = max((hf_sequential(folder, manifest, most, n, args.device, t) for t in torch_threads),
             key=lambda r: r["tokens_per_s"]) if "weights" in manifest else None
    hf_b = max((hf_batched(folder, manifest, most, n, args.rounds, args.device, t) for t in torch_threads),
               key=lambda r: r["tokens_per_s"]) if "weights" in manifest else None
    if hf is not None and hf_b is not None:
        print(f"transformers sequential: {hf['tokens_per_s']:8.1f} tokens/s; batch of {most} "
              f"({hf_b['threads']} threads, the faster): "
              f"{hf_b['tokens_per_s']:8.1f} tokens/s")
    ratios = {}
    for e, r in zip(rows["engine"], rows["recompute"], strict=True):
        ratios[f"engine_vs_recompute_{e['streams']}"] = e["tokens_per_s"] / r["tokens_per_s"]
        ratios[f"engine_vs_raw_sequential_{e['streams']}"] = e["tokens_per_s"] / raw["tokens_per_s"]
        if hf is not None:
            ratios[f"engine_vs_transformers_sequential_{e['streams']}"] = e["tokens_per_s"] / hf["tokens_per_s"]
    # The most streams, with stream_interval 1 and `--stream-interval`, against the raw graph decoding that many
    # rows at once and against transformers generating them as one batch.
    for label, e in ((1, rows["engine"][-1]), (args.stream_interval, rows["engine_interval"][0])):
        ratios[f"engine_interval_{label}_{most}_vs_raw_batched_decode"] = (e["tokens_per_s"]
                                                                          / raw_b["decode_tokens_per_s"])
        if hf is not None and hf_b is not None:
            ratios[f"engine_interval_{label}_{most}_vs_transformers_sequential"] = (e["tokens_per_s"]
                                                                                   / hf["tokens_per_s"])
            ratios[f"engine_interval_{label}_{most}_vs_transformers_batched"] = (e["tokens_per_s"]
                                                                                / hf_b["tokens_per_s"])
    ratios["classify_prefix_reuse_speedup"] = classify_s["recompute"] / classify_s["engine"]
    ratios["classify_prefix_reuse_vs_whole_sequences_same_server"] = classify_s["whole"] / classify_s["engine"]
    for one in (r for r in rows["engine"] if r["streams"] == 1):  # only when 1 stream was run
        ratios["inter_token_1_stream_vs_raw_step"] = one["mean_inter_token_ms"] / raw["mean_decode_step_ms"]
        ratios["server_inter_token_1_stream_vs_raw_step"] = (one["server_mean_inter_token_ms"]
                                                             / raw["mean_decode_step_ms"])
    for k, v in ratios.items():
        print(f"{k:56} {v:6.2f}×")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model, "device": args.device, "new_tokens": n,
                                    "fixed_length": not args.stop_at_eos, "rows": rows,
                                    "raw_ort": raw, "raw_ort_batched": raw_b,
                                    "transformers": hf, "transformers_batched": hf_b,
                                    "classify_seconds": classify_s, "ratios": ratios}, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, style, label in (("engine", "o-", "engine"), ("recompute", "s--", "recompute"),
                               ("engine_interval", "D", interval)):
        ax.plot([r["streams"] for r in rows[mode]], [r["tokens_per_s"] for r in rows[mode]], style, label=label)
    ax.axhline(raw["tokens_per_s"], color="grey", ls=":", label="raw ORT, sequential")
    if hf is not None:
        ax.axhline(hf["tokens_per_s"], color="red", ls="-.", label="transformers, sequential")
    if hf_b is not None:
        ax.axhline(hf_b["tokens_per_s"], color="darkred", ls="--", label=f"transformers, batch of {most}")
    ax.axhline(raw_b["decode_tokens_per_s"], color="black", ls=":", label=f"raw ORT decode steps, batch {most}")
    ax.set(xlabel="concurrent streams", ylabel="generated tokens / s", xscale="log",
           title=f"{args.model}: {n} new tokens per stream")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"))
    print(f"written to {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    run(main)
