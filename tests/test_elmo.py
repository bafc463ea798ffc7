"""Behaviour of the `elmo` family: padding never leaks (either direction, either side), ONNX keeps the LSTMs
and equals PyTorch, the same word gets different vectors in different contexts (the notes' polysemy point)
while its layer-0 vector stays the same, the layer mix follows ELMo's formula, and the adapter batches
faithfully. Models are a few thousand parameters; the adapter's folder is built with the real `build()`.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from plm.data import corpus as corpus_mod
from plm.export.build import BuildData
from plm.export.rnn_export import export_elmo
from plm.models import tokenization
from plm.models.elmo import ELMo, ELMoConfig, mix_layers, padding_indices
from plm.service.errors import InvalidArgument
from torch import Tensor

H = 8
PAD = 3
SENTENCE = [1, 5, 17, 9, 42, 2]  # <s> … </s>
LONGER = [1, 7, 8, 11, 12, 13, 14, 15, 2]


@pytest.fixture(scope="module")
def model() -> ELMo:
    torch.manual_seed(0)
    return ELMo(ELMoConfig(vocab_size=50, n_embd=H, dropout=0.0)).eval()


@pytest.fixture(scope="module")
def session(model: ELMo, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], ort.InferenceSession]:
    path = tmp_path_factory.mktemp("elmo") / "model.onnx"
    entry = export_elmo(model, path)
    return entry, ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _pad(rows: list[list[int]], side: str) -> tuple[Tensor, Tensor]:
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), PAD, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        cols = slice(0, len(r)) if side == "right" else slice(T - len(r), T)
        ids[i, cols] = torch.tensor(r)
        mask[i, cols] = 1
    return ids, mask


def test_padding_indices_reverse_within_the_real_length() -> None:
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    compact, reverse, restore, lengths = padding_indices(mask)
    assert compact.tolist() == [[2, 3, 4, 0, 1], [0, 1, 2, 3, 4]]
    assert reverse.tolist() == [[2, 1, 0, 3, 4], [2, 1, 0, 3, 4]]  # the 3 real tokens reversed, pads stay
    assert restore.tolist() == [[3, 4, 0, 1, 2], [0, 1, 2, 3, 4]]
    assert lengths.tolist() == [3, 3]


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_does_not_leak(model: ELMo, session: tuple[dict[str, Any], ort.InferenceSession],
                               side: str) -> None:
    """A sentence alone and padded beside a longer one: same layers, both directions, PyTorch and ONNX."""
    _, sess = session
    alone_ids, alone_mask = _pad([SENTENCE], side)
    ids, mask = _pad([LONGER, SENTENCE, [1, 4, 2]], side)
    with torch.no_grad():
        alone_layers, alone_lp = model(alone_ids, alone_mask)  # (1, 3, 6, 2H), (1, 6)
        layers, lp = model(ids, mask)  # (3, 3, 9, 2H), (3, 9)
    real = mask[1].bool()
    got = layers[1][:, real]  # (3, 6, 2H)
    # forward half [..., :H] and backward half [..., H:], separately: the backward LSTM is the one a
    # reversed padded tensor would poison.
    torch.testing.assert_close(got[..., :H], alone_layers[0][..., :H], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[..., H:], alone_layers[0][..., H:], atol=1e-5, rtol=0)
    torch.testing.assert_close(lp[1][real], alone_lp[0], atol=1e-5, rtol=0)
    assert (layers[1][:, ~real] == 0).all() and (lp[1][~real] == 0).all()
    onnx_alone = sess.run(["layers", "token_logprobs"], {"input_ids": alone_ids.numpy(),
                                                         "attention_mask": alone_mask.numpy()})
    onnx_batch = sess.run(["layers", "token_logprobs"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    np.testing.assert_allclose(onnx_batch[0][1][:, real.numpy()], onnx_alone[0][0], atol=1e-5)
    np.testing.assert_allclose(onnx_batch[1][1][real.numpy()], onnx_alone[1][0], atol=1e-5)
    np.testing.assert_allclose(onnx_batch[0][1][:, real.numpy()], got.numpy(), atol=1e-5)


def test_backward_states_depend_only_on_later_tokens(model: ELMo) -> None:
    """Changing the last word changes every earlier backward state but no forward state before it."""
    changed = [*SENTENCE[:-2], 30, 2]
    with torch.no_grad():
        a, _ = model(torch.tensor([SENTENCE]), torch.ones(1, 6, dtype=torch.long))
        b, _ = model(torch.tensor([changed]), torch.ones(1, 6, dtype=torch.long))
    torch.testing.assert_close(a[0, 1:, :4, :H], b[0, 1:, :4, :H])  # forward states of tokens 0..3
    assert (a[0, 1:, :4, H:] - b[0, 1:, :4, H:]).abs().amax() > 1e-4  # backward states see the change


def test_onnx_has_lstm_nodes_and_matches_pytorch(model: ELMo,
                                                 session: tuple[dict[str, Any], ort.InferenceSession],
                                                 tmp_path: Path) -> None:
    entry, sess = session
    assert entry["lstm_nodes"] == 4
    assert entry["parity"]["max_abs_diff"] <= 1e-4 and len(entry["parity"]["checked_shapes"]) == 10
    assert [o["name"] for o in entry["outputs"]] == ["layers", "token_logprobs"]
    assert entry["outputs"][0]["shape"] == ["batch", 3, "sequence", 2 * H]
    path = tmp_path / "again.onnx"
    export_elmo(model, path)
    assert sum(n.op_type == "LSTM" for n in onnx.load(str(path)).graph.node) == 4
    ids, mask = _pad([LONGER, SENTENCE], "left")
    got = sess.run(["layers", "token_logprobs"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    with torch.no_grad():
        expected = model(ids, mask)
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e.numpy(), atol=1e-4)


def test_same_word_different_contexts(model: ELMo) -> None:
    """The notes' polysemy point: word 20 in two sentences — same layer 0, different contextual vectors."""
    a = [1, 5, 6, 20, 7, 2]
    b = [1, 30, 31, 20, 32, 33, 2]
    with torch.no_grad():
        la, _ = model(torch.tensor([a]), torch.ones(1, len(a), dtype=torch.long))
        lb, _ = model(torch.tensor([b]), torch.ones(1, len(b), dtype=torch.long))
    va, vb = la[0, :, 3], lb[0, :, 3]  # (3, 2H) each
    torch.testing.assert_close(va[0], vb[0], atol=0, rtol=0)
    for j in (1, 2):
        cos = torch.nn.functional.cosine_similarity(va[j], vb[j], dim=0)
        assert cos < 0.999
    mixed = torch.nn.functional.cosine_similarity(mix_layers(la[0, :, 3:4], torch.zeros(3))[0],
                                                  mix_layers(lb[0, :, 3:4], torch.zeros(3))[0], dim=0)
    assert mixed < 0.999


def test_mix_layers_is_the_elmo_formula() -> None:
    layers = torch.randn(3, 4, 6)
    s = torch.tensor([0.5, -1.0, 2.0])
    w = torch.softmax(s, 0)
    expected = 2.0 * (w[0] * layers[0] + w[1] * layers[1] + w[2] * layers[2])
    torch.testing.assert_close(mix_layers(layers, s, 2.0), expected)
    torch.testing.assert_close(mix_layers(layers, torch.tensor([0.0, -1e9, -1e9])), layers[0])


# ------------------------------------------------------------------------------------------------ adapter
TOY = [
    "the bank of the river was green .",
    "she put money in the bank today .",
    "the river ran past the old mill .",
    "he took money from the bank .",
    "a boat sat on the river bank .",
]


def toy_data() -> BuildData:
    tok = tokenization.train_word_tokenizer(TOY, min_count=1)
    splits = {"train": TOY * 4, "valid": TOY[:2], "test": TOY[2:]}
    corpus = corpus_mod.Corpus(train=splits["train"], valid=splits["valid"], test=splits["test"],
                               manifest={"corpus_sha256": "toy"})
    words = {split: [tokenization.words(tok, s) for s in sents] for split, sents in splits.items()}
    return BuildData(corpus, tok, words)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    from plm.export.build_elmo import build

    repo = tmp_path_factory.mktemp("repo")
    return repo / "elmo", build(toy_data(), "tiny", repo, "test-key", 0)["elmo"]


def test_manifest(folder: tuple[Path, dict[str, Any]]) -> None:
    _, manifest = folder
    assert manifest["family"] == "elmo" and manifest["tasks"] == ["embed", "score"]
    assert manifest["elmo"]["layer_weights"] == [0.0, 0.0, 0.0] and manifest["elmo"]["gamma"] == 1.0
    assert manifest["graphs"]["model"]["lstm_nodes"] == 4 and manifest["parity"]["max_abs_diff"] <= 1e-4
    assert manifest["evaluation"]["valid_word_perplexity"] > 1.0


def test_adapter(folder: tuple[Path, dict[str, Any]]) -> None:
    from plm.service.config import ServerConfig
    from plm.service.errors import FailedPrecondition
    from plm.service.families.elmo import ElmoAdapter
    from plm.service.metrics import Metrics

    path, manifest = folder
    texts = ["She put money in the bank.", "the bank of the river", "zebra", "a boat sat on the river bank ."]
    weights = (1.0, -0.5, 2.0)

    async def run() -> dict[str, Any]:
        adapter = ElmoAdapter("elmo", path, manifest, ServerConfig(), Metrics())
        await adapter.start()
        try:
            seqs = [adapter.encode(t).ids for t in texts]
            out: dict[str, Any] = {"adapter": adapter, "seqs": seqs}
            out["scores"] = await adapter.score(seqs, True, None)
            out["scores_alone"] = [(await adapter.score([s], True, None))[0] for s in seqs]
            out["vectors"] = await adapter.embed(seqs, None, None)
            out["vectors_alone"] = [(await adapter.embed([s], None, None))[0] for s in seqs]
            out["weighted"] = await adapter.embed(seqs[:1], weights, None)
            for bad in ((1.0, 2.0), (1.0, float("nan"), 0.0), (0.0, 0.0, 0.0, 0.0)):
                with pytest.raises(InvalidArgument, match="layer_weights"):
                    await adapter.embed(seqs[:1], bad, None)
            with pytest.raises(FailedPrecondition):
                await adapter.next_logprobs(seqs[:1], None)
            return out
        finally:
            await adapter.close()

    out = asyncio.run(run())
    adapter, seqs = out["adapter"], out["seqs"]
    assert adapter.encode("zebra").oov == [True] and seqs[2] == [0]
    for b, a, s in zip(out["scores"], out["scores_alone"], seqs, strict=True):
        assert len(b.log_probs) == len(s) + 1  # the words, then </s>
        np.testing.assert_allclose(b.log_probs, a.log_probs, atol=1e-5)
        assert (b.log_probs < 0).all()
    for b, a, s in zip(out["vectors"], out["vectors_alone"], seqs, strict=True):
        assert b.tokens.shape == (len(s), 2 * manifest["config"]["n_embd"]) and b.cls is None
        np.testing.assert_allclose(b.tokens, a.tokens, atol=1e-5)

    # The mix, recomputed from the graph's raw layers of `<s> words </s>`: γ Σ softmax(s)_j layer_j.
    sess = ort.InferenceSession(str(path / "model.onnx"), providers=["CPUExecutionProvider"])
    row = np.array([[1, *seqs[0], 2]], dtype=np.int64)
    (layers,) = sess.run(["layers"], {"input_ids": row, "attention_mask": np.ones_like(row)})
    layers = layers[0, :, 1:-1]  # (3, N, 2H)
    w = np.exp(weights) / np.exp(weights).sum()
    np.testing.assert_allclose(out["weighted"][0].tokens, np.tensordot(w, layers, axes=1), atol=1e-5)
    np.testing.assert_allclose(out["vectors"][0].tokens, layers.mean(0), atol=1e-5)  # default: equal weights

    # "bank" (money) vs "bank" (river): different contextual vectors, the same layer-0 vector.
    bank = adapter.vocab.word_to_id["bank"]
    i, j = seqs[0].index(bank), seqs[1].index(bank)
    a, b = out["vectors"][0].tokens[i], out["vectors"][1].tokens[j]
    assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) < 0.999
    row2 = np.array([[1, *seqs[1], 2]], dtype=np.int64)
    (layers2,) = sess.run(["layers"], {"input_ids": row2, "attention_mask": np.ones_like(row2)})
    np.testing.assert_allclose(layers[0, i], layers2[0, 0, j + 1], atol=0)
