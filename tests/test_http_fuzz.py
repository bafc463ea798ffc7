"""Property-based fuzzing of plm.v1 as JSON over HTTP (hypothesis over JSON bodies, real sockets).

Every method of `plm.v1.LanguageModelService` gets bodies drawn from its request message's descriptor (the
strategy of tests/test_fuzz.py, written as protobuf's JSON), some of them spoiled: a field's value replaced by
any JSON value, an unknown key added, the body's JSON cut short. The properties: never a 5xx, never a hang
(each call has a timeout; hitting it fails the test); a 4xx is Google's error body, and an INVALID_ARGUMENT
names a field of the request (or `body`) in its field violation; a 200 is the method's response message, by the
model the request named. The OpenAI endpoints' fuzzing is in tests/test_openai_http.py.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from google.protobuf import json_format, message_factory
from plm.client.local_server import free_port

from plm.api.v1 import plm_pb2
from tests.conftest import ServerThread, make_config
from tests.test_fuzz import LIMITS, _build, _message, hypothesis, st

SERVICE = plm_pb2.DESCRIPTOR.services_by_name["LanguageModelService"]
METHODS = list(SERVICE.methods)
EXAMPLES = {"ListModels": 20, "GetModel": 60}  # the others: DEFAULT_EXAMPLES each
DEFAULT_EXAMPLES = 90
TIMEOUT = 60.0
FIELD_RE = re.compile(r"^([a-z_]+)")

_ANY_JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
                         | st.text(max_size=8),
                         lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                    max_size=3), max_leaves=6)


def _spoiled(method: Any) -> Any:
    """A JSON body for `method`: its request drawn from the descriptor, then left alone or spoiled."""
    cls = message_factory.GetMessageClass(method.input_type)
    names = [f.json_name for f in method.input_type.fields] + [f.name for f in method.input_type.fields]

    def as_json(values: dict[str, Any]) -> dict[str, Any]:
        return json_format.MessageToDict(_build(cls, values))

    body = _message(method.input_type).map(as_json)
    unknown = st.tuples(body, st.text(min_size=1, max_size=6)).map(lambda t: {**t[0], "x" + t[1]: 1})
    kinds = [body, body, unknown]
    if names:  # ListModels' request has no fields to spoil
        kinds.append(st.tuples(body, st.sampled_from(names), _ANY_JSON).map(lambda t: {**t[0], t[1]: t[2]}))
    return st.one_of(*kinds).map(lambda b: json.dumps(b).encode()) | \
        st.tuples(body, st.integers(0, 40)).map(lambda t: json.dumps(t[0]).encode()[:t[1]])


def _object(raw: bytes) -> dict[str, Any]:
    """The body's keys, when it is a JSON object (an unknown key is refused by its own name)."""
    try:
        body = json.loads(raw)
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _field_names(message: Any, seen: frozenset[str] = frozenset()) -> set[str]:
    """Every field name of `message` and of the messages it holds (the data plane names a nested field such as
    `sampling.min_new_tokens` by its own name)."""
    names = {f.name for f in message.fields}
    for f in message.fields:
        if f.message_type is not None and f.message_type.full_name not in seen:
            names |= _field_names(f.message_type, seen | {message.full_name})
    return names


@pytest.fixture(scope="module")
def fuzz_web(tiny_repo: Path) -> Iterator[httpx.Client]:
    srv = ServerThread(make_config(tiny_repo, limits=LIMITS, http_port=free_port()))
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{srv.running.http_port}", timeout=TIMEOUT) as c:
            yield c
    finally:
        srv.stop()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("method", METHODS, ids=[m.name for m in METHODS])
def test_fuzz_json_route(fuzz_web: httpx.Client, method: Any) -> None:
    fields = _field_names(method.input_type) | {"body"}
    resp_cls = message_factory.GetMessageClass(method.output_type)
    ran: list[int] = []

    @hypothesis.settings(max_examples=EXAMPLES.get(method.name, DEFAULT_EXAMPLES), deadline=None, database=None,
                         derandomize=bool(os.environ.get("CI")), suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(_spoiled(method))
    def check(raw: bytes) -> None:
        ran.append(1)
        r = fuzz_web.post(f"/{SERVICE.full_name}/{method.name}", content=raw,
                          headers={"content-type": "application/json"})
        assert r.status_code < 500, (r.status_code, r.text[:500])
        if r.status_code >= 400:
            error = r.json()["error"]
            assert error["code"] == r.status_code and error["status"] and error["message"], error
            if error["status"] == "INVALID_ARGUMENT":
                field = error["details"][0]["fieldViolations"][0]["field"]
                m = FIELD_RE.match(field)
                sent = _object(raw)
                assert (m and m[1] in fields) or field in sent, f"INVALID_ARGUMENT does not name a field: {error!r}"
            return
        lines = r.text.splitlines() if method.server_streaming else [r.text]
        body = _object(raw)
        for line in lines:
            answer = json.loads(line)
            if method.server_streaming:
                if set(answer) == {"error"}:  # a failure after the first message: its status, never a 5xx one
                    assert answer["error"]["code"] < 500, answer
                    continue
                assert set(answer) == {"result"}, answer
                answer = answer["result"]
            message = json_format.ParseDict(answer, resp_cls())
            if isinstance(body.get("model"), str) and "model" in {f.name for f in message.DESCRIPTOR.fields}:
                assert message.model == body["model"]  # type: ignore[attr-defined]

    check()
    assert len(ran) >= EXAMPLES.get(method.name, DEFAULT_EXAMPLES)
