"""Serving overhead and batching, as ratios measured in one run (docs/benchmarks.md, "Serving on CPU").

    python benchmarks/serving.py [--repository repository] [--duration 8] [--out results/serving.json]

The texts are real held-out text: the test split of the corpus the repository's models were built from
(`held_out_texts`: rebuilt from `corpus.json`, checked against its hash), the lines of three or more words that
fit the GPT's and BERT's windows. Each served figure comes from `plm serve` in its own process
(client/local_server.py) driven by the `plm loadtest` engine (closed loop, warm-up excluded, client CPU
reported); each raw figure from an in-process ONNX Runtime session over the same graph file with the server's
own session settings, in batches of the server's `max_batch_size` texts of like lengths (the texts sorted by
tokens, so the least padding a server's batches could reach), measured two ways: "raw ORT" (token ids made
beforehand: pad and run) and "raw with tokenization" (text in, the same response message out: the served
adapter's tokenizer, pad, run, top-k, the protobuf response built per text; checked equal to the server's own
responses). Their difference is the Python per-text cost outside the model. Raw ORT in batches of mixed
lengths (texts in the order they come) is timed too: what batching without the padding floor gets.

1. `Score` on GPT and `FillMask` on BERT at concurrency 64, one text per request, ÷ raw with tokenization
   (targets ≥ 0.75 and ≥ 0.6) and ÷ raw ORT (≥ 0.8); the same with 8 texts per request; each on a server of
   that one model, as the raw side holds one.
2. Dynamic batching on ÷ off (`max_batch_size` 1) for GPT `Score` at concurrency 64 (target ≥ 1.5×) and the
   server's default `spin_wait = false` ÷ ONNX Runtime's spinning threads: GPT-only servers on both sides,
   alternated (two rounds); and the batcher's padding floor (`min_padding_efficiency` 0.8) ÷ none (median of
   three alternated pairs).
3. `PredictNext` on the neural LM at concurrency 1: served p50 − raw ONNX Runtime p50 (one run + top-k;
   target ≤ 1 ms), with the default batcher (a fast model's lone row runs on the event loop) and with
   `inline_max_ms = 0` (every run on the model's thread).
4. n-gram `PredictNext` throughput at concurrency 32 (target ≥ 2,000 requests/s on 2 cores, the client on the
   same machine; its CPU is reported — it competes with the server for the same cores), on a server of the
   default models.
5. 1 and 4 again on `plm serve --workers N` (N = the cores by default): several server processes on one port.

Writes the JSON and a PNG (throughput bars and the latency CDFs) and prints the ratios.

`--fill-ab DIR ...` runs only an A/B of 1's BERT `FillMask`: a BERT-only server of this checkout and one of each
folder (another `plm` package laid out as installed, put on PYTHONPATH), every server's answers checked equal to
the raw side's, then `--pairs` rounds each driving every server in turn (each first in turn) beside one raw timing.
`--score-ab DIR ...` is the same for 1's GPT `Score` on GPT-only servers. With `--ceiling` (the folders then
optional), the minimal grpc.aio server of _minimal_server.py runs beside them: the same per-text work as the raw
side's behind gRPC and a queue, what any Python grpc.aio server can reach here (`--concurrency`, default 64).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from _minimal_server import (
    MinimalServer,
    batches,
    bert_logprobs,
    fill_responses,
    gpt_logprobs,
    row_lengths,
    score_responses,
)
from _smoke import Servers, add_smoke_flag, no_errors, run  # this folder is on sys.path when run as a script
from google.protobuf.message import Message
from plm.client.client import PlmClient
from plm.client.loadtest import LoadConfig, RequestSpec, mask_one_word, run_loadtest
from plm.service.config import Runtime, ServerConfig
from plm.service.metrics import Metrics
from plm.service.registry import load_model
from plm.service.runtime import open_graph
from tokenizers import Tokenizer

from plm.api.v1 import plm_pb2 as pb

BATCHES = (1, 4, 8, 16, 32, 64)
UNBATCHED = {"PLM_BATCHING__MAX_BATCH_SIZE": "1"}
SPINNING = {"PLM_RUNTIME__SPIN_WAIT": "true"}
BATCH_CAP = ServerConfig().batching.max_batch_size  # the server's rows per ONNX run, which the raw side keeps to
TIED = re.compile(r"^\S*\.candidates\[\d+\]\.(token|token_str|sequence|token_ids)\b")


def held_out_texts(repository: Path, n: int | None = None, fit: Sequence[str] = ("gpt", "bert"),
                   min_words: int = 3) -> list[str]:
    """Sentences of the test split of the corpus `repository`'s models were built from (documents they never
    trained on): the corpus rebuilt from the files and split settings `corpus.json` records, and refused unless
    its hash equals the recorded one. Kept: lines of `min_words` or more words whose tokens, with BOS/[CLS] and
    EOS/[SEP], fit the window of every `fit` model the repository has; `n` of them evenly spaced, or all."""
    from plm.data import corpus

    recorded = json.loads((repository / "corpus.json").read_text())
    paths = []
    for f in recorded["files"]:  # as the build named them: absolute, or relative to where it ran (here, the
        # repository's parent or the checkout)
        found = [p for p in (Path(f["path"]), repository.resolve().parent / f["path"],
                             Path(__file__).resolve().parents[1] / f["path"]) if p.is_file()]
        if not found:
            raise FileNotFoundError(f"{f['path']}: a corpus file {repository / 'corpus.json'} names is missing")
        paths.append(found[0])
    split = recorded["split"]
    built = corpus.build_corpus(paths, max_documents=recorded["documents"]["max_documents"], seed=split["seed"],
                                valid_frac=split["valid_frac"], test_frac=split["test_frac"])
    if built.manifest["corpus_sha256"] != recorded["corpus_sha256"]:
        raise ValueError(f"the corpus rebuilt from {repository / 'corpus.json'} differs from the one recorded there")
    windows = []
    for name in fit:
        manifest_path = repository / name / "manifest.json"
        if manifest_path.is_file():
            manifest = json.loads(manifest_path.read_text())
            tok = Tokenizer.from_file(str(manifest_path.parent / manifest["tokenizer"]["file"]))
            windows.append((tok, int(manifest["max_length"]) - 2))  # BOS/[CLS] and EOS/[SEP]
    kept = [s for s in built.test if len(s.split()) >= min_words
            and all(len(tok.encode(s, add_special_tokens=False).ids) <= room for tok, room in windows)]
    if not kept:
        raise ValueError(f"no test sentence of {min_words}+ words fits the windows of {', '.join(fit)}")
    step = 1 if n is None else max(1, len(kept) // n)
    texts = kept[::step][:n]
    print(f"held-out text: {len(texts)} lines of the corpus's test split ({len(built.test)} sentences, "
          f"{len(kept)} of {min_words}+ words fitting {', '.join(fit)})", flush=True)
    return texts


def best_rate(run: Callable[[list[int]], object], n_items: int, seconds: float = 1.5,
              batches: tuple[int, ...] = BATCHES, order: list[int] | None = None) -> dict[str, Any]:
    """Items/s of `run(indices)` at each batch size over a fixed time; the best batch wins. A batch is `b`
    consecutive items of `order` (by default one shuffled order: lengths mixed, as requests arrive; items
    sorted by length give batches of like lengths, as an offline loop makes them), the batches run in a
    shuffled sequence."""
    order = order if order is not None else np.random.default_rng(0).permutation(n_items).tolist()
    rows = []
    for b in batches:
        chunks = [order[k:k + b] for k in range(0, max(1, n_items - b + 1), b)]
        chunks = [chunks[k] for k in np.random.default_rng(1).permutation(len(chunks))]
        run(chunks[0])  # warm-up: ORT allocates for this shape
        done, started = 0, time.perf_counter()
        i = 0
        while time.perf_counter() - started < seconds:
            run(chunks[i % len(chunks)])
            done += len(chunks[i % len(chunks)])
            i += 1
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
    """The graphs of the served models, run directly (no server, no gRPC, no batcher).

    `runtime` picks providers, session settings and the graph variant; by default the server's own
    (`ServerConfig().runtime`). The `*_full` methods take text and return the response messages the server
    would send for one text per request; the others run ONNX Runtime alone on ids tokenized beforehand."""

    def __init__(self, repository: Path, texts: list[str], runtime: Runtime | None = None, nnlm: bool = True) -> None:
        runtime = runtime or ServerConfig().runtime
        config = ServerConfig(repository=repository, runtime=Runtime(providers=("cpu",)))  # tokenizers only
        m = Metrics()
        self.texts = texts
        self.gpt, self.bert = (load_model(repository / n, config, m) for n in ("gpt", "bert"))
        self.gpt_s, self.bert_s = (open_graph(model.folder, model.spec, "model", runtime, model.name, None)
                                   for model in (self.gpt, self.bert))
        g = self.gpt
        self.gpt_rows = [[g._bos, *g.encode(t).ids, g.eos_id] for t in texts]
        rng = np.random.default_rng(0)
        self.masked = [mask_one_word(t, rng) for t in texts]  # as the load generator blanks them
        b = self.bert
        self._cls = b.special_id(b.tokenizer, "[CLS]")
        self.bert_rows = [[self._cls, *b.encode(t).ids, b.eos_id] for t in self.masked]
        self.bert_pos = [[r.index(b.mask_id)] for r in self.bert_rows]
        # The texts by length in each model's tokens: batches of neighbours in these orders pad least.
        self.gpt_order = sorted(range(len(texts)), key=lambda i: len(self.gpt_rows[i]))
        self.bert_order = sorted(range(len(texts)), key=lambda i: len(self.bert_rows[i]))
        self._allowed = ~b.never_generate_mask()
        if nnlm:
            self.nnlm = load_model(repository / "nnlm", config, m)
            self.nnlm_s = open_graph(self.nnlm.folder, self.nnlm.spec, "model", runtime, "nnlm", None)
            self.nnlm_ctx = [self.nnlm._history(self.nnlm.encode(t).ids) for t in texts]

    def gpt_score(self, idx: list[int]) -> list[np.ndarray]:
        """Each text's token log-probs (BOS excluded), from ids tokenized beforehand."""
        lp = gpt_logprobs(self.gpt_s, self.gpt.eos_id, [self.gpt_rows[i] for i in idx])
        return [lp[k, 1:len(self.gpt_rows[i])] for k, i in enumerate(idx)]

    def gpt_score_full(self, idx: list[int]) -> list[pb.ScoreResponse]:
        """`Score`'s response for each text alone (per-token and per-word fields, EOS scored), from the text."""
        return score_responses(self.gpt, self.gpt_s, [self.texts[i] for i in idx])

    def bert_fill(self, idx: list[int]) -> np.ndarray:
        """The masked word's log-probs over the vocabulary, (B, V), from ids tokenized beforehand."""
        return bert_logprobs(self.bert_s, self.bert._pad, [self.bert_rows[i] for i in idx],
                             [self.bert_pos[i] for i in idx])[:, 0]

    def bert_fill_full(self, idx: list[int]) -> list[pb.FillMaskResponse]:
        """`FillMask`'s response (top 5 of the one blank) for each masked text alone, from the text."""
        return fill_responses(self.bert, self.bert_s, self._allowed, [self.masked[i] for i in idx])

    def nnlm_next(self, idx: list[int]) -> None:
        lp = self.nnlm_s.run(["next_logprobs"], {
            "context_ids": np.asarray([self.nnlm_ctx[i] for i in idx], dtype=np.int64)})["next_logprobs"]
        np.argpartition(-lp, 5, axis=-1)[:, :5]


def differences(served: Message, raw: Message, path: str = "", tol: float = 1e-4) -> list[str]:
    """Where two messages differ: floats beyond `tol` (relative above 1), anything else unequal."""
    if type(served) is not type(raw):
        return [f"{path}: {type(served).__name__} vs {type(raw).__name__}"]
    found = []
    for field in served.DESCRIPTOR.fields:
        a, b, at = getattr(served, field.name), getattr(raw, field.name), f"{path}.{field.name}"
        pairs = list(zip(a, b, strict=False)) if field.is_repeated else [(a, b)]
        if field.is_repeated and len(a) != len(b):
            found.append(f"{at}: {len(a)} vs {len(b)} items")
        for k, (x, y) in enumerate(pairs):
            where = f"{at}[{k}]" if field.is_repeated else at
            if isinstance(x, Message):
                found += differences(x, y, where, tol)
            elif isinstance(x, float):
                if abs(x - y) > tol * max(1.0, abs(x)):
                    found.append(f"{where}: {x!r} vs {y!r}")
            elif x != y:
                found.append(f"{where}: {x!r} vs {y!r}")
    return found


def check_same_responses(target: str, raw: Raw, model: str, count: int = 8, against: str | None = None) -> None:
    """Raises unless the raw side's responses equal the server's (GPT `Score` or BERT `FillMask`, one text per
    request) on `count` texts; with `against`, the server's must equal that server's instead, candidates' ids and
    order included (floats to 1e-4)."""
    with PlmClient(target, timeout=60) as c, PlmClient(against or target, timeout=60) as other:
        for i in range(min(count, len(raw.texts))):
            if model == "gpt":
                served: Message = c.stub.Score(pb.ScoreRequest(model=model, texts=[raw.texts[i]]))
                built: Message = (other.stub.Score(pb.ScoreRequest(model=model, texts=[raw.texts[i]])) if against
                                  else raw.gpt_score_full([i])[0])
            else:
                served = c.stub.FillMask(pb.FillMaskRequest(model=model, texts=[raw.masked[i]]))
                built = (other.stub.FillMask(pb.FillMaskRequest(model=model, texts=[raw.masked[i]])) if against
                         else raw.bert_fill_full([i])[0])
            # Against raw, candidates whose log-probs tie within the tolerance may come in either order.
            found = [f for f in differences(served, built) if against or not TIED.match(f)]
            if found:
                raise AssertionError(f"{against or 'raw'}'s {type(built).__name__} differs from {target}'s for text "
                                     f"{i}: " + "; ".join(found[:5]))
    print(f"  {target}'s {model} responses equal {against or 'the raw ones'} ({min(count, len(raw.texts))} texts)",
          flush=True)


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


def raw_rates(raw: Raw, seconds: float, rounds: int) -> dict[str, Any]:
    """Texts/s at the server's batch cap, alternated `rounds` times (the median round of each): ONNX Runtime alone
    and with tokenization and responses, in batches of like lengths (the least padding a server's batches could
    reach); and ONNX Runtime alone in batches of mixed lengths (`_mixed`: texts in the order they come)."""
    runs = {"gpt_score": (raw.gpt_score, raw.gpt_order), "gpt_score_full": (raw.gpt_score_full, raw.gpt_order),
            "gpt_score_mixed": (raw.gpt_score, None),
            "bert_fill": (raw.bert_fill, raw.bert_order), "bert_fill_full": (raw.bert_fill_full, raw.bert_order),
            "bert_fill_mixed": (raw.bert_fill, None)}
    by_round: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for key, (fn, order) in runs.items():
            by_round[key].append(best_rate(fn, len(raw.texts), seconds, (BATCH_CAP,), order)["best_items_per_s"])
    out = {k: {"batch": BATCH_CAP, "rounds": v, "items_per_s": float(np.median(v))} for k, v in by_round.items()}
    for k, v in out.items():
        print(f"  raw {k:15}: {v['items_per_s']:8.1f} texts/s at batch {BATCH_CAP} (rounds "
              + ", ".join(f"{x:.0f}" for x in v["rounds"]) + ")", flush=True)
    return out


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid`, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def task_ab(repository: Path, folders: list[Path], pairs: int, duration: float, out: Path, model: str,
            ceiling: bool = False, concurrency: int = 64) -> None:
    """BERT FillMask (`model` bert) or GPT Score (gpt), `concurrency` callers, one text per request, on servers of
    that one model of this checkout's code and of each folder's (on PYTHONPATH), all started at once and driven in
    turn (each first in turn), ÷ raw with tokenization timed in the same round; per round, each folder's server ÷ this
    checkout's. With `ceiling`, also the minimal grpc.aio server of _minimal_server.py (`minimal`), its answers
    checked equal to this checkout's server's (ids exactly, floats to 1e-4) as well as to raw's."""
    texts = held_out_texts(repository)
    raw = Raw(repository, texts, nnlm=False)
    rpc, full, order = (("FillMask", raw.bert_fill_full, raw.bert_order) if model == "bert"
                        else ("Score", raw.gpt_score_full, raw.gpt_order))
    # PYTHONSAFEPATH: `python -m plm.cli` would put the working directory first on sys.path, and run from a
    # checkout its `plm/` would shadow the folder's: every side would serve the checkout's code.
    sides = {"this": {}, **{d.name: {"PYTHONPATH": str(d.resolve()), "PYTHONSAFEPATH": "1"} for d in folders}}
    names = list(sides)
    rounds: list[dict[str, float]] = []
    # The minimal server's batches of the texts as they come: rounds of min(2 caps, callers), each split by length.
    lengths = row_lengths(raw.bert if model == "bert" else raw.gpt, raw.masked if model == "bert" else raw.texts)
    arrived = np.random.default_rng(0).permutation(len(lengths)).tolist()
    taken = min(2 * BATCH_CAP, concurrency)
    in_rounds = [[arrived[k + i] for i in b] for k in range(0, len(arrived), taken)
                 for b in batches([lengths[i] for i in arrived[k:k + taken]], BATCH_CAP,
                                  ServerConfig().batching.min_padding_efficiency)]
    with contextlib.ExitStack() as stack:
        servers: dict[str, Any] = {n: stack.enter_context(Servers(repository, False).start([model], env))
                                   for n, env in sides.items()}
        if ceiling:
            servers["minimal"] = stack.enter_context(MinimalServer(repository, model))
            names.append("minimal")
            check_same_responses(servers["minimal"].target, raw, model, against=servers["this"].target)
        for srv in servers.values():
            check_same_responses(srv.target, raw, model)
        for pair in range(pairs):
            cpu0, wall0 = time.process_time(), time.perf_counter()
            row = {"raw_with_tokenization": best_rate(full, len(raw.texts), 1.5, (BATCH_CAP,),
                                                      order)["best_items_per_s"]}
            # CPU per text or call (µs): the raw loop's process (ONNX Runtime's threads included); each server's
            # process and the load generator's over the measured window (the cores they share).
            wall = time.perf_counter() - wall0
            row["raw_cpu_us"] = 1e6 * (time.process_time() - cpu0) / (row["raw_with_tokenization"] * wall)
            if ceiling:  # the same in the minimal server's batches
                done, k, began, cpu0 = 0, 0, time.perf_counter(), time.process_time()
                while time.perf_counter() - began < 1.5:
                    done += len(full(in_rounds[k % len(in_rounds)]))
                    k += 1
                row["raw_in_minimal_batches"] = done / (time.perf_counter() - began)
                row["raw_in_minimal_batches_cpu_us"] = 1e6 * (time.process_time() - cpu0) / done
            for name in names[pair % len(names):] + names[:pair % len(names)]:
                pid = servers[name].proc.pid
                marks: list[float] = []  # the server's CPU seconds at the end of drive's 2 s warm-up
                threading.Timer(2.0, lambda m=marks, p=pid: m.append(_cpu_seconds(p))).start()
                result = drive(servers[name].target, rpc, model, texts, concurrency, duration)
                done = result["summary"]
                row[name] = result["texts_per_s"]
                row[f"{name}_server_cpu_us"] = 1e6 * (_cpu_seconds(pid) - marks[0]) / done["ok"]
                row[f"{name}_client_cpu_us"] = 1e4 * done["client_cpu_percent"] / done["throughput_ok_per_s"]
            rounds.append(row)
            print(f"  round {pair}: raw with tokenization {row['raw_with_tokenization']:.0f} texts/s "
                  f"({row['raw_cpu_us']:.0f} µs CPU/text; in the minimal server's batches "
                  f"{row.get('raw_in_minimal_batches', math.nan):.0f}, "
                  f"{row.get('raw_in_minimal_batches_cpu_us', math.nan):.0f} µs); "
                  + "; ".join(f"{n} {row[n]:.0f} ({row[n] / row['raw_with_tokenization']:.2f} of raw; CPU/call "
                              f"server {row[n + '_server_cpu_us']:.0f} µs, client {row[n + '_client_cpu_us']:.0f} µs)"
                              for n in names), flush=True)
    summary = {f"{n} ÷ raw with tokenization": float(np.median([r[n] / r["raw_with_tokenization"] for r in rounds]))
               for n in names}
    summary |= {f"{n} ÷ this": float(np.median([r[n] / r["this"] for r in rounds])) for n in names[1:]}
    if ceiling:
        summary["this ÷ minimal"] = float(np.median([r["this"] / r["minimal"] for r in rounds]))
        summary |= {f"{n} ÷ raw in the minimal server's batches": float(np.median(
            [r[n] / r["raw_in_minimal_batches"] for r in rounds])) for n in names}
    summary |= {f"{k} (median)": float(np.median([r[k] for r in rounds])) for k in rounds[0] if k.endswith("_us")}
    for k, v in summary.items():
        print(f"  {k:40} {v:6.2f} (median of {pairs} rounds)")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rounds": rounds, "summary": summary, "duration": duration,
                               "concurrency": concurrency}, indent=1) + "\n")
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repository", type=Path, default=Path("repository"))
    ap.add_argument("--duration", type=float, default=8.0, help="measured seconds per served run")
    ap.add_argument("--processes", type=int, default=1, help="load-generator processes for the n-gram run")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                    help="server processes of the `plm serve --workers` runs [the cores]")
    ap.add_argument("--out", type=Path, default=Path("results/serving.json"))
    ap.add_argument("--fill-ab", type=Path, nargs="*", default=None, metavar="DIR",
                    help="only an A/B of BERT FillMask (conc 64, 1 text/request): this checkout's server and one per "
                         "folder (another `plm` package laid out as installed), alternated --pairs rounds")
    ap.add_argument("--score-ab", type=Path, nargs="*", default=None, metavar="DIR",
                    help="the same A/B for GPT Score (GPT-only servers)")
    ap.add_argument("--pairs", type=int, default=3, help="rounds of --fill-ab / --score-ab")
    ap.add_argument("--ceiling", action="store_true",
                    help="--fill-ab / --score-ab (folders optional) with the minimal grpc.aio server of "
                         "_minimal_server.py beside them: what any Python grpc.aio server reaches here")
    ap.add_argument("--concurrency", type=int, default=64, help="callers of --fill-ab / --score-ab")
    add_smoke_flag(ap)
    args = ap.parse_args()
    started = time.perf_counter()
    if args.fill_ab is not None or args.score_ab is not None:
        task_ab(args.repository, args.fill_ab if args.fill_ab is not None else args.score_ab, args.pairs,
                args.duration, args.out, "bert" if args.fill_ab is not None else "gpt", args.ceiling, args.concurrency)
        return
    # Runs repeated to check each other (`reps`, `floor_reps`), and the raw loops' time, rounds and calls.
    reps, floor_reps, raw_seconds, raw_rounds, raw_calls = ("", "_again"), ("", "_2", "_3"), 1.5, 3, 400
    if args.smoke:
        args.duration, reps, floor_reps, raw_seconds, raw_rounds, raw_calls = 0.1, ("",), ("",), 0.05, 1, 20
    texts = held_out_texts(args.repository, 64 if args.smoke else None)
    load = functools.partial(drive, warmup=0.0 if args.smoke else 2.0)  # every served run below

    print(f"raw ONNX Runtime (in process, the server's session settings, batches of {BATCH_CAP}):", flush=True)
    raw = Raw(args.repository, texts)
    rates = raw_rates(raw, raw_seconds, raw_rounds)
    raw_nnlm = raw_latency(raw.nnlm_next, len(texts), raw_calls)
    print(f"  raw nnlm next: p50 {np.percentile(raw_nnlm, 50):.3f} ms", flush=True)

    served: dict[str, Any] = {}
    models = ["gpt", "bert", "nnlm", "ngram-kn"]
    # The configurations (models, settings) of the servers below, for a smoke run's one server of them all.
    servers = Servers(args.repository, args.smoke, [(["gpt"], {}), (["bert"], {}), (models, {}),
                                                    (["nnlm"], {"PLM_BATCHING__INLINE_MAX_MS": "0"}),
                                                    (["gpt"], UNBATCHED), (["gpt"], SPINNING),
                                                    (["gpt"], {"PLM_BATCHING__MIN_PADDING_EFFICIENCY": "0"})])
    # GPT-only servers, the default against batching off and against spinning threads, alternated: the same model
    # set on both sides of each ratio, and the default server's runs are also the served side of served ÷ raw.
    for rep in reps:
        for key, env in (("gpt_score", {}), ("gpt_score_unbatched", UNBATCHED), ("gpt_score_spinning", SPINNING)):
            with servers.start(["gpt"], env, metrics=True) as srv:
                if not env and not rep:
                    check_same_responses(srv.target, raw, "gpt")
                served[key + rep] = load(srv.target, "Score", "gpt", texts, 64, args.duration, srv.metrics_url)
                if not env and not rep:
                    served["gpt_score_x8"] = load(srv.target, "Score", "gpt", texts, 64, args.duration, per_request=8)
    with servers.start(["bert"], metrics=True) as srv:
        check_same_responses(srv.target, raw, "bert")
        # FillMask: the load generator blanks one word of each text itself (client/loadtest.py), as Raw does.
        served["bert_fill"] = load(srv.target, "FillMask", "bert", texts, 64, args.duration, srv.metrics_url)
        served["bert_fill_x8"] = load(srv.target, "FillMask", "bert", texts, 64, args.duration, per_request=8)
    del raw
    with servers.start(models) as srv:
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
        return float(served[key]["texts_per_s"])

    def paired(a: str, b: str) -> float:  # the mean over the alternated rounds of a ÷ b
        return float(np.mean([ok(a + rep) / ok(b + rep) for rep in reps]))

    def p50(key: str) -> float:  # the mean of the runs' medians
        return sum(float(served[key + rep]["summary"]["latency_ms"]["p50"]) for rep in reps) / len(reps)

    gpt = float(np.mean([ok("gpt_score" + rep) for rep in reps]))  # the default GPT-only server's rounds
    raw_gpt, raw_gpt_full = rates["gpt_score"]["items_per_s"], rates["gpt_score_full"]["items_per_s"]
    raw_bert, raw_bert_full = rates["bert_fill"]["items_per_s"], rates["bert_fill_full"]["items_per_s"]
    w = args.workers
    ratios = {
        "score_gpt_served_vs_raw_with_tokenization": gpt / raw_gpt_full,
        "fillmask_bert_served_vs_raw_with_tokenization": ok("bert_fill") / raw_bert_full,
        "score_gpt_served_vs_raw_ort": gpt / raw_gpt,
        "fillmask_bert_served_vs_raw_ort": ok("bert_fill") / raw_bert,
        "score_gpt_raw_ort_vs_raw_with_tokenization": raw_gpt / raw_gpt_full,
        "fillmask_bert_raw_ort_vs_raw_with_tokenization": raw_bert / raw_bert_full,
        "score_gpt_raw_ort_like_lengths_vs_mixed": raw_gpt / rates["gpt_score_mixed"]["items_per_s"],
        "fillmask_bert_raw_ort_like_lengths_vs_mixed": raw_bert / rates["bert_fill_mixed"]["items_per_s"],
        "score_gpt_8_texts_per_request_vs_raw_with_tokenization": ok("gpt_score_x8") / raw_gpt_full,
        "fillmask_bert_8_texts_per_request_vs_raw_with_tokenization": ok("bert_fill_x8") / raw_bert_full,
        "batching_on_vs_off_gpt_score": paired("gpt_score", "gpt_score_unbatched"),
        "spin_wait_off_vs_on_gpt_score": paired("gpt_score", "gpt_score_spinning"),
        "padding_floor_on_vs_off_gpt_score": float(np.median(floor_pairs)),  # the median of the three pairs
        "predict_next_nnlm_p50_overhead_ms": p50("nnlm_next") - float(np.percentile(raw_nnlm, 50)),
        "predict_next_nnlm_p50_overhead_ms_inline_off": p50("nnlm_next_on_thread") - float(np.percentile(raw_nnlm, 50)),
        "ngram_predict_next_req_per_s": ok("ngram_next"),
        f"score_gpt_served_vs_raw_with_tokenization_{w}_workers": ok("gpt_score_workers") / raw_gpt_full,
        f"fillmask_bert_served_vs_raw_with_tokenization_{w}_workers": ok("bert_fill_workers") / raw_bert_full,
        f"ngram_predict_next_req_per_s_{w}_workers": ok("ngram_next_workers"),
    }
    targets: dict[str, tuple[str, float] | None] = {k: None for k in ratios}
    targets |= {"score_gpt_served_vs_raw_with_tokenization": (">=", 0.75),
                "fillmask_bert_served_vs_raw_with_tokenization": (">=", 0.6),
                "score_gpt_served_vs_raw_ort": (">=", 0.8), "fillmask_bert_served_vs_raw_ort": (">=", 0.8),
                "batching_on_vs_off_gpt_score": (">=", 1.5), "spin_wait_off_vs_on_gpt_score": (">=", 1.0),
                "padding_floor_on_vs_off_gpt_score": (">=", 1.0),
                "predict_next_nnlm_p50_overhead_ms": ("<=", 1.0),
                "predict_next_nnlm_p50_overhead_ms_inline_off": ("<=", 1.0),
                "ngram_predict_next_req_per_s": (">=", 2000.0),
                f"ngram_predict_next_req_per_s_{w}_workers": (">=", 2000.0)}
    print(f"\nratios (one run, {os.cpu_count()} cores, {len(texts)} held-out lines, "
          f"{time.perf_counter() - started:.0f} s):")
    for k, v in ratios.items():
        target = targets[k]
        verdict = ""
        if target is not None:
            op, t = target
            verdict = f"target {op} {t:g}  {'✓' if (v >= t if op == '>=' else v <= t) else '✗'}"
        print(f"  {k:58} {v:9.2f}   {verdict}")
    for model, key in (("gpt", "gpt_score"), ("bert", "bert_fill")):  # what the Python of one text costs outside ORT
        per_text_us = 1e6 * (1 / rates[key + "_full"]["items_per_s"] - 1 / rates[key]["items_per_s"])
        print(f"  ({model}: tokenization and the response take {per_text_us:.0f} µs of the raw loop per text)")
    pairs = {k: [ok(k + rep) / ok(base + rep) for rep in reps] for k, base in
             (("gpt_score_unbatched", "gpt_score"), ("gpt_score_spinning", "gpt_score"))}
    print("  (alternated rounds, off ÷ on: " + "; ".join(f"{k} " + ", ".join(f"{1 / x:.2f}" for x in v)
                                                          for k, v in pairs.items()) + ")")
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
    args.out.write_text(json.dumps({"texts": len(texts), "text_source": "corpus test split, 3+ words, fits windows",
                                    "raw": rates, "raw_nnlm_next_ms": {
        "p50": float(np.percentile(raw_nnlm, 50)), "p99": float(np.percentile(raw_nnlm, 99))},
        "served": slim, "ratios": ratios, "targets": targets, "cpu_count": os.cpu_count()}, indent=1) + "\n")
    plot(served, rates, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


def plot(served: dict[str, Any], raw: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    x = np.arange(2)
    bars = [("raw ORT", [raw["gpt_score"]["items_per_s"], raw["bert_fill"]["items_per_s"]]),
            ("raw with tokenization + response", [raw["gpt_score_full"]["items_per_s"],
                                                  raw["bert_fill_full"]["items_per_s"]]),
            ("served, conc 64, 1 text/request", [served["gpt_score"]["texts_per_s"],
                                                 served["bert_fill"]["texts_per_s"]]),
            ("served by workers, 1 text/request", [served["gpt_score_workers"]["texts_per_s"],
                                                   served["bert_fill_workers"]["texts_per_s"]]),
            ("served, 8 texts/request", [served["gpt_score_x8"]["texts_per_s"], served["bert_fill_x8"]["texts_per_s"]])]
    w = 0.8 / (len(bars) + 1)
    for k, (label, values) in enumerate(bars):
        a.bar(x + k * w, values, w, label=label)
    a.bar(x[:1] + len(bars) * w, [served["gpt_score_unbatched"]["texts_per_s"]], w, label="served, batching off")
    a.set_xticks(x + 0.4 - w / 2, ["GPT Score", "BERT FillMask"])
    a.set_ylabel("sequences / s")
    a.legend(fontsize=7)
    a.set_title(f"throughput (raw: batches of {BATCH_CAP})")
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
