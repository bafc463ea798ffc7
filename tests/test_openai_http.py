"""The OpenAI-compatible HTTP API over real sockets: the official `openai` SDK for the endpoints and every row of
the error table, httpx for the SSE framing and a client that leaves mid-stream, hypothesis for bodies."""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any
from unittest.mock import patch

import httpx
import numpy as np
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from plm.client.client import PlmClient
from plm.client.local_server import free_port
from plm.service.config import Security

from tests.conftest import ServerThread, make_config
from tests.test_security import Pki, pki  # noqa: F401 (the certificates fixture)

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def http_server(tiny_repo: Path) -> Iterator[ServerThread]:
    srv = ServerThread(make_config(tiny_repo, http_port=free_port(), models=("gpt", "ngram-kn", "bert")))
    yield srv
    srv.stop()


def _base(srv: ServerThread) -> str:
    return f"http://127.0.0.1:{srv.running.http_port}"


@pytest.fixture(scope="module")
def sdk(http_server: ServerThread) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{_base(http_server)}/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def web(http_server: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=_base(http_server), timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def grpc_client(http_server: ServerThread) -> Iterator[PlmClient]:
    with PlmClient(http_server.target, timeout=60) as c:
        yield c


# ------------------------------------------------------------------------------------------- models


def test_models_list_every_model_with_its_tasks(sdk: openai.OpenAI) -> None:
    models = {m.id: m for m in sdk.models.list()}
    assert set(models) == {"gpt", "ngram-kn", "bert"}
    assert models["gpt"].object == "model" and models["gpt"].owned_by == "plm"
    assert set((models["gpt"].model_extra or {})["tasks"]) >= {"generate", "score", "embed"}
    assert sdk.models.retrieve("ngram-kn").id == "ngram-kn"
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve("no-such-model")


# -------------------------------------------------------------------------------------- completions


def test_completion_equals_plm_v1_generate_and_its_stream(sdk: openai.OpenAI, grpc_client: PlmClient) -> None:
    """Same seed, same text: unary HTTP, streamed HTTP and plm.v1 Generate sample alike (one data plane)."""
    args: dict[str, Any] = {"model": "gpt", "prompt": "The king", "max_tokens": 12, "seed": 7, "temperature": 1.0}
    unary = sdk.completions.create(**args)
    chunks = list(sdk.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    gen = grpc_client.generate("gpt", ["The king"], {"max_new_tokens": 12, "seed": 7, "temperature": 1.0})
    assert unary.choices[0].text == streamed == gen.generations[0].text
    assert unary.object == "text_completion" and unary.model == "gpt"
    assert unary.choices[0].finish_reason in ("length", "stop")
    assert chunks[-1].choices == [] and chunks[-1].usage == unary.usage
    assert unary.usage is not None and unary.usage.completion_tokens == gen.generations[0].generated_tokens
    assert unary.usage.prompt_tokens == gen.generations[0].prompt_tokens


def test_prompt_lists_and_n(sdk: openai.OpenAI) -> None:
    out = sdk.completions.create(model="gpt", prompt=["The king", "A horse"], n=3, max_tokens=4, seed=1)
    assert [c.index for c in out.choices] == list(range(6))
    assert len({c.text for c in out.choices[:3]}) > 1 or out.choices[0].text == ""  # n samples, not copies
    again = sdk.completions.create(model="gpt", prompt=["The king", "A horse"], n=3, max_tokens=4, seed=1)
    assert [c.text for c in again.choices] == [c.text for c in out.choices]


def test_stop_and_greedy(sdk: openai.OpenAI) -> None:
    greedy = sdk.completions.create(model="gpt", prompt="The", max_tokens=20, temperature=0).choices[0].text
    assert greedy == sdk.completions.create(model="gpt", prompt="The", max_tokens=20, temperature=0).choices[0].text
    if len(greedy) > 3:
        stop = greedy[2:4]
        cut = sdk.completions.create(model="gpt", prompt="The", max_tokens=20, temperature=0, stop=[stop])
        assert cut.choices[0].finish_reason == "stop" and stop not in cut.choices[0].text


def test_echo_logprobs_are_plm_v1_scores(sdk: openai.OpenAI, grpc_client: PlmClient) -> None:
    """echo + logprobs 0 + max_tokens 0: the prompt's token log-probabilities, as Score gives them."""
    text = "the king is dead"
    out = sdk.completions.create(model="ngram-kn", prompt=text, max_tokens=0, echo=True, logprobs=0)
    scored = grpc_client.score("ngram-kn", [text], add_eos=False).scores[0]
    lp = out.choices[0].logprobs
    assert out.choices[0].text == text and lp is not None
    assert lp.tokens == [t.token for t in scored.tokens]
    assert lp.token_logprobs == pytest.approx([t.log_prob for t in scored.tokens])
    assert lp.text_offset == [0, 4, 9, 12]
    assert out.usage is not None and out.usage.prompt_tokens == scored.num_tokens


def test_logprobs_of_a_generation(sdk: openai.OpenAI) -> None:
    out = sdk.completions.create(model="gpt", prompt="The king", max_tokens=5, temperature=0, logprobs=0, echo=True)
    lp = out.choices[0].logprobs
    assert lp is not None and lp.token_logprobs and all(x is None or x <= 0 for x in lp.token_logprobs)
    assert out.choices[0].text.startswith("The king")


def _scored_tail(grpc_client: PlmClient, model: str, text: str, n: int) -> list[Any]:
    """The last n tokens of Score's per-token answer for `text` (a completion's, after its prompt)."""
    tokens = list(grpc_client.score(model, [text], add_eos=False).scores[0].tokens)
    return tokens[len(tokens) - n:]


def _check_top(tokens: list[str], chosen: list[float | None], tops: list[dict[str, float]], k: int) -> None:
    """OpenAI's top_logprobs: the k likeliest tokens best first, and the chosen one with its own figure."""
    for token, lp, top in zip(tokens, chosen, tops, strict=True):
        assert token in top and top[token] == lp, (token, lp, top)
        assert k <= len(top) <= k + 1
        values = list(top.values())
        best = values[:k] if len(top) == k + 1 else [v for t, v in top.items() if t != token] or values
        assert best == sorted(best, reverse=True)
        if len(top) == k + 1:  # the chosen token is not among the k likeliest
            assert lp is not None and lp <= min(values[:k]) + 1e-5


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_logprobs_alternatives_agree_with_score_and_predict_next(sdk: openai.OpenAI, grpc_client: PlmClient,
                                                                 temperature: float) -> None:
    """logprobs 3: each token's log-probability is Score's for the same text, its top_logprobs hold the model's
    3 likeliest next tokens (PredictNext's tokens after the prompt, at the first) and the chosen one; greedy
    picks the best of them."""
    k = 3
    out = sdk.completions.create(model="gpt", prompt="The king", max_tokens=6, temperature=temperature, seed=4,
                                 logprobs=k, extra_body={"min_tokens": 6})
    choice = out.choices[0]
    lp = choice.logprobs
    assert lp is not None and lp.top_logprobs is not None and lp.token_logprobs is not None
    assert len(lp.tokens or []) >= 2, lp
    tail = _scored_tail(grpc_client, "gpt", "The king" + choice.text, len(lp.tokens))
    assert lp.tokens == [t.token for t in tail]
    assert lp.token_logprobs == [t.log_prob for t in tail]
    _check_top(lp.tokens, lp.token_logprobs, lp.top_logprobs, k)
    if grpc_client.score("gpt", ["The king"], add_eos=False).scores[0].num_tokens + len(tail) == \
            grpc_client.score("gpt", ["The king" + choice.text], add_eos=False).scores[0].num_tokens:
        first = grpc_client.predict_next("gpt", ["The king"], top_k=k, include_tokens=True).predictions[0].tokens
        assert list(lp.top_logprobs[0])[:k] == [c.text for c in first]
        assert list(lp.top_logprobs[0].values())[:k] == pytest.approx([c.log_prob for c in first], abs=1e-5)
    if temperature == 0:
        gen = grpc_client.generate("gpt", ["The king"], {"max_new_tokens": 6, "temperature": 0.0}).generations[0]
        if list(gen.token_ids) == [t.id for t in tail]:  # the text tokenizes back into the generated tokens
            assert all(next(iter(top)) == t for t, top in zip(lp.tokens, lp.top_logprobs, strict=True))


def test_streamed_logprobs_equal_the_unary_ones(sdk: openai.OpenAI) -> None:
    """Streamed with echo: the prompt's chunk first (Score's tokens), then each token's log-probability and
    alternatives as it comes, read at the engine's tokens: the same as the unary answer's."""
    args: dict[str, Any] = {"model": "gpt", "prompt": "The king", "max_tokens": 8, "seed": 11, "temperature": 1.0,
                            "logprobs": 2, "echo": True, "extra_body": {"min_tokens": 8}}
    unary = sdk.completions.create(**args).choices[0]
    chunks = [c.choices[0] for c in sdk.completions.create(**args, stream=True) if c.choices]
    assert chunks[0].text == "The king" and "".join(c.text for c in chunks) == unary.text
    assert unary.logprobs is not None
    tokens: list[str] = []
    lps: list[float | None] = []
    offsets: list[int] = []
    tops: list[dict[str, float]] = []
    for c in chunks:
        if c.logprobs is not None:
            tokens += c.logprobs.tokens or []
            lps += c.logprobs.token_logprobs or []
            offsets += c.logprobs.text_offset or []
            tops += c.logprobs.top_logprobs or []
    _check_top(tokens, lps, tops, 2)
    # The unary answer is Score's tokenization of the joined text, the stream the engine's tokens: compare where
    # they agree, which must reach past the prompt into the generated tokens.
    same = 0
    while same < min(len(tokens), len(unary.logprobs.tokens or [])) and tokens[same] == (unary.logprobs.tokens or
                                                                                          [])[same]:
        same += 1
    prompt_tokens = len(chunks[0].logprobs.tokens or []) if chunks[0].logprobs is not None else 0
    assert prompt_tokens > 0 and same >= prompt_tokens + 3, (tokens, unary.logprobs.tokens)
    assert offsets[:same] == (unary.logprobs.text_offset or [])[:same]
    assert lps[:same] == pytest.approx((unary.logprobs.token_logprobs or [])[:same], abs=1e-4)
    assert [list(t) for t in tops[:same]] == [list(t) for t in (unary.logprobs.top_logprobs or [])[:same]]


def test_logprobs_refusals_name_the_parameter(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        sdk.completions.create(model="gpt", prompt="x", logprobs=6)
    assert _error(e)["param"] == "logprobs" and "between 0 and 5" in _error(e)["message"]
    with pytest.raises(openai.BadRequestError) as e:  # a masked LM scores but has no next-token distribution
        sdk.completions.create(model="bert", prompt="the king", max_tokens=0, echo=True, logprobs=2)
    assert _error(e)["param"] == "logprobs" and "next-token distribution" in _error(e)["message"]
    out = sdk.completions.create(model="ngram-kn", prompt="the king is", max_tokens=0, echo=True, logprobs=2)
    lp = out.choices[0].logprobs
    assert lp is not None and lp.tokens == ["the", "king", "is"] and lp.top_logprobs is not None
    _check_top(lp.tokens, lp.token_logprobs or [], lp.top_logprobs, 2)


# --------------------------------------------------------------------------------------- embeddings


def test_embeddings_float_equals_base64_equals_plm_v1(sdk: openai.OpenAI, grpc_client: PlmClient) -> None:
    texts = ["The king is dead.", "A horse!"]
    b64 = sdk.embeddings.create(model="gpt", input=texts)  # the SDK asks for base64 and decodes it
    flt = sdk.embeddings.create(model="gpt", input=texts, encoding_format="float")
    ref = grpc_client.embed("gpt", texts).embeddings
    for a, b, r in zip(b64.data, flt.data, ref, strict=True):
        assert np.array_equal(np.asarray(a.embedding, np.float32), np.asarray(b.embedding, np.float32))
        assert np.array_equal(np.asarray(b.embedding, np.float32), np.asarray(r.vector, np.float32))
    assert flt.usage.prompt_tokens > 0 and flt.model == "gpt"
    single = sdk.embeddings.create(model="gpt", input="A horse!", encoding_format="float")
    assert single.data[0].embedding == flt.data[1].embedding


def test_dimensions_refused_unless_the_models_own(sdk: openai.OpenAI) -> None:
    dim = len(sdk.embeddings.create(model="gpt", input="x", encoding_format="float").data[0].embedding)
    assert len(sdk.embeddings.create(model="gpt", input="x", dimensions=dim).data[0].embedding) == dim
    with pytest.raises(openai.BadRequestError) as e:
        sdk.embeddings.create(model="gpt", input="x", dimensions=dim // 2)
    assert _error(e)["param"] == "dimensions" and "cannot shorten" in _error(e)["message"]


# ------------------------------------------------------------------------------------------- errors


def _error(e: pytest.ExceptionInfo[openai.APIStatusError]) -> dict[str, Any]:
    body = e.value.body
    assert isinstance(body, dict) and set(body) == {"message", "type", "param", "code"}, body
    return body


ErrorCase = tuple[Callable[[openai.OpenAI], Any], type[openai.APIStatusError], int, str | None]
ERRORS: dict[str, ErrorCase] = {
    "bad temperature": (lambda s: s.completions.create(model="gpt", prompt="x", temperature=-1),
                        openai.BadRequestError, 400, "temperature"),
    "max_tokens over the limit": (lambda s: s.completions.create(model="gpt", prompt="x", max_tokens=10**6),
                                  openai.BadRequestError, 400, "max_tokens"),
    "n over the limit": (lambda s: s.completions.create(model="gpt", prompt="x", n=1000),
                         openai.BadRequestError, 400, "n"),
    "logprobs over the limit": (lambda s: s.completions.create(model="gpt", prompt="x", logprobs=6),
                                openai.BadRequestError, 400, "logprobs"),
    "prompt list over the limit": (lambda s: s.completions.create(model="gpt", prompt=["x"] * 65),
                                   openai.BadRequestError, 400, "prompt"),
    "empty input": (lambda s: s.embeddings.create(model="gpt", input=["fine", "  "]),
                    openai.BadRequestError, 400, "input"),
    "unknown field": (lambda s: s.completions.create(model="gpt", prompt="x", extra_body={"frobnicate": 1}),
                      openai.BadRequestError, 400, "frobnicate"),
    "task the model lacks": (lambda s: s.completions.create(model="ngram-kn", prompt="x"),
                             openai.BadRequestError, 400, None),
    "unknown model": (lambda s: s.completions.create(model="no-such-model", prompt="x"),
                      openai.NotFoundError, 404, None),
    "chat": (lambda s: s.chat.completions.create(model="gpt", messages=[{"role": "user", "content": "hi"}]),
             openai.NotFoundError, 404, None),
    "deadline": (lambda s: s.embeddings.create(model="gpt", input="x",
                                               extra_headers={"X-Request-Timeout": "0.000001"}),
                 openai.InternalServerError, 504, None),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_error_rows(sdk: openai.OpenAI, case: str) -> None:
    call, exc, status, param = ERRORS[case]
    with pytest.raises(exc) as e:
        call(sdk)
    assert e.value.status_code == status
    body = _error(e)
    assert body["param"] == param, body
    if param is not None:
        assert body["message"].startswith(f"{param}") and body["type"] == "invalid_request_error"


def test_chat_says_why(web: httpx.Client) -> None:
    r = web.post("/v1/chat/completions", json={"model": "gpt", "messages": []})
    assert r.status_code == 404 and "no chat models" in r.json()["error"]["message"]


@pytest.mark.parametrize(("knob", "value", "exc", "status"), [("limit", 0, openai.RateLimitError, 429),
                                                              ("draining", True, openai.InternalServerError, 503)])
def test_admission_rows(http_server: ServerThread, sdk: openai.OpenAI, knob: str, value: object,
                        exc: type[openai.APIStatusError], status: int) -> None:
    """The in-flight limit (429) and the drain (503) are the data plane's gate, the one gRPC meets."""
    with patch.object(http_server.running.admission, knob, value), pytest.raises(exc) as e:
        sdk.completions.create(model="gpt", prompt="x", max_tokens=2)
    assert e.value.status_code == status and _error(e)["code"] in ("resource_exhausted", "unavailable")


def test_bearer_token_and_metrics_protocol(tiny_repo: Path) -> None:
    """[security]'s tokens guard HTTP as they guard gRPC; /metrics counts HTTP calls under protocol="http"."""
    config = make_config(tiny_repo, http_port=free_port(), models=("ngram-kn",))
    srv = ServerThread(replace(config, security=Security(auth_token=TOKEN)))  # type: ignore[type-var]
    try:
        base = f"{_base(srv)}/v1"
        with openai.OpenAI(base_url=base, api_key="wrong", max_retries=0) as bad:
            with pytest.raises(openai.AuthenticationError) as e:
                bad.models.list()
            assert e.value.status_code == 401 and _error(e)["code"] == "unauthenticated"
        with openai.OpenAI(base_url=base, api_key=TOKEN, max_retries=0) as good:
            assert [m.id for m in good.models.list()] == ["ngram-kn"]
            good.completions.create(model="ngram-kn", prompt="the king", max_tokens=0, echo=True, logprobs=0)
        assert httpx.get(f"{_base(srv)}/health").status_code == 200  # probes carry no token
        text = srv.running.metrics.exposition().decode()
        assert 'plm_requests_total{code="OK",method="Completions",model="ngram-kn",protocol="http"} 1.0' in text
        assert 'plm_rejections_total{model="*",reason="unauthenticated"}' in text or "unauthenticated" in text
    finally:
        srv.stop()


# -------------------------------------------------------------------------------------- raw framing


def test_sse_framing(web: httpx.Client) -> None:
    body = {"model": "gpt", "prompt": ["The", "A"], "max_tokens": 4, "seed": 2, "stream": True}
    with web.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-request-id"]
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    finished = set()
    for ev in events[:-2]:
        assert ev.startswith("data: ") and "\n" not in ev
        data = json.loads(ev[6:])
        (choice,) = data["choices"]
        if choice["finish_reason"]:
            finished.add(choice["index"])
    assert finished == {0, 1}


def test_errors_before_the_first_token_keep_their_status(web: httpx.Client) -> None:
    r = web.post("/v1/completions", json={"model": "gpt", "prompt": "x " * 300, "max_tokens": 8, "stream": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_a_client_leaving_mid_stream_frees_its_engine_slots(http_server: ServerThread) -> None:
    engine = http_server.running.registry.get("gpt").engine
    assert engine is not None
    metrics = http_server.running.metrics
    before = metrics.rejections.labels("gpt", "cancelled")._value.get()
    body = {"model": "gpt", "prompt": ["The king"] * 16, "max_tokens": 60, "seed": 1, "stream": True}
    with httpx.Client(base_url=_base(http_server), timeout=60) as c, c.stream("POST", "/v1/completions",
                                                                              json=body) as r:
        next(r.iter_raw())  # the first event has come: the sequences are running
    deadline = time.monotonic() + 10
    while engine.active and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.active == 0  # every sequence left the batch, its KV memory released
    assert metrics.rejections.labels("gpt", "cancelled")._value.get() == before + 1
    with httpx.Client(base_url=_base(http_server), timeout=60) as c:  # the engine goes on serving
        assert c.post("/v1/completions", json={"model": "gpt", "prompt": "x", "max_tokens": 2}).status_code == 200


@pytest.mark.parametrize(("body", "param"), [
    (b"{", "body"), (b"\xff\xfe{}", "body"), (b"[1]", "body"), (b'{"model": "gpt", "prompt": 5}', "prompt"),
    (b'{"model": "gpt", "prompt": "x", "max_tokens": "9"}', "max_tokens"),
    (b'{"model": "gpt", "prompt": "\\ud800"}', "prompt"), (b'{"model": "gpt", "prompt": [1, 2]}', "prompt"),
    (b'{"model": "gpt", "prompt": "x", "temperature": NaN}', "temperature"), (b"[" * 100_000, "body"),
    (b'{"model": "gpt", "prompt": "' + b"a" * (5 << 20) + b'"}', "body"),
])
def test_bad_bodies_are_4xx_naming_the_parameter(web: httpx.Client, body: bytes, param: str) -> None:
    r = web.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500 and r.json()["error"]["param"] == param, r.text


_json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                       max_size=3), max_leaves=6)
_keys = st.sampled_from(["model", "prompt", "input", "max_tokens", "n", "stop", "seed", "stream", "echo", "logprobs",
                         "temperature", "top_p", "encoding_format", "dimensions", "stream_options", "x"])
_bodies = st.fixed_dictionaries({"model": st.sampled_from(["gpt", "ngram-kn", "nope", 3])},
                                optional={"prompt": st.text(max_size=10) | st.lists(st.text(max_size=5), max_size=3),
                                          "input": st.text(max_size=10)}).flatmap(
    lambda base: st.dictionaries(_keys, _json_values, max_size=4).map(lambda extra: {**base, **extra}))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/v1/completions", "/v1/embeddings"]), body=_bodies)
def test_fuzzed_bodies_never_500(web: httpx.Client, path: str, body: dict[str, Any]) -> None:
    if isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 8:
        body["max_tokens"] = 8  # keep generation short; the limit itself is a row above
    r = web.post(path, content=json.dumps(body, allow_nan=True).encode(), headers={"content-type": "application/json"})
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_mutual_tls_guards_http_as_it_guards_grpc(tiny_repo: Path, pki: Pki) -> None:  # noqa: F811
    """[security]'s TLS settings serve HTTPS on the HTTP port; with a client CA, a client without a certificate
    it signed cannot complete the handshake."""
    security = Security(tls_cert_file=pki.write("server.pem", pki.server.cert),
                        tls_key_file=pki.write("server.key", pki.server.key),
                        tls_client_ca_file=pki.write("ca.pem", pki.ca.cert))
    srv = ServerThread(make_config(tiny_repo, http_port=free_port(), models=("ngram-kn",), security=security))
    try:
        url = f"https://localhost:{srv.running.http_port}/v1/models"
        trusted = ssl.create_default_context(cadata=pki.ca.cert.decode())
        with pytest.raises(httpx.TransportError):
            httpx.get(url, verify=trusted)
        trusted.load_cert_chain(pki.write("client.pem", pki.client.cert), pki.write("client.key", pki.client.key))
        assert [m["id"] for m in httpx.get(url, verify=trusted).json()["data"]] == ["ngram-kn"]
        with pytest.raises(httpx.TransportError):  # plaintext to the TLS port
            httpx.get(url.replace("https", "http"))
    finally:
        srv.stop()


# ----------------------------------------------------------------------------------------- loadtest


def test_loadtest_drives_the_http_api_with_the_grpc_report(http_server: ServerThread) -> None:
    """`plm loadtest --target http://…` runs a scenario over /v1/completions and /v1/embeddings and reports it as
    the gRPC run of the same scenario is reported; errors carry the status names of the error table."""
    from plm.client.loadtest import LoadConfig, format_report, load_scenario, parse_scenario, run_loadtest

    from tests.conftest import ROOT

    specs = tuple(load_scenario(ROOT / "benchmarks" / "scenarios" / "openai.json"))
    inputs = ("the king is dead", "to be or not to be", "the queen")
    runs = {}
    for name, target in (("http", _base(http_server)), ("grpc", http_server.target)):
        cfg = LoadConfig(targets=(target,), specs=specs, inputs=inputs, concurrency=4, requests=24, warmup=0.0)
        runs[name] = run_loadtest(cfg, progress=False)
    for name, result in runs.items():
        s = result["summary"]
        assert s["ok"] == s["requests"] == 24 and s["errors"] == {}, (name, s)
        assert set(s["by_rpc"]) <= {"Generate", "Embed"}
    http = runs["http"]
    assert http["config"]["protocol"].startswith("HTTP OpenAI API") and runs["grpc"]["config"]["protocol"] == \
        "gRPC plm.v1"
    assert "HTTP OpenAI API" in format_report(http) and set(http["summary"]["by_target"]) == {_base(http_server)}

    missing = parse_scenario({"requests": [{"rpc": "Embed", "model": "no-such-model"},
                                           {"rpc": "Generate", "model": "gpt", "temperature": -1.0}]})
    cfg = LoadConfig(targets=(_base(http_server) + "/",), specs=tuple(missing), inputs=inputs, concurrency=2,
                     requests=8, warmup=0.0)
    errors = run_loadtest(cfg, progress=False)["summary"]["errors"]
    assert set(errors) <= {"NOT_FOUND", "INVALID_ARGUMENT"} and sum(errors.values()) == 8, errors


@pytest.mark.parametrize(("targets", "entry", "message"), [
    (("127.0.0.1:1", "http://127.0.0.1:2"), {"rpc": "Embed", "model": "m"}, "targets"),
    (("http://127.0.0.1:2",), {"rpc": "FillMask", "model": "m"}, "no OpenAI-compatible endpoint"),
    (("http://127.0.0.1:2",), {"rpc": "Embed", "model": "m", "pooling": "cls"}, "/v1/embeddings has no such"),
    (("http://127.0.0.1:2",), {"rpc": "Generate", "model": "m", "truncate_prompt": True}, "/v1/completions"),
])
def test_loadtest_refuses_what_http_cannot_carry(targets: tuple[str, ...], entry: dict[str, Any],
                                                  message: str) -> None:
    from plm.client.loadtest import LoadConfig, parse_scenario, run_loadtest

    cfg = LoadConfig(targets=targets, specs=tuple(parse_scenario({"requests": [entry]})), inputs=("a",),
                     concurrency=1, requests=1, warmup=0.0)
    with pytest.raises(ValueError, match=message):
        run_loadtest(cfg, progress=False)


@pytest.mark.parametrize("stream", [False, True])
def test_a_refused_prompt_is_named_as_the_client_sent_it(web: httpx.Client, stream: bool) -> None:
    """The data plane sees each prompt n times; the error names the client's prompt (its index in the list, or no
    index for a string), unary and before a stream's first event alike."""
    long = "x " * 300
    r = web.post("/v1/completions", json={"model": "gpt", "prompt": ["fine", long], "n": 3, "max_tokens": 4,
                                          "stream": stream})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("prompt[1]"), r.json()
    r = web.post("/v1/completions", json={"model": "gpt", "prompt": long, "n": 2, "max_tokens": 4, "stream": stream})
    body = r.json()["error"]
    assert r.status_code == 400 and body["param"] == "prompt" and body["message"].startswith("prompt:"), body
