"""The `gpt` KV cache: cached == uncached in PyTorch, and the exported ONNX decoder graph == PyTorch.

Greedy decoding runs three ways (PyTorch without cache, PyTorch with cache, ONNX Runtime with the decoder
graph fed its own presents) and must give the same tokens, alone and in left-padded batches.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from plm.export.onnx_export import (
    DECODER_INPUT_NAMES,
    GPTDecoderGraph,
    export_gpt_decoder,
    past_names,
    present_names,
)
from plm.models.gpt import GPT, GPTConfig, KVCache, position_ids_from_mask
from torch import Tensor

torch.set_num_threads(1)

TINY = GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
PROMPTS = [[5, 17, 3, 42, 8], [7], [1, 2, 3, 4, 6, 7, 9, 10, 11], [30, 31]]
STEPS = 12


@pytest.fixture(scope="module")
def model() -> GPT:
    """An untrained model whose greedy continuations vary: at GPT's init it repeats the last token, so the
    position embeddings and attention weights are made larger to give every step a different argmax."""
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    with torch.no_grad():
        model.wpe.weight.normal_(0.0, 0.5)
        for name, p in model.named_parameters():
            if name.endswith("attn.c_attn.weight"):
                p.normal_(0.0, 0.2)
    return model


def _left_pad(rows: list[list[int]], extra: int = 0) -> tuple[Tensor, Tensor]:
    """Left-pad id lists (pad id 0) to one (B, T) batch, `extra` more pad columns; returns (ids, mask)."""
    T = max(len(r) for r in rows) + extra
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r) :] = torch.tensor(r)
        mask[i, T - len(r) :] = 1
    return ids, mask


def _empty_cache(batch: int) -> KVCache:
    shape = (batch, TINY.n_head, 0, TINY.n_embd // TINY.n_head)
    return [(torch.zeros(shape), torch.zeros(shape)) for _ in range(TINY.n_layer)]


# --- PyTorch ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunks", [(5, 1, 1, 1, 1, 1), (3, 2, 1, 4), (1,) * 10])
def test_cached_logits_equal_uncached(model: GPT, chunks: tuple[int, ...]) -> None:
    rows = [[(7 * i + 3) % 64 for i in range(sum(chunks))], [9, 8, 7, 6]]  # the 2nd is left padded
    ids, mask = _left_pad(rows)
    P0 = ids.size(1) - sum(chunks)  # pad columns before the first row; the prefill takes them too
    with torch.no_grad():
        full, _ = model(ids, mask)  # (B, T, V) no cache
        past: KVCache | None = None
        start = 0
        for n, T in enumerate(chunks):
            end = (P0 if n == 0 else start) + T
            logits, _, past = model(
                ids[:, start:end], mask[:, :end], past_key_values=past, use_cache=True
            )  # (B, T, V)
            assert len(past) == TINY.n_layer and past[0][0].shape == (2, TINY.n_head, end, 16)
            real = mask[:, start:end].bool()
            torch.testing.assert_close(logits[real], full[:, start:end][real], atol=1e-5, rtol=0)
            start = end
    assert start == ids.size(1)


def test_empty_past_is_no_past(model: GPT) -> None:
    ids, mask = _left_pad(PROMPTS)
    with torch.no_grad():
        a, _ = model(ids, mask)
        b, _, presents = model(ids, mask, past_key_values=_empty_cache(len(PROMPTS)), use_cache=True)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert presents[0][0].shape == (len(PROMPTS), TINY.n_head, ids.size(1), 16)


def _greedy_torch_cache(model: GPT, ids: Tensor, mask: Tensor, steps: int) -> Tensor:
    """Greedy decoding with the cache written out: prefill, then one token per step. -> (B, steps)."""
    out = []
    with torch.no_grad():
        logits, _, past = model(ids, mask, position_ids_from_mask(mask), use_cache=True)
        for _ in range(steps):
            next_id = logits[:, -1].argmax(-1, keepdim=True)  # left padding: the last column is real
            out.append(next_id)
            mask = torch.cat((mask, torch.ones_like(next_id)), dim=1)
            pos = position_ids_from_mask(mask)[:, -1:]
            logits, _, past = model(next_id, mask, pos, past_key_values=past, use_cache=True)
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("rows", [[PROMPTS[0]], [PROMPTS[1]], PROMPTS])
def test_greedy_with_and_without_cache(model: GPT, rows: list[list[int]]) -> None:
    ids, mask = _left_pad(rows)
    reference = model.generate(ids, STEPS, attention_mask=mask, temperature=0.0)[:, ids.size(1) :]
    assert torch.equal(_greedy_torch_cache(model, ids, mask, STEPS), reference)
    with_cache = model.generate(ids, STEPS, attention_mask=mask, temperature=0.0, use_cache=True)
    assert torch.equal(with_cache, torch.cat((ids, reference), dim=1))
    for i, r in enumerate(rows):  # each row of the batch continues as it does alone
        alone = model.generate(torch.tensor([r]), STEPS, temperature=0.0)[0, len(r) :]
        assert torch.equal(reference[i], alone)


def test_generate_with_cache_past_block_size(model: GPT) -> None:
    ids = torch.tensor([[(3 * i) % 64 for i in range(TINY.block_size - 3)]])  # outgrows block_size
    a = model.generate(ids, 8, temperature=0.0)
    b = model.generate(ids, 8, temperature=0.0, use_cache=True)
    assert torch.equal(a, b)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    ids, mask = _left_pad(PROMPTS)
    s1 = model.generate(ids, 6, attention_mask=mask, temperature=1.0, top_k=10, generator=g1)
    s2 = model.generate(ids, 6, attention_mask=mask, temperature=1.0, top_k=10, generator=g2, use_cache=True)
    assert torch.equal(s1, s2)


@pytest.mark.parametrize("extra", [1, 3, 7])
def test_left_padding_amount_does_not_matter_torch(model: GPT, extra: int) -> None:
    ids, mask = _left_pad(PROMPTS)
    more_ids, more_mask = _left_pad(PROMPTS, extra)
    a_tokens = _greedy_torch_cache(model, ids, mask, STEPS)
    assert torch.equal(a_tokens, _greedy_torch_cache(model, more_ids, more_mask, STEPS))
    with torch.no_grad():
        a, _, _ = model(ids, mask, use_cache=True)
        b, _, _ = model(more_ids, more_mask, use_cache=True)
    torch.testing.assert_close(a[:, -1], b[:, -1], atol=1e-5, rtol=0)


# --- ONNX ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def decoder(model: GPT, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, ort.InferenceSession]:
    path = tmp_path_factory.mktemp("onnx") / "gpt_decoder.onnx"
    info = export_gpt_decoder(model, path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return info, ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def test_decoder_manifest_entry(decoder: tuple[dict, ort.InferenceSession]) -> None:
    info, session = decoder
    assert info["opset"] == 17 and info["onnx_checker"] == "passed" and info["padding"] == "left"
    assert (info["n_layer"], info["n_head"], info["head_dim"]) == (2, 2, 16)
    assert info["parity"]["max_abs_diff"] <= 1e-4
    names = [*DECODER_INPUT_NAMES, *past_names(2)]
    assert names[3:] == ["past_key_values.0.key", "past_key_values.0.value", "past_key_values.1.key",
                         "past_key_values.1.value"]
    assert [i.name for i in session.get_inputs()] == names == [i["name"] for i in info["inputs"]]
    outputs = ["next_logprobs", *present_names(2)]
    assert [o.name for o in session.get_outputs()] == outputs == [o["name"] for o in info["outputs"]]
    shapes = {i.name: i.shape for i in session.get_inputs()} | {o.name: o.shape for o in session.get_outputs()}
    assert shapes["attention_mask"] == ["batch", "past_sequence + sequence"]
    assert shapes["position_ids"] == shapes["input_ids"] == ["batch", "sequence"]
    assert shapes["past_key_values.1.value"] == ["batch", 2, "past_sequence", 16]
    assert shapes["present.0.key"] == ["batch", 2, "past_sequence + sequence", 16]
    assert shapes["next_logprobs"] == ["batch", TINY.vocab_size]


def _ort_step(
    session: ort.InferenceSession, ids: np.ndarray, mask: np.ndarray, past: list[np.ndarray]
) -> tuple[np.ndarray, list[np.ndarray]]:
    """One decoder call: T new ids after the cached ones; mask covers both. -> (next_logprobs, presents)."""
    T = ids.shape[1]
    pos = np.where(mask > 0, np.cumsum(mask, axis=1) - 1, 0)[:, -T:]  # position_ids_from_mask, in numpy
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
    feeds.update(zip(past_names(TINY.n_layer), past, strict=True))
    next_lp, *presents = session.run(None, feeds)
    return next_lp, presents


def _greedy_ort(session: ort.InferenceSession, ids: Tensor, mask: Tensor, steps: int) -> np.ndarray:
    """Greedy decoding in numpy: prefill with zero-length pasts, then feed presents back as pasts."""
    np_ids, np_mask = ids.numpy(), mask.numpy()
    head = TINY.n_embd // TINY.n_head
    past = [np.zeros((len(np_ids), TINY.n_head, 0, head), np.float32) for _ in range(2 * TINY.n_layer)]
    next_lp, past = _ort_step(session, np_ids, np_mask, past)
    out = []
    for _ in range(steps):
        next_id = next_lp.argmax(-1)[:, None].astype(np.int64)  # (B, 1)
        out.append(next_id)
        np_mask = np.concatenate((np_mask, np.ones_like(next_id)), axis=1)
        next_lp, past = _ort_step(session, next_id, np_mask, past)
        assert past[0].shape[2] == np_mask.shape[1]
    return np.concatenate(out, axis=1)


@pytest.mark.parametrize("rows", [[PROMPTS[0]], [PROMPTS[1]], PROMPTS])
def test_onnx_greedy_matches_pytorch(
    model: GPT, decoder: tuple[dict, ort.InferenceSession], rows: list[list[int]]
) -> None:
    _, session = decoder
    ids, mask = _left_pad(rows)
    reference = model.generate(ids, STEPS, attention_mask=mask, temperature=0.0)[:, ids.size(1) :]
    np.testing.assert_array_equal(_greedy_ort(session, ids, mask, STEPS), reference.numpy())


@pytest.mark.parametrize("extra", [2, 5])
def test_onnx_left_padding_amount_does_not_matter(
    model: GPT, decoder: tuple[dict, ort.InferenceSession], extra: int
) -> None:
    _, session = decoder
    ids, mask = _left_pad(PROMPTS)
    more_ids, more_mask = _left_pad(PROMPTS, extra)
    tokens = _greedy_ort(session, ids, mask, STEPS)
    np.testing.assert_array_equal(tokens, _greedy_ort(session, more_ids, more_mask, STEPS))
    head = TINY.n_embd // TINY.n_head
    logprobs = []
    for prompt, m in ((ids, mask), (more_ids, more_mask)):
        past = [np.zeros((len(PROMPTS), TINY.n_head, 0, head), np.float32) for _ in range(2 * TINY.n_layer)]
        logprobs.append(_ort_step(session, prompt.numpy(), m.numpy(), past)[0])
    np.testing.assert_allclose(logprobs[1], logprobs[0], atol=1e-5, rtol=0)


def test_onnx_decoder_matches_pytorch(model: GPT, decoder: tuple[dict, ort.InferenceSession]) -> None:
    """next_logprobs and presents, prefill then decode steps of 1 and 3 tokens, both fed their own cache."""
    _, session = decoder
    graph = GPTDecoderGraph(model).eval()
    ids, mask = _left_pad(PROMPTS)
    head = TINY.n_embd // TINY.n_head
    torch_past = [torch.zeros(len(PROMPTS), TINY.n_head, 0, head) for _ in range(2 * TINY.n_layer)]
    ort_past = [t.numpy() for t in torch_past]
    generator = torch.Generator().manual_seed(1)
    new, all_ids = ids, ids
    for T in (0, 1, 1, 3, 1, 1):
        if T:
            new = torch.randint(1, TINY.vocab_size, (len(PROMPTS), T), generator=generator)
            mask = torch.cat((mask, torch.ones_like(new)), dim=1)
            all_ids = torch.cat((all_ids, new), dim=1)
        with torch.no_grad():
            expected = graph(new, mask, position_ids_from_mask(mask)[:, -new.size(1) :], *torch_past)
            uncached = torch.log_softmax(model(all_ids, mask)[0][:, -1], dim=-1)  # (B, V)
        next_lp, ort_past = _ort_step(session, new.numpy(), mask.numpy(), ort_past)
        np.testing.assert_allclose(next_lp, expected[0].numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(next_lp, uncached.numpy(), atol=1e-4, rtol=0)
        assert len(ort_past) == 2 * TINY.n_layer
        for g, e in zip(ort_past, expected[1:], strict=True):
            assert g.shape == (len(PROMPTS), TINY.n_head, mask.size(1), head)
            np.testing.assert_allclose(g, e.numpy(), atol=1e-4, rtol=0)
        torch_past = list(expected[1:])


def test_onnx_right_padded_prefill(model: GPT, decoder: tuple[dict, ort.InferenceSession]) -> None:
    """A right-padded prompt batch also works: next_logprobs is read at each row's last real token and the
    pads stay, masked, between prompt and continuation (as GPT.generate does without a cache)."""
    _, session = decoder
    T = max(len(r) for r in PROMPTS)
    ids = torch.zeros(len(PROMPTS), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(PROMPTS):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    reference = model.generate(ids, STEPS, attention_mask=mask, temperature=0.0)[:, T:]
    np.testing.assert_array_equal(_greedy_ort(session, ids, mask, STEPS), reference.numpy())
