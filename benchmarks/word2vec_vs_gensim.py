"""Our word2vec (models/word2vec.py) against gensim's, the outside oracle: same sentences, same
hyper-parameters, same evaluation code, for CBOW and skip-gram.

    .venv/bin/python benchmarks/word2vec_vs_gensim.py [--profile small | --repository R] [--epochs 5]
                                                      [--seeds 1 2 3]

Evaluation: WordSim-353 and SimLex-999 (Spearman, coverage) and Google's analogies (3CosAdd accuracy,
coverage), all through `models.word2vec.evaluate_all`. Before comparing, the script checks that this code
gives gensim's own `evaluate_word_pairs` / `evaluate_word_analogies` numbers on gensim's vectors. Prints a
table with ours/gensim ratios and training times; writes results/word2vec_vs_gensim.json and a PNG of the
ratios. `--repository` takes the profile a built repository was made with (its corpus.json's document count).

On the default corpus (~1M words of mostly Shakespeare) these scores are small and a seed moves them by
~0.01, as much as the difference between the two implementations: pass several seeds, and the table
shows the mean over seeds (the JSON keeps every run).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _smoke import add_smoke_flag, bar_plot, run  # noqa: E402 — this folder is on sys.path as a script's
from plm.data.corpus import fetch_eval_sets  # noqa: E402
from plm.export.build import PROFILES, prepare_data  # noqa: E402 — after the path set-up above
from plm.models.word2vec import Word2Vec, Word2VecConfig, evaluate_all  # noqa: E402

METRICS = ("wordsim353_spearman", "simlex999_spearman", "analogy_accuracy")


def gensim_self_check(model: Any, eval_sets: dict[str, Path], ours: dict[str, float]) -> dict[str, float]:
    """|our evaluation − gensim's own| on gensim's vectors, per metric (should be ~0)."""
    wv = model.wv
    ws = wv.evaluate_word_pairs(str(eval_sets["wordsim353"]))
    sl = wv.evaluate_word_pairs(str(eval_sets["simlex999"]))
    an, _ = wv.evaluate_word_analogies(str(eval_sets["questions-words"]))
    theirs = {"wordsim353_spearman": float(ws[1].statistic), "simlex999_spearman": float(sl[1].statistic),
              "analogy_accuracy": float(an),
              "wordsim353_coverage": 1 - ws[2] / 100, "simlex999_coverage": 1 - sl[2] / 100}
    return {k: abs(v - ours[k]) for k, v in theirs.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="small", choices=sorted(PROFILES))
    ap.add_argument("--repository", type=Path, help="use the profile this built repository was made with")
    ap.add_argument("--cache", type=Path, default=ROOT / "cache")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1])
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "word2vec_vs_gensim.json")
    add_smoke_flag(ap)
    args = ap.parse_args(argv)
    if args.repository:
        used = json.loads((args.repository / "corpus.json").read_text())["documents"]["max_documents"]
        args.profile = next(name for name, p in PROFILES.items() if p.max_documents == used)
    if args.smoke:
        args.profile, args.epochs, args.seeds = "tiny", 1, [1]

    from gensim.models import Word2Vec as GensimWord2Vec

    data = prepare_data(PROFILES[args.profile], None, args.cache, 0)
    sentences = data.words["train"]
    eval_sets = fetch_eval_sets(args.cache)
    params = {"vector_size": 100, "window": 5, "min_count": 5, "sample": 1e-3, "negative": 5,
              "epochs": args.epochs}
    results: dict[str, Any] = {"profile": args.profile, "params": params, "gensim_workers": 2, "seeds": args.seeds,
                               "train_sentences": len(sentences), "train_words": sum(len(s) for s in sentences),
                               "models": {}}
    for arch, sg in (("cbow", False), ("skipgram", True)):
        runs: dict[str, list[dict[str, float]]] = {"ours": [], "gensim": []}
        check = 0.0
        for seed in args.seeds:
            started = time.perf_counter()
            theirs = GensimWord2Vec(sentences, sg=int(sg), workers=2, seed=seed, **params)
            gensim_seconds = time.perf_counter() - started
            gensim_eval = evaluate_all(theirs.wv.get_normed_vectors(), theirs.wv.index_to_key, eval_sets)
            check = max(check, *gensim_self_check(theirs, eval_sets, gensim_eval).values())
            runs["gensim"].append({**gensim_eval, "seconds": gensim_seconds, "vocab": len(theirs.wv), "seed": seed})
            ours = Word2Vec.train_on(sentences, Word2VecConfig(sg=sg, seed=seed, **params))
            ours_eval = evaluate_all(ours.normalized(), ours.vocab, eval_sets)
            runs["ours"].append({**ours_eval, "seconds": ours.stats.seconds, "vocab": len(ours.vocab), "seed": seed,
                                 "pairs_per_second": ours.stats.pairs_per_second})
        mean = {who: {k: float(np.mean([r[k] for r in rs])) for k in rs[0] if k != "seed"}
                for who, rs in runs.items()}
        results["models"][arch] = {
            **mean,
            "std": {who: {m: float(np.std([r[m] for r in rs])) for m in METRICS} for who, rs in runs.items()},
            "ratio": {m: mean["ours"][m] / mean["gensim"][m] if mean["gensim"][m] else math.nan for m in METRICS},
            "runs": runs,
            "evaluation_matches_gensim_max_abs_diff": check,
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")

    print(f"\n{len(sentences):,} sentences, {results['train_words']:,} words; {params}; seeds {args.seeds}")
    print(f"{'model':9} {'metric':20} {'ours':>8} {'(std)':>7} {'gensim':>8} {'(std)':>7} {'ratio':>6} {'coverage':>9}")
    for arch, r in results["models"].items():
        for m in METRICS:
            cov = r["ours"][m.rsplit("_", 1)[0] + "_coverage"]
            print(f"{arch:9} {m:20} {r['ours'][m]:8.4f} {r['std']['ours'][m]:7.4f} {r['gensim'][m]:8.4f} "
                  f"{r['std']['gensim'][m]:7.4f} {r['ratio'][m]:6.2f} {cov:9.1%}")
        print(f"{arch:9} {'train seconds':20} {r['ours']['seconds']:8.1f} {r['gensim']['seconds']:8.1f} "
              f"{r['ours']['seconds'] / r['gensim']['seconds']:6.1f}")
        print(f"{arch:9} our evaluation vs gensim's own on gensim's vectors: max |diff| "
              f"{r['evaluation_matches_gensim_max_abs_diff']:.2g}")
    bar_plot(args.out.with_suffix(".png"), {f"{arch} {m}": r["ratio"][m] for arch, r in results["models"].items()
                                            for m in METRICS}, "ours ÷ gensim", f"word2vec, {args.profile} corpus")
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    run(main)
