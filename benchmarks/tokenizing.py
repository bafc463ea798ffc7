"""Tokenizing on the event loop: each family's `encode` with and without the plain-text shortcut.

    python benchmarks/tokenizing.py [--repository repository] [--out results/tokenizing.json]

For every model of the repository with a tokenizer, times the tokenizer's own work on the held-out lines the
serving benchmark sends (`benchmarks/serving.py`), the way the served adapter does it: the whole tokenizer
(normalizer included) against the shortcut (`service/families/textnorm.py`: text the normalizer provably
leaves unchanged goes to a copy of the tokenizer without it, or skips `normalize_str` and, for word models, the
pre-tokenizer: `plain_text_splitter`). Best of 5 passes over
the lines; checks that both give the same ids (or words). Prints µs per line and the ratio, and writes the JSON
and a PNG of the ratios.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _smoke import add_smoke_flag, bar_plot, run  # this folder is on sys.path when run as a script
from plm.service.families.textnorm import PlainTextEncoder, plain_text_shortcut
from plm.service.families.words import PlainText, split_words
from serving import held_out_texts  # this folder is on sys.path when run as a script
from tokenizers import Tokenizer


def _ids(out: Any) -> Any:
    """An Encoding's ids, or the words themselves."""
    return getattr(out, "ids", out)


def best_us(fn: Callable[[str], Any], texts: list[str], passes: int = 5) -> float:
    best = float("inf")
    for _ in range(passes):
        started = time.perf_counter()
        for t in texts:
            fn(t)
        best = min(best, time.perf_counter() - started)
    return 1e6 * best / len(texts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repository", type=Path, default=Path("repository"))
    ap.add_argument("--out", type=Path, default=Path("results/tokenizing.json"))
    add_smoke_flag(ap)
    args = ap.parse_args()
    texts = held_out_texts(args.repository, 32 if args.smoke else None)
    passes = 1 if args.smoke else 5
    rows: dict[str, Any] = {}
    for manifest_path in sorted(args.repository.glob("*/manifest.json")):
        manifest = json.loads(manifest_path.read_text())
        spec = manifest.get("tokenizer") or {}
        if "file" not in spec:
            continue
        tok = Tokenizer.from_file(str(manifest_path.parent / spec["file"]))
        shortcut = plain_text_shortcut(tok)
        if shortcut is None:
            print(f"{manifest_path.parent.name:18} no shortcut (a normalizer step it cannot vouch for)")
            continue
        full: Callable[[str], Any]
        fast: Callable[[str], Any]
        if manifest.get("family") in ("gpt", "bert"):  # the adapters' encoder, and the tokenizer as it is
            encoder = PlainTextEncoder(tok)
            full = functools.partial(tok.encode, add_special_tokens=False)
            fast = encoder.encode
        else:  # word models: normalise, then split into words, with and without the shortcut
            full = functools.partial(split_words, tok)
            fast = functools.partial(split_words, tok, plain=PlainText(tok))
        assert all(_ids(full(t)) == _ids(fast(t)) for t in texts), manifest_path.parent.name
        row = {"lines": len(texts), "plain_lines": sum(shortcut(t) is not None for t in texts),
               "full_us": best_us(full, texts, passes), "shortcut_us": best_us(fast, texts, passes)}
        row["full_vs_shortcut"] = row["full_us"] / row["shortcut_us"]
        rows[manifest_path.parent.name] = row
        print(f"{manifest_path.parent.name:18} {row['full_us']:6.1f} → {row['shortcut_us']:6.1f} µs per line "
              f"({row['full_vs_shortcut']:.2f}×; {row['plain_lines']}/{row['lines']} lines plain)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")
    bar_plot(args.out.with_suffix(".png"), {k: r["full_vs_shortcut"] for k, r in rows.items()},
             "whole tokenizer ÷ shortcut (time per line)", "the plain-text shortcut")
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    run(main)
