"""The CUDA execution provider: GPU numbers equal CPU numbers, the KV cache stays on the GPU between decode steps.

Skipped where onnxruntime has no CUDA provider (CI, the 2-core development machine); run on a machine with
an NVIDIA GPU and `onnxruntime-gpu` (docs/benchmarks.md, "On a GPU", says how it was run and what it gave).
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from plm.client.client import PlmClient
from plm.export.variants import FP16_TOLERANCE
from plm.service.config import Runtime

from plm.api.v1 import plm_pb2 as pb
from tests.conftest import ServerThread, make_config

pytestmark = pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                                reason="this onnxruntime build has no CUDA execution provider")

MODELS = ("gpt", "bert", "nnlm")
TEXTS = ["To be, or not to be, that is the question.", "The king is dead.",
         "What light through yonder window breaks?", "The government said on Tuesday that the talks would continue."]
PROMPTS = ["The king", "Good morrow, my lord", "O", "What light through yonder window breaks"]
# TF32 matrix products (the CUDA provider's default) round inputs to 10 bits: off for the strict comparisons.
STRICT = {"CUDAExecutionProvider": {"use_tf32": 0}}
CUDA = "CUDAExecutionProvider"


def _server(repo: Path, **runtime: object) -> ServerThread:
    return ServerThread(make_config(repo, models=MODELS, runtime=Runtime(**runtime)))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def cpu(tiny_repo: Path) -> Iterator[ServerThread]:
    srv = _server(tiny_repo, providers=("cpu",))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def gpu(tiny_repo: Path) -> Iterator[ServerThread]:
    srv = _server(tiny_repo, providers=("cuda",), provider_options=STRICT)
    yield srv
    srv.stop()


def test_automatic_providers_choose_the_gpu_and_say_so(tiny_repo: Path) -> None:
    """With `providers = []` a GPU build runs every model on the GPU (TensorRT first where its libraries load,
    else CUDA, with a warning), shows it in GetModel and the metrics, and keeps the decoder's KV there."""
    srv = _server(tiny_repo)
    try:
        with PlmClient(srv.target) as c:
            for name in MODELS:
                providers = list(c.get_model(name).providers)
                assert providers[0] in ("TensorrtExecutionProvider", CUDA) and providers[-1] == "CPUExecutionProvider"
                active = srv.running.metrics.execution_provider.labels(name, providers[0])._value.get()
                assert active == 1
            details = c.get_model("gpt").details
            assert details["io_binding"] == "cuda" and details["kv_layout"] == "cuda"
    finally:
        srv.stop()


def test_gpu_scores_equal_cpu_scores(cpu: ServerThread, gpu: ServerThread) -> None:
    """Score (GPT, NNLM), FillMask and Embed (BERT) on CUDA within 1e-4 of CPU, token by token."""
    with PlmClient(cpu.target) as a, PlmClient(gpu.target) as b:
        assert b.get_model("gpt").providers[0] == CUDA
        for model in ("gpt", "nnlm"):
            for x, y in zip(a.score(model, TEXTS).scores, b.score(model, TEXTS).scores, strict=True):
                assert [t.id for t in x.tokens] == [t.id for t in y.tokens]
                np.testing.assert_allclose([t.log_prob for t in y.tokens], [t.log_prob for t in x.tokens], atol=1e-4)
        masked = ["To be, or not to [MASK], that is the question.", "The [MASK] is dead."]
        for x, y in zip(a.fill_mask("bert", masked, top_k=5).results, b.fill_mask("bert", masked, top_k=5).results,
                        strict=True):
            for mx, my in zip(x.masks, y.masks, strict=True):
                np.testing.assert_allclose([c.log_prob for c in my.candidates], [c.log_prob for c in mx.candidates],
                                           atol=1e-4)
        for x, y in zip(a.embed("bert", TEXTS).embeddings, b.embed("bert", TEXTS).embeddings, strict=True):
            np.testing.assert_allclose(y.vector, x.vector, atol=1e-4)


def test_gpu_engine_keeps_keys_and_values_on_the_gpu_and_generates_what_cpu_does(cpu: ServerThread,
                                                                                 gpu: ServerThread) -> None:
    """IO binding: every decode step is fed CUDA OrtValues (the last step's presents, or the KV layout graph's
    output after a join or leave); greedy tokens, alone and with sequences joining and leaving, and Classify's
    scores are the CPU engine's."""
    engine = gpu.running.registry.get("gpt").engine
    assert engine.session.io_binding and engine.session.device == "cuda"
    where: list[str] = []
    decode = engine._decode

    def watched() -> object:
        kv = engine._batch.kv[0]
        where.append(kv.device_name() if isinstance(kv, ort.OrtValue) else "numpy")
        return decode()

    def gen(srv: ServerThread, prompts: list[str], n: int) -> list[list[int]]:
        with PlmClient(srv.target) as c:
            got = c.generate("gpt", prompts, pb.SamplingParams(temperature=0.0, max_new_tokens=n)).generations
        return [list(g.token_ids) for g in got]

    engine._decode = watched
    try:
        assert gen(gpu, PROMPTS, 16) == gen(cpu, PROMPTS, 16)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            together = list(pool.map(lambda p: gen(gpu, [p], 4 + len(p) // 4)[0], PROMPTS * 2))
        assert together == [gen(cpu, [p], 4 + len(p) // 4)[0] for p in PROMPTS * 2]
        demos = [pb.Demonstration(text="Alas!", label="tragedy"), pb.Demonstration(text="Ha!", label="comedy")]
        req = pb.ClassifyRequest(model="gpt", demonstrations=demos, labels=["tragedy", "comedy"],
                                 queries=["To be.", "A horse!"])
        with PlmClient(cpu.target) as a, PlmClient(gpu.target) as b:
            for x, y in zip(a.stub.Classify(req).results, b.stub.Classify(req).results, strict=True):
                np.testing.assert_allclose([s.log_likelihood for s in y.scores],
                                           [s.log_likelihood for s in x.scores], atol=1e-4)
    finally:
        del engine._decode
    assert where and all(w == "cuda" for w in where)  # joins and leaves too were laid out on the GPU


def test_fp16_variant_on_gpu_within_its_tolerance(tiny_repo: Path, tmp_path: Path) -> None:
    """The fp16 graphs run in fp16 on CUDA: GPT's token log-probs stay within FP16_TOLERANCE of float32 on CPU,
    and its greedy generation through the fp16 decoder starts as float32's does."""
    import shutil

    from plm.export.variants import add_variants

    shutil.copytree(tiny_repo / "gpt", tmp_path / "gpt")
    add_variants(tmp_path / "gpt", ["fp16"], TEXTS * 3)  # its own parity check runs here, on the GPU
    fp32 = ServerThread(make_config(tmp_path, models=("gpt",), runtime=Runtime(providers=("cpu",))))
    fp16 = ServerThread(make_config(tmp_path, models=("gpt",), runtime=Runtime(providers=("cuda",), variant="fp16")))
    try:
        with PlmClient(fp32.target) as a, PlmClient(fp16.target) as b:
            assert b.get_model("gpt").details["variant"] == "fp16"
            for x, y in zip(a.score("gpt", TEXTS).scores, b.score("gpt", TEXTS).scores, strict=True):
                diff = np.abs(np.subtract([t.log_prob for t in y.tokens], [t.log_prob for t in x.tokens]))
                assert diff.max() <= FP16_TOLERANCE
            params = pb.SamplingParams(temperature=0.0, max_new_tokens=4)
            first = [g.token_ids[0] for g in a.generate("gpt", PROMPTS, params).generations]
            assert [g.token_ids[0] for g in b.generate("gpt", PROMPTS, params).generations] == first
    finally:
        fp32.stop()
        fp16.stop()
