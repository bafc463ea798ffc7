"""Hugging Face `transformers` as the outside oracle for GPT: our weights in GPT2LMHeadModel."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from plm.client.client import PlmClient
from plm.export.hf_gpt2 import load_weights, to_hf_gpt2
from plm.models.gpt import GPT, GPTConfig

from plm.api.v1 import plm_pb2 as pb
from tests.conftest import ServerThread

pytest.importorskip("transformers")
torch.set_num_threads(1)


def test_same_logits_and_greedy_tokens_as_transformers() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=97, block_size=32, n_layer=2, n_head=2, n_embd=16)).eval()
    hf = to_hf_gpt2(model)
    x = torch.randint(1, 97, (3, 20))
    with torch.no_grad():
        np.testing.assert_allclose(model(x)[0].numpy(), hf(x).logits.numpy(), atol=1e-5)
        ours = model.generate(x[:1, :6], 12, temperature=0.0, use_cache=True)
        theirs = hf.generate(x[:1, :6], max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert ours.tolist() == theirs.tolist()


def test_served_gpt_agrees_with_transformers(tiny_repo: Path, server: ServerThread) -> None:
    """What the server returns (ONNX Runtime, batched, KV cache) is what transformers computes."""
    folder = tiny_repo / "gpt"
    manifest = json.loads((folder / "manifest.json").read_text())
    hf = to_hf_gpt2(load_weights(folder / manifest["weights"], GPTConfig(**manifest["config"])))
    texts = ["The king is dead.", "Good morrow, my lord"]
    with PlmClient(server.target) as c:
        scores = c.score("gpt", texts).scores
        gens = c.generate("gpt", texts, pb.SamplingParams(temperature=0.0, max_new_tokens=12)).generations
    for s, g in zip(scores, gens, strict=True):
        ids = torch.tensor([[0, *[t.id for t in s.tokens]]])  # BOS + the text's tokens + EOS
        with torch.no_grad():
            lp = torch.log_softmax(hf(ids).logits[0, :-1].double(), -1).gather(-1, ids[0, 1:, None])[:, 0]
        np.testing.assert_allclose([t.log_prob for t in s.tokens], lp.numpy(), atol=1e-4)
        prompt = ids[:, :-1]  # without the EOS
        with torch.no_grad():
            out = hf.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=0, pad_token_id=0)
        theirs = [t for t in out[0, prompt.shape[1]:].tolist() if t != 0]
        assert list(g.token_ids) == theirs[: len(g.token_ids)] and len(g.token_ids) == len(theirs)
