"""`plm build` for the `bert` family: WordPiece tokenizer, MLM + NSP pre-training, ONNX export, evaluation.

`build()` writes the model folder `bert` (tokenizer.json, model.onnx, loss_curve.png, manifest.json)
atomically into the repository. Its profiles live here: "tiny" (a test fixture, the whole build in
seconds) and "small" (the default model, about two minutes of training on 2 CPU cores).

The corpus keeps sentences in document order but not the document boundaries, so each split is one
"document" for NSP: IsNext pairs are consecutive sentences (a pair that straddles two documents is rare
noise) and NotNext pairs take a random sentence elsewhere in the split.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from plm.export.build import BuildData
from plm.export.repository import staging, write_manifest
from plm.models import tokenization

if TYPE_CHECKING:  # torch is imported only when a build runs
    from plm.models.bert import Bert, SpecialIds
    from tokenizers import Tokenizer

log = logging.getLogger("plm.build")

NAME = "bert"


@dataclass(frozen=True)
class BertProfile:
    vocab_size: int
    max_length: int  # the window, specials included
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float
    batch_size: int
    max_steps: int  # the planned run: the model depends on the seed alone, not on the machine's speed
    max_seconds: float | None  # a safety cap that warns when it cuts training short; None: no cap
    eval_interval: int
    eval_batches: int  # validation batches per evaluation (each one a forward pass)
    lr: float
    eval_pairs: int  # held-out NSP pairs (their masked tokens give the MLM accuracy)
    num_threads: int  # torch threads; 1 for the fixture: a second thread waits on a busy core every step


PROFILES = {
    # A test fixture: memorises a small corpus in a few seconds (no dropout, a high learning rate).
    "tiny": BertProfile(vocab_size=1000, max_length=64, n_layer=2, n_head=2, n_embd=64, dropout=0.0,
                        batch_size=32, max_steps=300, max_seconds=None, eval_interval=50, eval_batches=2, lr=5e-3,
                        eval_pairs=200, num_threads=1),
    # The default model: ~2 minutes of training on 2 idle cores, the cap well above it; dropout 0.1 as BERT,
    # since the data are small.
    "small": BertProfile(vocab_size=8000, max_length=128, n_layer=4, n_head=4, n_embd=128, dropout=0.1,
                         batch_size=32, max_steps=240, max_seconds=450.0, eval_interval=40, eval_batches=10, lr=1e-3,
                         eval_pairs=2000, num_threads=2),
    # `full`: wider and trained for many more steps, for the notes' claims (MLM top-1, NSP well above chance).
    "full": BertProfile(vocab_size=8000, max_length=128, n_layer=4, n_head=4, n_embd=192, dropout=0.1,
                        batch_size=32, max_steps=2000, max_seconds=2400.0, eval_interval=200, eval_batches=10,
                        lr=1e-3, eval_pairs=2000, num_threads=2),
}


def build(data: BuildData, profile: str, repository: Path, key: str, seed: int) -> dict[str, dict[str, Any]]:
    """Train, export and evaluate BERT on `data`; returns {"bert": manifest}."""
    import torch
    from plm.export.bert_export import export_bert
    from plm.models.bert import Bert, BertConfig, mlm_nsp_batches, mlm_nsp_loss
    from plm.models.train import TrainConfig, train

    p = PROFILES[profile]
    started = time.perf_counter()
    tok = tokenization.train_wordpiece_tokenizer(data.corpus.train, vocab_size=p.vocab_size)
    specials = _special_ids(tok)

    def sentences(texts: list[str]) -> list[list[int]]:
        return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False) if e.ids]

    train_doc = sentences(data.corpus.train)
    valid_doc = sentences(data.corpus.valid)
    if len(valid_doc) < 3:  # a tiny corpus may leave almost nothing for validation
        valid_doc = train_doc
    test_doc = sentences(data.corpus.test)
    log.info("bert: WordPiece vocab %d, %d train sentences (%.1fs)", tok.get_vocab_size(), len(train_doc),
             time.perf_counter() - started)
    cfg = BertConfig(vocab_size=tok.get_vocab_size(), max_position=p.max_length, n_layer=p.n_layer,
                     n_head=p.n_head, n_embd=p.n_embd, dropout=p.dropout)
    torch.manual_seed(seed)
    model = Bert(cfg)
    tcfg = TrainConfig(max_steps=p.max_steps, batch_size=p.batch_size, lr=p.lr, min_lr=p.lr / 10,
                       warmup_steps=min(100, p.max_steps // 10), eval_interval=p.eval_interval,
                       eval_batches=p.eval_batches, num_threads=p.num_threads,
                       max_seconds=p.max_seconds, seed=seed, device=data.device)
    get_batch = mlm_nsp_batches({"train": [train_doc], "valid": [valid_doc]}, max_length=p.max_length,
                                batch_size=p.batch_size, vocab_size=cfg.vocab_size,
                                rng=np.random.default_rng(seed), specials=specials)
    with staging(repository, NAME) as folder:
        result = train(model, get_batch, tcfg, folder, loss_fn=mlm_nsp_loss, desc=NAME)
        graph = export_bert(model, folder / "model.onnx")
        tokenization.save(tok, folder / "tokenizer.json")
        evaluation = evaluate(model, test_doc, p.max_length, specials, p.eval_pairs, seed)
        manifest = write_manifest(folder, {
            "name": NAME, "family": "bert", "tasks": ["fill_mask", "embed", "next_sentence", "score"],
            "description": f"BERT {cfg.n_layer} layers × {cfg.n_embd}, {model.num_params():,} parameters",
            "max_length": cfg.max_position, "vocab_size": cfg.vocab_size,
            "tokenizer": {"file": "tokenizer.json", "kind": "wordpiece", "cls": "[CLS]", "sep": "[SEP]",
                          "mask": "[MASK]", "pad": "[PAD]", "unk": "[UNK]"},
            "graphs": {"model": graph},
            "parity": graph.get("parity", {}),
            "config": asdict(cfg),
            "training": result.manifest(
                model.num_params(), losses=[list(h) for h in result.history],
                objective="MLM (15%: 80% [MASK] / 10% random / 10% kept) + NSP (50/50)"),
            "evaluation": evaluation,
            "build_key": key, "corpus_sha256": data.corpus.manifest.get("corpus_sha256", ""),
        })
    log.info("bert: test MLM top-1 %s, top-5 %s, NSP %s (%.1fs in all)", evaluation.get("test_mlm_top1"),
             evaluation.get("test_mlm_top5"), evaluation.get("test_nsp_accuracy"), time.perf_counter() - started)
    return {NAME: manifest}


def _special_ids(tok: Tokenizer) -> SpecialIds:
    from plm.models.bert import SpecialIds

    ids = [tok.token_to_id(t) for t in tokenization.WORDPIECE_SPECIALS]
    if any(i is None for i in ids):
        raise ValueError("the WordPiece tokenizer lacks one of its specials")
    return SpecialIds(*(int(i) for i in ids if i is not None))


def evaluate(model: Bert, doc: list[list[int]], max_length: int, specials: SpecialIds, n_pairs: int,
             seed: int) -> dict[str, Any]:
    """Held-out accuracy: MLM top-1/top-5 at 15% of the tokens, all replaced by [MASK] (the fill-mask task),
    and NSP accuracy on 50/50 pairs. Empty when the split cannot make pairs."""
    import torch
    from plm.models.bert import IGNORE_INDEX, collate_pairs, mask_tokens, sample_pairs

    if len(doc) < 3:
        return {"test_pairs": 0, "note": "test split too small for NSP pairs"}
    rng = np.random.default_rng(seed + 1)
    pairs = sample_pairs([doc], n_pairs, rng)
    top1 = top5 = masked = nsp_right = 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(pairs), 64):
            ids, mask, types, maskable, nsp = collate_pairs(pairs[i: i + 64], max_length, specials)
            inputs, labels = mask_tokens(ids, maskable, rng, mask_id=specials.mask, vocab_size=model.config.vocab_size,
                                         first_regular=specials.first_regular, replace_with_mask=1.0,
                                         replace_with_random=0.0)
            t = [torch.from_numpy(a) for a in (inputs, mask, types, labels)]
            hidden = model.hidden_states(t[0], t[1], t[2])  # (B, T, C)
            chosen = t[3] != IGNORE_INDEX
            best5 = model.mlm_logits(hidden[chosen]).topk(5, dim=-1).indices  # (N, 5)
            target = t[3][chosen][:, None]  # (N, 1)
            top1 += int((best5[:, :1] == target).sum())
            top5 += int((best5 == target).any(dim=-1).sum())
            masked += int(chosen.sum())
            nsp_right += int((model.nsp_logits(hidden).argmax(-1) == torch.from_numpy(nsp)).sum())
    return {"test_mlm_top1": round(top1 / masked, 4), "test_mlm_top5": round(top5 / masked, 4),
            "test_nsp_accuracy": round(nsp_right / len(pairs), 4), "test_pairs": len(pairs),
            "test_masked_tokens": masked}
