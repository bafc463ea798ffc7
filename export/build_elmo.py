"""`plm build` for the `elmo` family: train the biLSTM LM on the word-level corpus, export, evaluate, write `elmo/`.

The folder holds `model.onnx` (export/rnn_export.py's elmo contract), the word tokenizer and the manifest,
whose `elmo` entry carries the default layer mix (pre-softmax scalars s, equal by default, and γ). Held-out
per-word perplexity is the *forward* LM's, defined as the n-gram models' (every word and `</s>`, given `<s>`).
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
from plm.export.build_nnlm import word_ids
from plm.export.repository import staging, write_manifest
from plm.models import tokenization

log = logging.getLogger("plm.build")

DEFAULT_LAYER_WEIGHTS = (0.0, 0.0, 0.0)  # softmax -> 1/3 each: no layer preferred before a task says so
DEFAULT_GAMMA = 1.0


@dataclass(frozen=True)
class ElmoProfile:
    n_embd: int
    dropout: float
    batch_size: int
    max_len: int  # training sentences are cut to this many tokens (LSTM time is linear in it)
    max_steps: int  # the planned run: the model depends on the seed alone, not on the machine's speed
    max_seconds: float | None  # a safety cap that warns when it cuts training short; None: no cap
    eval_interval: int
    lr: float


PROFILES = {
    "tiny": ElmoProfile(n_embd=32, dropout=0.0, batch_size=16, max_len=40, max_steps=120, max_seconds=None,
                        eval_interval=50, lr=5e-3),
    # The full softmax over a ~17k-word vocabulary, twice (both directions), dominates a step on one CPU
    # thread, so a step is few positions; about a minute of one idle core, the cap well above it.
    "small": ElmoProfile(n_embd=64, dropout=0.1, batch_size=16, max_len=40, max_steps=200, max_seconds=300.0,
                         eval_interval=40, lr=3e-3),
    # `full`: a wider biLSTM trained long enough for its forward LM to pass the NNLM (the notes' order).
    "full": ElmoProfile(n_embd=128, dropout=0.2, batch_size=32, max_len=40, max_steps=2000, max_seconds=1800.0,
                        eval_interval=200, lr=3e-3),
}


def build(data: BuildData, profile: str, repository: Path, key: str, seed: int) -> dict[str, dict[str, Any]]:
    """Train, export and evaluate the ELMo of `profile` into `repository/elmo`; returns {"elmo": manifest}."""
    import torch
    from plm.export.rnn_export import export_elmo
    from plm.models.elmo import ELMo, ELMoConfig, elmo_loss, forward_logprob_sum, sentence_batches
    from plm.models.train import TrainConfig, train

    p = PROFILES[profile]
    started = time.perf_counter()
    vocab: dict[str, int] = data.word_tokenizer.get_vocab()
    bos, eos, pad = vocab[tokenization.BOS], vocab[tokenization.EOS], vocab[tokenization.PAD]
    seqs = {split: [[bos, *s, eos] for s in word_ids(data, split)] for split in ("train", "valid", "test")}
    cfg = ELMoConfig(vocab_size=len(vocab), n_embd=p.n_embd, dropout=p.dropout)
    torch.manual_seed(seed)
    model = ELMo(cfg)
    tcfg = TrainConfig(max_steps=p.max_steps, batch_size=p.batch_size, lr=p.lr, min_lr=p.lr / 10,
                       warmup_steps=min(100, p.max_steps // 10), eval_interval=p.eval_interval,
                       max_seconds=p.max_seconds, seed=seed, device=data.device, weight_decay=0.0,
                       num_threads=1)  # small matmuls: a second thread on shared cores costs more than it gives
    get_batch = sentence_batches(seqs, p.batch_size, p.max_len, pad, np.random.default_rng(seed))
    with staging(repository, "elmo") as folder:
        result = train(model, get_batch, tcfg, folder, loss_fn=elmo_loss, desc="elmo")
        graph = export_elmo(model, folder / "model.onnx")
        tokenization.save(data.word_tokenizer, folder / "tokenizer.json")
        evaluation: dict[str, Any] = {}
        for split in ("valid", "test"):
            n = sum(len(s) - 1 for s in seqs[split])  # words + </s>
            evaluation[f"{split}_word_perplexity"] = math.exp(-forward_logprob_sum(model, seqs[split], pad) / n)
        evaluation.update(test_sentences=len(seqs["test"]), test_words=sum(len(s) - 2 for s in seqs["test"]),
                          direction="forward LM")
        manifest = write_manifest(folder, {
            "name": "elmo", "family": "elmo", "tasks": ["embed", "score"],
            "description": f"ELMo 2-layer biLSTM {cfg.n_embd}×2, {model.num_params():,} parameters",
            "max_length": 1024, "vocab_size": cfg.vocab_size,
            "tokenizer": {"file": "tokenizer.json", "kind": "word", "bos": tokenization.BOS,
                          "eos": tokenization.EOS, "unk": tokenization.UNK, "pad": tokenization.PAD},
            "elmo": {"layer_weights": list(DEFAULT_LAYER_WEIGHTS), "gamma": DEFAULT_GAMMA,
                     "dim": 2 * cfg.n_embd, "input": "word", "softmax": "shared by both directions, tied to the "
                     "input embedding"},
            "graphs": {"model": graph},
            "parity": graph["parity"],
            "config": asdict(cfg),
            "training": result.manifest(model.num_params(), profile=profile,
                                        loss="mean of the forward and backward LMs' cross entropies"),
            "evaluation": evaluation,
            "build_key": key, "corpus_sha256": data.corpus.manifest.get("corpus_sha256", ""),
        })
    log.info("elmo: test per-word perplexity %.1f (%.1fs in all)", evaluation["test_word_perplexity"],
             time.perf_counter() - started)
    return {"elmo": manifest}
