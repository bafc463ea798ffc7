"""Behaviour of the `bert` family: the pre-training data (80/10/10 of 15%, NSP 50/50), padding invariance,
ONNX == PyTorch, training, and the adapter on a tiny model built by `export.build_bert.build`.

Everything runs on models of a few ten thousand parameters in seconds.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnxruntime as ort
import pytest
import torch
from plm.data.corpus import Corpus
from plm.export.bert_export import INPUT_NAMES, OUTPUT_NAMES, BertServingGraph, export_bert, random_batch
from plm.export.build import BuildData
from plm.export.build_bert import build
from plm.models.bert import (
    IGNORE_INDEX,
    IS_NEXT,
    NOT_NEXT,
    Bert,
    BertConfig,
    SpecialIds,
    collate_pairs,
    mask_tokens,
    mlm_nsp_batches,
    mlm_nsp_loss,
    sample_pairs,
)
from plm.models.train import TrainConfig, train
from plm.service.config import Runtime, ServerConfig
from plm.service.families.base import top_of
from plm.service.families.bert import BertAdapter
from plm.service.metrics import Metrics
from tokenizers import Tokenizer

TINY = BertConfig(vocab_size=60, max_position=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
T = TypeVar("T")


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread: on a shared 2-core machine a second thread waiting for a busy core costs ~30x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model() -> Bert:
    torch.manual_seed(0)
    return Bert(TINY).eval()


# -- data -------------------------------------------------------------------------------------------------
def test_mask_tokens_80_10_10_of_15_percent() -> None:
    rng = np.random.default_rng(0)
    B, n, V = 1000, 40, 1000  # 40 maskable tokens a row: 15% is exactly 6
    ids = rng.integers(5, V, size=(B, n + 2))
    maskable = np.ones_like(ids, dtype=bool)
    maskable[:, [0, -1]] = False  # [CLS] ... [SEP]
    inputs, labels = mask_tokens(ids, maskable, rng, mask_id=4, vocab_size=V, first_regular=5)
    chosen = labels != IGNORE_INDEX
    assert (chosen.sum(axis=1) == 6).all()
    assert not chosen[:, [0, -1]].any(), "specials are never chosen"
    assert (labels[chosen] == ids[chosen]).all() and (inputs[~chosen] == ids[~chosen]).all()
    k = chosen.sum()
    masked = (inputs[chosen] == 4).sum() / k
    replaced = ((inputs[chosen] != 4) & (inputs[chosen] != ids[chosen])).sum() / k
    kept = (inputs[chosen] == ids[chosen]).sum() / k
    # 6000 choices: the standard error of a 10% share is 0.4%; the random token equals the original 0.1% of
    # the time, which moves ~0.01% from "replaced" to "kept".
    assert masked == pytest.approx(0.8, abs=0.02)
    assert replaced == pytest.approx(0.1, abs=0.015)
    assert kept == pytest.approx(0.1, abs=0.015)
    assert (inputs[chosen] >= 4).all(), "random replacements are never [PAD]/[UNK]/[CLS]/[SEP]"


def test_mask_tokens_chooses_15_percent_of_short_rows_too() -> None:
    rng = np.random.default_rng(1)
    ids = np.full((3, 6), 7)
    maskable = np.array([[0, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0]], dtype=bool)
    _, labels = mask_tokens(ids, maskable, rng, mask_id=4, vocab_size=10, first_regular=5)
    assert ((labels != IGNORE_INDEX).sum(axis=1) == [1, 1, 0]).all()  # at least one where there is any


def test_nsp_pairs_are_half_true_next_half_other_document() -> None:
    docs = [[[100 * d + i] for i in range(20)] for d in range(4)]  # sentence i of document d is [100d + i]
    pairs = sample_pairs(docs, 4000, np.random.default_rng(0))
    labels = np.array([label for _, _, label in pairs])
    assert (labels == IS_NEXT).mean() == pytest.approx(0.5, abs=0.03)
    for (a,), (b,), label in pairs:
        if label == IS_NEXT:
            assert b == a + 1
        else:
            assert b // 100 != a // 100, "a NotNext sentence comes from another document"


def test_single_document_nsp_never_uses_the_true_next_as_negative() -> None:
    doc = [[[i] for i in range(10)]]
    for (a,), (b,), label in sample_pairs(doc, 500, np.random.default_rng(0)):
        assert (b == a + 1) == (label == IS_NEXT)


def test_collate_builds_cls_a_sep_b_sep_with_segments_and_truncation() -> None:
    sp = SpecialIds()
    ids, mask, types, maskable, nsp = collate_pairs([([10, 11], [12], IS_NEXT), ([20] * 9, [21] * 5, NOT_NEXT)],
                                                    max_length=10, specials=sp)
    assert ids[0].tolist() == [2, 10, 11, 3, 12, 3, 0, 0, 0, 0]
    assert types[0].tolist() == [0, 0, 0, 0, 1, 1, 0, 0, 0, 0]
    assert maskable[0].tolist() == [False, True, True, False, True] + [False] * 5
    assert mask[0].tolist() == [1] * 6 + [0] * 4
    assert ids[1].tolist() == [2, 20, 20, 20, 3, 21, 21, 21, 21, 3]  # longest-first truncation to 10
    assert nsp.tolist() == [IS_NEXT, NOT_NEXT]


# -- model ------------------------------------------------------------------------------------------------
def test_padding_does_not_change_real_outputs(model: Bert) -> None:
    rows = [[2, 7, 8, 9, 3], [2, 11, 3], [2, 5, 6, 7, 8, 9, 10, 3]]
    T_ = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T_, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    with torch.no_grad():
        batched = model.hidden_states(ids, mask)
        for i, r in enumerate(rows):
            alone = model.hidden_states(torch.tensor([r]))
            assert torch.allclose(batched[i, : len(r)], alone[0], atol=1e-5)
            assert torch.allclose(model.nsp_logits(batched[i: i + 1]), model.nsp_logits(alone), atol=1e-5)


def test_mlm_decoder_is_tied_to_the_token_embeddings(model: Bert) -> None:
    h = torch.randn(3, TINY.n_embd)
    expected = model.mlm_ln(torch.nn.functional.gelu(model.mlm_dense(h))) @ model.word_embeddings.weight.T
    assert torch.allclose(model.mlm_logits(h), expected + model.mlm_bias, atol=1e-6)


def test_onnx_matches_pytorch_for_every_output(model: Bert, tmp_path: Path) -> None:
    entry = export_bert(model, tmp_path / "model.onnx")
    assert entry["parity"]["max_abs_diff"] <= 1e-4 and entry["onnx_checker"] == "passed"
    assert [o["name"] for o in entry["outputs"]] == list(OUTPUT_NAMES)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    graph = BertServingGraph(model).eval()
    g = torch.Generator().manual_seed(5)
    for batch, length, masks in ((1, 2, 1), (4, 23, 6), (9, 6, 2)):  # shapes the export did not see
        inputs = random_batch(TINY.vocab_size, batch, length, masks, g)
        with torch.no_grad():
            expected = [t.numpy() for t in graph(*inputs)]
        got = session.run(list(OUTPUT_NAMES), {n: t.numpy() for n, t in zip(INPUT_NAMES, inputs, strict=True)})
        real = inputs[1].numpy() > 0
        assert got[0].shape == (batch, masks, TINY.vocab_size) and got[1].shape == (batch, 2)
        assert np.abs(got[0] - expected[0]).max() <= 1e-4
        assert np.abs(got[1] - expected[1]).max() <= 1e-4
        assert np.abs(got[2] - expected[2])[real].max() <= 1e-4


def test_training_lowers_the_mlm_loss(tmp_path: Path) -> None:
    docs = [[[5 + (i + j) % 20 for j in range(6)] for i in range(40)]]  # a repetitive "language"
    get_batch = mlm_nsp_batches({"train": docs, "valid": docs}, max_length=16, batch_size=16,
                                vocab_size=TINY.vocab_size, rng=np.random.default_rng(0))
    torch.manual_seed(0)
    bert = Bert(TINY)
    fixed = [get_batch("valid") for _ in range(4)]

    def mlm_loss() -> float:
        """MLM cross entropy alone over the fixed batches (NSP left out)."""
        bert.eval()
        losses = []
        with torch.no_grad():
            for ids, mask, types, _, labels in fixed:
                chosen = labels != IGNORE_INDEX
                logits = bert.mlm_logits(bert.hidden_states(ids, mask, types)[chosen])  # (N, V)
                losses.append(float(torch.nn.functional.cross_entropy(logits, labels[chosen])))
        return float(np.mean(losses))

    before = mlm_loss()
    cfg = TrainConfig(max_steps=60, warmup_steps=5, eval_interval=30, eval_batches=2, lr=3e-3, num_threads=1,
                      progress=False)
    result = train(bert, get_batch, cfg, tmp_path, loss_fn=mlm_nsp_loss, desc="bert-test")
    assert result.best_valid_loss < result.history[0][2]
    assert mlm_loss() < before - 0.5
    assert (tmp_path / "loss_curve.png").is_file()


# -- adapter ----------------------------------------------------------------------------------------------
SENTENCES = [
    "the cat sat on the mat.", "my dog is hairy.", "she sat on the river bank.", "he put money in the bank.",
    "birds fly over the blue sea.", "the old man reads a book.", "we eat bread and cheese.",
    "the children play in the garden.", "rain falls on the green hills.", "a ship sails to the island.",
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `tiny` BERT built by the real build function on a corpus that repeats ten sentences."""
    train_text = SENTENCES * 30
    corpus = Corpus(train=train_text, valid=SENTENCES * 2, test=SENTENCES * 2,
                    manifest={"corpus_sha256": "test"})
    data = BuildData(corpus=corpus, word_tokenizer=None, words={})
    repo = tmp_path_factory.mktemp("repo")
    manifests = build(data, "tiny", repo, key="k", seed=0)
    assert manifests["bert"]["build_key"] == "k"
    return repo / "bert"


def _with_adapter(folder: Path, fn: Callable[[BertAdapter], Awaitable[T]]) -> T:
    async def main() -> T:
        manifest: dict[str, Any] = json.loads((folder / "manifest.json").read_text())
        adapter = BertAdapter("bert", folder, manifest, ServerConfig(runtime=Runtime(intra_op_threads=1)), Metrics())
        await adapter.start()
        try:
            return await fn(adapter)
        finally:
            await adapter.close()

    return asyncio.run(main())


def test_manifest(folder: Path) -> None:
    m = json.loads((folder / "manifest.json").read_text())
    assert m["family"] == "bert" and m["tasks"] == ["fill_mask", "embed", "next_sentence", "score"]
    assert m["tokenizer"]["kind"] == "wordpiece" and m["graphs"]["model"]["parity"]["max_abs_diff"] <= 1e-4
    assert {"test_mlm_top1", "test_mlm_top5", "test_nsp_accuracy"} <= set(m["evaluation"])
    assert (folder / "loss_curve.png").is_file() and (folder / "tokenizer.json").is_file()


def test_encode_groups_wordpieces_and_keeps_mask(folder: Path) -> None:
    async def go(a: BertAdapter) -> None:
        enc = a.encode("The cats sat on the [MASK].")
        assert enc.ids[enc.tokens.index("[MASK]")] == a.mask_id
        assert len(enc.words) == max(enc.word_index) + 1
        assert a.context_budget == a.max_length - 2 and a.eos_id == a.tokenizer.token_to_id("[SEP]")
        assert a.never_generate_mask()[[0, 1, 2, 3, 4]].all()
        with pytest.raises(Exception, match="masked LM"):
            await a.next_logprobs([[5]], None)

    _with_adapter(folder, go)


def test_fill_mask_recalls_a_memorised_word(folder: Path) -> None:
    async def go(a: BertAdapter) -> list[np.ndarray]:
        enc = a.encode("the cat sat on the [MASK].")
        return await a.mask_logprobs([enc.ids], [[enc.ids.index(a.mask_id)]], None)

    (lp,) = _with_adapter(folder, go)
    assert lp.shape[0] == 1
    assert np.exp(lp[0]).sum() == pytest.approx(1.0, abs=1e-4)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    # A tiny model trained for seconds: which sentence-final noun wins top-1 differs between CPUs (CI once
    # chose "book"), so the memorised word must rank in the top 5 with far more than a uniform share.
    top5 = [tok.id_to_token(int(i)) for i in np.argsort(-lp[0])[:5]]
    assert "mat" in top5, top5
    assert np.exp(lp[0][tok.token_to_id("mat")]) > 5.0 / lp.shape[1]


def test_mask_top_on_the_batchers_thread_equals_the_top_of_the_full_rows(folder: Path) -> None:
    """FillMask takes each blank's top k where the model ran; it must be the top k of the (M, V) rows."""
    texts = ["the cat sat on the [MASK].", "[MASK] dog is [MASK].", "birds fly over the [MASK] [MASK] sea."]

    async def go(a: BertAdapter) -> tuple[list[Any], list[Any]]:
        seqs, blanks = [], []
        for t in texts:
            ids = a.encode(t).ids
            seqs.append(ids)
            blanks.append([i for i, x in enumerate(ids) if x == a.mask_id])
        allowed = ~a.never_generate_mask()
        tops, dists = await asyncio.gather(a.mask_top(seqs, blanks, allowed, 7, None),
                                           a.mask_logprobs(seqs, blanks, None))
        return tops, [[top_of(row, allowed, 7) for row in d] for d in dists]

    tops, expected = _with_adapter(folder, go)
    assert [len(t) for t in tops] == [1, 2, 2]
    for got_text, want_text in zip(tops, expected, strict=True):
        for (ids, lps), (want_ids, want_lps) in zip(got_text, want_text, strict=True):
            assert ids.tolist() == want_ids.tolist() and np.array_equal(lps, want_lps)


def test_same_word_gets_different_vectors_in_different_contexts(folder: Path) -> None:
    async def go(a: BertAdapter) -> list[Any]:
        seqs = [a.encode("she sat on the river bank.").ids, a.encode("he put money in the bank.").ids]
        return [await a.embed(seqs, None, None), seqs, a.tokenizer.token_to_id("bank")]

    (v1, v2), (s1, s2), bank = _with_adapter(folder, go)
    assert v1.tokens.shape == (len(s1), 64) and v1.cls is not None and v1.cls.shape == (64,)
    x, y = v1.tokens[s1.index(bank)], v2.tokens[s2.index(bank)]
    assert float(x @ y / np.linalg.norm(x) / np.linalg.norm(y)) < 0.999


def test_next_sentence_probabilities(folder: Path) -> None:
    async def go(a: BertAdapter) -> np.ndarray:
        e = [a.encode(s).ids for s in SENTENCES]
        return await a.next_sentence_logprobs([(e[0], e[1]), (e[0], e[5]), (e[3], e[4])], None)

    lp = _with_adapter(folder, go)
    assert lp.shape == (3,) and ((np.exp(lp) >= 0) & (np.exp(lp) <= 1)).all()


def test_pll_is_the_sum_of_one_blank_fill_masks(folder: Path) -> None:
    async def go(a: BertAdapter) -> tuple[Any, list[np.ndarray]]:
        ids = a.encode("the old man reads a book.").ids
        scores = await a.score([ids], add_eos=True, deadline=None)
        one_by_one = [await a.mask_logprobs([[*ids[:i], a.mask_id, *ids[i + 1:]]], [[i]], None)
                      for i in range(len(ids))]
        return (ids, scores[0].log_probs), [o[0][0] for o in one_by_one]

    (ids, pll), rows = _with_adapter(folder, go)
    assert pll.shape == (len(ids),)
    assert np.allclose(pll, [r[t] for r, t in zip(rows, ids, strict=True)], atol=1e-5)


def test_results_do_not_depend_on_the_batch(folder: Path) -> None:
    async def go(a: BertAdapter) -> tuple[list[Any], list[Any]]:
        seqs = [a.encode(s).ids for s in ("my dog is hairy.", "we eat bread and cheese.", "a ship.")]
        long_ = a.encode(" ".join(SENTENCES[:4])).ids
        alone = [await a.score([seqs[0]], False, None), await a.embed([seqs[0]], None, None),
                 await a.next_sentence_logprobs([(seqs[0], seqs[1])], None)]
        batched = await asyncio.gather(
            a.score([seqs[0], long_, seqs[2]], False, None), a.embed([long_, seqs[0], seqs[2]], None, None),
            a.next_sentence_logprobs([(long_, seqs[1]), (seqs[0], seqs[1]), (seqs[2], seqs[2])], None))
        return alone, list(batched)

    alone, batched = _with_adapter(folder, go)
    assert np.abs(alone[0][0].log_probs - batched[0][0].log_probs).max() <= 1e-5
    assert np.abs(alone[1][0].tokens - batched[1][1].tokens).max() <= 1e-5
    assert np.abs(alone[2][0] - batched[2][1]) <= 1e-5
