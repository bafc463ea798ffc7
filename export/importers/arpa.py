"""`plm import arpa`: an ARPA backoff model from any toolkit (KenLM lmplz, SRILM, any order) into an `ngram` family
model folder (service/families/ngram.py), scored as KenLM scores it.

The file is read once with the family's own reader (a malformed file fails here, naming its line) and copied as
it is. Words are what whitespace separates, with no normalisation: the vocabulary is the file's, as for KenLM.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from plm.export.importers.common import ImportFailed, finish, model_folder, source_identity
from plm.export.importers.vectors import whitespace_tokenizer

SPECIALS = ("<s>", "</s>", "<unk>")


def import_arpa(source: Path, repository: Path, name: str, max_length: int | None, replace: bool) -> dict[str, Any]:
    """Import the ARPA file `source` as `repository/name`; returns the manifest."""
    from plm.service.families.ngram_scorer import NgramModel

    if not source.is_file():
        raise ImportFailed(source, "missing")
    try:
        lm = NgramModel.load_arpa(source)
    except (ValueError, UnicodeDecodeError) as e:
        raise ImportFailed(source, f"not a valid ARPA file ({e})") from e
    missing = [w for w in SPECIALS if w not in lm.word_to_id]
    if missing:
        raise ImportFailed(source, f"has no {', '.join(missing)} unigram (the ngram family needs "
                                   f"{', '.join(SPECIALS)})")
    with model_folder(repository, name, replace) as folder:
        shutil.copyfile(source, folder / "model.arpa")
        whitespace_tokenizer().save(str(folder / "tokenizer.json"))
        return finish(folder, {
            "name": name, "family": "ngram", "tasks": ["score", "predict_next"],
            "description": f"imported {lm.order}-gram ARPA model, {len(lm.vocab):,} words",
            "max_length": max_length or 1024, "vocab_size": len(lm.vocab),
            "tokenizer": {"file": "tokenizer.json", "kind": "word", "bos": "<s>", "eos": "</s>", "unk": "<unk>",
                          "note": "whitespace split only; ids come from the ARPA file"},
            "ngram": {"file": "model.arpa", "format": "arpa", "order": lm.order, "smoothing": "as in the source"},
            "source": source_identity([source], format="arpa", path=str(source.resolve())),
        })
