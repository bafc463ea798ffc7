"""Serving overhead and batching, as ratios measured in one run (docs/benchmarks.md, "Serving on CPU").

    python benchmarks/serving.py [--repository repository] [--duration 8] [--out results/serving.json]

Each served figure comes from `plm serve` in its own process (client/local_server.py) driven by the
`plm loadtest` engine (closed loop, warm-up excluded, client CPU reported); each raw figure from an
in-process ONNX Runtime session over the same graph file, with the same session options and the same token
ids, padded the same way:

1. `Score` on GPT and `FillMask` on BERT at concurrency 64 ÷ raw ONNX Runtime at its best batch size
   (target ≥ 0.8 on CPU): one text per request, and 8 texts per request (the per-call cost shared by 8).
2. Dynamic batching on ÷ off (`max_batch_size` 1) for GPT `Score` at concurrency 64 (target ≥ 1.5×); the
   server's default `spin_wait = false` ÷ ONNX Runtime's spinning threads (the choice it documents); and the
   batcher's padding floor (`min_padding_efficiency` 0.8) ÷ none, on GPT-only servers (median of three
   alternated pairs).
3. `PredictNext` on the neural LM at concurrency 1: served p50 − raw ONNX Runtime p50 (one run + top-k;
   target ≤ 1 ms), with the default batcher (a fast model's lone row runs on the event loop) and with
   `inline_max_ms = 0` (every run on the model's thread).
4. n-gram `PredictNext` throughput at concurrency 32 (target ≥ 2,000 requests/s on 2 cores, the client on the
   same machine; its CPU is reported — it competes with the server for the same cores).
5. 1 and 4 again on `plm serve --workers N` (N = the cores by default): several server processes on one port.

Writes the JSON and a PNG (throughput bars and the latency CDFs) and prints the ratios.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from _smoke import Servers, add_smoke_flag, no_errors, run  # this folder is on sys.path when run as a script
from plm.client.loadtest import BUILTIN_INPUTS, LoadConfig, RequestSpec, mask_one_word, run_loadtest
from plm.service.config import Runtime, ServerConfig
from plm.service.metrics import Metrics
from plm.service.registry import load_model
from plm.service.runtime import open_graph, pad_right

BATCHES = (1, 4, 8, 16, 32, 64)
UNBATCHED = {"PLM_BATCHING__MAX_BATCH_SIZE": "1"}
SPINNING = {"PLM_RUNTIME__SPIN_WAIT": "true"}


def held_out_texts(n: int = 256) -> list[str]:
    """The load tester's built-in held-out sentences (Shakespeare and news the models never trained on)."""
    texts = list(BUILTIN_INPUTS)
    return (texts * (n // len(texts) + 1))[:n]


def best_rate(run: Callable[[list[int]], object], n_items: int, seconds: float = 1.5,
              batches: tuple[int, ...] = BATCHES) -> dict[str, Any]:
    """Items/s of `run(indices)` at each batch size over a fixed time; the best batch wins."""
    rows = []
    for b in batches:
        run(list(range(b)))  # warm-up: ORT allocates for this shape
        done, started = 0, time.perf_counter()
        i = 0
        while time.perf_counter() - started < seconds:
            run([(i + k) % n_items for k in range(b)])
            i += b
            done += b
        rows.append({"batch": b, "items_per_s": done / (time.perf_counter() - started)})
    best = max(rows, key=lambda r: r["items_per_s"])
    return {"by_batch": rows, "best_batch": best["batch"], "best_items_per_s": best["items_per_s"]}


def raw_latency(run: Callable[[list[int]], object], n_items: int, count: int = 400) -> list[float]:
    out = []
    for i in range(count):
        t = time.perf_counter()
        run([i % n_items])
        out.append((time.perf_counter() - t) * 1000)
    return out


class Raw:
    """The graphs of the served models, run directly (the server's session options, no server).

    `runtime` picks providers and the graph variant; by default ONNX Runtime's own choice for a tight loop
    (threads spin between runs) with the server's thread count and providers."""

    def __init__(self, repository: Path, texts: list[str], runtime: Runtime | None = None, nnlm: bool = True) -> None:
        runtime = runtime or Runtime(spin_wait=True)
        config = ServerConfig(repository=repository, runtime=Runtime(providers=("cpu",)))  # tokenizers only
        m = Metrics()
        self.gpt, self.bert = (load_model(repository / n, config, m) for n in ("gpt", "bert"))
        self.gpt_s, self.bert_s = (open_graph(model.folder, model.spec, "model", runtime, model.name, None)
                                   for model in (self.gpt, self.bert))
        g = self.gpt
        self.gpt_rows = [[g._bos, *g.encode(t).ids, g.eos_id] for t in texts]
        rng = np.random.default_rng(0)
        self.masked = [mask_one_word(t, rng) for t in texts]
        b = self.bert
        cls, sep = b.special_id(b.tokenizer, "[CLS]"), b.eos_id
        self.bert_rows = [[cls, *b.encode(t).ids, sep] for t in self.masked]
        self.bert_pos = [[r.index(b.mask_id)] for r in self.bert_rows]
        if nnlm:
            self.nnlm = load_model(repository / "nnlm", config, m)
            self.nnlm_s = open_graph(self.nnlm.folder, self.nnlm.spec, "model", runtime, "nnlm", None)
            self.nnlm_ctx = [self.nnlm._history(self.nnlm.encode(t).ids) for t in texts]

    def gpt_score(self, idx: list[int]) -> list[np.ndarray]:
        """Each text's token log-probs (BOS excluded)."""
        ids, mask = pad_right([self.gpt_rows[i] for i in idx], self.gpt.eos_id)
        pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
        lp = self.gpt_s.run(["token_logprobs"], {"input_ids": ids, "attention_mask": mask,
                                                 "position_ids": pos})["token_logprobs"]
        return [lp[k, 1:len(self.gpt_rows[i])] for k, i in enumerate(idx)]

    def bert_fill(self, idx: list[int]) -> np.ndarray:
        """The masked word's log-probs over the vocabulary, (B, V); their top 5 taken as FillMask takes them."""
        ids, mask = pad_right([self.bert_rows[i] for i in idx], self.bert._pad)
        lp = self.bert_s.run(["mask_logprobs"], {
            "input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids),
            "mask_positions": np.asarray([self.bert_pos[i] for i in idx], dtype=np.int64)})["mask_logprobs"]
        np.argpartition(-lp[:, 0], 5, axis=-1)[:, :5]
        return lp[:, 0]

    def nnlm_next(self, idx: list[int]) -> None:
        lp = self.nnlm_s.run(["next_logprobs"], {
            "context_ids": np.asarray([self.nnlm_ctx[i] for i in idx], dtype=np.int64)})["next_logprobs"]
        np.argpartition(-lp, 5, axis=-1)[:, :5]


def drive(target: str, rpc: str, model: str, texts: list[str], concurrency: int, duration: float,
          metrics_url: str | None = None, processes: int = 1, per_request: int = 1, connections: int = 1,
          warmup: float = 2.0, **params: Any) -> dict[str, Any]:
    cfg = LoadConfig(targets=(target,), specs=(RequestSpec(1.0, rpc, model, per_request, params),),
                     inputs=tuple(texts), concurrency=concurrency, duration=duration, warmup=warmup,
                     connections=connections)
    result = run_loadtest(cfg, processes=processes, metrics_url=metrics_url, progress=False)
    s = result["summary"]
    lat = [r[1] for r in result["records"] if r[5] == "OK"]
    errors = s["errors"]
    print(f"  served {rpc:11} {model:9} conc {concurrency:3} × {per_request} text(s): "
          f"{s['throughput_ok_per_s'] * per_request:8.1f} texts/s, "
          f"p50 {s['latency_ms']['p50']:.2f} ms, p99 {s['latency_ms']['p99']:.2f} ms, client CPU "
          f"{s['client_cpu_percent']:.0f}%{', errors ' + str(errors) if errors else ''}", flush=True)
    return {"rpc": rpc, "model": model, "concurrency": concurrency, "texts_per_request": per_request,
            "texts_per_s": s["throughput_ok_per_s"] * per_request, "summary": s, "latencies_ms": lat,
            "server": result.get("server")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repository", type=Path, default=Path("repository"))
    ap.add_argument("--duration", type=float, default=8.0, help="measured seconds per served run")
    ap.add_argument("--processes", type=int, default=1, help="load-generator processes for the n-gram run")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                    help="server processes of the `plm serve --workers` runs [the cores]")
    ap.add_argument("--out", type=Path, default=Path("results/serving.json"))
    add_smoke_flag(ap)
    args = ap.parse_args()
    texts = held_out_texts()
    started = time.perf_counter()
    # Runs repeated to check each other (`reps`, `floor_reps`), and the raw loops' time and batch sizes.
    reps, floor_reps, raw_seconds, batches, raw_calls = ("", "_again"), ("", "_2", "_3"), 1.5, BATCHES, 400
    if args.smoke:
        args.duration, reps, floor_reps, raw_seconds, batches, raw_calls = 0.15, ("",), ("",), 0.05, (1, 4), 20
    load = functools.partial(drive, warmup=0.0 if args.smoke else 2.0)  # every served run below

    print("raw ONNX Runtime (in process, best batch size):", flush=True)
    raw = Raw(args.repository, texts)
    raw_rates = {"gpt_score": best_rate(raw.gpt_score, len(texts), raw_seconds, batches),
                 "bert_fill": best_rate(raw.bert_fill, len(texts), raw_seconds, batches)}
    for k, v in raw_rates.items():
        print(f"  raw {k:10}: {v['best_items_per_s']:8.1f} items/s at batch {v['best_batch']}", flush=True)
    raw_nnlm = raw_latency(raw.nnlm_next, len(texts), raw_calls)
    print(f"  raw nnlm next: p50 {np.percentile(raw_nnlm, 50):.3f} ms", flush=True)
    del raw

    served: dict[str, Any] = {}
    models = ["gpt", "bert", "nnlm", "ngram-kn"]
    # The configurations (models, settings) of the servers below, for a smoke run's one server of them all.
    servers = Servers(args.repository, args.smoke, [(models, {}), (["nnlm"], {"PLM_BATCHING__INLINE_MAX_MS": "0"}),
                                                    (["gpt"], UNBATCHED), (["gpt"], SPINNING),
                                                    (["gpt"], {"PLM_BATCHING__MIN_PADDING_EFFICIENCY": "0"})])
    with servers.start(models, metrics=True) as srv:
        served["gpt_score"] = load(srv.target, "Score", "gpt", texts, 64, args.duration, srv.metrics_url)
        # FillMask: the load generator blanks one word of each text itself (client/loadtest.py), as Raw does.
        served["bert_fill"] = load(srv.target, "FillMask", "bert", texts, 64, args.duration, srv.metrics_url)
        served["gpt_score_x8"] = load(srv.target, "Score", "gpt", texts, 64, args.duration, per_request=8)
        served["bert_fill_x8"] = load(srv.target, "FillMask", "bert", texts, 64, args.duration, per_request=8)
        served["ngram_next"] = load(srv.target, "PredictNext", "ngram-kn", texts, 32, args.duration,
                                     processes=args.processes)
    # The same on `--workers` server processes sharing the port: the client opens several connections, since
    # the kernel spreads connections (not calls) over the workers, by a hash of each connection's ports. With
    # 4 connections over 2 workers a 3:1 or 4:0 split is as likely as not, and the busier worker sets the pace.
    conns = 8 * args.workers
    with servers.start(["gpt", "bert", "ngram-kn"], workers=args.workers) as srv:
        served["gpt_score_workers"] = load(srv.target, "Score", "gpt", texts, 64, args.duration, connections=conns)
        served["bert_fill_workers"] = load(srv.target, "FillMask", "bert", texts, 64, args.duration,
                                            connections=conns)
        served["ngram_next_workers"] = load(srv.target, "PredictNext", "ngram-kn", texts, 32, args.duration,
                                             processes=args.processes, connections=conns)
    # Latency at concurrency 1 on servers of the one model, the default batcher and inline runs off, alternated
    # (runs of the same server vary by a few tenths of a millisecond; a server holding four models is slower).
    for rep in reps:
        for key, inline in (("nnlm_next", "1"), ("nnlm_next_on_thread", "0")):
            with servers.start(["nnlm"], {"PLM_BATCHING__INLINE_MAX_MS": inline}) as srv:
                served[key + rep] = load(srv.target, "PredictNext", "nnlm", texts, 1, args.duration / 2)
    with servers.start(["gpt"], UNBATCHED) as srv:
        served["gpt_score_unbatched"] = load(srv.target, "Score", "gpt", texts, 64, args.duration)
    with servers.start(["gpt"], SPINNING) as srv:
        served["gpt_score_spinning"] = load(srv.target, "Score", "gpt", texts, 64, args.duration)
    # The batcher's padding floor (min_padding_efficiency, default 0.8) against none, on GPT-only servers:
    # three alternated pairs of half-length runs (the gain is a few per cent, within one run's noise).
    floor_pairs: list[float] = []
    for rep in floor_reps:
        for key, floor in (("gpt_score_padding_floor", "0.8"), ("gpt_score_no_padding_floor", "0")):
            with servers.start(["gpt"], {"PLM_BATCHING__MIN_PADDING_EFFICIENCY": floor}, metrics=True) as srv:
                served[key + rep] = load(srv.target, "Score", "gpt", texts, 64, args.duration / 2, srv.metrics_url)
        floor_pairs.append(float(served["gpt_score_padding_floor" + rep]["summary"]["throughput_ok_per_s"])
                           / float(served["gpt_score_no_padding_floor" + rep]["summary"]["throughput_ok_per_s"]))
    servers.close()

    def ok(key: str) -> float:
        return float(served[key]["summary"]["throughput_ok_per_s"])

    def p50(key: str) -> float:  # the mean of the runs' medians
        return sum(float(served[key + rep]["summary"]["latency_ms"]["p50"]) for rep in reps) / len(reps)

    ratios = {
        "score_gpt_served_vs_raw": ok("gpt_score") / raw_rates["gpt_score"]["best_items_per_s"],
        "fillmask_bert_served_vs_raw": ok("bert_fill") / raw_rates["bert_fill"]["best_items_per_s"],
        "score_gpt_8_texts_per_request_vs_raw": served["gpt_score_x8"]["texts_per_s"]
        / raw_rates["gpt_score"]["best_items_per_s"],
        "fillmask_bert_8_texts_per_request_vs_raw": served["bert_fill_x8"]["texts_per_s"]
        / raw_rates["bert_fill"]["best_items_per_s"],
        "batching_on_vs_off_gpt_score": ok("gpt_score") / ok("gpt_score_unbatched"),
        "spin_wait_off_vs_on_gpt_score": ok("gpt_score") / ok("gpt_score_spinning"),
        "padding_floor_on_vs_off_gpt_score": float(np.median(floor_pairs)),  # the median of the three pairs
        "predict_next_nnlm_p50_overhead_ms": p50("nnlm_next") - float(np.percentile(raw_nnlm, 50)),
        "predict_next_nnlm_p50_overhead_ms_inline_off": p50("nnlm_next_on_thread") - float(np.percentile(raw_nnlm, 50)),
        "ngram_predict_next_req_per_s": ok("ngram_next"),
        f"score_gpt_served_vs_raw_{args.workers}_workers": ok("gpt_score_workers")
        / raw_rates["gpt_score"]["best_items_per_s"],
        f"fillmask_bert_served_vs_raw_{args.workers}_workers": ok("bert_fill_workers")
        / raw_rates["bert_fill"]["best_items_per_s"],
        f"ngram_predict_next_req_per_s_{args.workers}_workers": ok("ngram_next_workers"),
    }
    targets = {"score_gpt_served_vs_raw": (">=", 0.8), "fillmask_bert_served_vs_raw": (">=", 0.8),
               "score_gpt_8_texts_per_request_vs_raw": (">=", 0.8),
               "fillmask_bert_8_texts_per_request_vs_raw": (">=", 0.8),
               "batching_on_vs_off_gpt_score": (">=", 1.5), "spin_wait_off_vs_on_gpt_score": (">=", 1.0),
               "padding_floor_on_vs_off_gpt_score": (">=", 1.0),
               "predict_next_nnlm_p50_overhead_ms": ("<=", 1.0),
               "predict_next_nnlm_p50_overhead_ms_inline_off": ("<=", 1.0),
               "ngram_predict_next_req_per_s": (">=", 2000.0),
               f"score_gpt_served_vs_raw_{args.workers}_workers": (">=", 0.8),
               f"fillmask_bert_served_vs_raw_{args.workers}_workers": (">=", 0.8),
               f"ngram_predict_next_req_per_s_{args.workers}_workers": (">=", 2000.0)}
    print(f"\nratios (one run, {os.cpu_count()} cores, {time.perf_counter() - started:.0f} s):")
    for k, v in ratios.items():
        op, t = targets[k]
        met = v >= t if op == ">=" else v <= t
        print(f"  {k:36} {v:9.2f}   target {op} {t:g}  {'✓' if met else '✗'}")
    for key in ("gpt_score_padding_floor", "gpt_score_no_padding_floor"):
        view = served[key].get("server") or {}
        print(f"  ({key}: mean batch {view.get('batch_size_mean', float('nan')):.1f} rows, padding efficiency "
              f"{view.get('padding_efficiency_mean', float('nan')):.2f})")
    print(f"  (n-gram runs: client CPU {served['ngram_next']['summary']['client_cpu_percent']:.0f}% and "
          f"{served['ngram_next_workers']['summary']['client_cpu_percent']:.0f}% of one core)")

    if args.smoke:
        for key, r in served.items():
            no_errors(r["summary"]["errors"], key)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    slim = {k: {kk: vv for kk, vv in v.items() if kk != "latencies_ms"} for k, v in served.items()}
    args.out.write_text(json.dumps({"raw": raw_rates, "raw_nnlm_next_ms": {
        "p50": float(np.percentile(raw_nnlm, 50)), "p99": float(np.percentile(raw_nnlm, 99))},
        "served": slim, "ratios": ratios, "targets": targets, "cpu_count": os.cpu_count()}, indent=1) + "\n")
    plot(served, raw_rates, ratios, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


def plot(served: dict[str, Any], raw: dict[str, Any], ratios: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    labels = ["GPT Score", "BERT FillMask"]
    x = np.arange(2)
    w = 0.16
    a.bar(x - 2 * w, [raw["gpt_score"]["best_items_per_s"], raw["bert_fill"]["best_items_per_s"]], w,
          label="raw ORT, best batch")
    a.bar(x - w, [served["gpt_score"]["texts_per_s"], served["bert_fill"]["texts_per_s"]], w,
          label="served, conc 64, 1 text/request")
    a.bar(x, [served["gpt_score_workers"]["texts_per_s"], served["bert_fill_workers"]["texts_per_s"]], w,
          label="served by workers, conc 64, 1 text/request")
    a.bar(x + w, [served["gpt_score_x8"]["texts_per_s"], served["bert_fill_x8"]["texts_per_s"]], w,
          label="served, conc 64, 8 texts/request")
    a.bar(x[:1] + 2 * w, [served["gpt_score_unbatched"]["texts_per_s"]], w, label="served, batching off")
    a.set_xticks(x, labels)
    a.set_ylabel("sequences / s")
    a.legend(fontsize=8)
    a.set_title("throughput")
    for key, label in (("gpt_score", "GPT Score c64"), ("bert_fill", "BERT FillMask c64"),
                       ("gpt_score_unbatched", "GPT Score c64, unbatched"), ("nnlm_next", "NNLM PredictNext c1"),
                       ("nnlm_next_on_thread", "NNLM PredictNext c1, inline off"),
                       ("ngram_next", "n-gram PredictNext c32"),
                       ("ngram_next_workers", "n-gram PredictNext c32, workers")):
        lat = np.sort(served[key]["latencies_ms"])
        if lat.size:
            b.plot(lat, np.arange(1, lat.size + 1) / lat.size, label=label)
    b.set_xscale("log")
    b.set_xlabel("latency (ms)")
    b.set_ylabel("fraction of requests")
    b.set_title("latency CDF")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    run(main)
