"""`plm import word2vec`: word vectors in the word2vec format (binary or text, as gensim's save_word2vec_format and
the original C tool write them; fastText's .vec is the text form) into a `word2vec` family model folder.

The file's words keep their case and their order; the served vocabulary puts `<unk>` and `[MASK]` in front, as
our own builds do (export/word2vec_export.py). There are no output vectors in such a file, so the cloze graph the
family opens gets zero output weights and the model serves `embed` only (vectors, nearest words, analogies).
The tokenizer splits on whitespace alone and does not normalise: the vocabulary is the file's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from plm.export.importers.common import ImportFailed, finish, model_folder, source_identity

MAX_WORD_BYTES = 1000  # a word longer than this means the file is not what its header says


def _header(f: BinaryIO, path: Path) -> tuple[int, int]:
    line = f.readline()
    parts = line.split()
    if len(parts) != 2 or not all(p.isdigit() for p in parts) or int(parts[1]) == 0:
        raise ImportFailed(path, f"line 1 is {line[:60]!r}; expected the header 'WORDS DIMENSIONS'")
    return int(parts[0]), int(parts[1])


def _read_text(f: BinaryIO, path: Path, count: int, dim: int) -> tuple[list[str], np.ndarray]:
    words: list[str] = []
    matrix = np.zeros((count, dim), dtype=np.float32)
    for n, raw in enumerate(f, start=2):
        if not raw.strip():
            continue
        fields = raw.decode("utf-8", errors="strict").rstrip("\n").rstrip(" ").split(" ")
        if len(fields) != dim + 1:
            raise ImportFailed(path, f"line {n} has {len(fields) - 1} numbers; the header says {dim} dimensions")
        if len(words) == count:
            raise ImportFailed(path, f"line {n}: more words than the header's {count}")
        try:
            matrix[len(words)] = np.array(fields[1:], dtype=np.float32)
        except ValueError as e:
            raise ImportFailed(path, f"line {n}: not a number ({e})") from e
        words.append(fields[0])
    if len(words) != count:
        raise ImportFailed(path, f"{len(words)} words; the header says {count}")
    return words, matrix


def _read_binary(f: BinaryIO, path: Path, count: int, dim: int) -> tuple[list[str], np.ndarray]:
    words: list[str] = []
    matrix = np.zeros((count, dim), dtype=np.float32)
    for i in range(count):
        word = bytearray()
        while True:
            ch = f.read(1)
            if not ch:
                raise ImportFailed(path, f"ends after {i} of the header's {count} words")
            if ch == b" ":
                break
            if ch != b"\n" or word:  # the newline after the previous vector belongs to no word
                word += ch
            if len(word) > MAX_WORD_BYTES:
                raise ImportFailed(path, f"word {i + 1} is over {MAX_WORD_BYTES} bytes: not a binary word2vec file "
                                         f"of {dim} dimensions")
        row = f.read(4 * dim)
        if len(row) != 4 * dim:
            raise ImportFailed(path, f"ends inside the vector of word {i + 1}; the header says {dim} dimensions")
        words.append(word.decode("utf-8", errors="replace"))
        matrix[i] = np.frombuffer(row, dtype="<f4")
    if f.read().strip():
        raise ImportFailed(path, f"has data after the header's {count} words of {dim} dimensions")
    return words, matrix


def read_word2vec(path: Path) -> tuple[list[str], np.ndarray, str]:
    """(words, (V, D) float32 vectors, "text" | "binary"); the form is told from the first row."""
    if not path.is_file():
        raise ImportFailed(path, "missing")
    with path.open("rb") as f:
        count, dim = _header(f, path)
        start = f.tell()
        first = f.readline()
        try:
            fields = first.decode("utf-8").split()
            text = len(fields) == dim + 1 and all(_is_float(x) for x in fields[1:])
        except UnicodeDecodeError:
            text = False
        f.seek(start)
        words, matrix = (_read_text if text else _read_binary)(f, path, count, dim)
    seen: set[str] = set()
    for n, w in enumerate(words):
        if w in seen or not w:
            raise ImportFailed(path, f"word {n + 1} {w!r} is {'empty' if not w else 'listed twice'}")
        seen.add(w)
    if not np.isfinite(matrix).all():
        raise ImportFailed(path, "holds NaN or infinite numbers")
    return words, matrix, "text" if text else "binary"


def _is_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def whitespace_tokenizer() -> Any:
    """Words are what whitespace separates; no normaliser (ids come from vocab.json, as in our builds)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    tok = Tokenizer(WordLevel({"<unk>": 0}, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    return tok


def import_vectors(source: Path, repository: Path, name: str, max_length: int | None, replace: bool) -> dict[str, Any]:
    """Import the vector file `source` as `repository/name`; returns the manifest."""
    from plm.export.word2vec_export import MASK_ID, SPECIALS, UNK_ID, export_word2vec

    words, matrix, form = read_word2vec(source)
    clash = [w for w in words if w in SPECIALS]
    if clash:
        raise ImportFailed(source, f"holds the word {clash[0]!r}, which the word2vec family reserves")
    with model_folder(repository, name, replace) as folder:
        exported = export_word2vec(matrix, np.zeros_like(matrix), folder)
        (folder / "vocab.json").write_text(json.dumps([*SPECIALS, *words], ensure_ascii=False) + "\n",
                                           encoding="utf-8")
        whitespace_tokenizer().save(str(folder / "tokenizer.json"))
        return finish(folder, {
            "name": name, "family": "word2vec", "tasks": ["embed"],
            "description": f"imported word vectors, {len(words):,} words × {matrix.shape[1]}",
            "max_length": max_length or 1024, "vocab_size": exported["vocab_size"],
            "tokenizer": {"file": "tokenizer.json", "kind": "word",
                          "note": "whitespace split only; ids come from word2vec.vocab_file"},
            "word2vec": {"vocab_file": "vocab.json", "unk": SPECIALS[UNK_ID], "unk_id": UNK_ID,
                         "mask": SPECIALS[MASK_ID], "mask_id": MASK_ID, "dimension": int(matrix.shape[1]),
                         "architecture": "imported", "window": 1},
            "graphs": exported["graphs"],
            "parity": exported["parity"], "parity_max_abs_diff": exported["parity"]["max_abs_diff"],
            "parity_reference": "numpy on the file's vectors",
            "source": source_identity([source], format=f"word2vec {form}", path=str(source.resolve())),
        })
