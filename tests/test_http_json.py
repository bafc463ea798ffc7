"""plm.v1 as JSON over HTTP (service/frontends/json_http.py) over real sockets: every unary RPC's JSON answer is
the JSON of the gRPC answer to the same request, GenerateStream as newline-delimited JSON, and the refusals
(bad JSON, unknown field, wrong type, the data plane's own) as 4xx naming the field in Google's error body."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import json_format, message_factory
from plm.client.local_server import free_port
from plm.service.config import Security

from plm.api.v1 import plm_pb2 as pb
from plm.api.v1 import plm_pb2_grpc as pb_grpc
from tests.conftest import ServerThread, make_config

SERVICE = pb.DESCRIPTOR.services_by_name["LanguageModelService"]
PATH = f"/{SERVICE.full_name}"
TOKEN = "json-token"

# One request per unary method, in protobuf's JSON mapping (camelCase and .proto names both occur).
REQUESTS: dict[str, list[dict[str, Any]]] = {
    "Score": [{"model": "gpt", "texts": ["The king is dead.", "A horse!"]},
              {"model": "ngram-kn", "texts": ["the king is dead"], "add_eos": False}],
    "PredictNext": [{"model": "gpt", "contexts": ["The king is"], "topK": 3, "includeTokens": True},
                    {"model": "ngram-kn", "contexts": ["the king"], "top_k": 4}],
    "Generate": [{"model": "gpt", "prompts": ["The king", "A horse"],
                  "sampling": {"maxNewTokens": 6, "seed": "3", "temperature": 1.0}}],
    "FillMask": [{"model": "bert", "texts": ["the king is [MASK] ."], "topK": 3}],
    "Embed": [{"model": "gpt", "texts": ["The king is dead."]},
              {"model": "bert", "texts": ["the bank"], "pooling": "POOLING_CLS", "normalize": True},
              {"model": "word2vec-skipgram", "texts": ["king"], "nearestK": 3,
               "analogies": [{"a": "king", "b": "man", "c": "woman"}]}],
    "PredictNextSentence": [{"model": "bert", "pairs": [{"a": "the king is dead .", "b": "long live the king ."}]}],
    "Classify": [{"model": "gpt", "queries": ["O, I am slain!"], "labels": ["tragedy", "comedy"],
                  "demonstrations": [{"text": "Alas, poor Yorick!", "label": "tragedy"}],
                  "scoring": "LABEL_SCORING_TOKEN_MEAN"}],
    "ListModels": [{}],
    "GetModel": [{"name": "gpt"}],
}


@pytest.fixture(scope="module")
def srv(tiny_repo: Path) -> Iterator[ServerThread]:
    server = ServerThread(make_config(tiny_repo, http_port=free_port(),
                                      models=("gpt", "ngram-kn", "bert", "word2vec-skipgram")))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def web(srv: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"http://127.0.0.1:{srv.running.http_port}", timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def stub(srv: ServerThread) -> Iterator[pb_grpc.LanguageModelServiceStub]:
    with grpc.insecure_channel(srv.target) as channel:
        yield pb_grpc.LanguageModelServiceStub(channel)


def _request(method: str, body: dict[str, Any]) -> Any:
    cls = message_factory.GetMessageClass(SERVICE.methods_by_name[method].input_type)
    return json_format.ParseDict(body, cls())


def _violation(r: httpx.Response) -> tuple[str, str]:
    """(status name, the violated field) of a 4xx in Google's error body."""
    error = r.json()["error"]
    assert set(error) >= {"code", "status", "message"} and error["code"] == r.status_code, error
    (detail,) = error["details"]
    assert detail["@type"] == "type.googleapis.com/google.rpc.BadRequest"
    (violation,) = detail["fieldViolations"]
    assert error["message"].startswith(violation["field"] + ":"), error
    return error["status"], violation["field"]


def test_every_rpc_has_a_json_route_and_a_case() -> None:
    assert set(REQUESTS) | {"GenerateStream"} == {m.name for m in SERVICE.methods}


@pytest.mark.parametrize(("method", "case"), [(m, i) for m, bodies in REQUESTS.items() for i in range(len(bodies))])
def test_json_answer_is_the_grpc_answers_json(web: httpx.Client, stub: pb_grpc.LanguageModelServiceStub,
                                              method: str, case: int) -> None:
    body = REQUESTS[method][case]
    r = web.post(f"{PATH}/{method}", json=body, headers={"X-Request-Id": f"json-{method}-{case}"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.headers["x-request-id"] == f"json-{method}-{case}"
    answer = getattr(stub, method)(_request(method, body), timeout=60)
    assert r.json() == json_format.MessageToDict(answer)


def test_generate_stream_is_ndjson_of_the_grpc_stream(web: httpx.Client,
                                                      stub: pb_grpc.LanguageModelServiceStub) -> None:
    body = {"model": "gpt", "prompts": ["The king", "A horse"], "sampling": {"maxNewTokens": 6, "seed": 5}}
    with web.stream("POST", f"{PATH}/GenerateStream", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
        lines = [line for line in r.iter_lines()]
    assert lines and all(line for line in lines)
    results = [json.loads(line)["result"] for line in lines]
    expected = [json_format.MessageToDict(m) for m in stub.GenerateStream(_request("GenerateStream", body),
                                                                          timeout=60)]
    # How tokens group into messages depends on timing (a prompt's tokens wait for company between its first
    # and last message); what each prompt's messages carry together does not.
    assert _per_prompt(results) == _per_prompt(expected)
    unary = stub.Generate(_request("Generate", body), timeout=60)
    assert [text for text, _, _ in _per_prompt(results)] == [g.text for g in unary.generations]


def _per_prompt(messages: list[dict[str, Any]]) -> list[tuple[str, list[str], dict[str, Any]]]:
    """Per prompt index: the text, the token ids and the last message's other fields (finish reason, counts)."""
    out = []
    for i in sorted({m.get("index", 0) for m in messages}):
        mine = [m for m in messages if m.get("index", 0) == i]
        last = {k: v for k, v in mine[-1].items() if k not in ("textDelta", "tokenIds")}
        out.append(("".join(m.get("textDelta", "") for m in mine), [t for m in mine for t in m.get("tokenIds", [])],
                    last))
    assert [m["model"] for m in messages] == ["gpt"] * len(messages)
    return out


def test_a_refused_stream_keeps_its_status(web: httpx.Client) -> None:
    body = {"model": "gpt", "prompts": ["x " * 300], "sampling": {"maxNewTokens": 4}}
    r = web.post(f"{PATH}/GenerateStream", json=body)
    assert r.status_code == 400 and _violation(r) == ("INVALID_ARGUMENT", "prompts[0]")


@pytest.mark.parametrize(("method", "body", "field"), [
    ("Score", b"{", "body"),
    ("Score", b"\xff{}", "body"),
    ("Score", b"[1]", "body"),
    ("Score", b'{"model": "gpt", "texts": ["a"], "frobnicate": 1}', "frobnicate"),
    ("Score", b'{"model": "gpt", "texts": "a"}', "texts"),
    ("Score", b'{"model": "gpt", "texts": ["a", 3]}', "texts[1]"),
    ("Score", b'{"model": "gpt", "texts": ["a"], "perToken": "yes"}', "per_token"),
    ("Generate", b'{"model": "gpt", "prompts": ["a"], "sampling": {"maxNewTokens": 1.5}}', "sampling.max_new_tokens"),
    ("Generate", b'{"model": "gpt", "prompts": ["a"], "sampling": {"topQ": 1}}', "sampling.topQ"),
    ("Generate", b'{"model": "gpt", "prompts": ["a"], "sampling": {"stop": ["x", false]}}', "sampling.stop[1]"),
    ("PredictNextSentence", b'{"model": "bert", "pairs": [{"a": "x", "b": "y"}, {"a": 2}]}', "pairs[1].a"),
    ("Embed", b'{"model": "gpt", "texts": ["a"], "pooling": "POOLING_MAX"}', "pooling"),
    # refused by the data plane, the field named as the gRPC API names it
    ("Score", b'{"model": "gpt", "texts": ["fine", "  "]}', "texts[1]"),
    ("Generate", b'{"model": "gpt", "prompts": ["a"], "sampling": {"topP": 7}}', "sampling.top_p"),
    ("Embed", b'{"model": "gpt", "texts": ["a"], "pooling": 17}', "pooling"),
    ("GetModel", b'{"name": ""}', "name"),
])
def test_bad_requests_are_400_naming_the_field(web: httpx.Client, method: str, body: bytes, field: str) -> None:
    r = web.post(f"{PATH}/{method}", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert _violation(r) == ("INVALID_ARGUMENT", field)


def test_statuses_map_to_http(web: httpx.Client, srv: ServerThread) -> None:
    """The error table's statuses as HTTP statuses, each with its name in the body."""
    def status(r: httpx.Response) -> tuple[int, str]:
        return r.status_code, r.json()["error"]["status"]

    assert status(web.post(f"{PATH}/Score", json={"model": "nope", "texts": ["a"]})) == (404, "NOT_FOUND")
    assert status(web.post(f"{PATH}/Generate", json={"model": "ngram-kn", "prompts": ["a"]})) == \
        (400, "FAILED_PRECONDITION")
    assert status(web.post(f"{PATH}/Embed", json={"model": "gpt", "texts": ["a"]},
                           headers={"X-Request-Timeout": "0.000001"})) == (504, "DEADLINE_EXCEEDED")
    assert status(web.post(f"{PATH}/Frobnicate", json={})) == (404, "NOT_FOUND")
    assert status(web.get(f"{PATH}/Score")) == (405, "INVALID_ARGUMENT")
    big = web.post(f"{PATH}/Score", content=b'{"model": "gpt", "texts": ["' + b"a" * (5 << 20) + b'"]}')
    assert big.status_code == 413 and _violation(big) == ("INVALID_ARGUMENT", "body")
    admission = srv.running.admission
    limit = admission.limit
    admission.limit = 0
    try:
        assert status(web.post(f"{PATH}/ListModels", json={})) == (429, "RESOURCE_EXHAUSTED")
    finally:
        admission.limit = limit


def test_metrics_count_json_calls_as_http(web: httpx.Client, srv: ServerThread) -> None:
    series = srv.running.metrics.requests.labels("Score", "ngram-kn", "OK", "http")
    before = series._value.get()
    assert web.post(f"{PATH}/Score", json={"model": "ngram-kn", "texts": ["the king"]}).status_code == 200
    assert series._value.get() == before + 1


def test_bearer_token_guards_the_json_api(tiny_repo: Path) -> None:
    config = make_config(tiny_repo, http_port=free_port(), models=("ngram-kn",))
    server = ServerThread(replace(config, security=Security(auth_token=TOKEN)))  # type: ignore[type-var]
    try:
        url = f"http://127.0.0.1:{server.running.http_port}{PATH}/ListModels"
        r = httpx.post(url, json={})
        assert r.status_code == 401 and r.json()["error"]["status"] == "UNAUTHENTICATED"
        r = httpx.post(url, json={}, headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200 and [m["name"] for m in r.json()["models"]] == ["ngram-kn"]
    finally:
        server.stop()
