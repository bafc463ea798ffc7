"""Behaviour of the `gpt` family: padding invariance, causality, ONNX == PyTorch, and the training loop.

Everything runs on a ~30k-parameter model in a few seconds.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
from plm.export.onnx_export import INPUT_NAMES, OUTPUT_NAMES, GPTScoringGraph, export_gpt
from plm.models.gpt import GPT, GPTConfig, position_ids_from_mask
from plm.models.train import TrainConfig, lm_batches, train
from torch import Tensor

TINY = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(TINY).eval()


def _pad(rows: list[list[int]], side: str) -> tuple[Tensor, Tensor]:
    """Pad id lists to one (B, T) batch with pad id 0 on `side`; returns (ids, mask)."""
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        cols = slice(0, len(r)) if side == "right" else slice(T - len(r), T)
        ids[i, cols] = torch.tensor(r)
        mask[i, cols] = 1
    return ids, mask


def test_position_ids_follow_the_mask() -> None:
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    expected = torch.tensor([[0, 0, 0, 1, 2], [0, 1, 2, 0, 0], [0, 1, 2, 3, 4]])
    assert torch.equal(position_ids_from_mask(mask), expected)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_does_not_change_real_logits(model: GPT, side: str) -> None:
    sentence = [5, 17, 3, 42, 8]
    rows = [[1, 2, 3, 4, 6, 7, 9, 10, 11], sentence, [30, 31]]  # longer and shorter neighbours
    with torch.no_grad():
        alone, _ = model(torch.tensor([sentence]))  # (1, 5, V)
        ids, mask = _pad(rows, side)
        batched, _ = model(ids, mask)  # (3, 9, V)
    real = mask[1].bool()
    assert not torch.isnan(batched).any()  # pad queries (all keys masked) stay finite
    torch.testing.assert_close(batched[1, real], alone[0], atol=1e-5, rtol=0)


def test_future_tokens_do_not_change_earlier_logits(model: GPT) -> None:
    ids = torch.tensor([[5, 17, 3, 42, 8, 9, 1]])
    changed = ids.clone()
    changed[0, 4] = 60
    with torch.no_grad():
        a, _ = model(ids)
        b, _ = model(changed)
    torch.testing.assert_close(a[:, :4], b[:, :4], atol=0, rtol=0)
    assert not torch.allclose(a[:, 4:], b[:, 4:])


def test_loss_ignores_padding_targets(model: GPT) -> None:
    ids = torch.tensor([[5, 17, 3, 42]])
    targets = torch.tensor([[17, 3, 42, 9]])
    padded_targets = torch.tensor([[17, 3, -100, -100]])
    with torch.no_grad():
        _, loss = model(ids, targets=padded_targets)
        _, short_loss = model(ids[:, :2], targets=targets[:, :2])
    assert loss is not None and short_loss is not None
    torch.testing.assert_close(loss, short_loss, atol=1e-6, rtol=0)


def test_generate_greedy_matches_argmax(model: GPT) -> None:
    prompt = torch.tensor([[5, 17, 3]])
    out = model.generate(prompt, max_new_tokens=4, temperature=0.0)
    assert out.shape == (1, 7) and torch.equal(out[:, :3], prompt)
    with torch.no_grad():
        logits, _ = model(out[:, :-1])
    assert torch.equal(out[0, 3:], logits[0, 2:].argmax(-1))
    # A left-padded batch continues each row exactly as the row alone.
    ids, mask = _pad([[9, 9, 9, 9, 9], [5, 17, 3]], "left")
    batched = model.generate(ids, max_new_tokens=4, attention_mask=mask, temperature=0.0)
    assert torch.equal(batched[1, -4:], out[0, 3:])


# --- ONNX -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(model: GPT, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, ort.InferenceSession]:
    path = tmp_path_factory.mktemp("onnx") / "gpt.onnx"
    info = export_gpt(model, path)
    return info, ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_export_manifest_entry(exported: tuple[dict, ort.InferenceSession]) -> None:
    info, session = exported
    assert info["opset"] == 17 and info["onnx_checker"] == "passed"
    assert [i["name"] for i in info["inputs"]] == list(INPUT_NAMES)
    assert [o["name"] for o in info["outputs"]] == list(OUTPUT_NAMES)
    assert info["parity"]["max_abs_diff"] <= 1e-4
    assert [i.name for i in session.get_inputs()] == list(INPUT_NAMES)
    assert [o.shape for o in session.get_outputs()] == [
        ["batch", "sequence"],
        ["batch", TINY.vocab_size],
        ["batch", "sequence", TINY.n_embd],
    ]


@pytest.mark.parametrize(
    ("rows", "side"),
    [
        ([[7]], "right"),
        ([[5, 17, 3, 42, 8, 9]], "right"),
        ([[5, 17, 3], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [30, 31], [4] * 16], "right"),
        ([[5, 17, 3], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [30, 31], [4] * 16], "left"),
        ([[i % 64 for i in range(n, 2 * n + 1)] for n in range(1, 8)], "left"),  # batch 7
    ],
)
def test_onnx_matches_pytorch(
    model: GPT, exported: tuple[dict, ort.InferenceSession], rows: list[list[int]], side: str
) -> None:
    _, session = exported
    ids, mask = _pad(rows, side)
    pos = position_ids_from_mask(mask)
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": pos.numpy()}
    token_lp, next_lp, hidden = session.run(list(OUTPUT_NAMES), feeds)
    with torch.no_grad():
        ref = [t.numpy() for t in GPTScoringGraph(model)(ids, mask, pos)]
        logits = model(ids, mask)[0].numpy().astype(np.float64)  # (B, T, V)
    real = mask.numpy().astype(bool)
    np.testing.assert_allclose(token_lp, ref[0], atol=1e-4, rtol=0)
    np.testing.assert_allclose(next_lp, ref[1], atol=1e-4, rtol=0)
    np.testing.assert_allclose(hidden[real], ref[2][real], atol=1e-4, rtol=0)

    # next_logprobs is a distribution: each row sums to 1 in probability space.
    np.testing.assert_allclose(np.exp(next_lp).sum(-1), 1.0, atol=1e-5)
    # token_logprobs == log_softmax(logits)[t-1, x_t] computed in numpy, where t-1 and t are real; else 0.
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))  # (B, T, V) log_softmax
    expected = np.zeros(ids.shape)
    for b, t in zip(*np.nonzero(real[:, 1:] & real[:, :-1]), strict=True):
        expected[b, t + 1] = logp[b, t, ids[b, t + 1]]
    np.testing.assert_allclose(token_lp, expected, atol=1e-4, rtol=0)
    # next_logprobs is read after each row's last real token, whatever the padding side.
    last = [max(np.nonzero(r)[0]) for r in real]
    np.testing.assert_allclose(next_lp, logp[np.arange(len(rows)), last], atol=1e-4, rtol=0)


# --- training --------------------------------------------------------------------------------------------


def _stream(n: int, seed: int, reverse: bool = False) -> np.ndarray:
    """A repetitive stream: counting runs 0..15 (or 15..0) of random lengths, starting anywhere."""
    rng = np.random.default_rng(seed)
    out: list[int] = []
    while len(out) < n:
        start = int(rng.integers(0, 16))
        out.extend((start + k) % 16 for k in range(int(rng.integers(4, 12))))
    s = np.array(out[:n], dtype=np.uint16)
    return 15 - s if reverse else s


def _fast(**overrides: Any) -> TrainConfig:
    """A few dozen steps of a tiny model: seconds on 2 busy cores."""
    cfg = TrainConfig(max_steps=40, batch_size=16, lr=3e-3, min_lr=3e-4, warmup_steps=5, eval_interval=10)
    cfg = replace(cfg, eval_batches=2, patience=None, seed=0, num_threads=2, progress=False)
    return replace(cfg, **overrides)


def test_training_lowers_validation_loss(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=16, block_size=16, n_layer=2, n_head=2, n_embd=32))
    get_batch = lm_batches(_stream(5000, seed=1), block_size=16, batch_size=16, rng=np.random.default_rng(0))
    result = train(model, get_batch, _fast(), tmp_path)
    assert result.stopped_because == "max_steps" and result.steps == 40
    assert result.tokens_seen == 40 * 16 * 16
    initial_valid = result.history[0][2]
    assert result.best_valid_loss < 0.6 * initial_valid, result.history
    png = (tmp_path / "loss_curve.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000


def test_early_stopping_restores_best_weights(tmp_path: Path) -> None:
    # Train on counting up, validate on counting down: learning the one makes the other worse,
    # so the best validation loss is at the start and patience runs out.
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=16, block_size=16, n_layer=2, n_head=2, n_embd=32))
    streams = {"train": _stream(5000, seed=1), "valid": _stream(2000, seed=2, reverse=True)}
    fixed_valid = lm_batches(streams, 16, 16, np.random.default_rng(0))("valid")  # one batch, no noise
    sampler = lm_batches(streams, 16, 16, np.random.default_rng(0))

    def get_batch(split: str) -> tuple[Tensor, ...]:
        return fixed_valid if split == "valid" else sampler("train")

    result = train(model, get_batch, _fast(max_steps=400, eval_interval=5, patience=3), tmp_path)
    assert result.stopped_because == "early_stopping"
    assert result.steps < 400
    valid_losses = [v for _, _, v in result.history]
    assert result.best_valid_loss == min(valid_losses)
    assert len(valid_losses) - 1 - valid_losses.index(min(valid_losses)) == 3  # patience evaluations
    with torch.no_grad():
        restored = model(*fixed_valid[:1], targets=fixed_valid[1])[1]
    assert restored is not None and abs(float(restored) - result.best_valid_loss) < 1e-5


def test_time_budget_stops_training(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=16, block_size=16, n_layer=2, n_head=2, n_embd=32))
    get_batch = lm_batches(_stream(5000, seed=1), block_size=16, batch_size=16, rng=np.random.default_rng(0))
    result = train(model, get_batch, _fast(max_steps=10**6, max_seconds=2.0), tmp_path)
    assert result.stopped_because == "time_budget"
    assert 0 < result.steps < 10**6 and result.seconds < 10.0  # generous: the machine may be busy
    assert result.history[-1][0] == result.steps  # a final evaluation at the stopping step


def test_lm_batches_are_shifted_windows_and_reproducible() -> None:
    stream = np.arange(1000, dtype=np.uint16)
    a = lm_batches(stream, block_size=8, batch_size=4, rng=np.random.default_rng(7))
    b = lm_batches(stream, block_size=8, batch_size=4, rng=np.random.default_rng(7))
    x, y = a("train")
    assert x.dtype == torch.long and x.shape == (4, 8)
    assert torch.equal(y, x + 1)  # y is x shifted by one token in the stream
    assert torch.equal(x, b("train")[0])
    assert int(a("valid")[0].min()) >= 900  # the last 10% of the stream is validation
