"""RNN seq2seq with attention vs the Transformer encoder-decoder, trained on the same span-corruption data with the
same budget (steps, batch size, learning-rate schedule, seed), then measured on the same held-out corrupted test
sentences; and the served Transformer's Generate throughput with and without its KV cache.

    python benchmarks/encdec_report.py [--profile small] [--steps 600] [--parts train serve]
                                       [--repository DIR] [--streams 1 16] [--new-tokens 64] [--rounds 3]
                                       [--out results/encdec.json]

`train` prints and writes (JSON + PNG) per model: held-out span-infilling exact match (the greedy output equals
the whole target), token accuracy and per-token loss (teacher-forced), training tokens/s (target tokens per
second of the training loop, evaluations included), parameters, and the validation-loss curve. The notes' claim
under test: attention-only models train faster and do better than recurrent ones.

`serve` starts two `plm serve` processes over the `encdec` model of `--repository` (built there by
`plm build --families encdec` when absent; into a folder beside `--out` when `--repository` is another
repository without it): the KV-cache engine, and the same model recomputing every step through the batcher
(`kv_cache = false`: encoder and decoder re-read whole). Each is driven with `--streams` concurrent
GenerateStream calls of exactly `--new-tokens` tokens (seeded top-k 50, min_new_tokens = max_new_tokens), as
benchmarks/generation.py drives GPT; the median of `--rounds` rounds is reported.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from _smoke import Servers, add_smoke_flag, bar_plot, run  # this folder is on sys.path when run as a script


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=("tiny", "small"), default="small", help="corpus slice and model sizes")
    ap.add_argument("--steps", type=int, default=None, help="training steps of each model (default: the profile's)")
    ap.add_argument("--eval-interval", type=int, default=None,
                    help="steps between validation evaluations (default: a tenth of the steps)")
    ap.add_argument("--test-sentences", type=int, default=None,
                    help="held-out sentences the infilling figures are taken on (default: the profile's)")
    ap.add_argument("--cache-dir", type=Path, default=Path("cache"))
    ap.add_argument("--repository", type=Path, default=None,
                    help="serve: the repository whose encdec model is served (training makes its own models)")
    ap.add_argument("--parts", nargs="+", choices=("train", "serve"), default=["train", "serve"])
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 16], help="serve: concurrent streams")
    ap.add_argument("--new-tokens", type=int, default=64, help="serve: tokens per request")
    ap.add_argument("--rounds", type=int, default=3, help="serve: rounds per stream count (the median is reported)")
    ap.add_argument("--out", type=Path, default=Path("results/encdec.json"))
    ap.add_argument("--seed", type=int, default=0)
    add_smoke_flag(ap)
    args = ap.parse_args()
    profile = "tiny" if args.smoke else args.profile
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"profile": profile, "seed": args.seed, "smoke": args.smoke}
    if "train" in args.parts:
        report.update(train_both(args, profile))
    if "serve" in args.parts:
        report["serving"] = serve(args, profile)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    if "train" not in args.parts:  # the PNG is the training figures; a serving-only run plots its throughput
        bar_plot(args.out.with_suffix(".png"), {f"{mode} {r['streams']}": r["tokens_per_s"]
                                                for mode, rows in report["serving"]["rows"].items() for r in rows},
                 "generated tokens / s", "encdec served Generate: KV-cache engine vs recomputing")
    print(f"\nwritten to {args.out} and {args.out.with_suffix('.png')}")


def train_both(args: argparse.Namespace, profile: str) -> dict[str, Any]:
    """Train the RNN and the Transformer on the same batches and budget; their held-out figures and curves."""
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

    p = PROFILES[profile]
    steps = 10 if args.smoke else (args.steps or p.max_steps)
    data = prepare_data(BUILD_PROFILES[profile], None, args.cache_dir, args.seed)
    tok = tokenization.train_encdec_tokenizer(data.corpus.train, vocab_size=p.vocab_size, sentinels=p.sentinels)
    specials = special_tokens(tok, p.sentinels)
    splits = {split: encode(tok, getattr(data.corpus, split)) for split in ("train", "valid", "test")}
    if sum(len(s) >= 2 for s in splits["valid"]) < 2:
        splits["valid"] = splits["train"]
    test = held_out(splits["test"], specials, p.max_tokens, args.seed + 1,
                    8 if args.smoke else args.test_sentences or p.eval_sentences)
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
    for name, make in makers.items():
        torch.manual_seed(args.seed)
        model: EncoderDecoder = make()
        cfg = TrainConfig(max_steps=steps, batch_size=p.batch_size, lr=p.lr, min_lr=p.lr / 10,
                          warmup_steps=min(p.warmup_steps, steps // 5),
                          eval_interval=args.eval_interval or max(1, steps // (2 if args.smoke else 10)),
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
    plot(rows, args.out.with_suffix(".png"), f"span corruption, {steps} steps × batch {p.batch_size} ({profile})")
    return {"steps": steps, "batch_size": p.batch_size, "test_examples": len(test), "models": rows}


def serve(args: argparse.Namespace, profile: str) -> dict[str, Any]:
    """Served Generate tokens/s of the encdec model at each stream count: the KV-cache engine vs recomputing."""
    from generation import drive  # benchmarks/generation.py: the same streams and rounds as for GPT

    repository = args.repository
    if args.smoke or repository is None or not (repository / "encdec" / "manifest.json").exists():
        from plm.export.build import build_repository

        repository = args.out.parent / f"encdec_repo_{profile}"
        build_repository(profile=profile, repository=repository, cache_dir=args.cache_dir, families=["encdec"],
                         seed=args.seed)
    manifest = json.loads((repository / "encdec" / "manifest.json").read_text())
    n = min(4 if args.smoke else args.new_tokens, int(manifest["encdec"]["max_target_length"]) - 1)
    streams, rounds = ([1, 2], 1) if args.smoke else (args.streams, args.rounds)
    modes = {"engine": {"PLM_RUNTIME__KV_CACHE": "true"}, "recompute": {"PLM_RUNTIME__KV_CACHE": "false"}}
    rows: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
    with Servers(repository, args.smoke, [(["encdec"], modes["engine"])]) as servers:
        for mode, env in modes.items():
            with servers.start(["encdec"], env, metrics=True, shared=mode == "engine") as srv:
                for k in streams:
                    rows[mode].append(drive(srv.target, "encdec", k, n, srv.metrics_url, rounds))
                    print(f"{mode:9} {k:3d} streams: {rows[mode][-1]['tokens_per_s']:8.1f} tokens/s", flush=True)
    ratios = {f"engine_vs_recompute_{e['streams']}": round(e["tokens_per_s"] / r["tokens_per_s"], 3)
              for e, r in zip(rows["engine"], rows["recompute"], strict=True)}
    for key, value in ratios.items():
        print(f"{key:28} {value:6.2f}×")
    return {"repository": str(repository), "new_tokens": n, "rows": rows, "ratios": ratios}


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
