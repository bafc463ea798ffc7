"""`plm import word2vec`: vectors gensim wrote (binary and text) answer nearest words and analogies over gRPC
exactly as gensim's KeyedVectors does on the same file; a file with inconsistent dimensions fails with one line."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ServerThread
from tests.test_import_bert import client, serve

__all__ = ["client"]  # the module's client fixture, on this module's `served`

SENTENCES = [s.split() for s in [
    "the king rules the kingdom with the queen", "the queen rules the kingdom with the king",
    "a man walks the dog in the park", "a woman walks the dog in the park", "the prince is the son of the king",
    "the princess is the daughter of the queen", "Paris is the capital of France", "Berlin is the capital of Germany",
    "the boy plays football with the man", "the girl plays football with the woman",
]] * 30
WORDS = ["king", "queen", "man", "woman", "Paris", "park", "the"]
ANALOGIES = [("king", "man", "woman"), ("Paris", "France", "Germany"), ("prince", "king", "queen")]


@pytest.fixture(scope="module")
def vector_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from gensim.models import Word2Vec

    folder = tmp_path_factory.mktemp("vectors")
    model = Word2Vec(SENTENCES, vector_size=24, window=3, min_count=1, epochs=20, seed=1, workers=1)
    files = {"binary": folder / "vectors.bin", "text": folder / "vectors.txt"}
    for form, path in files.items():
        model.wv.save_word2vec_format(str(path), binary=form == "binary")
    return files


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, vector_files: dict[str, Path]) -> Iterator[ServerThread]:
    from plm.export.importers import import_model

    repo = tmp_path_factory.mktemp("imported-vectors")
    for form, path in vector_files.items():
        import_model("word2vec", path, repo, name=f"w2v-{form}")
    yield from serve(repo)


@pytest.mark.parametrize("form", ["binary", "text"])
def test_nearest_and_analogies_equal_gensim(form: str, client: Any, vector_files: dict[str, Path]) -> None:
    from gensim.models import KeyedVectors

    kv = KeyedVectors.load_word2vec_format(str(vector_files[form]), binary=form == "binary")
    resp = client.embed(f"w2v-{form}", WORDS, nearest_k=5,
                        analogies=ANALOGIES)
    for word, emb in zip(WORDS, resp.embeddings, strict=True):
        expected = kv.most_similar(word, topn=5)
        assert [n.word for n in emb.nearest] == [w for w, _ in expected], word
        assert [n.cosine for n in emb.nearest] == pytest.approx([c for _, c in expected], abs=1e-5)
    for (a, b, c), result in zip(ANALOGIES, resp.analogies, strict=True):
        expected = kv.most_similar(positive=[a, c], negative=[b], topn=5)
        assert [n.word for n in result.answers] == [w for w, _ in expected], (a, b, c)
        assert [n.cosine for n in result.answers] == pytest.approx([s for _, s in expected], abs=1e-5)


@pytest.mark.parametrize(("content", "problem"), [
    (b"3 4\nking 0.1 0.2 0.3 0.4\nqueen 0.1 0.2 0.3\nman 1 2 3 4\n", "line 3 has 3 numbers; the header says 4"),
    (b"3 4\nking 0.1 0.2 0.3 0.4\n", "1 words; the header says 3"),
    (b"king 0.1 0.2\n", "line 1 is"),
    (b"2 4\nking " + b"\x00" * 16 + b"\nqueen " + b"\x00" * 8, "ends inside the vector of word 2"),
])
def test_bad_vector_file(content: bytes, problem: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from plm.cli import main

    path = tmp_path / "bad.vec"
    path.write_bytes(content)
    repo = tmp_path / "repo"
    assert main(["import", "word2vec", str(path), "--repository", str(repo)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"bad.vec: {problem}" in err, err
    assert not repo.exists() or not any(repo.iterdir())
