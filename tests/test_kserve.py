"""KServe v2 / Triton GRPCInferenceService, driven by tritonclient (a client nobody here wrote) against the real
server: readiness, metadata, and ModelInfer results equal to the plm.v1 RPCs' for the same inputs, with the text
sent as raw_input_contents (what tritonclient does) and as typed contents (a request written by hand)."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from plm.client import PlmClient
from plm.service.config import Security

from tests.conftest import ServerThread, make_config

tc = pytest.importorskip("tritonclient.grpc")
from tritonclient.grpc import service_pb2, service_pb2_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402


@pytest.fixture(scope="module")
def triton(server: ServerThread) -> Iterator[Any]:
    client = tc.InferenceServerClient(url=server.target)
    yield client
    client.close()


@pytest.fixture(scope="module")
def plm(server: ServerThread) -> Iterator[PlmClient]:
    with PlmClient(server.target) as c:
        yield c


def _bytes_input(name: str, texts: list[str]) -> Any:
    t = tc.InferInput(name, [len(texts)], "BYTES")
    t.set_data_from_numpy(np.array([s.encode() for s in texts], dtype=object))
    return t


def infer_raw(triton: Any, model: str, inputs: dict[str, list[str]], **params: Any) -> dict[str, np.ndarray]:
    """tritonclient's own request: BYTES tensors in raw_input_contents."""
    result = triton.infer(model, [_bytes_input(n, v) for n, v in inputs.items()], parameters=params or None)
    return {o.name: result.as_numpy(o.name) for o in result.get_response().outputs}


def infer_typed(server: ServerThread, model: str, inputs: dict[str, list[str]], **params: Any) -> dict[str, Any]:
    """The same request with the text in InferTensorContents.bytes_contents, sent through tritonclient's stub."""
    req = service_pb2.ModelInferRequest(model_name=model)
    for name, values in inputs.items():
        req.inputs.add(name=name, datatype="BYTES", shape=[len(values)],
                       contents=service_pb2.InferTensorContents(bytes_contents=[v.encode() for v in values]))
    for key, value in params.items():
        p = req.parameters[key]
        if isinstance(value, bool):
            p.bool_param = value
        elif isinstance(value, int):
            p.int64_param = value
        elif isinstance(value, float):
            p.double_param = value
        else:
            p.string_param = value
    with grpc.insecure_channel(server.target) as ch:
        resp = service_pb2_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req, timeout=60)
    result = tc.InferResult(resp)
    return {o.name: result.as_numpy(o.name) for o in resp.outputs}


def both(server: ServerThread, triton: Any, model: str, inputs: dict[str, list[str]],
         **params: Any) -> dict[str, np.ndarray]:
    """Raw and typed requests give identical tensors; return them."""
    raw = infer_raw(triton, model, inputs, **params)
    typed = infer_typed(server, model, inputs, **params)
    assert raw.keys() == typed.keys()
    for name in raw:
        np.testing.assert_array_equal(raw[name], typed[name], err_msg=name)
    return raw


def _text(a: np.ndarray) -> list[Any]:
    return [x.decode() if isinstance(x, bytes) else _text(x) for x in a]


# -------------------------------------------------------------------------------- protocol and metadata


def test_the_protocol_is_tritons_byte_for_byte(server: ServerThread) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    from tritonclient.grpc import model_config_pb2

    from plm.api.triton import grpc_service_pb2 as ours
    from plm.api.triton import model_config_pb2 as ours_config

    assert ours.DESCRIPTOR.serialized_pb == service_pb2.DESCRIPTOR.serialized_pb
    assert ours_config.DESCRIPTOR.serialized_pb == model_config_pb2.DESCRIPTOR.serialized_pb
    with grpc.insecure_channel(server.target) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        resp = next(iter(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))))
    assert "inference.GRPCInferenceService" in {s.name for s in resp.list_services_response.service}


def test_liveness_readiness_and_server_metadata(triton: Any) -> None:
    assert triton.is_server_live() and triton.is_server_ready()
    meta = triton.get_server_metadata()
    assert meta.name == "plm" and meta.version and "parameters" in meta.extensions
    assert triton.is_model_ready("gpt") and triton.is_model_ready("gpt:generate")
    assert triton.is_model_ready("bert:fill_mask") and triton.is_model_ready("gpt:classify")
    assert not triton.is_model_ready("no-such-model")
    assert not triton.is_model_ready("gpt:fill_mask")  # gpt does not fill masks
    assert not triton.is_model_ready("bert:classify")  # in-context classification needs a causal LM


def test_model_metadata_for_every_model_and_task(triton: Any, plm: PlmClient) -> None:
    """Every plm.v1 model answers under its own name (its first task) and under `name:task` for each task."""
    from plm.service.frontends.kserve_tasks import TASKS

    for info in plm.list_models().models:
        first = triton.get_model_metadata(info.name)
        assert first.versions == [info.version]
        assert first.platform == ("plm_ngram_arpa" if info.family == "ngram" else "onnxruntime_onnx")
        for task in [t for t in info.tasks if t in TASKS]:
            meta = triton.get_model_metadata(f"{info.name}:{task}")
            spec = TASKS[task]
            assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
                (t.name, t.datatype, list(t.shape)) for t in spec.inputs]
            assert [t.name for t in meta.outputs] == [t.name for t in spec.outputs]
        assert first.inputs == triton.get_model_metadata(f"{info.name}:{info.tasks[0]}").inputs
    with pytest.raises(InferenceServerException) as e:
        triton.get_model_metadata("gpt", model_version="999")
    assert "NOT_FOUND" in str(e.value.status())


# ------------------------------------------------------------------------- ModelInfer equals plm.v1


SENTENCES = ["The king is dead.", "Long live the king.", "To be, or not to be."]


@pytest.mark.parametrize("model", ["gpt", "ngram-kn", "nnlm", "elmo"])
def test_score(server: ServerThread, triton: Any, plm: PlmClient, model: str) -> None:
    out = both(server, triton, f"{model}:score", {"TEXT": SENTENCES})
    want = plm.score(model, SENTENCES).scores
    np.testing.assert_array_equal(out["LOG_PROB"], [s.log_prob for s in want])
    np.testing.assert_array_equal(out["PERPLEXITY"], [s.perplexity for s in want])
    np.testing.assert_array_equal(out["NUM_TOKENS"], [s.num_tokens for s in want])
    no_eos = infer_raw(triton, f"{model}:score", {"TEXT": SENTENCES[:1]}, add_eos=False)
    assert no_eos["LOG_PROB"][0] == plm.score(model, SENTENCES[:1], add_eos=False).scores[0].log_prob


@pytest.mark.parametrize("model", ["gpt", "ngram-laplace"])
def test_predict_next(server: ServerThread, triton: Any, plm: PlmClient, model: str) -> None:
    contexts = ["the king", "to be or not to"]
    out = both(server, triton, f"{model}:predict_next", {"TEXT": contexts}, top_k=3)
    want = plm.predict_next(model, contexts, top_k=3).predictions
    assert out["WORD"].shape == out["PROB"].shape == (2, 3)
    assert _text(out["WORD"]) == [[c.text for c in p.words] for p in want]
    np.testing.assert_array_equal(out["PROB"], [[c.prob for c in p.words] for p in want])


def test_generate(server: ServerThread, triton: Any, plm: PlmClient) -> None:
    prompts = ["The king", "To be"]
    out = both(server, triton, "gpt:generate", {"TEXT": prompts}, temperature=0.0, max_new_tokens=6)
    want = plm.generate("gpt", prompts, {"temperature": 0.0, "max_new_tokens": 6}).generations
    assert _text(out["TEXT_OUTPUT"]) == [g.text for g in want]
    assert list(out["GENERATED_TOKENS"]) == [g.generated_tokens for g in want]
    assert set(_text(out["FINISH_REASON"])) <= {"length", "stop", "eos"}
    seeded = infer_raw(triton, "gpt:generate", {"TEXT": prompts}, seed=7, max_new_tokens=5, top_k=20)
    sampled = plm.generate("gpt", prompts, {"seed": 7, "max_new_tokens": 5, "top_k": 20}).generations
    assert _text(seeded["TEXT_OUTPUT"]) == [g.text for g in sampled]


@pytest.mark.parametrize("model", ["bert", "word2vec-cbow"])
def test_fill_mask(server: ServerThread, triton: Any, plm: PlmClient, model: str) -> None:
    texts = ["the king is [MASK] .", "the [MASK] of [MASK] is dead ."]
    out = both(server, triton, f"{model}:fill_mask", {"TEXT": texts}, top_k=4)
    want = plm.fill_mask(model, texts, top_k=4).results
    rows = [(i, m) for i, r in enumerate(want) for m in r.masks]
    assert list(out["TEXT_INDEX"]) == [i for i, _ in rows]
    assert _text(out["TOKEN"]) == [[c.token_str for c in m.candidates] for _, m in rows]
    np.testing.assert_array_equal(out["SCORE"], [[c.score for c in m.candidates] for _, m in rows])


@pytest.mark.parametrize(("model", "params"), [("word2vec-skipgram", {}), ("gpt", {"normalize": True}),
                                               ("bert", {"pooling": "cls"}), ("elmo", {})])
def test_embed(server: ServerThread, triton: Any, plm: PlmClient, model: str, params: dict[str, Any]) -> None:
    texts = ["king", "the queen is dead"]
    out = both(server, triton, f"{model}:embed", {"TEXT": texts}, **params)
    want = plm.embed(model, texts, **params)
    assert out["EMBEDDING"].dtype == np.float32 and out["EMBEDDING"].shape == (2, want.dimension)
    np.testing.assert_array_equal(out["EMBEDDING"], [list(e.vector) for e in want.embeddings])


def test_next_sentence(server: ServerThread, triton: Any, plm: PlmClient) -> None:
    a, b = ["the king is dead .", "to be or not to be ."], ["long live the king .", "the cat sat ."]
    out = both(server, triton, "bert:next_sentence", {"TEXT_A": a, "TEXT_B": b})
    want = plm.predict_next_sentence("bert", list(zip(a, b, strict=True))).results
    np.testing.assert_array_equal(out["IS_NEXT_PROB"], [r.is_next_prob for r in want])
    np.testing.assert_array_equal(out["LOG_PROB"], [r.log_prob for r in want])


@pytest.mark.parametrize("model", ["gpt", "ngram-kn", "nnlm", "elmo"])
def test_classify(server: ServerThread, triton: Any, plm: PlmClient, model: str) -> None:
    queries, labels = ["Alas, poor Yorick!", "Ha ha, what a jest!"], ["tragedy", "comedy"]
    out = both(server, triton, f"{model}:classify",
               {"TEXT": queries, "LABELS": labels, "DEMO_TEXT": ["O woe!"], "DEMO_LABEL": ["tragedy"]},
               scoring="token_mean", calibrate=True)
    want = plm.classify(model, queries, labels, demonstrations=[("O woe!", "tragedy")], scoring="token_mean",
                        calibrate=True).results
    assert _text(out["LABEL"]) == [c.label for c in want]
    np.testing.assert_array_equal(out["PROB"], [[s.probability for s in c.scores] for c in want])
    assert np.allclose(out["PROB"].sum(axis=1), 1.0)


def test_requested_outputs_only(triton: Any) -> None:
    result = triton.infer("gpt", [_bytes_input("TEXT", SENTENCES)],  # the bare name: gpt's first task, score
                          outputs=[tc.InferRequestedOutput("NUM_TOKENS")])
    assert [o.name for o in result.get_response().outputs] == ["NUM_TOKENS"]


# ------------------------------------------------------------------------------------------------ errors


def _status(fn: Any) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as e:
        fn()
    return str(e.value.status()), str(e.value.message())


def test_errors_name_the_tensor_or_parameter(server: ServerThread, triton: Any) -> None:
    code, msg = _status(lambda: infer_raw(triton, "no-such-model", {"TEXT": ["x"]}))
    assert code == "StatusCode.NOT_FOUND" and "no-such-model" in msg
    code, msg = _status(lambda: infer_raw(triton, "gpt:fill_mask", {"TEXT": ["x [MASK]"]}))
    assert code == "StatusCode.NOT_FOUND" and "gpt:generate" in msg  # lists what gpt serves
    code, msg = _status(lambda: infer_raw(triton, "gpt:score", {"TEXT": ["fine", "  "]}))
    assert code == "StatusCode.INVALID_ARGUMENT" and "input TEXT[1]" in msg
    code, msg = _status(lambda: infer_raw(triton, "gpt:score", {"PROMPT": ["x"]}))
    assert code == "StatusCode.INVALID_ARGUMENT" and "PROMPT" in msg and "TEXT" in msg
    code, msg = _status(lambda: infer_raw(triton, "gpt:generate", {"TEXT": ["x"]}, temperature="hot"))
    assert code == "StatusCode.INVALID_ARGUMENT" and "parameter temperature" in msg
    code, msg = _status(lambda: infer_raw(triton, "gpt:generate", {"TEXT": ["x"]}, top_p=0.0))
    assert code == "StatusCode.INVALID_ARGUMENT" and "parameter top_p" in msg
    code, msg = _status(lambda: infer_raw(triton, "ngram-kn:predict_next", {"TEXT": ["the"]}, top_k=0))
    assert code == "StatusCode.INVALID_ARGUMENT" and "parameter top_k: is 0" in msg
    code, msg = _status(lambda: infer_raw(triton, "gpt:score", {"TEXT": ["x"]}, beam=2))
    assert code == "StatusCode.INVALID_ARGUMENT" and "parameter beam" in msg
    code, msg = _status(lambda: infer_raw(triton, "bert:next_sentence", {"TEXT_A": ["a", "b"], "TEXT_B": ["c"]}))
    assert code == "StatusCode.INVALID_ARGUMENT" and "TEXT_B" in msg
    numbers = tc.InferInput("TEXT", [2], "INT64")
    numbers.set_data_from_numpy(np.array([1, 2], dtype=np.int64))
    code, msg = _status(lambda: triton.infer("gpt:score", [numbers]))
    assert code == "StatusCode.INVALID_ARGUMENT" and "BYTES" in msg
    code, msg = _status(lambda: triton.infer("gpt:score", [_bytes_input("TEXT", ["x"])],
                                             outputs=[tc.InferRequestedOutput("LOGITS")]))
    assert code == "StatusCode.INVALID_ARGUMENT" and "LOGITS" in msg


@pytest.mark.parametrize(("raw", "problem"), [
    (b"\x05\x00\x00\x00abc", "claims 5 bytes"),  # a length prefix longer than what follows
    (b"\x01\x00", "length prefix"),  # a cut-off prefix
    (b"\x01\x00\x00\x00a\x01\x00\x00\x00b", "holds 2 elements"),  # more elements than the shape says
    (b"\x02\x00\x00\x00\xff\xfe", "UTF-8"),
])
def test_malformed_raw_bytes(server: ServerThread, raw: bytes, problem: str) -> None:
    req = service_pb2.ModelInferRequest(model_name="gpt:score", raw_input_contents=[raw])
    req.inputs.add(name="TEXT", datatype="BYTES", shape=[1])
    with grpc.insecure_channel(server.target) as ch, pytest.raises(grpc.RpcError) as e:
        service_pb2_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req, timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and problem in e.value.details()
    assert "input TEXT" in e.value.details()


def test_modelinfer_shares_the_request_metrics_and_batcher(server: ServerThread, triton: Any) -> None:
    registry = server.running.metrics.registry

    def sample(name: str, labels: dict[str, str]) -> float:
        return registry.get_sample_value(name, labels) or 0.0

    ok = {"method": "ModelInfer", "model": "gpt", "code": "OK", "protocol": "grpc"}
    before = sample("plm_requests_total", ok), sample("plm_batch_size_count", {"model": "gpt"})
    infer_raw(triton, "gpt:score", {"TEXT": SENTENCES})
    assert sample("plm_requests_total", ok) == before[0] + 1
    assert sample("plm_batch_size_count", {"model": "gpt"}) > before[1]  # it ran through gpt's batcher
    bad = {"method": "ModelInfer", "model": "gpt", "code": "INVALID_ARGUMENT", "protocol": "grpc"}
    n = sample("plm_requests_total", bad)
    _status(lambda: infer_raw(triton, "gpt:score", {"TEXT": [""]}))
    # The status reaches the client as the handler aborts; its metrics line runs just after: wait for it.
    deadline = time.monotonic() + 10
    while sample("plm_requests_total", bad) < n + 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sample("plm_requests_total", bad) == n + 1


# ------------------------------------------------------------------------- config and statistics


def datatype(number: int) -> str:
    """A Triton config DataType as a tensor datatype: TYPE_STRING → BYTES, TYPE_FP64 → FP64."""
    from tritonclient.grpc import model_config_pb2

    kind = model_config_pb2.DataType.Name(number).removeprefix("TYPE_")
    return "BYTES" if kind == "STRING" else kind


def test_model_config_matches_the_metadata(server: ServerThread, triton: Any, plm: PlmClient) -> None:
    """Every task's ModelConfig has ModelMetadata's tensors: [-1] + dims when max_batch_size > 0 (Triton's
    convention), the dims themselves when it is 0; dynamic batching carries the model's batcher settings."""
    from plm.service.frontends.kserve import batching
    from plm.service.frontends.kserve_tasks import model_tasks

    registry = server.running.registry
    for info in plm.list_models().models:
        for task in model_tasks(registry.models[info.name]):
            name = f"{info.name}:{task}"
            config = triton.get_model_config(name).config
            meta = triton.get_model_metadata(name)
            assert config.name == name and config.platform == meta.platform

            def shape(dims: Any, max_batch: int = config.max_batch_size) -> list[int]:
                return ([-1] if max_batch else []) + list(dims)

            assert [(t.name, datatype(t.data_type), shape(t.dims)) for t in config.input] \
                == [(t.name, t.datatype, list(t.shape)) for t in meta.inputs]
            assert [(t.name, datatype(t.data_type), shape(t.dims)) for t in config.output] \
                == [(t.name, t.datatype, list(t.shape)) for t in meta.outputs]
            cfg = batching(registry.models[info.name])
            if cfg is None:
                assert not config.HasField("dynamic_batching")
            else:
                assert config.dynamic_batching.max_queue_delay_microseconds == round(cfg.max_queue_delay_ms * 1000)
                assert config.dynamic_batching.default_queue_policy.max_queue_size == cfg.max_queue_size
                assert config.parameters["batching.max_batch_size"].string_value == str(cfg.max_batch_size)
    limit = server.running.config.limits.max_inputs_per_request
    assert triton.get_model_config("ngram-kn:score").config.max_batch_size == limit  # unbatched: the request's limit
    gpt = batching(registry.models["gpt"])
    assert gpt is not None
    assert triton.get_model_config("gpt:score").config.max_batch_size == min(gpt.max_batch_size, limit)
    assert triton.get_model_config("bert:fill_mask").config.max_batch_size == 0  # a row per [MASK], not per text
    assert triton.get_model_config("gpt:classify").config.max_batch_size == 0  # LABELS is not the batch
    code, msg = _status(lambda: triton.get_model_config("gpt:fill_mask"))
    assert code == "StatusCode.NOT_FOUND" and "gpt:generate" in msg


def _wait_for(check: Any, seconds: float = 10) -> None:
    """The status reaches the client before the call's metrics line is written: poll a little."""
    deadline = time.monotonic() + seconds
    while not check() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert check()


def test_model_statistics_count_calls_and_their_time(triton: Any, plm: PlmClient) -> None:
    def stats(name: str = "gpt:score") -> Any:
        (one,) = triton.get_inference_statistics(name).model_stats
        return one

    before = stats()
    assert before.name == "gpt:score" and before.version == plm.get_model("gpt").version
    infer_raw(triton, "gpt:score", {"TEXT": SENTENCES})
    plm.score("gpt", SENTENCES[:1])  # plm.v1 calls are the same model's inferences
    _status(lambda: infer_raw(triton, "gpt:score", {"TEXT": [""]}))
    _wait_for(lambda: stats().inference_stats.fail.count == before.inference_stats.fail.count + 1)
    _wait_for(lambda: stats().inference_stats.success.count == before.inference_stats.success.count + 2)
    after = stats()
    s, b = after.inference_stats, before.inference_stats
    assert s.success.ns > b.success.ns and s.fail.ns > b.fail.ns
    assert s.queue.count >= b.queue.count + len(SENTENCES) + 1 and s.queue.ns >= b.queue.ns  # rows queued
    assert s.compute_infer.count > b.compute_infer.count and s.compute_infer.ns > b.compute_infer.ns
    assert after.execution_count > before.execution_count
    assert after.inference_count >= before.inference_count + len(SENTENCES) + 1
    assert after.last_inference >= max(before.last_inference, int(time.time() * 1000) - 60_000)
    triton.get_model_metadata("gpt")  # describing a model is no inference
    assert stats().inference_stats.success.count == s.success.count
    every = {m.name for m in triton.get_inference_statistics().model_stats}
    assert every == {m.name for m in plm.list_models().models}
    code, _ = _status(lambda: triton.get_inference_statistics("no-such-model"))
    assert code == "StatusCode.NOT_FOUND"


# ------------------------------------------------------------------------------------------- repository


def test_repository_index_lists_every_model(triton: Any, plm: PlmClient) -> None:
    index = triton.get_model_repository_index().models
    assert [(m.name, m.version, m.state) for m in index] == [
        (m.name, m.version, "READY") for m in sorted(plm.list_models().models, key=lambda m: m.name)]


async def _on_loop(fn: Any) -> Any:
    return fn()


@pytest.fixture(scope="module")
def small_repo(tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ngram-kn, and `broken`: a copy of it whose manifest names another folder (it fails to load)."""
    repo = tmp_path_factory.mktemp("kserve-repository")
    shutil.copytree(tiny_repo / "ngram-kn", repo / "ngram-kn")
    shutil.copytree(tiny_repo / "ngram-kn", repo / "broken")
    return repo


@pytest.fixture(scope="module")
def repo_server(small_repo: Path) -> Iterator[ServerThread]:
    srv = ServerThread(make_config(small_repo, grace_seconds=30.0))
    yield srv
    srv.stop()


def test_unload_drains_and_load_serves_again(repo_server: ServerThread) -> None:
    srv, running = repo_server, repo_server.running
    client = tc.InferenceServerClient(url=srv.target)
    try:
        index = {m.name: m for m in client.get_model_repository_index().models}
        assert (index["ngram-kn"].state, index["ngram-kn"].version) == ("READY", running.registry.models["ngram-kn"]
                                                                        .version)
        assert index["broken"].state == "UNAVAILABLE" and "differs from the folder name" in index["broken"].reason
        first = infer_raw(client, "ngram-kn", {"TEXT": SENTENCES})

        # A call in flight holds the model: unload answers only once it is done, and new calls are refused at once.
        model = srv.call(_on_loop(lambda: running.registry.acquire("ngram-kn")))
        unloading = ThreadPoolExecutor(1).submit(client.unload_model, "ngram-kn")
        _wait_for(lambda: not client.is_model_ready("ngram-kn"))
        code, msg = _status(lambda: infer_raw(client, "ngram-kn", {"TEXT": SENTENCES}))
        assert code == "StatusCode.NOT_FOUND" and "ngram-kn" in msg
        time.sleep(0.3)
        assert not unloading.done()  # still draining
        srv.call(_on_loop(lambda: running.registry.release(model)))
        unloading.result(timeout=10)

        index = {m.name: m for m in client.get_model_repository_index().models}
        assert (index["ngram-kn"].state, index["ngram-kn"].reason) == ("UNAVAILABLE", "unloaded")
        changes = srv.call(running.reloader.reload())  # a reload leaves an unloaded model unloaded
        assert "ngram-kn" not in {c.name for c in changes}  # type: ignore[attr-defined]
        assert not client.is_model_ready("ngram-kn")

        client.load_model("ngram-kn")
        assert client.is_model_ready("ngram-kn") and not client.is_server_ready()  # `broken` failed to load
        again = infer_raw(client, "ngram-kn", {"TEXT": SENTENCES})
        np.testing.assert_array_equal(again["LOG_PROB"], first["LOG_PROB"])
        client.load_model("ngram-kn")  # loaded already: nothing to do
        assert client.get_model_repository_index().models[1].state == "READY"

        code, msg = _status(lambda: client.load_model("broken"))
        assert code == "StatusCode.FAILED_PRECONDITION" and "differs from the folder name" in msg
        code, msg = _status(lambda: client.load_model("no-such-model"))
        assert code == "StatusCode.NOT_FOUND"
        code, msg = _status(lambda: client.unload_model("no-such-model"))
        assert code == "StatusCode.NOT_FOUND"
        code, msg = _status(lambda: client.load_model("ngram-kn:score"))
        assert code == "StatusCode.INVALID_ARGUMENT" and "'ngram-kn'" in msg
        code, msg = _status(lambda: client.load_model("ngram-kn", config='{"max_batch_size": 4}'))
        assert code == "StatusCode.INVALID_ARGUMENT" and "parameter config" in msg
        client.unload_model("broken")  # a model that failed to load can be unloaded: it is no longer listed as failed
        assert client.is_server_ready()
    finally:
        client.close()


def test_load_and_unload_need_what_the_admin_service_needs(tiny_repo: Path) -> None:
    """With bearer tokens on and the KServe service open to all (open_services), inference needs no token,
    but load and unload are refused UNAUTHENTICATED as plm.v1.AdminService is, until the token comes."""
    open_kserve = (*Security().open_services, "inference.GRPCInferenceService")
    srv = ServerThread(make_config(tiny_repo, models=("ngram-kn",),
                                   security=Security(auth_token="admin-token", open_services=open_kserve)))
    client = tc.InferenceServerClient(url=srv.target)
    try:
        infer_raw(client, "ngram-kn", {"TEXT": SENTENCES})
        assert client.get_model_repository_index().models[0].state == "READY"
        for refused in ({}, {"authorization": "Bearer wrong-token"}, {"authorization": "admin-token"}):
            for call in (client.unload_model, client.load_model):
                code, msg = _status(lambda call=call, refused=refused: call("ngram-kn", headers=refused))
                assert code == "StatusCode.UNAUTHENTICATED" and "Bearer" in msg
        assert client.is_model_ready("ngram-kn")
        rejected = srv.running.metrics.registry.get_sample_value(
            "plm_rejections_total", {"model": "-", "reason": "unauthenticated"})
        assert rejected == 6
        token = {"authorization": "Bearer admin-token"}
        client.unload_model("ngram-kn", headers=token)
        assert not client.is_model_ready("ngram-kn")
        client.load_model("ngram-kn", headers=token)
        assert client.is_model_ready("ngram-kn")
    finally:
        client.close()
        srv.stop()
