"""RNN seq2seq with attention vs the Transformer encoder-decoder, trained on the same span-corruption data with the
same budget (steps, batch size, learning-rate schedule, seed), then measured on the same held-out corrupted test
sentences.

    python benchmarks/encdec_report.py [--profile small] [--steps 600] [--out results/encdec.json]

Prints and writes (JSON + PNG) per model: held-out span-infilling exact match (the greedy output equals the whole
target), token accuracy and per-token loss (teacher-forced), training tokens/s (target tokens per second of the
training loop, evaluations included), parameters, and the validation-loss curve. The notes' claim under test:
attention-only models train faster and do better than recurrent ones.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from _smoke import add_smoke_flag, run  # this folder is on sys.path when run as a script


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=("tiny", "small"), default="small", help="corpus slice and model sizes")
    ap.add_argument("--steps", type=int, default=None, help="training steps of each model (default: the profile's)")
    ap.add_argument("--cache-dir", type=Path, default=Path("cache"))
    ap.add_argument("--repository", type=Path, default=None, help="unused: the models are trained here")
    ap.add_argument("--out", type=Path, default=Path("results/encdec.json"))
    ap.add_argument("--seed", type=int, default=0)
    add_smoke_flag(ap)
    args = ap.parse_args()

    import numpy as np
    import torch
    from plm.export.build import PROFILES as BUILD_PROFILES
    from plm.export.build import prepare_data
    from plm.export.build_encdec import PROFILES, encode, special_tokens
    from plm.models import tokenization
    from plm.models.seq2seq import Seq2Seq, Seq2SeqConfig
    from plm.models.span_corruption import EncoderDecoder, held_out, infilling_figures, span_batches
    from plm.models.train import TrainConfig, train
    from plm.models.transformer import Transformer, TransformerConfig

    profile = "tiny" if args.smoke else args.profile
    p = PROFILES[profile]
    steps = 20 if args.smoke else (args.steps or p.max_steps)
    data = prepare_data(BUILD_PROFILES[profile], None, args.cache_dir, args.seed)
    tok = tokenization.train_encdec_tokenizer(data.corpus.train, vocab_size=p.vocab_size, sentinels=p.sentinels)
    specials = special_tokens(tok, p.sentinels)
    splits = {split: encode(tok, getattr(data.corpus, split)) for split in ("train", "valid", "test")}
    if sum(len(s) >= 2 for s in splits["valid"]) < 2:
        splits["valid"] = splits["train"]
    test = held_out(splits["test"], specials, p.max_tokens, args.seed + 1, 16 if args.smoke else p.eval_sentences)
    ids = {"pad_id": specials.pad, "bos_id": specials.bos, "eos_id": specials.eos,
           "first_sentinel": specials.first_sentinel, "sentinels": specials.sentinels}
    vocab = tok.get_vocab_size()
    makers: dict[str, Any] = {
        "transformer": lambda: Transformer(TransformerConfig(
            vocab_size=vocab, max_position=p.max_tokens + 1, n_encoder_layer=p.n_layer, n_decoder_layer=p.n_layer,
            n_head=p.n_head, d_model=p.d_model, d_ff=4 * p.d_model, **ids)),
        # One GRU layer each way at twice the width, so its parameters are of the Transformer's order (both printed).
        "rnn": lambda: Seq2Seq(Seq2SeqConfig(vocab_size=vocab, max_position=p.max_tokens + 1, n_layer=1,
                                             d_model=2 * p.d_model, **ids)),
    }
    rows: dict[str, dict[str, Any]] = {}
    out_dir = args.out.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, make in makers.items():
        torch.manual_seed(args.seed)
        model: EncoderDecoder = make()
        cfg = TrainConfig(max_steps=steps, batch_size=p.batch_size, lr=p.lr, min_lr=p.lr / 10,
                          warmup_steps=min(p.warmup_steps, steps // 5), eval_interval=max(1, steps // 10),
                          eval_batches=2 if args.smoke else 4, patience=None, seed=args.seed,
                          num_threads=p.num_threads, progress=not args.smoke)
        get_batch = span_batches(splits, p.batch_size, np.random.default_rng(args.seed), specials, p.max_tokens)
        started = time.perf_counter()
        result = train(model, get_batch, cfg, out_dir / f"encdec_{name}", desc=f"encdec-{name}")
        figures = infilling_figures(model, test, specials)
        rows[name] = {"parameters": model.num_params(), "steps": result.steps,
                      "train_tokens": result.tokens_seen, "train_seconds": round(result.seconds, 2),
                      "train_tokens_per_s": round(result.tokens_seen / max(result.seconds, 1e-9), 1),
                      "best_valid_loss": round(result.best_valid_loss, 4), **figures,
                      "valid_curve": [[s, round(v, 4)] for s, _, v in result.history],
                      "wall_seconds": round(time.perf_counter() - started, 2)}
    keys = ("parameters", "train_tokens_per_s", "loss_per_token", "token_accuracy", "exact_match")
    print(f"{'model':12} " + " ".join(f"{k:>18}" for k in keys))
    for name, r in rows.items():
        print(f"{name:12} " + " ".join(f"{r[k]:>18}" for k in keys))
    report = {"profile": profile, "steps": steps, "batch_size": p.batch_size, "seed": args.seed,
              "test_examples": len(test), "smoke": args.smoke, "models": rows}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot(rows, args.out.with_suffix(".png"), f"span corruption, {steps} steps × batch {p.batch_size} ({profile})")
    print(f"\nwritten to {args.out} and {args.out.with_suffix('.png')}")


def plot(rows: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    """Validation loss against step, and the held-out figures side by side."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    curves, bars = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for name, r in rows.items():
        curves.plot([s for s, _ in r["valid_curve"]], [v for _, v in r["valid_curve"]], marker=".", label=name)
    curves.set_xlabel("step")
    curves.set_ylabel("validation loss (nats/token)")
    curves.legend()
    curves.grid(alpha=0.3)
    metrics = ("exact_match", "token_accuracy")
    width = 0.8 / max(1, len(rows))
    for i, (name, r) in enumerate(rows.items()):
        bars.bar([m + i * width for m in range(len(metrics))], [r[k] for k in metrics], width, label=name)
    bars.set_xticks([m + width * (len(rows) - 1) / 2 for m in range(len(metrics))], ["exact match", "token accuracy"])
    bars.set_ylim(0, 1)
    bars.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    run(main)
