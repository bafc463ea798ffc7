"""`plm import arpa`: a hand-written trigram ARPA file whose sentences take every backoff branch (a trigram hit,
a bigram after the trigram context's backoff, a unigram after two backoffs, a context with no backoff entry, an
unknown word, the end of sentence) scores over gRPC as kenlm.Model.full_scores does."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ServerThread
from tests.test_import_bert import client, serve

__all__ = ["client"]  # the module's client fixture, on this module's `served`

ARPA = """
\\data\\
ngram 1=6
ngram 2=5
ngram 3=3

\\1-grams:
-1.0\t<unk>\t0
-99\t<s>\t-0.5
-0.7\t</s>
-0.6\ta\t-0.3
-0.8\tb\t-0.2
-0.9\tc\t-0.25

\\2-grams:
-0.3\t<s> a\t-0.1
-0.4\ta b\t-0.15
-0.5\tb c
-0.35\tc </s>
-0.45\tb a\t-0.05

\\3-grams:
-0.2\t<s> a b
-0.25\ta b c
-0.15\tb a b

\\end\\
"""
SENTENCES = ["a b c", "b a b c", "c a", "a x b", "c c c", "b", "a b a b c a"]


@pytest.fixture(scope="module")
def arpa_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("arpa") / "hand.arpa"
    path.write_text(ARPA.lstrip(), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, arpa_file: Path) -> Iterator[ServerThread]:
    from plm.export.importers import import_model

    repo = tmp_path_factory.mktemp("imported-arpa")
    import_model("arpa", arpa_file, repo, name="hand")
    yield from serve(repo)


def test_scores_equal_kenlm(client: Any, arpa_file: Path) -> None:
    import kenlm

    lm = kenlm.Model(str(arpa_file))
    resp = client.score("hand", SENTENCES)
    lengths = set()
    for text, result in zip(SENTENCES, resp.scores, strict=True):
        expected = list(lm.full_scores(text, bos=True, eos=True))
        got = [(t.log_prob / math.log(10), t.ngram_length) for t in result.tokens]
        assert len(got) == len(expected), text
        for (g, gn), (e, en, _) in zip(got, expected, strict=True):
            assert g == pytest.approx(e, abs=1e-4) and gn == en, text
        lengths |= {n for _, n, _ in expected}
    assert lengths == {1, 2, 3}  # every order was reached


def test_bad_arpa_fails_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from plm.cli import main

    path = tmp_path / "bad.arpa"
    path.write_text(ARPA.lstrip().replace("ngram 2=5", "ngram 2=7"), encoding="utf-8")
    assert main(["import", "arpa", str(path), "--repository", str(tmp_path / "repo")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.arpa: not a valid ARPA file" in err, err
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").iterdir())
