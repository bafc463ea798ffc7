"""`plm import gpt2`: a randomly initialised GPT2LMHeadModel (tanh GELU) with a trained byte-level BPE tokenizer,
served over gRPC: per-token log-probabilities equal transformers', and greedy generation, batched with other
prompts, gives transformers' tokens for 32 steps."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import ServerThread
from tests.test_import_bert import client, serve

__all__ = ["client"]  # the module's client fixture, on this module's `served`

ENDOFTEXT = "<|endoftext|>"
TEXT = ["The quick brown fox jumps over the lazy dog.", "Now is the winter of our discontent.",
        "To be, or not to be, that is the question.", "All the world's a stage, and all the men and women players.",
        "Friends, Romans, countrymen, lend me your ears!", "What light through yonder window breaks?"] * 5


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    import transformers
    from tokenizers import ByteLevelBPETokenizer

    folder = tmp_path_factory.mktemp("gpt2")
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(TEXT, vocab_size=300, special_tokens=[ENDOFTEXT])
    tok.save(str(folder / "tokenizer.json"))
    eot = tok.token_to_id(ENDOFTEXT)
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=64, n_embd=32, n_layer=2,
                                     n_head=2, bos_token_id=eot, eos_token_id=eot)
    assert config.activation_function == "gelu_new"  # GPT-2's tanh approximation
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, gpt2_folder: Path) -> Iterator[ServerThread]:
    from plm.export.importers import import_model

    repo = tmp_path_factory.mktemp("imported-gpt2")
    import_model("gpt2", gpt2_folder, repo, name="gpt2")
    yield from serve(repo)


@pytest.fixture(scope="module")
def reference(gpt2_folder: Path) -> tuple[Any, Any]:
    import transformers
    from tokenizers import Tokenizer

    model = transformers.GPT2LMHeadModel.from_pretrained(str(gpt2_folder)).eval()
    return model, Tokenizer.from_file(str(gpt2_folder / "tokenizer.json"))


PROMPTS = ["The quick brown", "To be", "Friends, Romans", "What light through yonder window", "All the world"]


def test_scores_equal_transformers(client: Any, reference: tuple[Any, Any]) -> None:
    """Each token's log-probability after <|endoftext|> (the family's BOS), and the end of text's."""
    import torch

    model, tok = reference
    eot = tok.token_to_id(ENDOFTEXT)
    resp = client.score("gpt2", PROMPTS + TEXT[:3])
    worst = 0.0
    for text, result in zip(PROMPTS + TEXT[:3], resp.scores, strict=True):
        ids = [eot, *tok.encode(text).ids, eot]
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1).numpy()
        expected = lp[np.arange(len(ids) - 1), ids[1:]]
        got = np.array([t.log_prob for t in result.tokens])
        assert [t.id for t in result.tokens] == ids[1:]
        worst = max(worst, float(np.abs(got - expected).max()))
    print(f"gpt2 import: max |plm score - transformers| {worst:.3g}")
    assert worst <= 1e-4


def test_greedy_generation_equals_transformers(client: Any, reference: tuple[Any, Any]) -> None:
    """32 greedy steps (no EOS before them, as min_new_tokens) for prompts generated together in one call."""
    import torch

    model, tok = reference
    eot = tok.token_to_id(ENDOFTEXT)
    resp = client.generate("gpt2", PROMPTS, {"temperature": 0, "max_new_tokens": 32, "min_new_tokens": 32})
    for prompt, gen in zip(PROMPTS, resp.generations, strict=True):
        ids = torch.tensor([[eot, *tok.encode(prompt).ids]])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, min_new_tokens=32,
                                 do_sample=False, pad_token_id=eot)
        assert list(gen.token_ids) == out[0, ids.shape[1]:].tolist(), prompt


def test_manifest_records_parity_and_source(served: ServerThread, client: Any) -> None:
    manifest = json.loads((served.running.config.repository / "gpt2" / "manifest.json").read_text())
    assert manifest["config"]["activation"] == "gelu_tanh"
    assert manifest["parity_max_abs_diff"] <= 1e-4
    assert manifest["parity_reference"].startswith("transformers")
    assert set(manifest["graphs"]) == {"model", "decoder", "kv_layout"}
    assert manifest["source"]["architecture"] == "GPT2LMHeadModel"
    assert client.get_model("gpt2").parity_max_abs_diff == pytest.approx(manifest["parity_max_abs_diff"])


def test_unsupported_gpt2_options_refused(gpt2_folder: Path, tmp_path: Path) -> None:
    import shutil

    from plm.export.importers import import_model
    from plm.export.importers.common import ImportFailed

    source = tmp_path / "src"
    shutil.copytree(gpt2_folder, source)
    config = json.loads((source / "config.json").read_text())
    config["scale_attn_by_inverse_layer_idx"] = True
    (source / "config.json").write_text(json.dumps(config))
    with pytest.raises(ImportFailed, match="scale_attn_by_inverse_layer_idx=True not supported"):
        import_model("gpt2", source, tmp_path / "repo")
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").iterdir())
