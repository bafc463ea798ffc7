"""Execution providers, session settings and optimised graph variants, through the real server.

This machine has no GPU: the CUDA/TensorRT paths are exercised as configuration that must fall back to CPU with
a warning, never fail to start. The variants (int8, fused, fp16) are built from the tiny models and served.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from plm.client.client import PlmClient
from plm.export.variants import FP16_TOLERANCE, add_variants
from plm.service.config import Runtime, load_config
from plm.service.metrics import Metrics
from plm.service.registry import Registry
from plm.service.runtime import AUTO, choose_providers

from plm.api.v1 import plm_pb2 as pb
from tests.conftest import ServerThread, make_config

HELD_OUT = ["To be, or not to be, that is the question.", "The king is dead.",
            "What light through yonder window breaks?", "The government said on Tuesday that the talks would continue."]


def test_config_reads_providers_their_options_and_per_model_runtime(tmp_path: Path) -> None:
    path = tmp_path / "plm.toml"
    path.write_text("""
[runtime]
providers = ["tensorrt", "cuda", "cpu"]
graph_optimization = "extended"
[runtime.provider_options.CUDAExecutionProvider]
device_id = 0
gpu_mem_limit = 2147483648
[runtime.provider_options.TensorrtExecutionProvider]
trt_fp16_enable = true
trt_engine_cache_enable = true
trt_engine_cache_path = "cache/trt"
[model.gpt.runtime]
variant = "int8"
providers = ["cpu"]
[model.bert.batching]
max_batch_size = 4
""")
    cfg = load_config(path, environ={"PLM_RUNTIME__INTRA_OP_THREADS": "1"})
    assert cfg.runtime.providers == ("tensorrt", "cuda", "cpu") and cfg.runtime.intra_op_threads == 1
    assert cfg.runtime.provider_options["CUDAExecutionProvider"] == {"device_id": 0, "gpu_mem_limit": 2147483648}
    assert cfg.runtime.provider_options["TensorrtExecutionProvider"]["trt_engine_cache_path"] == "cache/trt"
    gpt = cfg.runtime_for("gpt")  # the model's section starts from the server's [runtime]
    assert gpt.variant == "int8" and gpt.providers == ("cpu",) and gpt.graph_optimization == "extended"
    assert cfg.runtime_for("bert") == cfg.runtime and cfg.batching_for("bert").max_batch_size == 4
    path.write_text("[model.gpt.runtimes]\nvariant = 'int8'\n")
    with pytest.raises(ValueError, match=r"model.gpt.*runtimes"):
        load_config(path, environ={})
    path.write_text("[runtime]\nprovider_options = {cuda = 3}\n")
    with pytest.raises(ValueError, match="provider_options must be a table of tables"):
        load_config(path, environ={})
    # Choices are checked at start, naming the setting, the allowed values and where it was set.
    assert load_config(None, environ={"PLM_RUNTIME__IO_BINDING": "on"}).runtime.io_binding == "on"
    with pytest.raises(ValueError, match=r"config \[runtime\]: io_binding must be one of auto, on, off, got 'yes'"):
        load_config(None, environ={"PLM_RUNTIME__IO_BINDING": "yes"})
    path.write_text("[model.gpt.runtime]\ngraph_optimization = 'max'\n")
    with pytest.raises(ValueError, match=r"model.gpt.runtime\]: graph_optimization must be one of disable"):
        load_config(path, environ={})


def test_provider_choice_skips_what_is_missing_and_keeps_cpu_last(caplog: pytest.LogCaptureFixture) -> None:
    auto = choose_providers(Runtime(), "m")
    assert [n for n, _ in auto][-1] == "CPUExecutionProvider"
    assert all(n in AUTO for n, _ in auto)
    with caplog.at_level(logging.WARNING, logger="plm.service.runtime"):
        chosen = choose_providers(Runtime(providers=("cuda", "tensorrt"),
                                          provider_options={"cuda": {"device_id": 1}}), "m")
    names = [n for n, _ in chosen]
    import onnxruntime as ort

    have = set(ort.get_available_providers())
    assert names == [n for n in ("CUDAExecutionProvider", "TensorrtExecutionProvider") if n in have] + [
        "CPUExecutionProvider"]
    if "CUDAExecutionProvider" in have:
        assert chosen[0][1] == {"device_id": 1}  # options reach the provider under its full name
    else:  # this machine: asked for by name and missing → a warning naming it, then CPU
        assert any("CUDAExecutionProvider" in r.getMessage() and "not available" in r.getMessage()
                   for r in caplog.records)


def test_automatic_providers_skip_tensorrt_without_its_libraries(monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime-gpu lists TensorRT whether or not libnvinfer is installed: the automatic choice starts at CUDA
    then (no failed TensorRT start per session), while a TensorRT asked for by name is still tried."""
    import onnxruntime as ort
    from plm.service import runtime

    gpu_build = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: gpu_build)
    monkeypatch.setattr(runtime, "_load_gpu_libraries", lambda: None)  # nothing to preload in this test
    for loadable, expected in ((False, gpu_build[1:]), (True, gpu_build)):
        monkeypatch.setattr(runtime, "tensorrt_loadable", lambda loadable=loadable: loadable)
        assert [n for n, _ in choose_providers(Runtime(), "m")] == expected
        assert [n for n, _ in choose_providers(Runtime(providers=("trt", "cpu")), "m")] == [gpu_build[0], gpu_build[2]]


def test_unknown_provider_fails_the_start_naming_it(tiny_repo: Path) -> None:
    config = make_config(tiny_repo, runtime=Runtime(providers=("cuda", "warp-drive")))
    with pytest.raises(ValueError, match="unknown execution provider 'warp-drive'"):
        Registry(config, Metrics()).load_all()  # type: ignore[arg-type]


def test_server_without_gpu_starts_on_cpu_and_says_so(tiny_repo: Path, caplog: pytest.LogCaptureFixture) -> None:
    runtime = Runtime(providers=("tensorrt", "cuda", "cpu"), provider_options={
        "CUDAExecutionProvider": {"device_id": 0, "gpu_mem_limit": 1 << 30}})
    with caplog.at_level(logging.WARNING, logger="plm.service.runtime"):
        srv = ServerThread(make_config(tiny_repo, models=("gpt", "bert"), runtime=runtime))
    try:
        with PlmClient(srv.target) as c:
            for name in ("gpt", "bert"):
                info = c.get_model(name)
                assert list(info.providers) == srv.running.registry.get(name).providers
                assert info.providers[-1] == "CPUExecutionProvider" and info.details["variant"] == "exported"
            scored = c.score("gpt", HELD_OUT[:2])
            assert all(np.isfinite(s.log_prob) for s in scored.scores)
        text = srv.running.metrics.exposition().decode()
        assert 'plm_execution_provider_active{model="gpt",provider="CPUExecutionProvider"} 1.0' in text
    finally:
        srv.stop()
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert any("gpt" in r.getMessage() and "CUDAExecutionProvider" in r.getMessage() for r in caplog.records)


@pytest.fixture(scope="module")
def variant_repo(tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """gpt and bert copied from the tiny repository, with their int8, fused and fp16 variants."""
    repo = tmp_path_factory.mktemp("variants")
    for name in ("gpt", "bert", "nnlm"):
        shutil.copytree(tiny_repo / name, repo / name)
        add_variants(repo / name, ["int8", "fused", "fp16"], HELD_OUT * 3)
    return repo


def test_variants_are_recorded_with_their_accuracy_change(variant_repo: Path) -> None:
    import json

    for name, expected in (("gpt", {"int8", "fused", "fp16"}), ("bert", {"int8", "fused", "fp16"}),
                           ("nnlm", {"int8"})):
        variants = json.loads((variant_repo / name / "manifest.json").read_text())["variants"]
        assert set(variants) == expected
        for variant, spec in variants.items():
            acc = spec["accuracy"]
            for file in spec["graphs"].values():
                assert (variant_repo / name / file).is_file()
            assert acc["test_token_perplexity_delta"] == pytest.approx(
                acc["test_token_perplexity"] - acc["exported_test_token_perplexity"])
            if variant == "int8":  # quantised weights: smaller, and every log-prob moves a little
                assert spec["bytes"] < 0.6 * spec["exported_bytes"] and 0 < acc["max_abs_logprob_diff"] < 0.5
            if variant == "fp16":
                assert acc["max_abs_logprob_diff"] <= FP16_TOLERANCE and spec["bytes"] < 0.6 * spec["exported_bytes"]
            if name == "bert":
                assert 0 <= acc["test_mlm_top1"] <= 1 and "test_mlm_top1_delta" in acc
        if name != "nnlm":  # the optimizer fused something in our transformer graphs, and says what
            assert variants["fused"]["fused_operators"]


def test_the_configured_variant_is_served_and_shown(variant_repo: Path) -> None:
    base = make_config(variant_repo, models=("gpt", "bert"))
    int8 = replace(base, model_runtime={"gpt": Runtime(variant="int8"), "bert": Runtime(variant="nope")})
    servers = [ServerThread(base), ServerThread(int8)]  # type: ignore[arg-type]
    try:
        with PlmClient(servers[0].target) as plain, PlmClient(servers[1].target) as quant:
            info = quant.get_model("gpt")
            assert info.details["variant"] == "int8" and "variants.int8.test_token_perplexity_delta" in info.figures
            assert plain.get_model("gpt").details["variant"] == "exported"
            assert quant.get_model("bert").details["variant"] == "exported"  # no such variant: the exported one
            a = [s.log_prob for s in plain.score("gpt", HELD_OUT).scores]
            b = [s.log_prob for s in quant.score("gpt", HELD_OUT).scores]
            assert a != b and np.allclose(a, b, atol=0.5)  # another graph, nearly the same answers
            filled = quant.stub.FillMask(pb.FillMaskRequest(model="bert", texts=["the king is [MASK]."]))
            assert len(filled.results[0].masks[0].candidates) == 5
    finally:
        for s in servers:
            s.stop()


def test_an_unknown_variant_is_refused_before_any_work(tmp_path: Path) -> None:
    from plm.export.build import build_repository

    with pytest.raises(ValueError, match="unknown variant"):
        build_repository(profile="tiny", repository=tmp_path, variants=["int4"])




def test_every_built_graph_loads_in_the_oldest_supported_onnxruntime(tiny_repo: Path) -> None:
    """pyproject allows onnxruntime >= 1.17, which loads ONNX IR versions up to 9: no graph the build writes
    (exported, hand-built or a variant) may carry a newer one. onnx's helper defaults to its newest IR (14 in
    onnx 1.23), which onnxruntime-gpu 1.31 refused for the word2vec graphs on the H100 machine."""
    import json

    import onnx

    files = []
    for manifest_path in sorted(tiny_repo.glob("*/manifest.json")):
        manifest = json.loads(manifest_path.read_text())
        files += [manifest_path.parent / g["file"] for g in manifest.get("graphs", {}).values()]
        files += [manifest_path.parent / f for v in (manifest.get("variants") or {}).values()
                  for f in v.get("graphs", {}).values()]
    assert len(files) >= 10
    newer = {f"{f.parent.name}/{f.name}": v for f in files if (v := onnx.load(str(f), load_external_data=False)
                                                               .ir_version) > 9}
    assert not newer
