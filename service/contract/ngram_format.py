"""The n-gram model files: ARPA (backoff) and plm's Laplace counts file, read and written here only.

Training (`models/ngram.py`) writes them with `write_arpa` / `write_counts`; the server
(`service/families/ngram_scorer.py`) reads them with `read_arpa` / `read_counts`, which also read any ARPA
file (e.g. one from KenLM's lmplz). Both directions speak in tables: per order k, the n-grams as space-joined
words (writing) or as a (n_k, k) matrix of vocabulary ids (reading) plus one value array per column. A bad
file raises ValueError naming the file and the line. numpy and the standard library only.

ARPA: `\\data\\`, `ngram k=<count>` lines, then per order `\\k-grams:` with `log10p<TAB>w1 .. wk[<TAB>backoff]`
lines, and `\\end\\`. Counts: one header line `COUNTS_MAGIC order=N vocab_size=V smoothing=laplace`, then
`w1 .. wk<TAB>count` lines for orders 1..N; the unigram lines list every vocabulary word in id order, so the
file alone defines the vocabulary.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
COUNTS_MAGIC = "# plm-ngram-counts"
# KenLM gives a missing <unk> this log10 probability (and warns); we do the same so scores agree.
KENLM_MISSING_UNK_LOG10 = -100.0

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True, eq=False)
class ArpaTables:
    """A backoff model as read from an ARPA file; index k-1 of each list is order k."""

    vocab: list[str]  # the unigrams in file order (plus <unk> when the file lacks it, as KenLM does)
    ids: list[IntArray]  # (n_k, k) word ids of the order-k n-grams, in file order
    log10probs: list[FloatArray]  # (n_k,)
    log10backoffs: list[FloatArray]  # (n_k,) for orders 1..N-1; 0 where a line has none


@dataclass(frozen=True, eq=False)
class CountTables:
    """A Laplace counts file as read; index k-1 of each list is order k."""

    vocab: list[str]  # the unigram lines in file order: id i is line i
    ids: list[IntArray]  # (n_k, k) word ids
    counts: list[IntArray]  # (n_k,) raw counts


def write_arpa(path: str | Path, grams: Sequence[Sequence[str]], log10probs: Sequence[FloatArray],
               log10backoffs: Sequence[FloatArray]) -> None:
    """Write an ARPA file: `grams[k-1]` the order-k n-grams as space-joined words, their log10
    probabilities, and the backoffs of orders 1..N-1."""
    order = len(grams)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("\\data\\\n")
        for k in range(1, order + 1):
            f.write(f"ngram {k}={len(grams[k - 1])}\n")
        for k in range(1, order + 1):
            f.write(f"\n\\{k}-grams:\n")
            # Seven decimals in log10 is a relative error below 2e-7 in probability.
            probs = [f"{x:.7f}" for x in log10probs[k - 1].tolist()]
            if k < order:
                bows = [f"{x:.7f}" for x in log10backoffs[k - 1].tolist()]
                f.writelines(f"{p}\t{g}\t{b}\n" for p, g, b in zip(probs, grams[k - 1], bows, strict=True))
            else:
                f.writelines(f"{p}\t{g}\n" for p, g in zip(probs, grams[k - 1], strict=True))
        f.write("\n\\end\\\n")


def write_counts(path: str | Path, grams: Sequence[Sequence[str]], counts: Sequence[IntArray]) -> None:
    """Write a counts file: `grams[k-1]` the order-k n-grams as space-joined words and their raw counts;
    `grams[0]` must be the whole vocabulary in id order."""
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(f"{COUNTS_MAGIC} order={len(grams)} vocab_size={len(grams[0])} smoothing=laplace\n")
        for k_grams, k_counts in zip(grams, counts, strict=True):
            f.writelines(f"{g}\t{n}\n" for g, n in zip(k_grams, k_counts.tolist(), strict=True))


def read_arpa(path: str | Path) -> ArpaTables:
    """The tables of an ARPA file. Raises ValueError (file:line) on a malformed file."""
    with _gc_paused():
        return _read_arpa(Path(path))


def read_counts(path: str | Path) -> CountTables:
    """The tables of a counts file written by `write_counts`. Raises ValueError (file:line) on a bad file."""
    with _gc_paused():
        return _read_counts(Path(path))


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Parsing creates millions of small lists and tuples, none of them cyclic; the cyclic collector's
    repeated passes over them would dominate the load."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class _Lines:
    """The lines of a file with 1-based numbering, for errors that name the file and the line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:  # a missing or unreadable file stays an OSError
            raise ValueError(f"{path}: not UTF-8 text ({e})") from e
        self.lines = text.split("\n")
        if self.lines and self.lines[-1] == "":
            self.lines.pop()
        self.pos = 0  # index of the next line to read

    def error(self, index: int, message: str) -> ValueError:
        return ValueError(f"{self.path}:{index + 1}: {message}")

    def next_nonblank(self, expected: str) -> tuple[int, str]:
        while self.pos < len(self.lines):
            index, line = self.pos, self.lines[self.pos].strip()
            self.pos += 1
            if line:
                return index, line
        raise ValueError(f"{self.path}:{len(self.lines)}: unexpected end of file, expected {expected}")

    def block(self, count: int, what: str) -> list[str]:
        """The next `count` lines, which must all be non-empty (a section body)."""
        start = self.pos
        block = self.lines[start : start + count]
        if len(block) < count:
            raise self.error(len(self.lines) - 1, f"unexpected end of file: {what} has fewer lines than declared")
        if not all(block):
            blank = start + block.index("")
            raise self.error(blank, f"{what}: section ended after fewer lines than the declared {count}")
        self.pos += count
        return block


def _floats(lines: _Lines, first: int, fields: list[str], what: str) -> FloatArray:
    try:
        values: FloatArray = np.array(fields, dtype=np.float64)
    except ValueError:
        values = np.zeros(0)
    if len(values) != len(fields) or np.isnan(values).any():
        for i, field in enumerate(fields):  # slow path, only to name the line
            try:
                bad = math.isnan(float(field))
            except ValueError:
                bad = True
            if bad:
                raise lines.error(first + i, f"{what} {field!r} is not a number") from None
    return values


def _read_arpa(path: Path) -> ArpaTables:
    lines = _Lines(path)
    index, line = lines.next_nonblank("\\data\\")
    if line != "\\data\\":
        raise lines.error(index, f"expected \\data\\, found {line[:40]!r}")
    declared: list[int] = []
    index, line = lines.next_nonblank("ngram counts")
    while line.startswith("ngram "):
        k_str, sep, n_str = line[6:].partition("=")
        try:
            k, n = int(k_str), int(n_str)
        except ValueError:
            k, n = -1, -1
        if not sep or k != len(declared) + 1 or n < 0:
            raise lines.error(index, f"bad count line {line!r} (expected 'ngram {len(declared) + 1}=<count>')")
        declared.append(n)
        index, line = lines.next_nonblank("an n-gram section")
    if not declared:
        raise lines.error(index, "no 'ngram k=count' lines after \\data\\")
    order = len(declared)

    vocab: list[str] = []
    word_to_id: dict[str, int] = {}
    ids: list[IntArray] = []
    probs: list[FloatArray] = []
    backoffs: list[FloatArray] = []
    for k in range(1, order + 1):
        if k > 1:
            index, line = lines.next_nonblank(f"\\{k}-grams:")
        if line != f"\\{k}-grams:":
            hint = f" (more {k - 1}-grams than the declared {declared[k - 2]}?)" if k > 1 else ""
            raise lines.error(index, f"expected \\{k}-grams:{hint}, found {line[:40]!r}")
        first = lines.pos
        what = f"\\{k}-grams:"
        rows = [ln.split() for ln in lines.block(declared[k - 1], what)]
        with_backoff = k + 2 if k < order else k + 1
        for i, parts in enumerate(rows):
            if len(parts) != k + 1 and len(parts) != with_backoff:
                raise lines.error(
                    first + i,
                    f"a {k}-gram line needs {k} words, a log10 probability"
                    + (" and optionally a backoff" if k < order else ""),
                )
        probs.append(_floats(lines, first, [p[0] for p in rows], "log10 probability"))
        if k < order:
            backoffs.append(_floats(lines, first, [p[k + 1] if len(p) == k + 2 else "0" for p in rows], "backoff"))
        if k == 1:
            vocab = [p[1] for p in rows]
            word_to_id = {w: i for i, w in enumerate(vocab)}
            if len(word_to_id) != len(vocab):
                seen: set[str] = set()
                for i, w in enumerate(vocab):
                    if w in seen:
                        raise lines.error(first + i, f"duplicate unigram {w!r}")
                    seen.add(w)
            ids.append(np.arange(len(vocab), dtype=np.int64)[:, None])
        else:
            try:
                flat = [word_to_id[w] for p in rows for w in p[1 : k + 1]]
            except KeyError:
                for i, p in enumerate(rows):
                    for w in p[1 : k + 1]:
                        if w not in word_to_id:
                            raise lines.error(first + i, f"word {w!r} is not a unigram") from None
                raise
            ids.append(np.array(flat, dtype=np.int64).reshape(-1, k))
    index, line = lines.next_nonblank("\\end\\")
    if line != "\\end\\":
        raise lines.error(
            index, f"expected \\end\\ after the declared {declared[-1]} {order}-grams, found {line[:40]!r}"
        )

    for special in (BOS, EOS):
        if special not in word_to_id:
            raise ValueError(f"{path}: the ARPA file has no {special} unigram")
    if UNK not in word_to_id:  # KenLM substitutes one rather than failing
        vocab.append(UNK)
        ids[0] = np.arange(len(vocab), dtype=np.int64)[:, None]
        probs[0] = np.append(probs[0], KENLM_MISSING_UNK_LOG10)
        if order > 1:
            backoffs[0] = np.append(backoffs[0], 0.0)
    return ArpaTables(vocab, ids, probs, backoffs)


def _read_counts(path: Path) -> CountTables:
    lines = _Lines(path)
    index, header = lines.next_nonblank(COUNTS_MAGIC)
    if not header.startswith(COUNTS_MAGIC):
        raise lines.error(index, f"not a plm n-gram counts file (expected a {COUNTS_MAGIC!r} header)")
    fields = {}
    for field in header[len(COUNTS_MAGIC) :].split():
        key, _, value = field.partition("=")
        fields[key] = value
    try:
        order, vsize = int(fields["order"]), int(fields["vocab_size"])
    except (KeyError, ValueError):
        raise lines.error(index, "the header needs order=<int> vocab_size=<int>") from None
    if order < 1 or vsize < 3:
        raise lines.error(index, f"bad order {order} or vocab_size {vsize}")

    grams: list[list[str]] = [[] for _ in range(order)]
    counts: list[list[str]] = [[] for _ in range(order)]
    line_of: list[list[int]] = [[] for _ in range(order)]
    for i in range(lines.pos, len(lines.lines)):
        line = lines.lines[i]
        if not line:
            continue
        gram, tab, count = line.partition("\t")
        k = gram.count(" ") + 1
        if not gram or not tab or not count or k > order:
            raise lines.error(i, f"expected 'w1 ... wk<TAB>count' with k <= {order}")
        grams[k - 1].append(gram)
        counts[k - 1].append(count)
        line_of[k - 1].append(i)

    vocab = grams[0]
    if len(vocab) != vsize:
        raise ValueError(f"{path}: the header declares vocab_size={vsize} but there are {len(vocab)} unigram lines")
    word_to_id = {w: i for i, w in enumerate(vocab)}
    if len(word_to_id) != vsize:
        raise ValueError(f"{path}: duplicate unigram lines")
    ids: list[IntArray] = [np.arange(vsize, dtype=np.int64)[:, None]]
    values: list[IntArray] = []
    for k in range(1, order + 1):
        parsed = []
        for i, c in zip(line_of[k - 1], counts[k - 1], strict=True):
            try:
                n = int(c)
            except ValueError:
                n = -1
            if n < 0:
                raise lines.error(i, f"count {c!r} is not a non-negative integer")
            parsed.append(n)
        values.append(np.array(parsed, dtype=np.int64))
        if k > 1:
            try:
                flat = [word_to_id[w] for g in grams[k - 1] for w in g.split(" ")]
            except KeyError:
                for i, g in zip(line_of[k - 1], grams[k - 1], strict=True):
                    for w in g.split(" "):
                        if w not in word_to_id:
                            raise lines.error(i, f"word {w!r} is not in the vocabulary (unigram lines)") from None
                raise
            ids.append(np.array(flat, dtype=np.int64).reshape(-1, k))
    return CountTables(vocab, ids, values)
