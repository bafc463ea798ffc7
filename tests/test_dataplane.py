"""The front ends share one data plane: the same request through plm.v1 and KServe v2 gives the same numbers,
and each error of the error table reaches each protocol with its status and under its own field names."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest

from plm.api.v1 import plm_pb2 as pb
from plm.api.v1 import plm_pb2_grpc as pb_grpc
from tests.conftest import ServerThread

tc = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402


@pytest.fixture(scope="module")
def stub(server: ServerThread) -> Iterator[pb_grpc.LanguageModelServiceStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.LanguageModelServiceStub(channel)


@pytest.fixture(scope="module")
def triton(server: ServerThread) -> Iterator[Any]:
    client = tc.InferenceServerClient(url=server.target)
    yield client
    client.close()


def infer(triton: Any, model: str, inputs: dict[str, list[str]], timeout: float | None = None,
          **params: Any) -> dict[str, np.ndarray]:
    tensors = []
    for name, texts in inputs.items():
        t = tc.InferInput(name, [len(texts)], "BYTES")
        t.set_data_from_numpy(np.array([s.encode() for s in texts], dtype=object))
        tensors.append(t)
    result = triton.infer(model, tensors, parameters=params or None, client_timeout=timeout)
    return {o.name: result.as_numpy(o.name) for o in result.get_response().outputs}


def _strings(a: np.ndarray) -> list[Any]:
    return [x.decode() if isinstance(x, bytes) else _strings(x) for x in a]


# ------------------------------------------------------------------------------- the same numbers


TEXTS = ["The king is dead.", "Long live the king."]


def test_score(stub: Any, triton: Any) -> None:
    want = stub.Score(pb.ScoreRequest(model="gpt", texts=TEXTS)).scores
    out = infer(triton, "gpt:score", {"TEXT": TEXTS})
    np.testing.assert_array_equal(out["LOG_PROB"], [s.log_prob for s in want])
    np.testing.assert_array_equal(out["PERPLEXITY"], [s.perplexity for s in want])
    np.testing.assert_array_equal(out["NUM_TOKENS"], [s.num_tokens for s in want])


def test_predict_next(stub: Any, triton: Any) -> None:
    want = stub.PredictNext(pb.PredictNextRequest(model="gpt", contexts=["the king"], top_k=3)).predictions
    out = infer(triton, "gpt:predict_next", {"TEXT": ["the king"]}, top_k=3)
    assert _strings(out["WORD"]) == [[c.text for c in p.words] for p in want]
    np.testing.assert_array_equal(out["PROB"], [[c.prob for c in p.words] for p in want])


def test_generate_sampled(stub: Any, triton: Any) -> None:
    """Sampled, not greedy: the sampling numbers (plm.v1 carries them as float32) reach the sampler alike."""
    sampling = pb.SamplingParams(temperature=0.9, top_p=0.95, top_k=40, max_new_tokens=8, seed=11)
    want = stub.Generate(pb.GenerateRequest(model="gpt", prompts=TEXTS, sampling=sampling)).generations
    out = infer(triton, "gpt:generate", {"TEXT": TEXTS}, temperature=0.9, top_p=0.95, top_k=40, max_new_tokens=8,
                seed=11)
    assert _strings(out["TEXT_OUTPUT"]) == [g.text for g in want]
    np.testing.assert_array_equal(out["GENERATED_TOKENS"], [g.generated_tokens for g in want])
    names = {pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_EOS: "eos"}
    assert _strings(out["FINISH_REASON"]) == [names[g.finish_reason] for g in want]


def test_fill_mask(stub: Any, triton: Any) -> None:
    texts = ["the king is [MASK] .", "[MASK] live the [MASK] ."]
    want = stub.FillMask(pb.FillMaskRequest(model="bert", texts=texts, top_k=4)).results
    out = infer(triton, "bert:fill_mask", {"TEXT": texts}, top_k=4)
    masks = [m for r in want for m in r.masks]
    assert _strings(out["TOKEN"]) == [[c.token_str for c in m.candidates] for m in masks]
    np.testing.assert_array_equal(out["SCORE"], [[c.score for c in m.candidates] for m in masks])
    np.testing.assert_array_equal(out["TEXT_INDEX"], [0, 1, 1])


def test_embed(stub: Any, triton: Any) -> None:
    want = stub.Embed(pb.EmbedRequest(model="bert", texts=TEXTS, pooling=pb.POOLING_CLS, normalize=True))
    out = infer(triton, "bert:embed", {"TEXT": TEXTS}, pooling="cls", normalize=True)
    np.testing.assert_array_equal(out["EMBEDDING"], [list(e.vector) for e in want.embeddings])


def test_next_sentence(stub: Any, triton: Any) -> None:
    a, b = ["the king is dead ."], ["long live the king ."]
    want = stub.PredictNextSentence(pb.PredictNextSentenceRequest(
        model="bert", pairs=[pb.SentencePair(a=x, b=y) for x, y in zip(a, b, strict=True)])).results
    out = infer(triton, "bert:next_sentence", {"TEXT_A": a, "TEXT_B": b})
    np.testing.assert_array_equal(out["IS_NEXT_PROB"], [r.is_next_prob for r in want])
    np.testing.assert_array_equal(out["LOG_PROB"], [r.log_prob for r in want])


def test_classify(stub: Any, triton: Any) -> None:
    queries, labels = ["Alas, poor Yorick!", "Ha ha, what a jest!"], ["tragedy", "comedy"]
    want = stub.Classify(pb.ClassifyRequest(
        model="gpt", queries=queries, labels=labels, demonstrations=[pb.Demonstration(text="O woe!", label="tragedy")],
        scoring=pb.LABEL_SCORING_PER_CHAR, calibrate=True)).results
    out = infer(triton, "gpt:classify", {"TEXT": queries, "LABELS": labels, "DEMO_TEXT": ["O woe!"],
                                         "DEMO_LABEL": ["tragedy"]}, scoring="per_char", calibrate=True)
    assert _strings(out["LABEL"]) == [c.label for c in want]
    np.testing.assert_array_equal(out["PROB"], [[s.probability for s in c.scores] for c in want])


def test_every_kserve_task_is_compared_here() -> None:
    from plm.service.frontends.kserve_tasks import TASKS

    compared = {"score", "predict_next", "generate", "fill_mask", "embed", "next_sentence", "classify"}
    assert set(TASKS) == compared


# --------------------------------------------------------------------------- the error table

# (plm.v1 call, KServe call, status, the field plm.v1 names, the field KServe names). Each row is one case of
# the error table (README), raised once in the data plane, reported by each front end in its own words.
Case = tuple[Callable[[Any], Any], Callable[[Any], Any], grpc.StatusCode, str, str]
INVALID = grpc.StatusCode.INVALID_ARGUMENT


def _gen(**sampling: Any) -> Callable[[Any], Any]:
    return lambda s: s.Generate(pb.GenerateRequest(model="gpt", prompts=["x"], sampling=pb.SamplingParams(**sampling)))


CASES: dict[str, Case] = {
    "empty text": (lambda s: s.Score(pb.ScoreRequest(model="gpt", texts=["fine", "  "])),
                   lambda t: infer(t, "gpt:score", {"TEXT": ["fine", "  "]}), INVALID, "texts[1]: ",
                   "input TEXT[1]: "),
    "top_k <= 0": (lambda s: s.PredictNext(pb.PredictNextRequest(model="gpt", contexts=["the"], top_k=0)),
                   lambda t: infer(t, "gpt:predict_next", {"TEXT": ["the"]}, top_k=0), INVALID, "top_k: is 0",
                   "parameter top_k: is 0"),
    "temperature < 0": (_gen(temperature=-1.0), lambda t: infer(t, "gpt:generate", {"TEXT": ["x"]}, temperature=-1.0),
                        INVALID, "sampling.temperature: is -1.0", "parameter temperature: is -1.0"),
    "top_p = 0": (_gen(top_p=0.0), lambda t: infer(t, "gpt:generate", {"TEXT": ["x"]}, top_p=0.0), INVALID,
                  "sampling.top_p: ", "parameter top_p: "),
    "too many new tokens": (_gen(max_new_tokens=10**6),
                            lambda t: infer(t, "gpt:generate", {"TEXT": ["x"]}, max_new_tokens=10**6), INVALID,
                            "sampling.max_new_tokens: ", "parameter max_new_tokens: "),
    "empty stop": (_gen(stop=[""]), lambda t: infer(t, "gpt:generate", {"TEXT": ["x"]}, stop=""), INVALID,
                   "sampling.stop[0]: ", "parameter stop[0]: "),
    "no [MASK]": (lambda s: s.FillMask(pb.FillMaskRequest(model="bert", texts=["no blank here"])),
                  lambda t: infer(t, "bert:fill_mask", {"TEXT": ["no blank here"]}), INVALID, "texts[0]: has no",
                  "input TEXT[0]: has no"),
    "empty pair": (lambda s: s.PredictNextSentence(pb.PredictNextSentenceRequest(
        model="bert", pairs=[pb.SentencePair(a="the king", b=" ")])),
                   lambda t: infer(t, "bert:next_sentence", {"TEXT_A": ["the king"], "TEXT_B": [" "]}), INVALID,
                   "pairs[0].b: ", "input TEXT_A/TEXT_B[0].b: "),
    "duplicate labels": (lambda s: s.Classify(pb.ClassifyRequest(model="gpt", queries=["q"], labels=["a", "a"])),
                         lambda t: infer(t, "gpt:classify", {"TEXT": ["q"], "LABELS": ["a", "a"]}), INVALID,
                         "labels: has duplicates", "input LABELS: has duplicates"),
    "bad template": (lambda s: s.Classify(pb.ClassifyRequest(model="gpt", queries=["q"], labels=["a", "b"],
                                                             template="{label}")),
                     lambda t: infer(t, "gpt:classify", {"TEXT": ["q"], "LABELS": ["a", "b"]}, template="{label}"),
                     INVALID, "template: must", "parameter template: must"),
    "unknown model": (lambda s: s.Score(pb.ScoreRequest(model="no-such-model", texts=["x"])),
                      lambda t: infer(t, "no-such-model", {"TEXT": ["x"]}), grpc.StatusCode.NOT_FOUND,
                      "'no-such-model'", "'no-such-model'"),
}


def _status(fn: Callable[[], Any]) -> tuple[str, str]:
    """(status name, message) of a call that fails, from either client."""
    try:
        fn()
    except grpc.RpcError as e:
        return e.code().name, e.details()
    except InferenceServerException as e:
        return str(e.status()).removeprefix("StatusCode."), str(e.message())
    raise AssertionError("the call succeeded")


@pytest.mark.parametrize("case", list(CASES))
def test_each_protocol_names_its_own_field(stub: Any, triton: Any, case: str) -> None:
    plm_call, kserve_call, code, plm_field, kserve_field = CASES[case]
    plm_code, plm_msg = _status(lambda: plm_call(stub))
    kserve_code, kserve_msg = _status(lambda: kserve_call(triton))
    assert (plm_code, kserve_code) == (code.name, code.name), (plm_msg, kserve_msg)
    assert plm_msg.startswith(plm_field) or plm_field in plm_msg, plm_msg
    assert kserve_msg.startswith(kserve_field) or kserve_field in kserve_msg, kserve_msg
    if code == INVALID:  # the field leads the message, and the problem after it is the same in both
        assert plm_msg.startswith(plm_field) and kserve_msg.startswith(kserve_field)
        problem = [m.split(": ", 1)[1].rsplit(" (request_id=", 1)[0] for m in (plm_msg, kserve_msg)]
        assert problem[0] == problem[1]


def test_a_task_the_model_does_not_serve(stub: Any, triton: Any) -> None:
    """plm.v1 asks a model for a task: FAILED_PRECONDITION. A KServe model is a model's task: NOT_FOUND, naming
    what the model serves."""
    code, msg = _status(lambda: stub.Generate(pb.GenerateRequest(model="ngram-kn", prompts=["x"])))
    assert code == "FAILED_PRECONDITION" and "ngram-kn" in msg
    code, msg = _status(lambda: infer(triton, "ngram-kn:generate", {"TEXT": ["x"]}))
    assert code == "NOT_FOUND" and "ngram-kn:score" in msg


@pytest.mark.parametrize(("knob", "code"), [("inflight", "RESOURCE_EXHAUSTED"), ("draining", "UNAVAILABLE")])
def test_admission_refuses_both_protocols_alike(server: ServerThread, stub: Any, triton: Any, knob: str,
                                                code: str) -> None:
    """The in-flight limit and the drain are the data plane's: both front ends are refused by the same gate."""
    admission = server.running.admission
    saved = admission.limit, admission.draining
    try:
        if knob == "inflight":
            admission.limit = 0
        else:
            admission.draining = True
        got = [_status(lambda: stub.Score(pb.ScoreRequest(model="gpt", texts=["x"])))[0],
               _status(lambda: infer(triton, "gpt:score", {"TEXT": ["x"]}))[0]]
    finally:
        admission.limit, admission.draining = saved
    assert got == [code, code]


def test_generated_request_ids_are_unique_in_every_forked_worker() -> None:
    """A call without a client id gets 16 hex digits, new each call, and `plm serve --workers` children forked from
    one parent do not repeat each other's (nor the parent's) ids."""
    import os
    import re

    from plm.service.dataplane.plane import Call

    def new_id() -> str:
        return Call(None, "Score", None, None).request_id  # type: ignore[arg-type]  # __init__ only stores the plane

    ids = {new_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(re.fullmatch("[0-9a-f]{16}", i) for i in ids)
    assert Call(None, "Score", "client-id", None).request_id == "client-id"  # type: ignore[arg-type]
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next id, then gone
        os.write(write, new_id().encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.waitpid(pid, 0)
    os.close(read)
    assert child != new_id()
