"""The client SDK against real servers on loopback: every RPC through both variants, deadlines, retries (counted
by client interceptors and by the servers' own metrics), round-robin over two servers, TLS/mTLS and the token."""

from __future__ import annotations

import asyncio
import concurrent.futures
import random
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from plm.client import NO_RETRY, AsyncPlmClient, PlmClient, RetryPolicy, TlsConfig
from plm.client.core import RETRYABLE
from plm.client.local_server import free_port

from plm.api.v1 import plm_pb2 as pb
from tests.conftest import ServerThread, make_config

GREEDY = {"temperature": 0.0, "max_new_tokens": 6}
OK = grpc.StatusCode.OK


class Attempts:
    """Client interceptors (sync and asyncio) that record every attempt's method and final status."""

    def __init__(self) -> None:
        self.log: list[tuple[str, grpc.StatusCode]] = []
        self._lock = threading.Lock()

    def record(self, method: str | bytes, code: grpc.StatusCode) -> None:
        name = method.decode() if isinstance(method, bytes) else method  # grpc.aio gives bytes
        with self._lock:
            self.log.append((name.rsplit("/", 1)[-1], code))

    def codes(self, method: str) -> list[grpc.StatusCode]:
        return [c for m, c in self.log if m == method]

    def sync(self) -> list[Any]:
        attempts = self

        class Unary(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
            def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
                outcome = continuation(details, request)
                attempts.record(details.method, outcome.code())
                return outcome

        class Stream(grpc.UnaryStreamClientInterceptor):  # type: ignore[misc]
            def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
                call = continuation(details, request)
                call.add_done_callback(lambda c: attempts.record(details.method, c.code()))
                return call

        return [Unary(), Stream()]

    def aio(self) -> list[Any]:
        attempts, pending = self, set()

        class Unary(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
            async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
                call = await continuation(details, request)
                attempts.record(details.method, await call.code())
                return call

        class Stream(grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
            async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
                call = await continuation(details, request)

                async def record() -> None:
                    attempts.record(details.method, await call.code())  # waits for the stream's end

                pending.add(asyncio.ensure_future(record()))
                return call

        return [Unary(), Stream()]


def _requests_total(srv: ServerThread, code: str, model: str = "ngram-kn") -> float:
    """The server's own count of Score calls that ended with `code` (plm_requests_total)."""
    value = srv.running.metrics.registry.get_sample_value(
        "plm_requests_total", {"method": "Score", "model": model, "code": code, "protocol": "grpc"})
    return value or 0.0


# -------------------------------------------------------------------------------- every RPC, both variants

CALLS: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = [
    ("list_models", (), {}),
    ("get_model", ("gpt",), {}),
    ("score", ("gpt", ["The king is dead.", "Long live the king."]), {"add_eos": False}),
    ("predict_next", ("ngram-kn", ["the king"]), {"top_k": 3, "include_tokens": True}),
    ("generate", ("gpt", ["The king", "To be"], GREEDY), {}),
    ("fill_mask", ("bert", ["the king is [MASK] ."]), {"top_k": 4}),
    ("embed", ("word2vec-skipgram", ["king"]), {"nearest_k": 3, "analogies": [("king", "man", "woman")]}),
    ("embed", ("bert", ["the king is dead ."]), {"pooling": "cls", "normalize": True}),
    ("predict_next_sentence", ("bert", [("the king is dead .", "long live the king .")]), {}),
    ("classify", ("gpt", ["Alas, poor Yorick!"], ["tragedy", "comedy"]),
     {"demonstrations": [("Ha ha!", "comedy")], "scoring": "token_mean"}),
]


METHODS = {"list_models": "ListModels", "get_model": "GetModel", "score": "Score", "predict_next": "PredictNext",
           "generate": "Generate", "fill_mask": "FillMask", "embed": "Embed",
           "predict_next_sentence": "PredictNextSentence", "classify": "Classify"}


def _raw(server: ServerThread, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The same call through the bare generated stub: the oracle for what the SDK returns."""
    from plm.client import core

    from plm.api.v1 import plm_pb2_grpc

    build = getattr(core, {"predict_next_sentence": "next_sentence"}.get(name, name) + "_request")
    with grpc.insecure_channel(server.target) as ch:
        return getattr(plm_pb2_grpc.LanguageModelServiceStub(ch), METHODS[name])(build(*args, **kwargs).request,
                                                                                 timeout=60)


def test_requests_are_the_documented_messages() -> None:
    """The builders write exactly the fields a hand-written request has, and leave unset what the caller left."""
    from plm.client import core

    assert core.score_request("m", ["a"]).request == pb.ScoreRequest(model="m", texts=["a"])
    assert not core.score_request("m", ["a"]).request.HasField("add_eos")
    assert core.generate_request("m", ["p"], {"temperature": 0, "seed": 3}).request == pb.GenerateRequest(
        model="m", prompts=["p"], sampling=pb.SamplingParams(temperature=0, seed=3))
    assert core.embed_request("m", ["w"], pooling="none", analogies=[("a", "b", "c")]).request == pb.EmbedRequest(
        model="m", texts=["w"], pooling=pb.POOLING_NONE, analogies=[pb.Analogy(a="a", b="b", c="c")])
    assert core.classify_request("m", ["q"], ["x", "y"], demonstrations=[("t", "x")], scoring="per_char").request \
        == pb.ClassifyRequest(model="m", queries=["q"], labels=["x", "y"], scoring=pb.LABEL_SCORING_PER_CHAR,
                              demonstrations=[pb.Demonstration(text="t", label="x")])
    with pytest.raises(ValueError, match="pooling"):
        core.embed_request("m", ["w"], pooling="max")


def test_every_rpc_sync_and_async_equal_the_raw_stub(server: ServerThread) -> None:
    """Deterministic calls (greedy generation) give identical responses through PlmClient, AsyncPlmClient and
    the bare generated stub; the stream's deltas spell the unary generation."""
    expected = [_raw(server, name, args, kwargs) for name, args, kwargs in CALLS]
    with PlmClient(server.target) as c:
        got_sync = [getattr(c, name)(*args, **kwargs) for name, args, kwargs in CALLS]
        stream_sync = list(c.generate_stream("gpt", ["The king", "To be"], GREEDY))
        health_sync = c.health_status(), c.health_status("gpt")

    async def run() -> tuple[list[Any], list[pb.GenerateStreamResponse], tuple[str, str]]:
        async with AsyncPlmClient(server.target) as ac:
            got = [await getattr(ac, name)(*args, **kwargs) for name, args, kwargs in CALLS]
            stream = [ev async for ev in ac.generate_stream("gpt", ["The king", "To be"], GREEDY)]
            return got, stream, (await ac.health_status(), await ac.health_status("gpt"))

    got_async, stream_async, health_async = asyncio.run(run())
    for (name, _, _), want, a, b in zip(CALLS, expected, got_sync, got_async, strict=True):
        assert a == want, name
        assert b == want, name
    assert health_sync == health_async == ("SERVING", "SERVING")
    generations = expected[CALLS.index(("generate", ("gpt", ["The king", "To be"], GREEDY), {}))].generations
    for stream in (stream_sync, stream_async):
        for i, g in enumerate(generations):
            assert "".join(ev.text_delta for ev in stream if ev.index == i) == g.text
            assert [t for ev in stream if ev.index == i for t in ev.token_ids] == list(g.token_ids)


def test_cancelling_an_async_stream_frees_the_engine(server: ServerThread) -> None:
    """(The sync client's cancel is tested in test_engine.py.)"""
    engine = server.running.registry.get("gpt").engine

    async def run() -> None:
        async with AsyncPlmClient(server.target) as c:
            events = c.generate_stream("gpt", ["The king"] * 16, {"max_new_tokens": 60, "seed": 1})
            await anext(events)
            assert events.cancel()
            with pytest.raises(asyncio.CancelledError):
                _ = [ev async for ev in events]

    asyncio.run(run())
    deadline = time.monotonic() + 10
    while engine.active and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.active == 0


# ------------------------------------------------------------------------------------------- deadlines


def test_deadline_default_and_per_call(server: ServerThread) -> None:
    prompts = ["The king"] * 16
    long = {"temperature": 1.0, "seed": 1, "max_new_tokens": 60}
    with PlmClient(server.target, timeout=0.001) as c:
        with pytest.raises(grpc.RpcError) as e:
            c.generate("gpt", prompts, long)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert c.score("ngram-kn", ["the king"], timeout=60).scores  # the per-call deadline wins
    with PlmClient(server.target, timeout=60) as c, pytest.raises(grpc.RpcError) as e:
        c.generate("gpt", prompts, long, timeout=0.001)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_deadline_bounds_the_retries() -> None:
    """Nothing listens on the port: every attempt is UNAVAILABLE, and the deadline (not the attempt budget) ends
    the call, as a gRPC deadline covers the whole call."""
    attempts = Attempts()
    retry = RetryPolicy(max_attempts=10_000, initial_backoff=0.01, max_backoff=0.05)
    with PlmClient(f"127.0.0.1:{free_port()}", timeout=1.0, retry=retry, interceptors=attempts.sync()) as c, \
            pytest.raises(grpc.RpcError) as e:
        c.score("ngram-kn", ["the king"])
    assert e.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    codes = attempts.codes("Score")
    assert 2 <= len(codes) < 10_000
    assert set(codes) <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


def test_backoff_is_bounded_jittered_and_stops() -> None:
    policy = RetryPolicy(max_attempts=6, initial_backoff=0.1, max_backoff=0.5)
    rng = random.Random(0)
    for attempts_done in range(1, 6):
        cap = min(0.5, 0.1 * 2 ** (attempts_done - 1))
        waits = [policy.wait(attempts_done, grpc.StatusCode.UNAVAILABLE, None, rng) for _ in range(200)]
        assert all(w is not None and 0 <= w <= cap for w in waits)
        assert len(set(waits)) > 100  # jittered, not one fixed value
    assert policy.wait(6, grpc.StatusCode.UNAVAILABLE, None, rng) is None  # attempts spent
    for code in set(grpc.StatusCode) - RETRYABLE:
        assert policy.wait(1, code, None, rng) is None
    with pytest.raises(ValueError, match="INVALID_ARGUMENT"):
        RetryPolicy(retry_on=frozenset({grpc.StatusCode.INVALID_ARGUMENT}))
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)


# --------------------------------------------------------------------------------------------- retries


def test_wrong_arguments_are_not_retried(server: ServerThread) -> None:
    attempts = Attempts()
    with PlmClient(server.target, retry=RetryPolicy(max_attempts=5), interceptors=attempts.sync()) as c:
        for call, code in ((lambda: c.score("gpt", [""]), grpc.StatusCode.INVALID_ARGUMENT),
                           (lambda: c.score("no-such-model", ["x"]), grpc.StatusCode.NOT_FOUND),
                           (lambda: c.fill_mask("gpt", ["a [MASK]"]), grpc.StatusCode.FAILED_PRECONDITION),
                           (lambda: list(c.generate_stream("gpt", ["x"], {"top_p": 0.0})),
                            grpc.StatusCode.INVALID_ARGUMENT)):
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == code
    assert [c for _, c in attempts.log] == [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                                            grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT]


def test_a_server_that_is_not_up_yet(tiny_repo: Path) -> None:
    """Calls made before the server listens fail UNAVAILABLE and are retried until it is up: a unary call from
    the sync client and a stream from the asyncio client (retried before its first message)."""
    port = free_port()
    retry = RetryPolicy(max_attempts=200, initial_backoff=0.05, max_backoff=0.3)
    sync_attempts, aio_attempts = Attempts(), Attempts()

    def unary() -> pb.ScoreResponse:
        with PlmClient(f"127.0.0.1:{port}", retry=retry, timeout=30, interceptors=sync_attempts.sync()) as c:
            return c.score("ngram-kn", ["the king is dead"])

    async def stream() -> list[pb.GenerateStreamResponse]:
        async with AsyncPlmClient(f"127.0.0.1:{port}", retry=retry, timeout=30, interceptors=aio_attempts.aio()) as c:
            return [ev async for ev in c.generate_stream("gpt", ["The king"], GREEDY)]

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        score = pool.submit(unary)
        gen = pool.submit(asyncio.run, stream())
        while not (sync_attempts.log and aio_attempts.log):  # both have failed at least once
            assert not score.done() and not gen.done()
            threading.Event().wait(0.02)
        srv = ServerThread(replace(make_config(tiny_repo, models=("gpt", "ngram-kn")), port=port))  # type: ignore
        try:
            assert score.result(timeout=60).scores[0].num_tokens == 5
            events = gen.result(timeout=60)
        finally:
            srv.stop()
    assert events[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED
    for attempts, method in ((sync_attempts, "Score"), (aio_attempts, "GenerateStream")):
        codes = attempts.codes(method)
        assert len(codes) >= 2 and codes[-1] == OK
        assert set(codes[:-1]) == {grpc.StatusCode.UNAVAILABLE}


@pytest.mark.parametrize("variant", ["sync", "asyncio"])
def test_a_stream_is_not_retried_after_its_first_message(tiny_repo: Path, variant: str) -> None:
    """The server goes away mid-stream (UNAVAILABLE, a retryable status): the caller already has text, so the
    error reaches it and no second attempt is made."""
    srv = ServerThread(make_config(tiny_repo, models=("gpt",)))
    attempts = Attempts()
    retry = RetryPolicy(max_attempts=5)
    sampling = {"max_new_tokens": 60, "seed": 1}
    try:
        with pytest.raises(grpc.RpcError) as e:
            if variant == "sync":
                with PlmClient(srv.target, retry=retry, interceptors=attempts.sync()) as c:
                    events = c.generate_stream("gpt", ["The king"] * 16, sampling)
                    next(events)
                    srv.call(srv.running.server.stop(0))
                    list(events)
            else:
                async def run() -> None:
                    async with AsyncPlmClient(srv.target, retry=retry, interceptors=attempts.aio()) as c:
                        events = c.generate_stream("gpt", ["The king"] * 16, sampling)
                        await anext(events)
                        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(srv.running.server.stop(0),
                                                                                   srv.loop))
                        _ = [ev async for ev in events]

                asyncio.run(run())
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert attempts.codes("GenerateStream") == [grpc.StatusCode.UNAVAILABLE]
    finally:
        srv.stop()


def test_a_full_queue_is_retried_until_served(tiny_repo: Path) -> None:
    """A one-row batch and a two-row queue refuse most of a burst with RESOURCE_EXHAUSTED; with retries every
    request is served. The client's attempt count equals the server's own request counter, status by status."""
    from plm.service.config import Batching

    tiny_queue = Batching(max_batch_size=1, max_queue_size=2, max_queue_delay_ms=50)
    srv = ServerThread(make_config(tiny_repo, models=("gpt",), model_batching={"gpt": tiny_queue}))
    attempts = Attempts()
    retry = RetryPolicy(max_attempts=50, initial_backoff=0.02, max_backoff=0.5)
    try:
        with PlmClient(srv.target, retry=retry, interceptors=attempts.sync()) as c, \
                concurrent.futures.ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda i: c.score("gpt", ["The king is dead."] * 2), range(32)))
        assert len(results) == 32 and all(len(r.scores) == 2 for r in results)
        codes = attempts.codes("Score")
        refused = codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert codes.count(OK) == 32 and refused + 32 == len(codes) and refused > 0
        assert _requests_total(srv, "OK", "gpt") == 32
        assert _requests_total(srv, "RESOURCE_EXHAUSTED", "gpt") == refused
    finally:
        srv.stop()


# ----------------------------------------------------------------------------------------- round-robin


def test_round_robin_spreads_calls_and_fails_over(tiny_repo: Path) -> None:
    """Two real servers: alternate calls land on each (counted by each server's own metrics), from both client
    variants; when one stops, retries carry every call to the other."""
    a, b = (ServerThread(make_config(tiny_repo, models=("ngram-kn",))) for _ in range(2))
    try:
        with PlmClient([a.target, b.target], retry=RetryPolicy(max_attempts=3)) as c:
            for _ in range(10):
                c.score("ngram-kn", ["the king"])
            assert _requests_total(a, "OK") == _requests_total(b, "OK") == 5

            async def burst() -> None:
                async with AsyncPlmClient([a.target, b.target]) as ac:
                    await asyncio.gather(*(ac.score("ngram-kn", ["the queen"]) for _ in range(20)))

            asyncio.run(burst())
            assert _requests_total(a, "OK") == _requests_total(b, "OK") == 15
            b.stop()
            for _ in range(10):
                assert c.score("ngram-kn", ["the king"]).scores
            assert _requests_total(a, "OK") == 25
    finally:
        a.stop()


# ------------------------------------------------------------------------------------------ TLS, token


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for "plm.test" and a client certificate, made by the openssl CLI."""
    if subprocess.run(["which", "openssl"], capture_output=True).returncode:
        pytest.skip("openssl CLI not installed")
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=plm test CA",
             "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"))
    for name, san in (("server", "DNS:plm.test"), ("client", "DNS:client.plm.test")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", str(d / f"{name}.key"),
                 "-out", str(d / f"{name}.csr"))
        (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        _openssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.pem"), "-CAkey",
                 str(d / "ca.key"), "-CAcreateserial", "-days", "2", "-extfile", str(d / f"{name}.ext"),
                 "-out", str(d / f"{name}.pem"))
    return d


def _tls_server(repo: Path, pki: Path, mutual: bool) -> ServerThread:
    """The real server (start_server) on a TLS or mutual-TLS port, accepting three bearer tokens."""
    from plm.service.config import Security

    tokens = pki / "tokens.txt"
    tokens.write_text("s3cret\nother\nfrom-cli\n")
    security = Security(tls_cert_file=pki / "server.pem", tls_key_file=pki / "server.key",
                        tls_client_ca_file=pki / "ca.pem" if mutual else None,
                        auth_tokens_file=None if mutual else tokens)
    return ServerThread(make_config(repo, models=("ngram-kn",), security=security))


@pytest.fixture(scope="module")
def tls_servers(tiny_repo: Path, pki: Path) -> Iterator[tuple[ServerThread, ServerThread]]:
    plain, mutual = _tls_server(tiny_repo, pki, mutual=False), _tls_server(tiny_repo, pki, mutual=True)
    yield plain, mutual
    plain.stop()
    mutual.stop()


def test_tls_and_bearer_token(tls_servers: tuple[ServerThread, ServerThread], pki: Path) -> None:
    plain, _ = tls_servers
    tls = TlsConfig(ca_file=pki / "ca.pem", server_name="plm.test")
    with PlmClient(plain.target, tls=tls, token="s3cret") as c:
        assert c.score("ngram-kn", ["the king"]).scores  # the server accepts only calls that carry a token
    with PlmClient(plain.target, tls=tls) as c:
        assert c.health_status() == "SERVING"  # health is open: probes carry no token
        with pytest.raises(grpc.RpcError) as e:
            c.score("ngram-kn", ["the king"])
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED  # and it is not retried

    async def aio(token: str) -> pb.ScoreResponse:
        async with AsyncPlmClient(plain.target, tls=tls, token=token) as ac:
            return await ac.score("ngram-kn", ["the king"])

    assert asyncio.run(aio("other")).scores
    with pytest.raises(grpc.RpcError) as e:
        asyncio.run(aio("wrong"))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # A client that does not trust the server's CA never gets an answer, however often it retries.
    with PlmClient(plain.target, tls=TlsConfig(server_name="plm.test"), retry=NO_RETRY, timeout=10) as c, \
            pytest.raises(grpc.RpcError) as e:
        c.score("ngram-kn", ["the king"])
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(ValueError, match="token"):
        PlmClient(plain.target, token="a\nb")
    with pytest.raises(ValueError, match="only over TLS or to a loopback target"):
        PlmClient(["127.0.0.1:1", "10.1.2.3:50051"], token="s3cret")  # plaintext to another machine: refused
    PlmClient(["localhost:1", "[::1]:2", "127.0.0.1:3"], token="s3cret").close()  # this machine: allowed


def test_mutual_tls(tls_servers: tuple[ServerThread, ServerThread], pki: Path) -> None:
    _, mutual = tls_servers
    with PlmClient(mutual.target, tls=TlsConfig(ca_file=pki / "ca.pem", cert_file=pki / "client.pem",
                                                key_file=pki / "client.key", server_name="plm.test")) as c:
        assert c.score("ngram-kn", ["the king"]).scores
    with PlmClient(mutual.target, tls=TlsConfig(ca_file=pki / "ca.pem", server_name="plm.test"),
                   retry=NO_RETRY, timeout=10) as c, pytest.raises(grpc.RpcError) as e:
        c.score("ngram-kn", ["the king"])  # no client certificate: the handshake fails
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(ValueError, match="cert_file and key_file"):
        TlsConfig(cert_file=pki / "client.pem")


def test_plm_client_verbs_take_the_sdk_options(tls_servers: tuple[ServerThread, ServerThread], pki: Path) -> None:
    """`plm client` builds its PlmClient from the flags: several targets, TLS with a CA and mTLS, the token."""
    import sys

    plain, mutual = tls_servers
    out = subprocess.run(
        [sys.executable, "-m", "plm.cli", "client", "--target", f"{plain.target},{plain.target}", "--json",
         "--tls-ca", str(pki / "ca.pem"), "--tls-server-name", "plm.test", "--token", "from-cli",
         "score", "ngram-kn", "the king"], capture_output=True, text=True, timeout=60, check=True).stdout
    assert '"model": "ngram-kn"' in out  # the server took the call: the CLI's token reached it
    args = ["--target", mutual.target, "--tls-ca", str(pki / "ca.pem"), "--tls-server-name", "plm.test",
            "--retries", "0", "--timeout", "10", "health"]
    refused = subprocess.run([sys.executable, "-m", "plm.cli", "client", *args], capture_output=True, text=True,
                             timeout=60)
    assert refused.returncode == 1 and "UNAVAILABLE" in refused.stderr
    served = subprocess.run([sys.executable, "-m", "plm.cli", "client", "--tls-cert", str(pki / "client.pem"),
                             "--tls-key", str(pki / "client.key"), *args], capture_output=True, text=True,
                            timeout=60, check=True)
    assert served.stdout.strip() == "SERVING"
    half = subprocess.run([sys.executable, "-m", "plm.cli", "client", "--tls-cert", str(pki / "client.pem"),
                           *args], capture_output=True, text=True, timeout=60)
    assert half.returncode == 2 and "cert_file and key_file" in half.stderr


def test_each_retry_of_a_call_goes_to_the_next_target() -> None:
    """Attempts of one call walk the targets from the round-robin's pick, so a dead replica is tried at most
    once per call even while other threads' calls advance the round-robin (tests/test_scaleout.py kills one)."""
    with PlmClient(["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]) as c:
        assert [c._rpc("Score", 2, attempt) for attempt in (1, 2, 3, 4)] == [
            c._plm[2].Score, c._plm[0].Score, c._plm[1].Score, c._plm[2].Score]
        assert c._rpc("Health.Check", 1, 1) == c._health[1].Check
