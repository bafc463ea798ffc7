"""Where an engine step's time goes, without gRPC: the ONNX Runtime run vs the engine's own Python.

    python benchmarks/engine_step.py [--repository repository] [--model gpt] [--batch 1 16] [--new-tokens 64]

Loads the model in-process, generates exactly `--new-tokens` tokens for each of B prompts at once straight through
the generation task (seeded top-k 50 sampling with `min_new_tokens` = `max_new_tokens`, so no stream ends early and
the batch stays whole; `--stop-at-eos` lets a sampled EOS end a request, and the stream starts another, the
workload before 2026-12-07; `--mixed` gives each stream its own temperature, top-p and repetition penalty, top-k 50
for all, as clients choosing their own settings do), and splits the wall time per decode step into the ONNX Runtime
run (within it, the graph's own call, as the raw step below times it), the step's assembly around it (input ids and
mask) and the sampling/detokenising of the step's tokens; the
rest is prefills, laying the batch's keys and values out again when sequences join or leave, and handing events to
the event loop (uvloop's, as the server runs on, where it is installed; `--loop asyncio` for asyncio's own). Then
the same decoder session runs bare (no engine, no event loop) on the same shapes — B rows, pasts as wide as the
engine's were — and the engine's step is reported as a ratio to that raw step. Writes results/engine_step.json and
a PNG of the split.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from _smoke import add_smoke_flag, run  # this folder is on sys.path when run as a script
from plm.service.config import load_config
from plm.service.generation import kv_batch
from plm.service.metrics import Metrics
from plm.service.registry import load_model
from plm.service.tasks.generate import GenerateParams, SamplingParams, generate


def raw_steps(session: Any, manifest_graph: dict[str, Any], b: int, n: int, prompt: int = 6) -> float:
    """Seconds per decode step of the bare decoder session: `b` rows of `prompt` tokens, then `n` greedy steps
    (pasts `prompt` to `prompt + n - 1` wide, as the engine's rows are); the median of three runs' means."""
    layers, heads, dim = manifest_graph["n_layer"], manifest_graph["n_head"], manifest_graph["head_dim"]
    pasts = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    presents = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    means = []
    for r in range(4):  # the first run warms up
        ids = (5 + (np.arange(b * prompt).reshape(b, prompt) + r) % 50).astype(np.int64)
        kv = [np.zeros((b, heads, 0, dim), dtype=np.float32)] * len(pasts)
        mask = np.ones_like(ids)
        pos = np.repeat(np.arange(prompt, dtype=np.int64)[None], b, axis=0)
        out = session.run(["next_logprobs", *presents], {"input_ids": ids, "attention_mask": mask,
                                                         "position_ids": pos, **dict(zip(pasts, kv, strict=True))})
        started = time.perf_counter()
        for _ in range(n):
            ids = np.argmax(out[0], axis=1)[:, None].astype(np.int64)
            pos = np.full((b, 1), mask.shape[1], dtype=np.int64)
            mask = np.ones((b, mask.shape[1] + 1), dtype=np.int64)
            out = session.run(["next_logprobs", *presents], {"input_ids": ids, "attention_mask": mask,
                                                             "position_ids": pos,
                                                             **dict(zip(pasts, out[1:], strict=True))})
        if r:
            means.append((time.perf_counter() - started) / n)
    return float(np.median(means))


async def measure(repository: Path, model_name: str, batches: list[int], n: int,
                  fixed: bool = True, mixed: bool = False) -> list[dict[str, Any]]:
    # The server's own settings: PLM_* environment variables apply (e.g. PLM_RUNTIME__SPIN_WAIT=true).
    model = load_model(repository / model_name, replace(load_config(), repository=repository), Metrics())
    await model.start()
    engine = model.engine
    if engine is None:
        raise SystemExit(f"{model_name} has no KV-cache decoder graph")
    graph = json.loads((repository / model_name / "manifest.json").read_text())["graphs"]["decoder"]
    spent = {"ort": 0.0, "ort_decode": 0.0, "decode_call": 0.0, "emit": 0.0, "layout": 0.0, "graph_call": 0.0}

    def timed(key: str, fn: Any) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[key] += time.perf_counter() - started
        return wrapper

    run = engine.runner.run

    decoding = [False]

    def timed_run(*a: Any, **k: Any) -> Any:  # every graph run (prefills too); decode steps also on their own
        decoding[0] = a[-1] == "decode"
        started = time.perf_counter()
        try:
            return run(*a, **k)
        finally:
            spent["ort"] += time.perf_counter() - started
            if a[-1] == "decode":
                spent["ort_decode"] += time.perf_counter() - started

    engine.runner.run = timed_run  # type: ignore[method-assign]
    # The graph's own call (ONNX Runtime's `run`, getting the interpreter lock back included) without the runner's
    # feeds and the runtime's metrics around it: what the raw step times.
    bare = engine.session.session
    bare_run = bare.run

    def graph_call(*a: Any, **k: Any) -> Any:
        started = time.perf_counter()
        try:
            return bare_run(*a, **k)
        finally:
            if decoding[0]:
                spent["graph_call"] += time.perf_counter() - started

    bare.run = graph_call
    engine._decode = timed("decode_call", engine._decode)  # type: ignore[method-assign]
    engine._update = timed("emit", engine._update)  # type: ignore[method-assign]
    # Laying the batch out again when sequences join or leave (and, under IO binding, fetching it from the GPU).
    layouts = [0]
    host, refill, layout = kv_batch.to_host, kv_batch.refill, kv_batch.Scratch.layout

    def counted(fn: Any, counts: bool) -> Any:  # each layout calls refill (host memory) or the layout graph once
        def wrapper(*a: Any, **k: Any) -> Any:
            layouts[0] += counts
            return timed("layout", fn)(*a, **k)
        return wrapper

    kv_batch.to_host, kv_batch.refill = counted(host, False), counted(refill, True)
    kv_batch.Scratch.layout = counted(layout, False)  # type: ignore[method-assign]
    engine.runner.layout_on_device = counted(engine.runner.layout_on_device, True)  # type: ignore[method-assign]
    metrics = Metrics()

    async def one(i: int, tokens: int) -> int:
        got = 0
        for attempt in range(16):  # a sampled EOS ends a request early: the next one goes on
            # --mixed: each stream its own temperature, top-p and repetition penalty (as clients choose them), top-k
            # 50 for all
            temperature, top_p, penalty = ((0.7 + 0.1 * (i % 6), 0.9 if i % 2 else 1.0, 1.2 if i % 3 == 0 else 1.0)
                                           if mixed else (1.0, 1.0, 1.0))
            sampling = SamplingParams(temperature=temperature, top_k=50, top_p=top_p, repetition_penalty=penalty,
                                      seed=1000 * attempt + i, max_new_tokens=tokens - got,
                                      min_new_tokens=tokens - got if fixed else 0)
            params = GenerateParams((f"The king {i}",), sampling)
            async for ev in generate(model, params, None, metrics):
                got += len(ev.token_ids)
            if got >= tokens:
                break
        return got

    rows = []
    for b in batches:
        await asyncio.gather(*(one(i, 8) for i in range(b)))  # warm-up
        for key in spent:
            spent[key] = 0.0
        layouts[0] = 0
        steps_before, started = engine.steps, time.perf_counter()
        tokens = sum(await asyncio.gather(*(one(i, n) for i in range(b))))
        wall, steps = time.perf_counter() - started, engine.steps - steps_before
        ms = {k: 1000 * v / steps for k, v in spent.items()}
        bare.run = bare_run  # the raw steps untimed
        raw = 1000 * raw_steps(bare, graph, b, n)
        bare.run = graph_call
        rows.append({"batch": b, "tokens": tokens, "steps": steps, "wall_ms_per_step": 1000 * wall / steps,
                     "ort_ms_per_step": ms["ort_decode"], "prefill_ort_ms_per_step": ms["ort"] - ms["ort_decode"],
                     "assembly_ms_per_step": ms["decode_call"] - ms["ort_decode"], "sampling_ms_per_step": ms["emit"],
                     "layout_ms_per_step": ms["layout"], "layouts": layouts[0],
                     "graph_call_ms_per_step": ms["graph_call"],
                     "tokens_per_s": tokens / wall, "raw_ms_per_step": raw,
                     "step_vs_raw": 1000 * wall / steps / raw})
        r = rows[-1]
        print(f"B={b:3d}: {r['wall_ms_per_step']:.2f} ms/step = ONNX Runtime {r['ort_ms_per_step']:.2f} + assembly "
              f"{r['assembly_ms_per_step']:.2f} + sampling/detokenising {r['sampling_ms_per_step']:.2f} + rest "
              f"(of which prefill ONNX Runtime {r['prefill_ort_ms_per_step']:.2f}, {r['layouts']} layouts "
              f"{r['layout_ms_per_step']:.2f}); the decode's graph call alone {r['graph_call_ms_per_step']:.2f}; "
              f"{r['tokens_per_s']:.0f} tokens/s ({tokens} tokens in {steps} steps); raw step on the same shapes "
              f"{raw:.2f} ms: engine step {r['step_vs_raw']:.2f}× raw", flush=True)
    await model.close()
    kv_batch.to_host, kv_batch.refill = host, refill
    kv_batch.Scratch.layout = layout  # type: ignore[method-assign]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repository", type=Path, default=Path("repository"))
    ap.add_argument("--model", default="gpt")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--stop-at-eos", action="store_true",
                    help="let a sampled EOS end a request (the stream starts another) instead of fixed lengths")
    ap.add_argument("--mixed", action="store_true",
                    help="each stream its own temperature, top-p and repetition penalty (top-k 50 for all)")
    ap.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop",
                    help="the event loop the engine hands events to: the server's (uvloop, if installed) or asyncio's")
    ap.add_argument("--out", type=Path, default=Path("results/engine_step.json"))
    add_smoke_flag(ap)
    args = ap.parse_args()
    if args.smoke:
        args.batch, args.new_tokens = [1, 2], 8
    work = measure(args.repository, args.model, args.batch, args.new_tokens, not args.stop_at_eos, args.mixed)
    if args.loop == "uvloop" and importlib.util.find_spec("uvloop") is not None:
        import uvloop  # the server's event loop (service/server.py)

        rows = uvloop.run(work)
    else:
        rows = asyncio.run(work)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model, "rows": rows}, indent=2) + "\n")
    plot(rows, args.model, args.out.with_suffix(".png"))
    print(f"written to {args.out} and {args.out.with_suffix('.png')}")


def plot(rows: list[dict[str, Any]], model: str, path: Path) -> None:
    """One stacked bar per batch size: the parts of a decode step's wall time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = {"ONNX Runtime (decode)": "ort_ms_per_step", "assembly": "assembly_ms_per_step",
             "sampling/detokenising": "sampling_ms_per_step", "layouts": "layout_ms_per_step",
             "prefill ONNX Runtime": "prefill_ort_ms_per_step"}
    fig, ax = plt.subplots(figsize=(6, 4))
    labels = [f"B={r['batch']}" for r in rows]
    bottom = [0.0] * len(rows)
    for label, key in parts.items():
        values = [r[key] for r in rows]
        ax.bar(labels, values, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.bar(labels, [max(r["wall_ms_per_step"] - b, 0.0) for r, b in zip(rows, bottom, strict=True)], bottom=bottom,
           label="rest (event loop hand-over, ...)", color="lightgrey")
    ax.set(ylabel="ms per decode step", title=f"{model}: where an engine step's time goes")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    run(main)
