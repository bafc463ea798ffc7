"""`plm build` for the `nnlm` family: train Bengio's NNLM on the word-level corpus, export, evaluate, write `nnlm/`.

The folder holds `model.onnx` (export/rnn_export.py's nnlm contract), the word tokenizer and the manifest;
its held-out per-word perplexity is defined as the n-gram models' (every word and `</s>` of each test
sentence, histories `<s>`-padded), so the build summary compares like with like.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from plm.export.build import BuildData
from plm.export.repository import staging, write_manifest
from plm.models import tokenization

log = logging.getLogger("plm.build")


@dataclass(frozen=True)
class NnlmProfile:
    order: int
    n_embd: int
    n_hidden: int
    direct: bool
    dropout: float
    batch_size: int
    max_steps: int  # the planned run: the model depends on the seed alone, not on the machine's speed
    max_seconds: float | None  # a safety cap that warns when it cuts training short; None: no cap
    eval_interval: int
    lr: float


PROFILES = {
    "tiny": NnlmProfile(order=4, n_embd=32, n_hidden=64, direct=True, dropout=0.0, batch_size=64, max_steps=400,
                        max_seconds=None, eval_interval=50, lr=3e-3),
    # About 45 s of one idle core; the cap leaves a busy machine room before it warns.
    "small": NnlmProfile(order=4, n_embd=64, n_hidden=128, direct=True, dropout=0.1, batch_size=128,
                         max_steps=560, max_seconds=300.0, eval_interval=100, lr=2e-3),
    # `full`: the lineage's claims, not the 10-minute budget (sized for about an hour and a half, every family, on
    # 2 cores): a wider NNLM with one more word of context, trained for many more steps.
    "full": NnlmProfile(order=5, n_embd=96, n_hidden=256, direct=True, dropout=0.2, batch_size=128,
                        max_steps=4000, max_seconds=1800.0, eval_interval=200, lr=2e-3),
}


def word_ids(data: BuildData, split: str) -> list[list[int]]:
    """The split's sentences as word-tokenizer ids (OOV -> `<unk>` = 0), without `<s>`/`</s>`."""
    vocab: dict[str, int] = data.word_tokenizer.get_vocab()
    unk = vocab[tokenization.UNK]
    return [[vocab.get(w, unk) for w in sent] for sent in data.words[split]]


def build(data: BuildData, profile: str, repository: Path, key: str, seed: int) -> dict[str, dict[str, Any]]:
    """Train, export and evaluate the NNLM of `profile` into `repository/nnlm`; returns {"nnlm": manifest}."""
    import torch
    from plm.export.rnn_export import export_nnlm
    from plm.models.nnlm import NNLM, NNLMConfig, sentence_logprob_sum, window_batches, windows
    from plm.models.train import TrainConfig, train

    p = PROFILES[profile]
    started = time.perf_counter()
    vocab: dict[str, int] = data.word_tokenizer.get_vocab()
    bos, eos = vocab[tokenization.BOS], vocab[tokenization.EOS]
    ids = {split: word_ids(data, split) for split in ("train", "valid", "test")}
    pairs = {split: windows(ids[split], p.order, bos, eos) for split in ("train", "valid")}
    cfg = NNLMConfig(vocab_size=len(vocab), order=p.order, n_embd=p.n_embd, n_hidden=p.n_hidden, direct=p.direct,
                     dropout=p.dropout)
    torch.manual_seed(seed)
    model = NNLM(cfg)
    tcfg = TrainConfig(max_steps=p.max_steps, batch_size=p.batch_size, lr=p.lr, min_lr=p.lr / 10,
                       warmup_steps=min(100, p.max_steps // 10), eval_interval=p.eval_interval,
                       max_seconds=p.max_seconds, seed=seed, device=data.device,
                       weight_decay=0.0,  # decay hurts rare-word rows
                       num_threads=1)  # two threads on 2 shared, busy cores spin-wait each step
    with staging(repository, "nnlm") as folder:
        result = train(model, window_batches(pairs, p.batch_size, np.random.default_rng(seed)), tcfg, folder,
                       desc="nnlm")
        graph = export_nnlm(model, folder / "model.onnx")
        tokenization.save(data.word_tokenizer, folder / "tokenizer.json")
        evaluation: dict[str, Any] = {}
        for split in ("valid", "test"):
            total, n = sentence_logprob_sum(model, ids[split], bos, eos)
            evaluation[f"{split}_word_perplexity"] = math.exp(-total / n)
        evaluation.update(test_sentences=len(ids["test"]), test_words=sum(len(s) for s in ids["test"]))
        manifest = write_manifest(folder, {
            "name": "nnlm", "family": "nnlm", "tasks": ["score", "predict_next"],
            "description": f"NNLM (Bengio 2003) order {cfg.order}, {model.num_params():,} parameters",
            "max_length": 1024, "vocab_size": cfg.vocab_size,
            "tokenizer": {"file": "tokenizer.json", "kind": "word", "bos": tokenization.BOS,
                          "eos": tokenization.EOS, "unk": tokenization.UNK},
            "nnlm": {"order": cfg.order},
            # A batch row is one (n−1)-word window, not a sentence: a request of 64 sentences of 30 words is
            # ~2,000 rows, past the server's default queue bound of 1,024, and 32-row runs would waste the
            # batcher. Rows are tiny ((n−1) ids in, V floats out), so allow many more of them.
            "batching": {"max_batch_size": 512, "max_queue_size": 65536},
            "graphs": {"model": graph},
            "parity": graph["parity"],
            "config": asdict(cfg),
            "training": result.manifest(model.num_params(), profile=profile),
            "evaluation": evaluation,
            "build_key": key, "corpus_sha256": data.corpus.manifest.get("corpus_sha256", ""),
        })
    log.info("nnlm: test per-word perplexity %.1f (%.1fs in all)", evaluation["test_word_perplexity"],
             time.perf_counter() - started)
    return {"nnlm": manifest}
