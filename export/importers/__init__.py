"""`plm import`: turn a checkpoint made elsewhere into a model folder our serving families serve.

One module per kind; KINDS maps each kind to its importer (imported on use: torch only where a kind needs it).
Every importer writes atomically (common.model_folder), checks parity with the source framework where there is
one, and raises common.ImportFailed with a one-line message naming the file and the problem.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Kind:
    entry: str  # "module:function" under plm.export.importers
    help: str


KINDS = {
    "bert": Kind("hf_bert:import_bert", "Hugging Face BertModel / BertForMaskedLM / BertForPreTraining folder, "
                                        "or a sentence-transformers folder around one"),
    "gpt2": Kind("gpt2:import_gpt2", "Hugging Face GPT2LMHeadModel folder (tokenizer.json or vocab.json + merges.txt)"),
    "word2vec": Kind("vectors:import_vectors", "word vectors in word2vec format, binary or text (gensim's "
                                                 "save_word2vec_format, the C tool, fastText .vec)"),
    "arpa": Kind("arpa:import_arpa", "an ARPA backoff n-gram model from any toolkit (KenLM lmplz, SRILM), any order"),
}


def import_model(kind: str, source: Path, repository: Path, name: str | None = None, max_length: int | None = None,
                 replace: bool = False) -> dict[str, Any]:
    """Import `source` as a model of the repository; returns its manifest. The name defaults to the source's."""
    module, function = KINDS[kind].entry.split(":")
    importer = getattr(importlib.import_module(f"plm.export.importers.{module}"), function)
    result: dict[str, Any] = importer(source, repository, name or default_name(source), max_length, replace)
    return result


def default_name(source: Path) -> str:
    return source.resolve().name.rsplit(".", 1)[0] if source.is_file() else source.resolve().name
