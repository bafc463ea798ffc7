"""`plm import ... --variants`: an imported model carries optimised graphs like a built one, each measured against
its source on a fixed set of texts, and a server told `[model.NAME.runtime] variant = "int8"` serves that graph
with the accuracy its manifest records."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ServerThread, make_config
from tests.test_import_bert import minilm, pretraining
from tests.test_import_gpt2 import gpt2_folder

__all__ = ["gpt2_folder", "minilm", "pretraining"]  # the fixtures, shared with their modules


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_minilm_variants_measured_against_sentence_transformers_and_served(
        minilm: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from plm.client.client import PlmClient
    from plm.export.importers.common import VARIANT_TEXTS
    from plm.service.config import load_config
    from plm.service.contract import manifest as contract
    from sentence_transformers import SentenceTransformer

    from plm.cli import main

    repo = tmp_path / "repo"
    assert main(["import", "bert", str(minilm), "--name", "minilm", "--repository", str(repo),
                 "--variants", "int8", "fused"]) == 0
    out = capsys.readouterr().out
    assert "variant int8" in out and "min_cosine_to_reference" in out
    assert sorted(p.name for p in repo.iterdir()) == ["minilm"]  # the staging folder is gone
    manifest = contract.load(repo / "minilm" / contract.MANIFEST_FILE)
    assert set(manifest.variants) == {"int8", "fused"}
    for name, spec in manifest.variants.items():
        acc = spec.accuracy
        assert acc["reference"].startswith("sentence-transformers") and acc["embedded_texts"] == len(VARIANT_TEXTS)
        assert acc["exported_min_cosine_to_reference"] >= 0.99999
        assert 0.9 <= acc["min_cosine_to_reference"] <= acc["mean_cosine_to_reference"] <= 1 + 1e-9, name
        assert (repo / "minilm" / spec.graphs["model"]).is_file()
    assert manifest.variants["fused"].accuracy["min_cosine_to_reference"] >= 0.9999  # fusions keep the maths
    assert manifest.variants["fused"].extra["fused_operators"]
    assert manifest.variants["int8"].extra["bytes"] < manifest.variants["int8"].extra["exported_bytes"]

    config_file = tmp_path / "plm.toml"
    config_file.write_text('[model.minilm.runtime]\nvariant = "int8"\n')
    config = make_config(repo, model_runtime=load_config(config_file, environ={}).model_runtime)
    expected = SentenceTransformer(str(minilm), device="cpu").encode(list(VARIANT_TEXTS), convert_to_numpy=True)
    srv = ServerThread(config)
    try:
        with PlmClient(srv.target, timeout=120) as client:
            assert client.get_model("minilm").details["variant"] == "int8"
            got = np.array([e.vector for e in client.embed("minilm", list(VARIANT_TEXTS)).embeddings])
    finally:
        srv.stop()
    cos = _cosines(got, expected)
    recorded = manifest.variants["int8"].accuracy["min_cosine_to_reference"]
    print(f"int8 served: min cosine {cos.min():.6f} (recorded {recorded:.6f}), mean {cos.mean():.6f}")
    # The int8 graph quantises activations per batch at run time, so a row's vector depends a little on the
    # rows batched with it: the server's batches may differ from the measurement's.
    assert cos.min() >= recorded - 2e-3
    assert cos.min() < 0.99999  # it is the int8 graph that answered, not the exported one


def test_mlm_and_gpt2_variants_record_score_and_embed_accuracy(pretraining: Path, gpt2_folder: Path,
                                                                tmp_path: Path) -> None:
    """Models that serve Score are measured by it (perplexity change) and by Embed (cosine to the exported
    graph); with no sentence-transformers folder there is no outside reference."""
    from plm.export.importers import import_model

    for kind, source in (("bert", pretraining), ("gpt2", gpt2_folder)):
        manifest = import_model(kind, source, tmp_path, name=kind, variants=["int8", "fused"])
        for name, spec in manifest["variants"].items():
            acc = spec["accuracy"]
            assert np.isfinite(acc["test_token_perplexity_delta"]) and acc["test_tokens"] > 0, (kind, name)
            assert 0.5 < acc["min_cosine_to_exported"] <= 1 + 1e-9 and "reference" not in acc, (kind, name)
        assert manifest["variants"]["fused"]["accuracy"]["max_abs_logprob_diff"] < 1e-3, kind
        assert "test_mlm_top1" in manifest["variants"]["int8"]["accuracy"] or kind == "gpt2"


def test_variants_of_a_kind_without_graphs_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from plm.cli import main

    vectors = tmp_path / "v.txt"
    vectors.write_text("2 3\nking 1 0 0\nqueen 0 1 0\n")
    assert main(["import", "word2vec", str(vectors), "--repository", str(tmp_path / "repo"), "--variants", "int8"]) == 1
    err = capsys.readouterr().err.strip()
    assert "a word2vec model has no ONNX graphs to make variants of" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").iterdir())


def test_unknown_variant_refused(tmp_path: Path) -> None:
    from plm.export.importers import import_model
    from plm.export.importers.common import ImportFailed

    with pytest.raises(ImportFailed, match=r"unknown variant.*int4.*known: int8, fused, fp16"):
        import_model("bert", tmp_path, tmp_path / "repo", variants=["int4"])

