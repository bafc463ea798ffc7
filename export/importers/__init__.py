"""`plm import`: turn a checkpoint made elsewhere into a model folder our serving families serve.

One module per kind; KINDS maps each kind to its importer (imported on use: torch only where a kind needs it).
Every importer writes atomically (common.model_folder), checks parity with the source framework where there is
one, and raises common.ImportFailed with a one-line message naming the file and the problem. The kinds with ONNX
graphs also write optimised variants when asked (`--variants int8 fused ...`: common.finish, export/variants.py).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from plm.export.importers.common import ImportFailed


@dataclass(frozen=True)
class Kind:
    entry: str  # "module:function" under plm.export.importers
    help: str
    variants: bool = False  # has ONNX graphs to rewrite (the importer takes `variants`)


KINDS = {
    "bert": Kind("hf_bert:import_bert", "Hugging Face BertModel / BertForMaskedLM / BertForPreTraining folder, "
                                        "or a sentence-transformers folder around one", variants=True),
    "gpt2": Kind("gpt2:import_gpt2", "Hugging Face GPT2LMHeadModel folder (tokenizer.json or vocab.json + merges.txt)",
                 variants=True),
    "word2vec": Kind("vectors:import_vectors", "word vectors in word2vec format, binary or text (gensim's "
                                                 "save_word2vec_format, the C tool, fastText .vec)"),
    "arpa": Kind("arpa:import_arpa", "an ARPA backoff n-gram model from any toolkit (KenLM lmplz, SRILM), any order"),
}


def import_model(kind: str, source: Path, repository: Path, name: str | None = None, max_length: int | None = None,
                 replace: bool = False, variants: Sequence[str] = ()) -> dict[str, Any]:
    """Import `source` as a model of the repository; returns its manifest. The name defaults to the source's.
    `variants` (int8, fused, fp16) are written beside the graphs and measured before the model is in place."""
    from plm.export.variants import MAKERS

    unknown = [v for v in variants if v not in MAKERS]
    if unknown:
        raise ImportFailed(source, f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(MAKERS)}")
    if variants and not KINDS[kind].variants:
        raise ImportFailed(source, f"a {kind} model has no ONNX graphs to make variants of; only "
                                   f"{', '.join(k for k, v in KINDS.items() if v.variants)} imports take --variants")
    module, function = KINDS[kind].entry.split(":")
    importer = getattr(importlib.import_module(f"plm.export.importers.{module}"), function)
    extra = {"variants": tuple(variants)} if variants else {}
    result: dict[str, Any] = importer(source, repository, name or default_name(source), max_length, replace, **extra)
    return result


def default_name(source: Path) -> str:
    return source.resolve().name.rsplit(".", 1)[0] if source.is_file() else source.resolve().name
