"""Behaviour of the `word2vec` family: subsampling and noise tables, learning on a synthetic corpus,
ONNX == numpy, and the adapter (static vectors, cloze) over a folder built by `export.build_word2vec.build`.

Everything trains in seconds on inline corpora; the comparison with gensim is marked slow.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import pytest
from plm.export.build import BuildData
from plm.export.build_word2vec import PROFILES, build
from plm.export.word2vec_export import UNK_ID, cloze_reference, export_word2vec, served_matrices, vectors_reference
from plm.models import tokenization
from plm.models.word2vec import (
    Word2Vec,
    Word2VecConfig,
    evaluate_word_pairs,
    keep_probabilities,
    negative_table,
    noise_distribution,
    spearman,
)

GROUPS = [[f"a{i}" for i in range(8)], [f"b{i}" for i in range(8)]]


def _topic_corpus(n: int = 1500, seed: int = 0) -> list[list[str]]:
    """Sentences of 8 words drawn from one of two disjoint groups: a-words never meet b-words."""
    rng = random.Random(seed)
    return [[rng.choice(GROUPS[k % 2]) for _ in range(8)] for k in range(n)]


def _separation(model: Word2Vec) -> float:
    """Mean cosine within a group minus mean cosine across groups."""
    unit = model.normalized()
    a = unit[[model.index[w] for w in GROUPS[0]]]
    b = unit[[model.index[w] for w in GROUPS[1]]]
    within = (np.mean(a @ a.T) + np.mean(b @ b.T)) / 2  # includes the diagonal (1) equally in both models
    return float(within - np.mean(a @ b.T))


# ------------------------------------------------------------------------------------------ tables


def test_subsampling_follows_gensims_formula() -> None:
    counts = np.array([10_000, 1_000, 100, 10, 1])
    t = 1e-3 * counts.sum()
    expected = np.minimum(1.0, (np.sqrt(counts / t) + 1) * t / counts)
    np.testing.assert_allclose(keep_probabilities(counts, 1e-3), expected)
    assert keep_probabilities(counts, 1e-3)[-1] == 1.0  # rare words are always kept
    assert np.all(np.diff(keep_probabilities(counts, 1e-3)) >= 0)  # the more frequent, the more dropped
    assert np.all(keep_probabilities(counts, 0.0) == 1.0)


def test_negative_sampling_is_unigram_to_the_075() -> None:
    counts = np.array([16, 1, 81])
    p = noise_distribution(counts)
    np.testing.assert_allclose(p, np.array([8, 1, 27]) / 36)
    table = negative_table(p).numpy()
    np.testing.assert_allclose(np.bincount(table, minlength=3) / len(table), p, atol=1e-6)


def test_spearman_handles_ties_like_scipy() -> None:
    a = np.array([1.0, 2.0, 2.0, 3.0, 5.0])
    b = np.array([2.0, 1.0, 4.0, 4.0, 9.0])
    # scipy.stats.spearmanr(a, b) = 0.7631578947368421
    assert spearman(a, b) == pytest.approx(0.7631578947368421, abs=1e-12)


# ------------------------------------------------------------------------------------------ training


@pytest.mark.parametrize("sg", [False, True])
def test_cooccurring_words_become_closer(sg: bool) -> None:
    cfg = Word2VecConfig(sg=sg, vector_size=16, window=3, min_count=1, epochs=3, sample=0.0, batch_pairs=1024)
    model = Word2Vec.train_on(_topic_corpus(), cfg)
    assert model.stats.pairs > 0 and model.stats.loss_per_epoch[-1] < model.stats.loss_per_epoch[0]
    assert _separation(model) > 0.5


def test_word_pair_evaluation_counts_coverage(tmp_path: Path) -> None:
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("# comment\nA\tB\t3\nB\tC\t2\nA\tC\t1\nA\tzzz\t5\n", encoding="utf-8")
    unit = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]], dtype=np.float32)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    r = evaluate_word_pairs(unit, ["a", "b", "c"], pairs)
    assert r["coverage"] == 0.75 and r["spearman"] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------ ONNX


def test_onnx_graphs_match_numpy(tmp_path: Path) -> None:
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    wv, syn1neg = rng.normal(size=(50, 12)).astype(np.float32), rng.normal(size=(50, 12)).astype(np.float32)
    exported = export_word2vec(wv, syn1neg, tmp_path)
    assert exported["parity"]["max_abs_diff"] <= 1e-4 and exported["vocab_size"] == 52
    swv, ssyn, bias = served_matrices(wv, syn1neg)
    vec = ort.InferenceSession(str(tmp_path / "vectors.onnx"), providers=["CPUExecutionProvider"])
    cloze = ort.InferenceSession(str(tmp_path / "cloze.onnx"), providers=["CPUExecutionProvider"])
    ids = np.array([UNK_ID, 2, 51, 7], dtype=np.int64)
    (got,) = vec.run(["vectors"], {"input_ids": ids})
    np.testing.assert_allclose(got, vectors_reference(swv, ids), atol=1e-5)
    assert np.all(got[0] == 0)  # <unk> has no vector
    ctx = rng.integers(2, 52, size=(5, 6)).astype(np.int64)
    mask = np.ones_like(ctx)
    mask[1, 3:] = 0
    mask[4] = 0
    (lp,) = cloze.run(["logprobs"], {"context_ids": ctx, "context_mask": mask})
    np.testing.assert_allclose(lp, cloze_reference(swv, ssyn, bias, ctx, mask), atol=1e-4)
    np.testing.assert_allclose(np.exp(lp).sum(1), 1.0, atol=1e-5)
    assert np.all(np.exp(lp[:, :2]) == 0)  # the specials are never predicted
    np.testing.assert_allclose(lp[4, 2:], -np.log(50), atol=1e-5)  # no context: uniform


# ------------------------------------------------------------------------------------------ adapter

MEMO = [
    "the king rules the castle .",
    "a farmer plants seeds in spring .",
    "the river runs by the bank .",
    "she put money in the bank .",
    "cold winter brings deep snow .",
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    train = MEMO * 200
    tok = tokenization.train_word_tokenizer(train, min_count=1)
    words = {s: [tokenization.words(tok, t) for t in train] for s in ("train", "valid", "test")}
    repo = tmp_path_factory.mktemp("w2v")
    data = BuildData(cast(Any, SimpleNamespace(manifest={"corpus_sha256": "test"})), tok, words, repo / "no-cache")
    tiny = PROFILES["tiny"]
    PROFILES["test"] = replace(tiny, config=replace(tiny.config, epochs=5, sample=0.0, window=3))
    try:
        manifests = build(data, "test", repo, key="k", seed=0)
    finally:
        del PROFILES["test"]
    assert set(manifests) == {"word2vec-cbow", "word2vec-skipgram"}
    m = manifests["word2vec-cbow"]
    assert m["family"] == "word2vec" and m["tasks"] == ["embed", "fill_mask"] and m["build_key"] == "k"
    assert m["parity"]["max_abs_diff"] <= 1e-4
    return repo


def _adapter(folder: Path) -> Any:
    from plm.service.config import ServerConfig
    from plm.service.families.base import read_json
    from plm.service.families.word2vec import Word2VecAdapter
    from plm.service.metrics import Metrics

    return Word2VecAdapter(folder.name, folder, read_json(folder / "manifest.json"), ServerConfig(), Metrics())


@pytest.mark.parametrize("name", ["word2vec-cbow", "word2vec-skipgram"])
def test_adapter_vectors_are_static(folder: Path, name: str) -> None:
    model = _adapter(folder / name)

    async def go() -> list[Any]:
        e1, e2 = model.encode("The river runs by the bank."), model.encode("She put money in the BANK")
        out = await model.embed([e1.ids, e2.ids], None, None)
        return [e1, e2, *out]

    e1, e2, v1, v2 = asyncio.run(go())
    bank1, bank2 = v1.tokens[e1.words.index("bank")], v2.tokens[e2.words.index("bank")]
    assert np.array_equal(bank1, bank2) and v1.cls is None  # no context in a static vector
    assert abs(float(np.linalg.norm(bank1)) - 1.0) < 1e-5
    oov = model.encode("bank zebra")
    assert oov.oov == [False, True] and oov.ids[1] == model.eos_id
    matrix = model.word_vectors()
    assert matrix.shape == (model.vocab_size, 32) and np.array_equal(matrix[oov.ids[0]], bank1)


def test_adapter_cloze_predicts_the_centre_word(folder: Path) -> None:
    model = _adapter(folder / "word2vec-cbow")
    from plm.service.errors import FailedPrecondition

    async def go() -> tuple[list[np.ndarray], list[np.ndarray]]:
        await model.start()
        try:
            seqs, pos = [], []
            for text, blank in (("a farmer plants seeds in spring .", 3), ("cold winter brings deep snow .", 1),
                                ("the king rules the castle .", 2)):
                ids = model.encode(text).ids
                ids[blank] = model.mask_id
                seqs.append(ids)
                pos.append([blank])
            one = await model.mask_logprobs(seqs, pos, None)
            # two blanks in one sentence: neither is the other's context
            two_ids = model.encode("a farmer plants seeds in spring .").ids
            two_ids[1] = two_ids[3] = model.mask_id
            two = await model.mask_logprobs([two_ids], [[1, 3]], None)
            with pytest.raises(FailedPrecondition):
                await model.score([seqs[0]], True, None)
            return one, two
        finally:
            await model.close()

    one, two = asyncio.run(go())
    for dist, answer in zip(one, ("seeds", "winter", "rules"), strict=True):
        assert dist.shape == (1, model.vocab_size)
        assert abs(float(np.exp(dist[0].astype(np.float64)).sum()) - 1.0) < 1e-4
        assert model.token_text(int(np.argmax(dist[0]))) == answer
        assert np.all(np.isneginf(dist[0][model.never_generate_mask()]) | (dist[0][model.never_generate_mask()] < -1e8))
    assert two[0].shape == (2, model.vocab_size)
    top3 = [model.token_text(int(i)) for i in np.argsort(-two[0][1])[:3]]
    assert "seeds" in top3


# ------------------------------------------------------------------------------------------ vs gensim


@pytest.mark.slow
@pytest.mark.parametrize("sg", [False, True])
def test_as_good_as_gensim_on_a_topic_corpus(sg: bool) -> None:
    gensim_models = pytest.importorskip("gensim.models")
    kw: dict[str, Any] = {"vector_size": 32, "window": 5, "min_count": 1, "sample": 1e-3, "negative": 5, "epochs": 3}
    # Three corpora and seeds each, compared on the mean: one run of either moves by several per cent with the
    # seed (one pair on one corpus left only 3 % of margin under the 0.9 factor).
    ours_sep, ref_sep = [], []
    for seed in (1, 2, 3):
        corpus = _topic_corpus(3000, seed=seed)
        ours_sep.append(_separation(Word2Vec.train_on(corpus, Word2VecConfig(sg=sg, seed=seed, **kw))))
        theirs = gensim_models.Word2Vec(corpus, sg=int(sg), workers=1, seed=seed, **kw)
        ref = Word2Vec(theirs.wv.index_to_key, np.ones(len(theirs.wv)), Word2VecConfig(vector_size=32))
        ref.wv = __import__("torch").from_numpy(theirs.wv.vectors.copy())
        ref_sep.append(_separation(ref))
    assert np.mean(ours_sep) >= 0.9 * np.mean(ref_sep), (ours_sep, ref_sep)
