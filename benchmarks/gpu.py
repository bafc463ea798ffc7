"""The CUDA execution provider against the CPU one, as ratios measured in one run (docs/benchmarks.md, "On a GPU").

    python benchmarks/gpu.py [--repository repository] [--duration 5] [--out results/gpu.json]

Needs a GPU and `onnxruntime-gpu` (docs/benchmarks.md, "On a GPU", says how it was installed). In one run:

1. Parity: GPT's held-out token log-probs and BERT's masked-word log-probs on CUDA (float32 with TF32 off,
   float32 with the provider's default TF32 matrix products, and the fp16 variant when the folder has one)
   against float32 on CPU: the largest absolute difference.
2. Raw ONNX Runtime throughput at the best batch size, `Score` (GPT) and `FillMask` (BERT), each of those
   against the CPU provider on this machine's cores: the same batch sizes searched on both sides
   (`BATCHES`, 1 to 256), each batch of texts of like lengths, and each side's rate at every size in the JSON.
3. The decoder's step, bare ONNX Runtime, batch 1 and 16: keys and values bound on the GPU (IO binding) ÷
   copied through host memory every step (`run`); and the same through the engine in process
   (`runtime.io_binding` on and off).
4. Served on the GPU (`plm serve`, automatic providers): `Score` and `FillMask` at concurrency 64 ÷ raw CUDA
   at the server's batch cap (`max_batch_size`, the most rows a served batch has) and at its best batch size;
   dynamic batching on ÷ off; and `--workers N` server processes sharing the GPU, driven by N load-generator
   processes.

The texts are the serving benchmark's: the test split of the corpus the repository was built from
(`serving.held_out_texts`), so the corpus files `corpus.json` names must be on the machine too.

Writes the JSON and a PNG, and prints the ratios.

`--smoke` on a machine without CUDA runs every step above on the CPU provider in the place of CUDA (the
ratios then compare the CPU with itself) and skips, saying so, the two CUDA-only configurations: the provider's
TF32 switch and the fp16 variant.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _smoke import Servers, add_smoke_flag, no_errors, run
from engine_step import measure as engine_measure
from plm.service.config import Runtime
from plm.service.runtime import run_bound
from serving import BATCH_CAP, UNBATCHED, Raw, best_rate, drive, held_out_texts

BATCHES = (1, 4, 16, 32, 64, 128, 256)  # raw batch sizes, the same for every provider; 32 = BATCH_CAP
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def decode_steps(session: ort.InferenceSession, dec: dict[str, Any], batch: int, steps: int, bound: bool) -> float:
    """Mean ms of a bare greedy decode step at `batch` rows: presents fed back as CUDA OrtValues (`bound`) or
    as numpy arrays through `run` (copied to the device and back every step)."""
    layers, heads, dim = dec["n_layer"], dec["n_head"], dec["head_dim"]
    pasts = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    presents = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    ids = np.array([[0] + [5 + (r + k) % 50 for k in range(8)] for r in range(batch)], dtype=np.int64)
    kv: list[Any] = [np.zeros((batch, heads, 0, dim), dtype=np.float32)] * len(pasts)
    mask = np.ones_like(ids)
    pos = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape).copy()
    times = []
    for _ in range(steps + 1):  # the first is the prefill
        started = time.perf_counter()
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, **dict(zip(pasts, kv, strict=True))}
        if bound:
            host, kv = run_bound(session, ["next_logprobs"], presents, feeds,
                                 "cuda" if session.get_providers()[0] == CUDA else "cpu")
            logprobs = host["next_logprobs"]
        else:
            out = session.run(["next_logprobs", *presents], feeds)
            logprobs, kv = out[0], list(out[1:])
        times.append(time.perf_counter() - started)
        ids = np.argmax(logprobs, axis=-1)[:, None].astype(np.int64)
        pos = np.full((batch, 1), mask.shape[1], dtype=np.int64)
        mask = np.ones((batch, mask.shape[1] + 1), dtype=np.int64)
    return 1000 * float(np.mean(times[2:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repository", type=Path, default=Path("repository"))
    ap.add_argument("--duration", type=float, default=5.0, help="measured seconds per served run")
    ap.add_argument("--workers", type=int, default=4, help="server processes sharing the GPU in the workers run")
    ap.add_argument("--out", type=Path, default=Path("results/gpu.json"))
    add_smoke_flag(ap)
    args = ap.parse_args()
    has_cuda = CUDA in ort.get_available_providers()
    if not has_cuda and not args.smoke:
        raise SystemExit(f"no CUDA execution provider in this onnxruntime build ({ort.get_available_providers()})")
    # The smallest sizes in a smoke run: raw seconds per batch size, decode steps, engine batch sizes, served runs;
    # and one server process in the workers run (serving.py's smoke runs a supervisor of several).
    raw_seconds, steps, small, big, alternations = 1.0, 48, 1, 16, 2
    if args.smoke:
        raw_seconds, steps, small, big, alternations, args.duration, args.workers = 0.05, 4, 1, 2, 1, 0.1, 1
    drive_ = functools.partial(drive, warmup=0.0 if args.smoke else 2.0)
    started = time.perf_counter()
    texts = held_out_texts(args.repository, 32 if args.smoke else 512)
    idx = list(range(len(texts)))
    gpt_manifest = json.loads((args.repository / "gpt" / "manifest.json").read_text())
    has_fp16 = "fp16" in (gpt_manifest.get("variants") or {})
    accel, provider = ("cuda", CUDA) if has_cuda else ("cpu", CPU)
    configs = {
        "cpu": Runtime(providers=("cpu",), spin_wait=True),
        **({"cuda_fp32_no_tf32": Runtime(providers=("cuda",), provider_options={CUDA: {"use_tf32": 0}})}
           if has_cuda else {}),
        "cuda_fp32": Runtime(providers=(accel,)),
        **({"cuda_fp16": Runtime(providers=("cuda",), variant="fp16")} if has_fp16 and has_cuda else {}),
    }
    out: dict[str, Any] = {"device": ort.get_device(), "onnxruntime": ort.__version__, "cpu_count": os.cpu_count(),
                           "parity": {}, "raw": {}}
    if not has_cuda:
        out["smoke_without_cuda"] = ("no CUDA provider: the CUDA runs ran on the CPU provider; skipped the "
                                     "CUDA-only TF32 switch (cuda_fp32_no_tf32) and fp16 variant (cuda_fp16)")
        print(f"smoke: {out['smoke_without_cuda']}", flush=True)
    reference: dict[str, Any] = {}
    for name, runtime in configs.items():
        raw = Raw(args.repository, texts, runtime, nnlm=False)
        assert raw.gpt_s.providers[0] == (provider if name != "cpu" else CPU), raw.gpt_s.providers
        gpt = [lp for k in range(0, len(idx), 16) for lp in raw.gpt_score(idx[k:k + 16])]
        bert = np.concatenate([raw.bert_fill(idx[k:k + 16]) for k in range(0, len(idx), 16)])
        if name == "cpu":
            reference = {"gpt": gpt, "bert": bert}
        else:
            out["parity"][name] = {
                "gpt_token_logprob_max_abs_diff": float(max(np.abs(a - b).max() for a, b in
                                                            zip(gpt, reference["gpt"], strict=True))),
                "bert_mask_logprob_max_abs_diff": float(np.abs(bert - reference["bert"]).max())}
            print(f"parity {name:18}: " + ", ".join(f"{k} {v:.2e}" for k, v in out["parity"][name].items()),
                  flush=True)
        batches = (1, 4) if args.smoke else BATCHES  # the same range for every provider
        out["raw"][name] = {"gpt_score": best_rate(raw.gpt_score, len(texts), raw_seconds, batches, raw.gpt_order),
                            "bert_fill": best_rate(raw.bert_fill, len(texts), raw_seconds, batches, raw.bert_order)}
        for k, v in out["raw"][name].items():
            print(f"raw {name:18} {k:10}: {v['best_items_per_s']:9.1f} items/s at batch {v['best_batch']}", flush=True)
        del raw

    # The decoder's step: IO binding vs `run`, bare and through the engine.
    dec = gpt_manifest["graphs"]["decoder"]
    session = ort.InferenceSession(str(args.repository / "gpt" / dec["file"]), providers=[provider])
    out["decode_step_ms"] = {}
    for b in (small, big):
        for bound in (False, True):  # untimed: the device allocator sees every shape once
            decode_steps(session, dec, b, steps, bound)
        for bound in (False, True) * alternations:  # alternated: the second pair checks the first
            key = f"b{b}_{'io_binding' if bound else 'run'}"
            out["decode_step_ms"].setdefault(key, []).append(decode_steps(session, dec, b, steps, bound))
        print(f"raw decode step B={b:2d}: run {np.mean(out['decode_step_ms'][f'b{b}_run']):.3f} ms, "
              f"IO binding {np.mean(out['decode_step_ms'][f'b{b}_io_binding']):.3f} ms", flush=True)
    del session
    out["engine"] = {"off": [], "on": []}
    window = int(gpt_manifest["max_length"])
    for mode in ("off", "on") * alternations:  # alternated
        os.environ["PLM_RUNTIME__IO_BINDING"] = mode
        print(f"engine in process, io_binding {mode}:", flush=True)
        out["engine"][mode] += asyncio.run(engine_measure(args.repository, "gpt", [small, big],
                                                          min(steps * 2, window - 16)))
    os.environ.pop("PLM_RUNTIME__IO_BINDING")

    # Served on the GPU: automatic providers, as `plm serve` starts.
    served: dict[str, Any] = {}
    # ONNX Runtime's intra-op threads (one per core by default) run only the CPU-placed shape nodes of a CUDA
    # session, and take cores from the event loop when they spin: one thread, not spinning, against the default.
    # A smoke run's load for the workers comes from one process (the load generator's processes have their tests).
    load_processes = 1 if args.smoke else args.workers
    one_thread = {"PLM_RUNTIME__INTRA_OP_THREADS": "1", "PLM_RUNTIME__DECODER_SPIN_WAIT": "false"}
    # Every server holds the same models, so that each ratio between two of them compares one setting alone.
    both = ["gpt", "bert"]
    servers = Servers(args.repository, args.smoke, [(both, {}), (both, UNBATCHED), (both, one_thread)])
    with servers.start(both, metrics=True) as srv:
        served["gpt_score"] = drive_(srv.target, "Score", "gpt", texts, 64, args.duration, srv.metrics_url)
        served["bert_fill"] = drive_(srv.target, "FillMask", "bert", texts, 64, args.duration, srv.metrics_url)
        served["gpt_score_x8"] = drive_(srv.target, "Score", "gpt", texts, 64, args.duration, per_request=8)
    with servers.start(both, UNBATCHED) as srv:
        served["gpt_score_unbatched"] = drive_(srv.target, "Score", "gpt", texts, 64, args.duration)
    with servers.start(both, one_thread) as srv:
        served["gpt_score_1_thread"] = drive_(srv.target, "Score", "gpt", texts, 64, args.duration)
    servers.close()
    # One process's event loop is the ceiling long before the GPU is: `--workers` processes share the GPU (each
    # with its own session), driven by as many load-generator processes.
    with servers.start(both, workers=args.workers) as srv:
        for key, rpc, model in (("gpt_score_workers", "Score", "gpt"), ("bert_fill_workers", "FillMask", "bert")):
            served[key] = drive_(srv.target, rpc, model, texts, 64 * args.workers, args.duration,
                                 processes=load_processes, connections=2)
    out["served"] = {k: {kk: vv for kk, vv in v.items() if kk != "latencies_ms"} for k, v in served.items()}
    if args.smoke:
        for key, r in served.items():
            no_errors(r["summary"]["errors"], key)

    raw_cuda = out["raw"]["cuda_fp32"]

    def at_cap(rate: dict[str, Any]) -> float:  # items/s at the largest batch size run up to the server's cap
        return float(max((r for r in rate["by_batch"] if r["batch"] <= BATCH_CAP), key=lambda r: r["batch"])
                     ["items_per_s"])

    dstep = {k: float(np.mean(v)) for k, v in out["decode_step_ms"].items()}
    engine_ms = {mode: {b: float(np.mean([r["wall_ms_per_step"] for r in rows if r["batch"] == b]))
                        for b in (small, big)} for mode, rows in out["engine"].items()}
    ratios = {
        "raw_score_gpt_cuda_vs_cpu": raw_cuda["gpt_score"]["best_items_per_s"]
        / out["raw"]["cpu"]["gpt_score"]["best_items_per_s"],
        "raw_fillmask_bert_cuda_vs_cpu": raw_cuda["bert_fill"]["best_items_per_s"]
        / out["raw"]["cpu"]["bert_fill"]["best_items_per_s"],
        "raw_score_gpt_cuda_vs_cpu_at_batch_cap": at_cap(raw_cuda["gpt_score"])
        / at_cap(out["raw"]["cpu"]["gpt_score"]),
        "raw_fillmask_bert_cuda_vs_cpu_at_batch_cap": at_cap(raw_cuda["bert_fill"])
        / at_cap(out["raw"]["cpu"]["bert_fill"]),
        **{f"decode_step_b{b}_run_vs_io_binding": dstep[f"b{b}_run"] / dstep[f"b{b}_io_binding"] for b in (small, big)},
        **{f"engine_step_b{b}_off_vs_on": engine_ms["off"][b] / engine_ms["on"][b] for b in (small, big)},
        "score_gpt_served_vs_raw_cuda": served["gpt_score"]["texts_per_s"] / raw_cuda["gpt_score"]["best_items_per_s"],
        "fillmask_bert_served_vs_raw_cuda": served["bert_fill"]["texts_per_s"]
        / raw_cuda["bert_fill"]["best_items_per_s"],
        "score_gpt_served_vs_raw_cuda_at_batch_cap": served["gpt_score"]["texts_per_s"] / at_cap(raw_cuda["gpt_score"]),
        "fillmask_bert_served_vs_raw_cuda_at_batch_cap": served["bert_fill"]["texts_per_s"]
        / at_cap(raw_cuda["bert_fill"]),
        "score_gpt_8_texts_per_request_vs_raw_cuda": served["gpt_score_x8"]["texts_per_s"]
        / raw_cuda["gpt_score"]["best_items_per_s"],
        "batching_on_vs_off_gpt_score_cuda": served["gpt_score"]["texts_per_s"]
        / served["gpt_score_unbatched"]["texts_per_s"],
        f"score_gpt_{args.workers}_workers_vs_raw_cuda": served["gpt_score_workers"]["texts_per_s"]
        / raw_cuda["gpt_score"]["best_items_per_s"],
        f"fillmask_bert_{args.workers}_workers_vs_raw_cuda": served["bert_fill_workers"]["texts_per_s"]
        / raw_cuda["bert_fill"]["best_items_per_s"],
        f"score_gpt_{args.workers}_workers_vs_1": served["gpt_score_workers"]["texts_per_s"]
        / served["gpt_score"]["texts_per_s"],
        "score_gpt_1_intra_op_thread_vs_default": served["gpt_score_1_thread"]["texts_per_s"]
        / served["gpt_score"]["texts_per_s"],
    }
    if has_fp16:
        ratios["raw_score_gpt_fp16_vs_fp32_cuda"] = (out["raw"]["cuda_fp16"]["gpt_score"]["best_items_per_s"]
                                                     / raw_cuda["gpt_score"]["best_items_per_s"])
    out["ratios"] = ratios
    print(f"\nratios (one run, {ort.get_device()}, {os.cpu_count()} CPU cores, {time.perf_counter() - started:.0f} s):")
    for k, v in ratios.items():
        print(f"  {k:44} {v:8.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    plot(out, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


def plot(out: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(out["raw"])
    x = np.arange(2)
    w = 0.8 / (len(names) + 1)
    for k, name in enumerate(names):
        a.bar(x + k * w, [out["raw"][name]["gpt_score"]["best_items_per_s"],
                          out["raw"][name]["bert_fill"]["best_items_per_s"]], w, label=f"raw, {name}")
    a.bar(x + len(names) * w, [out["served"]["gpt_score"]["texts_per_s"], out["served"]["bert_fill"]["texts_per_s"]],
          w, label="served on the GPU, conc 64")
    a.set_xticks(x + 0.4 - w / 2, ["GPT Score", "BERT FillMask"])
    a.set_yscale("log")
    a.set_ylabel("sequences / s")
    a.set_title("throughput at the best batch size")
    a.legend(fontsize=7)
    keys = list(out["decode_step_ms"])
    b.bar(range(len(keys)), [float(np.mean(out["decode_step_ms"][k])) for k in keys])
    b.set_xticks(range(len(keys)), keys, rotation=20, fontsize=8)
    b.set_ylabel("ms per decode step (bare ONNX Runtime)")
    b.set_title("KV cache: IO binding vs run")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    run(main)
