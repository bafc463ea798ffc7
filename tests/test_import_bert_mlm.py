"""`plm import bert` of a BertForMaskedLM checkpoint (an MLM head, no NSP head, a vocab.txt tokenizer): FillMask
equals transformers' fill-mask pipeline (top-k, targets, several blanks), Score equals the pseudo-log-likelihood
computed with transformers, PredictNextSentence is refused as a task the model does not serve, and the KServe v2
metadata describe it as they describe a built model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from tests.conftest import ServerThread
from tests.test_import_bert import TRAIN_TEXT, client, serve, wordpiece_folder

__all__ = ["client"]  # the module's client fixture, on this module's `served`

MODEL = "bert-mlm"
TEXTS = ["the king is [MASK] long live the king", "to be or [MASK] to be", "[MASK] the world is a stage",
         "now is the [MASK] of our [MASK]"]  # the last has two blanks


@pytest.fixture(scope="module")
def mlm_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random BertForMaskedLM saved with save_pretrained, its tokenizer as vocab.txt + tokenizer_config.json
    (the older of the two layouts the importer reads)."""
    import torch
    import transformers
    from tokenizers import Tokenizer

    folder = tmp_path_factory.mktemp("bert-mlm")
    vocab = wordpiece_folder(folder, TRAIN_TEXT)
    tok = json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]
    assert Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size() == len(tok)
    (folder / "vocab.txt").write_text("".join(f"{t}\n" for t, _ in sorted(tok.items(), key=lambda kv: kv[1])))
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True,
                                                              "tokenizer_class": "BertTokenizer"}))
    torch.manual_seed(1)
    config = transformers.BertConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=64)
    transformers.BertForMaskedLM(config).save_pretrained(folder)
    assert not (folder / "tokenizer.json").exists()
    return folder


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, mlm_folder: Path) -> Iterator[ServerThread]:
    from plm.export.importers import import_model

    repo = tmp_path_factory.mktemp("imported-mlm")
    import_model("bert", mlm_folder, repo, name=MODEL)
    yield from serve(repo)


@pytest.fixture(scope="module")
def reference(mlm_folder: Path) -> tuple[Any, Any]:
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(mlm_folder))
    return transformers.BertForMaskedLM.from_pretrained(str(mlm_folder)).eval(), tok


def test_serves_what_an_mlm_head_serves(client: Any, served: ServerThread) -> None:
    manifest = json.loads((served.running.config.repository / MODEL / "manifest.json").read_text())
    assert manifest["source"]["architecture"] == "BertForMaskedLM"
    assert [g["name"] for g in manifest["graphs"]["model"]["outputs"]] == ["mask_logprobs", "hidden_states"]
    assert sorted(client.get_model(MODEL).tasks) == ["embed", "fill_mask", "score"]


def test_fill_mask_equals_pipeline(client: Any, mlm_folder: Path) -> None:
    """Each blank's top 5 tokens and scores, a text with two blanks included (the pipeline answers each blank
    from the same forward pass), all texts in one request."""
    import transformers

    fill = transformers.pipeline("fill-mask", model=str(mlm_folder), tokenizer=str(mlm_folder), device="cpu",
                                 top_k=5)
    resp = client.fill_mask(MODEL, TEXTS, top_k=5)
    for text, result in zip(TEXTS, resp.results, strict=True):
        expected = fill(text)
        per_blank = expected if isinstance(expected[0], list) else [expected]
        assert len(result.masks) == len(per_blank) == text.count("[MASK]"), text
        for mask, want in zip(result.masks, per_blank, strict=True):
            assert [c.token for c in mask.candidates] == [e["token"] for e in want], text
            assert [c.token_str for c in mask.candidates] == [e["token_str"] for e in want], text
            assert np.allclose([c.score for c in mask.candidates], [e["score"] for e in want], atol=1e-5), text


def test_fill_mask_targets_equal_pipeline(client: Any, mlm_folder: Path) -> None:
    import transformers

    fill = transformers.pipeline("fill-mask", model=str(mlm_folder), tokenizer=str(mlm_folder), device="cpu")
    targets = ["king", "the", "stage", "be"]
    expected = {e["token_str"]: e["score"] for e in fill(TEXTS[0], targets=targets)}
    got = client.fill_mask(MODEL, [TEXTS[0]], targets=targets).results[0].masks[0].candidates
    assert {c.token_str for c in got} == set(targets)
    for c in got:
        assert c.score == pytest.approx(expected[c.token_str], abs=1e-5), c.token_str


def test_score_is_transformers_pseudo_log_likelihood(client: Any, reference: tuple[Any, Any]) -> None:
    """Each token's log P(token | the rest) with that token alone masked ([CLS] text [SEP]), and their sum."""
    import torch

    model, tok = reference
    texts = ["the king is dead long live the king", "to be or not to be", "all the world is a stage"]
    resp = client.score(MODEL, texts)
    assert resp.method == "pseudo_log_likelihood"
    for text, result in zip(texts, resp.scores, strict=True):
        ids = tok(text, return_tensors="pt")["input_ids"][0]  # [CLS] ... [SEP]
        rows = ids.repeat(len(ids) - 2, 1)
        positions = torch.arange(1, len(ids) - 1)
        rows[torch.arange(len(positions)), positions] = tok.mask_token_id
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=rows).logits.double(), -1)
        expected = lp[torch.arange(len(positions)), positions, ids[1:-1]].numpy()
        assert [t.id for t in result.tokens] == ids[1:-1].tolist(), text
        assert np.allclose([t.log_prob for t in result.tokens], expected, atol=1e-4), text
        assert result.log_prob == pytest.approx(float(expected.sum()), abs=1e-3), text


def test_next_sentence_refused_without_an_nsp_head(served: ServerThread) -> None:
    from plm.api.v1 import plm_pb2 as pb
    from plm.api.v1 import plm_pb2_grpc as pb_grpc

    with grpc.insecure_channel(served.target) as ch:
        stub = pb_grpc.LanguageModelServiceStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.PredictNextSentence(pb.PredictNextSentenceRequest(
                model=MODEL, pairs=[pb.SentencePair(a="the king is dead", b="long live the king")]),
                timeout=30)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"model {MODEL!r} (bert) does not serve 'next_sentence'" in e.value.details()
    assert "it serves: embed, fill_mask, score" in e.value.details()


@pytest.fixture(scope="module")
def triton(served: ServerThread) -> Iterator[Any]:
    import tritonclient.grpc as tc

    triton_client = tc.InferenceServerClient(url=served.target)
    yield triton_client
    triton_client.close()


def test_kserve_metadata_of_the_imported_model(triton: Any, client: Any) -> None:
    """ModelMetadata under the bare name (its first task) and `name:task` for each task it serves, as for a
    built model; the task it lacks is not served, and ModelReady says so."""
    from plm.service.frontends.kserve_tasks import TASKS
    from tritonclient.utils import InferenceServerException

    info = client.get_model(MODEL)
    assert [m.name for m in client.list_models().models] == [MODEL]
    bare = triton.get_model_metadata(MODEL, as_json=True)
    assert bare["name"] == MODEL and bare["versions"] == [info.version] and bare["platform"] == "onnxruntime_onnx"
    for task in ("embed", "fill_mask", "score"):
        meta = triton.get_model_metadata(f"{MODEL}:{task}", as_json=True)
        assert meta["versions"] == [info.version], task
        assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in meta["inputs"]] == [
            (t.name, t.datatype, list(t.shape)) for t in TASKS[task].inputs], task
        assert [t["name"] for t in meta["outputs"]] == [t.name for t in TASKS[task].outputs], task
        assert triton.is_model_ready(f"{MODEL}:{task}"), task
    assert bare["inputs"] == triton.get_model_metadata(f"{MODEL}:{info.tasks[0]}", as_json=True)["inputs"]
    assert not triton.is_model_ready(f"{MODEL}:next_sentence")
    with pytest.raises(InferenceServerException) as e:
        triton.get_model_metadata(f"{MODEL}:next_sentence")
    assert "NOT_FOUND" in str(e.value.status()) and f"{MODEL}:fill_mask" in str(e.value.message())
    config = triton.get_model_config(f"{MODEL}:fill_mask", as_json=True)["config"]
    assert config["name"] == f"{MODEL}:fill_mask" and config["platform"] == "onnxruntime_onnx"
