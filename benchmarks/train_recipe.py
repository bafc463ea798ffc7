"""GPT training recipes side by side: tokens/s and held-out loss at equal wall time, in one run.

    python benchmarks/train_recipe.py [--seconds 120] [--threads 2] [--recipes old new]
                                      [--out results/train_recipe.json]

Each recipe is a tokenizer vocabulary, a batch shape, a learning-rate schedule and a thread count for the
`small` profile's GPT (4 layers × 128; export/build.py). `old` is the recipe the default build used before
fixed step counts; `new` is the one it uses now (read from export/build.py's profile, so the two cannot
drift); the others are candidates. The script

1. probes throughput: a few steps of each recipe in turn, several rounds (alternated, so a neighbour's load
   on a shared machine falls on every recipe alike), and takes each recipe's median step time;
2. trains every recipe for the same `--seconds` of its own step time, again alternated in short slices,
   with its schedule laid out over the steps the probe says fit in that time;
3. scores each on the same held-out sentences as per-word perplexity (tokenizers differ, so per-token loss
   would not compare), at a few points of the run and at the end.

Prints tokens/s, words/s and the held-out per-word perplexity of each recipe with its ratio to `old`, and
writes the JSON and a PNG of held-out per-word loss against training seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from _smoke import add_smoke_flag, run  # this folder is on sys.path when run as a script


@dataclass(frozen=True)
class Recipe:
    name: str
    bpe_vocab: int
    block_size: int
    batch_size: int
    lr: float
    warmup_fraction: float  # warm-up steps as a share of the planned steps


def recipes(smoke: bool) -> dict[str, Recipe]:
    from plm.export.build import PROFILES

    g = PROFILES["tiny" if smoke else "small"].gpt
    current = Recipe("new", g.bpe_vocab, g.block_size, g.batch_size, g.lr, g.warmup_steps / g.max_steps)
    if smoke:
        return {"old": Recipe("old", 512, 32, 8, 3e-3, 0.1), "new": current}
    return {
        # Before fixed steps: 100 warm-up steps, then a cosine over a 2-minute budget (160 steps on a 2-core build).
        "old": Recipe("old", 8000, 128, 32, 2e-3, 100 / 160),
        "new": current,
        "vocab8k-short-warmup": Recipe("vocab8k-short-warmup", 8000, 128, 32, 2e-3, 0.05),
        "vocab2k": Recipe("vocab2k", 2048, 128, 32, 2e-3, 0.05),
        "vocab4k-b16": Recipe("vocab4k-b16", 4096, 128, 16, 2e-3, 0.05),
    }


class Run:
    """One recipe's tokenizer, model, optimiser and batch sampler, trained a slice at a time."""

    def __init__(self, recipe: Recipe, data: Any, shape: Any, seed: int, eval_sentences: int) -> None:
        import torch
        from plm.models import tokenization
        from plm.models.gpt import GPT, GPTConfig
        from plm.models.train import lm_batches

        self.recipe = recipe
        self.tok = tokenization.train_bpe_tokenizer(data.corpus.train, vocab_size=recipe.bpe_vocab)
        eot = self.tok.token_to_id(tokenization.ENDOFTEXT)
        assert eot is not None, "train_bpe_tokenizer always adds <|endoftext|>"

        def stream(sentences: list[str]) -> np.ndarray:
            ids: list[int] = [eot]
            for enc in self.tok.encode_batch(sentences, add_special_tokens=False):
                ids.extend([*enc.ids, eot])
            return np.asarray(ids, dtype=np.int32)

        self.streams = {"train": stream(data.corpus.train), "valid": stream(data.corpus.valid)}
        words = sum(len(s) for s in data.words["train"])
        self.tokens_per_word = len(self.streams["train"]) / max(1, words)
        self.eval_text = data.corpus.valid[:eval_sentences]
        self.eval_words = data.words["valid"][:eval_sentences]
        self.config = GPTConfig(vocab_size=self.tok.get_vocab_size(), block_size=recipe.block_size,
                                n_layer=shape.n_layer, n_head=shape.n_head, n_embd=shape.n_embd, dropout=0.0)
        self.seed = seed
        self.batches = lm_batches
        torch.manual_seed(seed)
        self.model = GPT(self.config)
        self.reset(planned_steps=1)

    def reset(self, planned_steps: int) -> None:
        """A fresh model (same seed), optimiser and sampler, with the schedule laid out over `planned_steps`."""
        import torch
        from plm.models.gpt import GPT
        from plm.models.train import TrainConfig, make_optimizer

        r = self.recipe
        torch.manual_seed(self.seed)
        self.model = GPT(self.config)
        self.model.train()
        self.cfg = TrainConfig(max_steps=planned_steps, batch_size=r.batch_size, lr=r.lr, min_lr=r.lr / 10,
                               warmup_steps=max(1, round(r.warmup_fraction * planned_steps)))
        self.optimizer = make_optimizer(self.model, self.cfg)
        self.get_batch = self.batches(self.streams, r.block_size, r.batch_size, np.random.default_rng(self.seed))
        self.step = 0
        self.seconds = 0.0  # training time only (evaluations excluded)
        self.curve: list[tuple[float, int, float]] = []  # (train seconds, step, held-out loss per word)

    def train_for(self, seconds: float, steps: int | None = None) -> list[float]:
        """Steps until `seconds` have passed, `steps` were taken or the plan is done; returns each step's time."""
        import torch.nn as nn
        from plm.models.train import lr_at

        times: list[float] = []
        started = time.perf_counter()
        stop = self.cfg.max_steps if steps is None else min(self.cfg.max_steps, self.step + steps)
        while self.step < stop and time.perf_counter() - started < seconds:
            t0 = time.perf_counter()
            for group in self.optimizer.param_groups:
                group["lr"] = lr_at(self.step, self.cfg)
            x, y = self.get_batch("train")
            _, loss = self.model(x, targets=y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            self.optimizer.step()
            self.step += 1
            times.append(time.perf_counter() - t0)
        self.seconds += sum(times)
        return times

    def held_out_loss(self) -> float:
        """ln(per-word perplexity) on the evaluation sentences; leaves the model in train mode."""
        from plm.export.build import gpt_word_perplexity

        ppl = gpt_word_perplexity(self.model, self.tok, self.eval_text, self.eval_words)
        self.model.train()
        return math.log(ppl)

    @property
    def tokens_per_step(self) -> int:
        return self.recipe.batch_size * self.recipe.block_size


def plot(path: Path, runs: dict[str, Run]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, r in runs.items():
        ax.plot([s for s, _, _ in r.curve], [v for _, _, v in r.curve], marker=".", label=name)
    ax.set_xlabel("training seconds (own step time)")
    ax.set_ylabel("held-out loss per word (nats)")
    ax.set_title("GPT recipes at equal wall time")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=120.0, help="training time per recipe")
    ap.add_argument("--threads", type=int, default=2, help="torch threads, the same for every recipe")
    ap.add_argument("--recipes", nargs="*", help="names to run (default: all); `old` is always run")
    ap.add_argument("--probe-rounds", type=int, default=5)
    ap.add_argument("--eval-sentences", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", type=Path, default=Path("cache"))
    ap.add_argument("--repository", type=Path, help="unused: the script trains its own models")
    ap.add_argument("--out", type=Path, default=Path("results/train_recipe.json"))
    add_smoke_flag(ap)
    args = ap.parse_args()
    import torch
    from plm.export.build import PROFILES, prepare_data

    if args.smoke:  # every phase still runs: probe, two slices per recipe, held-out loss at each point
        args.seconds, args.probe_rounds, args.eval_sentences = 0.2, 1, 8
    torch.set_num_threads(args.threads)
    profile = PROFILES["tiny" if args.smoke else "small"]
    data = prepare_data(profile, None, args.cache, args.seed)
    chosen = recipes(args.smoke)
    names = ["old", *(n for n in (args.recipes or chosen) if n != "old")]
    runs = {n: Run(chosen[n], data, profile.gpt, args.seed, args.eval_sentences) for n in names}

    probe_steps = 2 if args.smoke else 4
    step_times: dict[str, list[float]] = {n: [] for n in runs}
    for _ in range(args.probe_rounds):
        for n, r in runs.items():
            r.reset(planned_steps=1000)
            step_times[n].extend(r.train_for(math.inf, steps=probe_steps)[1:])  # a fresh model's 1st step: caches
    step_seconds = {n: statistics.median(t) for n, t in step_times.items()}
    for n, r in runs.items():
        r.reset(planned_steps=max(10, int(args.seconds / step_seconds[n])))

    slice_seconds = args.seconds / (2 if args.smoke else 8)
    for r in runs.values():
        r.curve.append((0.0, 0, r.held_out_loss()))
    while any(r.step < r.cfg.max_steps and r.seconds < args.seconds for r in runs.values()):
        for r in runs.values():
            if r.step < r.cfg.max_steps and r.seconds < args.seconds:
                r.train_for(min(slice_seconds, args.seconds - r.seconds))
                r.curve.append((r.seconds, r.step, r.held_out_loss()))

    rows: dict[str, dict[str, Any]] = {}
    for n, r in runs.items():
        tokens_s = r.tokens_per_step / step_seconds[n]
        rows[n] = {"recipe": asdict(r.recipe), "step_seconds": step_seconds[n], "tokens_per_second": tokens_s,
                   "tokens_per_word": r.tokens_per_word, "words_per_second": tokens_s / r.tokens_per_word,
                   "planned_steps": r.cfg.max_steps, "steps": r.step, "train_seconds": r.seconds,
                   "held_out_word_perplexity": math.exp(r.curve[-1][2]), "curve": r.curve}
    old = rows["old"]
    print(f"{'recipe':22} {'tokens/s':>9} {'words/s':>9} {'ratio':>6} {'steps':>11} {'ppl/word':>9} {'ratio':>6}")
    for n, row in rows.items():
        row["words_per_second_ratio"] = row["words_per_second"] / old["words_per_second"]
        row["perplexity_ratio"] = row["held_out_word_perplexity"] / old["held_out_word_perplexity"]
        print(f"{n:22} {row['tokens_per_second']:9,.0f} {row['words_per_second']:9,.0f} "
              f"{row['words_per_second_ratio']:6.2f} {row['steps']:>5}/{row['planned_steps']:<5} "
              f"{row['held_out_word_perplexity']:9.1f} {row['perplexity_ratio']:6.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"seconds_per_recipe": args.seconds, "threads": args.threads, "smoke": args.smoke,
            "eval_sentences": len(next(iter(runs.values())).eval_text), "model": asdict(profile.gpt)}
    args.out.write_text(json.dumps({**meta, "recipes": rows}, indent=2) + "\n")
    plot(args.out.with_suffix(".png"), runs)
    print(f"\nwritten to {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    run(main)
