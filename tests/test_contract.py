"""The repository contract (service/contract/): the manifest's schema and the n-gram file format."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from plm.service.contract import manifest as contract
from plm.service.contract import ngram_format


def _gpt_manifest() -> dict[str, Any]:
    """A manifest of the shape `plm build` writes for GPT (graphs, a variant, free-form facts)."""
    return {
        "schema_version": 1, "version": "20260101T000000Z", "created_at": "2026-01-01T00:00:00+00:00",
        "name": "gpt", "family": "gpt", "tasks": ["score", "predict_next", "generate", "embed"],
        "description": "GPT 2 layers", "max_length": 64, "vocab_size": 512,
        "tokenizer": {"file": "tokenizer.json", "kind": "bpe", "bos": "<|endoftext|>", "eos": "<|endoftext|>"},
        "graphs": {
            "model": {"file": "model.onnx", "opset": 17, "inputs": [{"name": "input_ids", "dtype": "int64"}]},
            "decoder": {"file": "decoder.onnx", "n_layer": 2, "n_head": 2, "head_dim": 32, "padding": "left"},
        },
        "variants": {"int8": {"graphs": {"model": "model.int8.onnx"}, "bytes": 10,
                              "accuracy": {"test_token_perplexity": 64.7}}},
        "batching": {"max_batch_size": 8},
        "parity": {"max_abs_diff": 1e-6, "tolerance": 1e-4},
        "config": {"n_layer": 2, "n_head": 2}, "training": {"steps": 300}, "evaluation": {"test_word_perplexity": 90.0},
        "build_key": "abc", "corpus_sha256": "def", "source": {"importer": "a key this schema does not name"},
    }


def _write(folder: Path, data: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "manifest.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_a_build_manifest_loads_typed(tmp_path: Path) -> None:
    m = contract.load(_write(tmp_path / "gpt", _gpt_manifest()))
    assert (m.name, m.family, m.tasks, m.max_length, m.vocab_size) == (
        "gpt", "gpt", ("score", "predict_next", "generate", "embed"), 64, 512)
    assert m.tokenizer.special("eos", "?") == "<|endoftext|>" and m.tokenizer.special("unk", "<unk>") == "<unk>"
    assert m.graphs["decoder"].cache_dims() == (2, 2, 32) and m.graphs["model"].extra["opset"] == 17
    assert m.variants["int8"].graphs == {"model": "model.int8.onnx"}
    assert m.variants["int8"].accuracy["test_token_perplexity"] == 64.7
    assert m.batching == {"max_batch_size": 8}
    assert m.extra == {"source": {"importer": "a key this schema does not name"}}
    assert m.files() == ["tokenizer.json", "model.onnx", "decoder.onnx", "model.int8.onnx"]


@pytest.mark.parametrize("field", ["name", "family", "tasks", "max_length", "vocab_size", "tokenizer"])
def test_a_missing_field_names_the_file_and_the_field(tmp_path: Path, field: str) -> None:
    data = _gpt_manifest()
    del data[field]
    path = _write(tmp_path / "gpt", data)
    with pytest.raises(contract.ManifestError) as e:
        contract.load(path)
    assert str(e.value) == f"{path}: field '{field}' is missing"


@pytest.mark.parametrize(("change", "field", "expected"), [
    ({"vocab_size": "512"}, "vocab_size", "must be an int, got str"),
    ({"max_length": True}, "max_length", "must be an int, got bool"),
    ({"tasks": "score"}, "tasks", "must be a list, got str"),
    ({"tasks": ["score", 3]}, "tasks[1]", "must be a string, got int"),
    ({"tokenizer": {"kind": "bpe"}}, "tokenizer.file", "is missing"),
    ({"graphs": {"model": {"file": 7}}}, "graphs.model.file", "must be a string, got int"),
    ({"ngram": {"file": "m.arpa", "format": "zip", "order": 3}}, "ngram.format", "must be one of 'arpa', 'counts'"),
    ({"elmo": {"layer_weights": [0, "x", 0]}}, "elmo.layer_weights[1]", "must be a number, got str"),
    ({"variants": {"int8": {"graphs": {"model": None}}}}, "variants.int8.graphs.model", "must be a string, got null"),
])
def test_a_mistyped_field_names_the_file_and_the_field(tmp_path: Path, change: dict[str, Any], field: str,
                                                       expected: str) -> None:
    path = _write(tmp_path / "gpt", _gpt_manifest() | change)
    with pytest.raises(contract.ManifestError) as e:
        contract.load(path)
    assert str(e.value).startswith(f"{path}: field '{field}' {expected}")


def test_schema_versions(tmp_path: Path) -> None:
    old = _gpt_manifest()
    del old["schema_version"]  # written before the field existed: version 1
    assert contract.load(_write(tmp_path / "old", old)).schema_version == 1
    path = _write(tmp_path / "new", _gpt_manifest() | {"schema_version": contract.SCHEMA_VERSION + 1})
    with pytest.raises(contract.ManifestError, match=f"{path}: field 'schema_version'"):
        contract.load(path)


def test_write_then_load_is_equal_and_loses_nothing(tmp_path: Path) -> None:
    data = _gpt_manifest()
    m = contract.from_json(data)
    contract.write(tmp_path, m)
    assert contract.load(tmp_path / "manifest.json") == m
    assert json.loads((tmp_path / "manifest.json").read_text(encoding="utf-8")) == data


def test_the_tiny_repository_round_trips(tiny_repo: Path) -> None:
    """Every manifest `plm build` wrote loads, and dumps back to the very JSON on disk."""
    folders = sorted(p.parent for p in tiny_repo.glob("*/manifest.json"))
    assert len(folders) >= 6
    for folder in folders:
        m = contract.load(folder / "manifest.json")
        assert m.name == folder.name
        assert contract.dump(m) == json.loads((folder / "manifest.json").read_text(encoding="utf-8"))


def test_ngram_files_read_what_they_write(tmp_path: Path) -> None:
    grams = [["<unk>", "<s>", "</s>", "a", "b"], ["<s> a", "a b", "b </s>"], ["<s> a b", "a b </s>"]]
    probs = [np.array([-2.0, -99.0, -0.5, -0.25, -0.75]), np.array([-0.1, -0.2, -0.3]), np.array([-0.01, -0.02])]
    backoffs = [np.array([0.0, -0.5, 0.0, -0.125, -0.25]), np.array([-0.0625, 0.0, 0.0])]
    ngram_format.write_arpa(tmp_path / "m.arpa", grams, probs, backoffs)
    arpa = ngram_format.read_arpa(tmp_path / "m.arpa")
    assert arpa.vocab == grams[0]
    for k in range(3):
        words = [" ".join(arpa.vocab[i] for i in row) for row in arpa.ids[k].tolist()]
        assert words == grams[k]
        np.testing.assert_array_equal(arpa.log10probs[k], probs[k])
    for k in range(2):
        np.testing.assert_array_equal(arpa.log10backoffs[k], backoffs[k])

    counts = [np.array([0, 2, 2, 3, 1]), np.array([2, 1, 1]), np.array([1, 1])]
    ngram_format.write_counts(tmp_path / "counts.txt", grams, counts)
    assert (tmp_path / "counts.txt").read_text(encoding="utf-8").startswith(ngram_format.COUNTS_MAGIC + " order=3")
    read = ngram_format.read_counts(tmp_path / "counts.txt")
    assert read.vocab == grams[0]
    for k in range(3):
        assert [" ".join(read.vocab[i] for i in row) for row in read.ids[k].tolist()] == grams[k]
        np.testing.assert_array_equal(read.counts[k], counts[k])


def test_a_counts_file_without_the_magic_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "counts.txt"
    path.write_text("order=3 vocab_size=3\n<s>\t1\n", encoding="utf-8")
    with pytest.raises(ValueError, match=f"{path}:1: not a plm n-gram counts file"):
        ngram_format.read_counts(path)
