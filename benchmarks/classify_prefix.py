"""Classify's prefix reuse, cold and warm, against whole sequences (docs/benchmarks.md, "Classify: prefix reuse").

    python benchmarks/classify_prefix.py [--repository repository] [--model gpt] [--rounds 8]
                                         [--out results/classify_prefix.json]

One `Classify` call: `--shots` demonstrations × 4 labels × 16 queries (template "{text} = {label}\\n"), the lines
drawn from the corpus's test split (`serving.held_out_texts`, those short enough for every line of the prompt
to fit the model's window). Three servers of the one model, running side by side, answer the same calls:

- `prefix`: the default — the engine runs the demonstrations once and keeps their keys and values in its prefix
  cache; each (query, label) then runs from them;
- `whole`: the same engine server with `prefix_reuse = false`: every (query, label) as one whole sequence
  through the batcher;
- `recompute`: no engine (`kv_cache = false`): whole sequences too.

Each round takes demonstrations no earlier call used, and times on each server in turn:

- **cold**: the first call with them — the prefix is not in the cache (checked: the server's
  `plm_prefix_cache_lookups{result="miss"}` moves on `prefix`, and no lookup at all on the others);
- **warm**: the same call `--repeats` more times — the prefix cached (checked: hits, no miss); their median.

Before the rounds every server answers one call with other demonstrations, so its graphs have run and cold
measures the cache alone; that first call of each server is reported too (`first_call_after_start`). Prints
the medians over the rounds and the ratios (whole-sequence time ÷ prefix time, cold and warm), and writes the
JSON and a PNG.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import random
import re
import statistics
import time
from pathlib import Path
from typing import Any

from _smoke import add_smoke_flag, bar_plot, run  # this folder is on sys.path when run as a script
from plm.client.client import PlmClient
from plm.client.loadtest import scrape
from plm.client.local_server import LocalServer
from serving import held_out_texts
from tokenizers import Tokenizer

from plm.api.v1 import plm_pb2 as pb

LABELS = ["comedy", "tragedy", "history", "poetry"]
QUERIES = 16
TEMPLATE = "{text} = {label}\n"
MODES = {"prefix": {"PLM_RUNTIME__KV_CACHE": "true", "PLM_RUNTIME__PREFIX_REUSE": "true"},
         "whole": {"PLM_RUNTIME__KV_CACHE": "true", "PLM_RUNTIME__PREFIX_REUSE": "false"},
         "recompute": {"PLM_RUNTIME__KV_CACHE": "false"}}


def lookups(metrics_url: str, model: str) -> dict[str, float]:
    """The server's prefix-cache lookups so far, by result (hit, miss)."""
    found = {"hit": 0.0, "miss": 0.0}
    pattern = re.compile(r'^plm_prefix_cache_lookups_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$', re.M)
    for m in pattern.finditer(scrape(metrics_url)):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m["labels"]))
        if labels.get("model") == model and labels.get("result") in found:
            found[labels["result"]] += float(m["value"])
    return found


class Caller:
    """One server: timed Classify calls, each checked against what its prefix cache did."""

    def __init__(self, mode: str, server: LocalServer, model: str) -> None:
        self.mode, self.server, self.model = mode, server, model
        self.client = PlmClient(server.target, timeout=600)

    def call(self, request: pb.ClassifyRequest, expect: str | None) -> tuple[float, int]:
        """Seconds of one call and its prefix's tokens; `expect` is the prefix cache's answer on `prefix`
        ("miss" or "hit"), None for a call not checked."""
        assert self.server.metrics_url is not None
        before = lookups(self.server.metrics_url, self.model)
        started = time.perf_counter()
        response = self.client.stub.Classify(request)
        seconds = time.perf_counter() - started
        after = lookups(self.server.metrics_url, self.model)
        moved = {k: after[k] - before[k] for k in after}
        if expect is not None and self.mode == "prefix":
            other = "hit" if expect == "miss" else "miss"
            if moved[expect] < 1 or (expect == "hit" and moved[other]):
                raise AssertionError(f"{self.mode}: a call meant to {expect} the prefix cache moved {moved}")
        elif expect is not None and any(moved.values()):
            raise AssertionError(f"{self.mode}: whole sequences looked the prefix cache up: {moved}")
        return seconds, response.prefix_tokens


def request(model: str, demos: list[str], queries: list[str]) -> pb.ClassifyRequest:
    return pb.ClassifyRequest(model=model, labels=LABELS, queries=queries, template=TEMPLATE,
                              demonstrations=[pb.Demonstration(text=t, label=LABELS[i % len(LABELS)])
                                              for i, t in enumerate(demos)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repository", type=Path, default=Path("repository"))
    ap.add_argument("--model", default="gpt")
    ap.add_argument("--shots", type=int, default=8, help="demonstrations per call")
    ap.add_argument("--rounds", type=int, default=8, help="rounds, each with demonstrations of its own")
    ap.add_argument("--repeats", type=int, default=3, help="warm calls per round and server")
    ap.add_argument("--out", type=Path, default=Path("results/classify_prefix.json"))
    add_smoke_flag(ap)
    args = ap.parse_args()
    if args.smoke:  # a tiny model's window holds one demonstration
        args.shots, args.rounds, args.repeats = 1, 1, 1
    # Lines short enough that the demonstrations and a query, each with the template's label part, fit the
    # model's window after the BOS.
    manifest = json.loads((args.repository / args.model / "manifest.json").read_text())
    tok = Tokenizer.from_file(str(args.repository / args.model / manifest["tokenizer"]["file"]))
    label_tokens = max(len(tok.encode(TEMPLATE.format(text="", label=label), add_special_tokens=False).ids)
                       for label in LABELS)
    room = (int(manifest["max_length"]) - 1) // (args.shots + 1) - label_tokens - 1  # 1: joined, a token can split
    lines = [t for t in held_out_texts(args.repository, fit=(args.model,))
             if len(tok.encode(t, add_special_tokens=False).ids) <= room]
    queries = lines[::max(1, len(lines) // QUERIES)][:QUERIES]  # evenly spaced; the demonstrations shuffled
    pool = [t for t in lines if t not in set(queries)]
    random.Random(0).shuffle(pool)
    needed = (args.rounds + 1) * args.shots
    if len(pool) < needed:
        raise SystemExit(f"{len(pool)} short held-out lines for {needed} demonstrations: fewer rounds or shots")
    demos = [pool[k * args.shots:(k + 1) * args.shots] for k in range(args.rounds + 1)]  # [0]: the warm-up's

    with concurrent.futures.ThreadPoolExecutor(len(MODES)) as pool_:  # the three start side by side
        started = {mode: pool_.submit(LocalServer, args.repository, [args.model], env, metrics=True)
                   for mode, env in MODES.items()}
        servers = {mode: f.result() for mode, f in started.items()}
    callers = {mode: Caller(mode, srv, args.model) for mode, srv in servers.items()}
    times: dict[str, dict[str, list[float]]] = {mode: {"cold": [], "warm": []} for mode in MODES}
    first: dict[str, float] = {}
    prefix_tokens = 0
    try:
        for mode, c in callers.items():  # the first call of each fresh server, then its graphs have run
            first[mode], _ = c.call(request(args.model, demos[0], queries), None)
        for r in range(1, args.rounds + 1):
            req = request(args.model, demos[r], queries)
            for mode, c in callers.items():  # alternated: each round on every server in turn
                seconds, prefix_tokens = c.call(req, "miss")
                times[mode]["cold"].append(seconds)
                warm = [c.call(req, "hit")[0] for _ in range(args.repeats)]
                times[mode]["warm"].append(statistics.median(warm))
            print(f"round {r}: " + "; ".join(f"{m} cold {1e3 * t['cold'][-1]:.1f} warm {1e3 * t['warm'][-1]:.1f} ms"
                                             for m, t in times.items()), flush=True)
    finally:
        for c in callers.values():
            c.client.close()
        for srv in servers.values():
            srv.stop()

    median = {mode: {k: statistics.median(v) for k, v in t.items()} for mode, t in times.items()}
    ratios = {
        **{f"{base}_vs_prefix_{state}": median[base][state] / median["prefix"][state]
           for state in ("cold", "warm") for base in ("recompute", "whole")},
        "prefix_cold_vs_warm": median["prefix"]["cold"] / median["prefix"]["warm"],
    }
    print(f"\n{args.model}: Classify of {args.shots} demonstrations ({prefix_tokens} prefix tokens) × {len(LABELS)} "
          f"labels × {len(queries)} queries, median of {args.rounds} rounds (warm: median of {args.repeats} calls)")
    for mode, m in median.items():
        print(f"  {mode:9} cold {1e3 * m['cold']:7.1f} ms   warm {1e3 * m['warm']:7.1f} ms   "
              f"(first call after start {1e3 * first[mode]:.1f} ms)")
    for k, v in ratios.items():
        print(f"  {k:28} {v:6.2f}×")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"model": args.model, "shots": args.shots, "labels": len(LABELS),
                              "queries": len(queries), "prefix_tokens": prefix_tokens, "rounds": args.rounds,
                              "repeats": args.repeats, "seconds": times, "median_seconds": median,
                              "first_call_after_start_seconds": first, "ratios": ratios}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    bar_plot(args.out.with_suffix(".png"), {f"{mode} {state}": 1e3 * m[state] for mode, m in median.items()
                                            for state in ("cold", "warm")},
             "ms per Classify call (median)", "Classify: prefix reuse vs whole sequences, cold and warm")
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    run(main)
