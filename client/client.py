"""The synchronous plm.v1 client: every RPC, deadlines, retries, TLS, a bearer token, round-robin over targets.

    with PlmClient(["10.0.0.1:50051", "10.0.0.2:50051"], timeout=10, token="s3cret") as c:
        c.score("gpt", ["The king is dead."]).scores[0].log_prob
        for ev in c.generate_stream("gpt", ["Once"], {"temperature": 0, "max_new_tokens": 8}):
            print(ev.text_delta, end="")

Each call picks the next target (one channel per target); a retry goes to the next one. See client/core.py for
what is retried and how long a call may take. `stub` and `health` are the raw stubs of the first target (no
retries, no default deadline) for callers that want gRPC itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

import grpc
from grpc_health.v1 import health_pb2
from plm.client import core
from plm.client.core import Prepared

from plm.api.v1 import plm_pb2 as pb

P = ParamSpec("P")
R = TypeVar("R")


def _unary(method: str, build: Callable[P, Prepared[Any]],
           response: type[R]) -> Callable[Concatenate[PlmClient, P], R]:
    """A client method with `build`'s signature that sends its request with retries."""
    def call(self: PlmClient, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return cast(R, self._invoke(method, build(*args, **kwargs)))
    call.__doc__ = build.__doc__
    return call


class Stream(core.StreamHandle, Iterator[R]):
    """A server stream in progress: iterate it for the messages; `cancel()` stops it."""

    def __init__(self, client: PlmClient, method: str, call: Prepared[Any]) -> None:
        super().__init__()
        self._messages = client._invoke_stream(method, call, self)

    def __next__(self) -> R:
        return cast(R, next(self._messages))


def _stream(method: str, build: Callable[P, Prepared[Any]],
            response: type[R]) -> Callable[Concatenate[PlmClient, P], Stream[R]]:
    """A server-streaming method: retried only until its first message arrives (none has reached the caller)."""
    def call(self: PlmClient, /, *args: P.args, **kwargs: P.kwargs) -> Stream[R]:
        return Stream(self, method, build(*args, **kwargs))
    call.__doc__ = build.__doc__
    return call


class PlmClient(core.ClientBase):
    """A channel per target. `timeout` is each call's default deadline in seconds (None = none)."""

    def _open(self, target: str, options: list[tuple[str, Any]], interceptors: list[Any]) -> grpc.Channel:
        tls = self.conn.tls
        channel = (grpc.secure_channel(target, tls.credentials(), options=options) if tls
                   else grpc.insecure_channel(target, options=options))
        return grpc.intercept_channel(channel, *interceptors) if interceptors else channel

    def close(self) -> None:
        for c in self.channels:
            c.close()

    def __enter__(self) -> PlmClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _invoke(self, method: str, call: Prepared[Any]) -> Any:
        deadline = self.conn.deadline(call.timeout)
        metadata = self.conn.metadata(call.request_id)
        attempts, first = 0, self.conn.next_index()
        while True:
            attempts += 1
            try:
                rpc = self._rpc(method, first, attempts)
                return rpc(call.request, timeout=core.remaining(deadline), metadata=metadata)
            except grpc.RpcError as err:
                wait = self.conn.retry.wait(attempts, core.status_of(err), deadline, self.conn.rng)
                if wait is None:
                    raise
                time.sleep(wait)

    def _invoke_stream(self, method: str, call: Prepared[Any], handle: core.StreamHandle) -> Iterator[Any]:
        deadline = self.conn.deadline(call.timeout)
        metadata = self.conn.metadata(call.request_id)
        attempts, first = 0, self.conn.next_index()
        while not handle.cancelled:
            attempts += 1
            rpc = self._rpc(method, first, attempts)
            responses = handle.attempt = rpc(call.request, timeout=core.remaining(deadline), metadata=metadata)
            try:
                first = next(responses)
            except StopIteration:
                return
            except grpc.RpcError as err:
                wait = self.conn.retry.wait(attempts, core.status_of(err), deadline, self.conn.rng)
                if wait is None:
                    raise
                time.sleep(wait)
                continue
            try:
                yield first
                yield from responses  # past the first message an error reaches the caller: text was already shown
            finally:
                responses.cancel()  # the caller stopped reading: the server stops generating (no-op when done)
            return

    score = _unary("Score", core.score_request, pb.ScoreResponse)
    predict_next = _unary("PredictNext", core.predict_next_request, pb.PredictNextResponse)
    generate = _unary("Generate", core.generate_request, pb.GenerateResponse)
    generate_stream = _stream("GenerateStream", core.generate_request, pb.GenerateStreamResponse)
    fill_mask = _unary("FillMask", core.fill_mask_request, pb.FillMaskResponse)
    embed = _unary("Embed", core.embed_request, pb.EmbedResponse)
    predict_next_sentence = _unary("PredictNextSentence", core.next_sentence_request, pb.PredictNextSentenceResponse)
    classify = _unary("Classify", core.classify_request, pb.ClassifyResponse)
    list_models = _unary("ListModels", core.list_models_request, pb.ListModelsResponse)
    get_model = _unary("GetModel", core.get_model_request, pb.ModelInfo)

    def health_status(self, service: str = "", *, timeout: float | None = None) -> str:
        """grpc.health.v1 status of the server ("") or of one model: SERVING, NOT_SERVING (NOT_FOUND if unknown)."""
        resp = self._invoke("Health.Check", Prepared(health_pb2.HealthCheckRequest(service=service), timeout))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
