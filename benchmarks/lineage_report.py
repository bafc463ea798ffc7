"""The lineage side by side: held-out figures of every model in a repository, as a table and a JSON file.

    python benchmarks/lineage_report.py [--repository repository] [--out results/lineage.json]

Reads each model's manifest (written by `plm build`): per-word perplexity on the same held-out text for the
language models (n-gram, NNLM, ELMo's forward LM, GPT; `</s>` counted, OOV words scored as <unk> by the
word-level models), BERT's masked-LM top-1/top-5 accuracy and NSP accuracy, word2vec's word-similarity and
analogy scores, and what each model cost to train. Writes the JSON and a PNG of the language models'
held-out perplexity.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from _smoke import add_smoke_flag, bar_plot, run  # this folder is on sys.path when run as a script

FIGURES = (
    ("test_word_perplexity", "test ppl/word", "{:.1f}"),
    ("test_mlm_top1", "MLM top-1", "{:.3f}"),
    ("test_mlm_top5", "MLM top-5", "{:.3f}"),
    ("test_nsp_accuracy", "NSP acc", "{:.3f}"),
    ("wordsim353_spearman", "WS353 ρ", "{:.3f}"),
    ("simlex999_spearman", "SimLex ρ", "{:.3f}"),
    ("analogy_accuracy", "analogy", "{:.3f}"),
)


def collect(repository: Path) -> list[dict[str, Any]]:
    rows = []
    for manifest in sorted(repository.glob("*/manifest.json")):
        m = json.loads(manifest.read_text(encoding="utf-8"))
        ev, tr = m.get("evaluation") or {}, m.get("training") or {}
        rows.append({
            "model": m["name"], "family": m["family"], "description": m.get("description", ""),
            "train_seconds": tr.get("seconds"), "parity_max_abs_diff": (m.get("parity") or {}).get("max_abs_diff"),
            **{key: ev.get(key) for key, _, _ in FIGURES},
        })
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repository", type=Path, default=Path("repository"))
    ap.add_argument("--out", type=Path, default=Path("results/lineage.json"))
    add_smoke_flag(ap)  # nothing to shrink: the report reads manifests
    args = ap.parse_args()
    rows = collect(args.repository)
    if not rows:
        raise SystemExit(f"no models in {args.repository}: run `plm build` first")
    head = f"{'model':18} {'train s':>8} " + " ".join(f"{label:>13}" for _, label, _ in FIGURES)
    print(head)
    for r in rows:
        cells = [fmt.format(r[key]) if isinstance(r[key], int | float) else "-" for key, _, fmt in FIGURES]
        secs = f"{r['train_seconds']:.1f}" if isinstance(r["train_seconds"], int | float) else "-"
        print(f"{r['model']:18} {secs:>8} " + " ".join(f"{c:>13}" for c in cells))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"repository": str(args.repository), "models": rows}, indent=2) + "\n")
    ppl = {r["model"]: r["test_word_perplexity"] for r in rows if isinstance(r["test_word_perplexity"], int | float)}
    bar_plot(args.out.with_suffix(".png"), ppl, "held-out perplexity per word", f"language models in {args.repository}",
             log=True)
    print(f"\nwritten to {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    run(main)
