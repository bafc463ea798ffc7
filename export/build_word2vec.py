"""`plm build` for the word2vec family: train CBOW and skip-gram on the word-level corpus, export, evaluate.

Two model folders, `word2vec-cbow` and `word2vec-skipgram`, each holding vectors.onnx and cloze.onnx
(export/word2vec_export.py), vocab.json (the served vocabulary: a JSON list, index = id), tokenizer.json
(the word tokenizer, used only for its normalizer and pre-tokenizer) and manifest.json.

The word2vec vocabulary is its own (`min_count` over the training words), not the tokenizer's: a word the
tokenizer knows but word2vec dropped is out of vocabulary, served as id 0 `<unk>` with a zero vector and
flagged OOV by the adapter.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from plm.data.corpus import fetch_eval_sets
from plm.export.build import BuildData
from plm.export.repository import staging, write_manifest
from plm.export.word2vec_export import MASK_ID, SPECIALS, UNK_ID, export_word2vec
from plm.models import tokenization
from plm.models.word2vec import Word2Vec, Word2VecConfig, evaluate_all

log = logging.getLogger("plm.build.word2vec")

MODELS = (("word2vec-cbow", False), ("word2vec-skipgram", True))


@dataclass(frozen=True)
class Word2VecProfile:
    config: Word2VecConfig  # sg is set per model


PROFILES = {
    # Both models in a few seconds on the `tiny` corpus slice (8 documents): the test fixture.
    "tiny": Word2VecProfile(Word2VecConfig(vector_size=32, window=3, min_count=1, epochs=2)),
    # The default models: the whole corpus, gensim's defaults (min_count 5 keeps rare words from
    # getting vectors trained on a handful of contexts).
    "small": Word2VecProfile(Word2VecConfig(vector_size=100, window=5, min_count=5, epochs=5)),
    # `full`: more passes over the same small corpus (its vectors are what the word-similarity sets measure).
    "full": Word2VecProfile(Word2VecConfig(vector_size=100, window=5, min_count=5, epochs=15)),
}


def _evaluation(model: Word2Vec, cache_dir: Path) -> dict[str, Any]:
    try:
        eval_sets = fetch_eval_sets(cache_dir)
    except Exception as e:  # offline without the gensim wheel cached: the model is still usable
        log.warning("word2vec: evaluation sets unavailable (%s); skipped", e)
        return {"skipped": str(e)}
    return {k: round(v, 4) for k, v in evaluate_all(model.normalized(), model.vocab, eval_sets).items()}


def build(data: BuildData, profile: str, repository: Path, key: str, seed: int) -> dict[str, dict[str, Any]]:
    """Train, export and write both word2vec folders; returns their manifests by name."""
    base = PROFILES[profile].config
    out: dict[str, dict[str, Any]] = {}
    for name, sg in MODELS:
        cfg = replace(base, sg=sg, seed=seed + 1)  # gensim's default seed is 1
        started = time.perf_counter()
        model = Word2Vec.train_on(data.words["train"], cfg)
        stats = model.stats
        log.info("%s: %d words × %d dims, %d epochs in %.1fs (%.0f pairs/s)", name, len(model.vocab),
                 cfg.vector_size, cfg.epochs, stats.seconds, stats.pairs_per_second)
        with staging(repository, name) as folder:
            exported = export_word2vec(model.wv.numpy(), model.syn1neg.numpy(), folder)
            served = [*SPECIALS, *model.vocab]
            (folder / "vocab.json").write_text(json.dumps(served, ensure_ascii=False) + "\n", encoding="utf-8")
            tokenization.save(data.word_tokenizer, folder / "tokenizer.json")
            evaluation = _evaluation(model, data.cache_dir)
            kind = "skip-gram" if sg else "CBOW"
            out[name] = write_manifest(folder, {
                "name": name, "family": "word2vec", "tasks": ["embed", "fill_mask"],
                "description": f"word2vec {kind}, negative sampling, {len(model.vocab):,} words × {cfg.vector_size}",
                "max_length": 1024, "vocab_size": exported["vocab_size"],
                "tokenizer": {"file": "tokenizer.json", "kind": "word",
                              "note": "normalizer and pre-tokenizer only; ids come from word2vec.vocab_file"},
                "word2vec": {
                    "vocab_file": "vocab.json", "unk": SPECIALS[UNK_ID], "unk_id": UNK_ID,
                    "mask": SPECIALS[MASK_ID], "mask_id": MASK_ID, "dimension": cfg.vector_size,
                    "architecture": "skipgram" if sg else "cbow", "window": cfg.window,
                    "config": asdict(cfg),
                },
                "graphs": exported["graphs"],
                "parity": exported["parity"],
                "training": {"seconds": round(stats.seconds, 2), "epochs": stats.epochs,
                             "pairs": stats.pairs, "rows": stats.rows,
                             "pairs_per_second": round(stats.pairs_per_second),
                             "raw_words": stats.raw_words, "kept_words": stats.kept_words,
                             "loss_per_epoch": [round(x, 4) for x in stats.loss_per_epoch],
                             "train_sentences": len(data.words["train"])},
                "evaluation": evaluation,
                "build_key": key, "corpus_sha256": data.corpus.manifest.get("corpus_sha256", ""),
            })
        log.info("%s: built in %.1fs; evaluation %s", name, time.perf_counter() - started, evaluation)
    return out
