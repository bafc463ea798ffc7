"""Few-shot in-context classification on real labels: which kind of Shakespeare work a line comes from.

    python benchmarks/icl_genre.py [--target 127.0.0.1:50051 | --repository repository] [--model gpt]
                                   [--queries 120] [--shots 0 4 8]

Labels are the genres of the Folio tradition (comedy — romances included —, tragedy, history) plus poetry
for the poems. Queries are lines of 4–8 words from the works held out of training (the corpus's own
document split), balanced over the genres those works have; demonstrations are lines from training works,
balanced over the genres. The template is compact ("{text} = {label}") because the default GPT's window is
128 tokens. For each number of shots, the accuracy of `Classify` (plain and calibrated) is printed beside
the majority-class baseline and written to results/icl_genre.json (and a PNG). A prompt that does not fit
the model's window is reported, not run. `--repository` starts `plm serve` over that repository instead of
calling `--target`.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import grpc
from _smoke import add_smoke_flag, run  # this folder is on sys.path when run as a script
from plm.client.client import PlmClient
from plm.client.local_server import LocalServer
from plm.data import corpus as corpus_mod
from plm.data.downstream import GENRE_OF, GENRES

from plm.api.v1 import plm_pb2 as pb

LABELS = list(GENRES)


def lines(doc: corpus_mod.Document) -> list[str]:
    return [s for s in corpus_mod.split_sentences(doc.text) if 4 <= len(s.split()) <= 8]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="127.0.0.1:50051")
    ap.add_argument("--repository", type=Path, help="serve this repository (plm serve) instead of calling --target")
    ap.add_argument("--model", default="gpt")
    ap.add_argument("--cache-dir", type=Path, default=Path("cache"))
    ap.add_argument("--queries", type=int, default=120)
    ap.add_argument("--shots", type=int, nargs="+", default=[0, 4, 8])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("results/icl_genre.json"))
    add_smoke_flag(ap)
    args = ap.parse_args()
    if args.smoke:
        args.queries, args.shots = 8, [0, 1]
    rng = random.Random(args.seed)

    docs = [d for d in corpus_mod.load_documents(corpus_mod.fetch_default_sources(args.cache_dir))
            if d.source == "shakespeare"]
    train, valid, test = corpus_mod.split_documents(docs)
    held_out = {g: [s for d in valid + test if GENRE_OF[d.name] == g for s in lines(d)] for g in LABELS}
    present = [g for g in LABELS if held_out[g]]
    queries = []  # balanced over the genres the held-out works have, so the majority baseline stays low
    for g in present:
        rng.shuffle(held_out[g])
        queries += [(s, g) for s in held_out[g][: args.queries // len(present)]]
    rng.shuffle(queries)
    pool = {g: [s for d in train if GENRE_OF[d.name] == g for s in lines(d)] for g in LABELS}
    counts = {g: sum(1 for _, y in queries if y == g) for g in LABELS}
    majority = max(counts.values()) / len(queries)
    print(f"{len(queries)} held-out lines from {', '.join(d.name for d in valid + test)}; labels {counts}; "
          f"majority baseline {majority:.3f}")

    server = LocalServer(args.repository, [args.model]) if args.repository else None
    try:
        results = classify(server.target if server else args.target, args, queries, pool, majority, rng)
    finally:
        if server:
            server.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model, "queries": len(queries), "label_counts": counts,
                                    "majority_baseline": majority, "results": results}, indent=2) + "\n")
    plot(results, majority, args.model, args.out.with_suffix(".png"))
    print(f"written to {args.out} and {args.out.with_suffix('.png')}")


def classify(target: str, args: argparse.Namespace, queries: list[tuple[str, str]], pool: dict[str, list[str]],
             majority: float, rng: random.Random) -> list[dict[str, object]]:
    """Accuracy of Classify, plain and calibrated, for each number of shots; an RPC error is recorded as such."""
    results = []
    with PlmClient(target, timeout=600) as client:
        for k in args.shots:
            demos = [pb.Demonstration(text=rng.choice(pool[LABELS[i % len(LABELS)]]), label=LABELS[i % len(LABELS)])
                     for i in range(k)]
            rng.shuffle(demos)
            row: dict[str, object] = {"shots": k}
            for calibrate in (False, True):
                started = time.perf_counter()
                chosen: list[str] = []
                try:
                    for i in range(0, len(queries), 32):  # the server takes at most 64 inputs per request
                        resp = client.stub.Classify(pb.ClassifyRequest(
                            model=args.model, demonstrations=demos, labels=LABELS, calibrate=calibrate,
                            queries=[q for q, _ in queries[i: i + 32]], template="{text} = {label}\n"), timeout=600)
                        chosen += [r.label for r in resp.results]
                except grpc.RpcError as e:
                    row["calibrated" if calibrate else "plain"] = f"{e.code().name}: {e.details()}"
                    continue
                acc = sum(c == y for c, (_, y) in zip(chosen, queries, strict=True)) / len(queries)
                row["calibrated" if calibrate else "plain"] = acc
                row["prefix_tokens"] = resp.prefix_tokens
                row["seconds" + ("_calibrated" if calibrate else "")] = round(time.perf_counter() - started, 2)
            results.append(row)
            print(f"{k}-shot: accuracy {row.get('plain')}  calibrated {row.get('calibrated')}  "
                  f"(majority {majority:.3f}; prompt prefix {row.get('prefix_tokens', '-')} tokens)")
    return results


def plot(results: list[dict[str, object]], majority: float, model: str, path: Path) -> None:
    """Accuracy by shots, plain and calibrated (a prompt that did not fit has no point), and the baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for key, style in (("plain", "o-"), ("calibrated", "s--")):
        points = [(r["shots"], r[key]) for r in results if isinstance(r.get(key), float)]
        ax.plot([x for x, _ in points], [y for _, y in points], style, label=key)
    ax.axhline(majority, color="grey", linestyle=":", label="majority class")
    ax.set(xlabel="demonstrations", ylabel="accuracy", ylim=(0, 1), title=f"{model}: genre of a held-out line")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    run(main)
