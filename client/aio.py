"""The asyncio plm.v1 client: the same methods, options and retry rules as client.client.PlmClient, awaited.

    async with AsyncPlmClient("127.0.0.1:50051", timeout=10) as c:
        r = await c.score("gpt", ["The king is dead."])
        async for ev in c.generate_stream("gpt", ["Once"], {"max_new_tokens": 8}):
            print(ev.text_delta, end="")

Create it inside the event loop that uses it (grpc.aio channels belong to one loop).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

import grpc
from grpc_health.v1 import health_pb2
from plm.client import core
from plm.client.core import Prepared

from plm.api.v1 import plm_pb2 as pb

P = ParamSpec("P")
R = TypeVar("R")


def _unary(method: str, build: Callable[P, Prepared[Any]],
           response: type[R]) -> Callable[Concatenate[AsyncPlmClient, P], Awaitable[R]]:
    """A coroutine method with `build`'s signature that sends its request with retries."""
    async def call(self: AsyncPlmClient, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return cast(R, await self._invoke(method, build(*args, **kwargs)))
    call.__doc__ = build.__doc__
    return call


class AsyncStream(core.StreamHandle, AsyncIterator[R]):
    """A server stream in progress: `async for` it for the messages; `cancel()` stops it (reading on then
    raises asyncio.CancelledError, as a cancelled grpc.aio call does)."""

    def __init__(self, client: AsyncPlmClient, method: str, call: Prepared[Any]) -> None:
        super().__init__()
        self._messages = client._invoke_stream(method, call, self)

    async def __anext__(self) -> R:
        return cast(R, await anext(self._messages))


def _stream(method: str, build: Callable[P, Prepared[Any]],
            response: type[R]) -> Callable[Concatenate[AsyncPlmClient, P], AsyncStream[R]]:
    """A server-streaming method: retried only until its first message arrives (none has reached the caller)."""
    def call(self: AsyncPlmClient, /, *args: P.args, **kwargs: P.kwargs) -> AsyncStream[R]:
        return AsyncStream(self, method, build(*args, **kwargs))
    call.__doc__ = build.__doc__
    return call


class AsyncPlmClient(core.ClientBase):
    """A grpc.aio channel per target. `timeout` is each call's default deadline in seconds (None = none)."""

    def _open(self, target: str, options: list[tuple[str, Any]], interceptors: list[Any]) -> grpc.aio.Channel:
        tls = self.conn.tls
        if tls:
            return grpc.aio.secure_channel(target, tls.credentials(), options=options, interceptors=interceptors)
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)

    async def close(self) -> None:
        for c in self.channels:
            await c.close()

    async def __aenter__(self) -> AsyncPlmClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _invoke(self, method: str, call: Prepared[Any]) -> Any:
        deadline = self.conn.deadline(call.timeout)
        metadata = self.conn.metadata(call.request_id)
        attempts, first = 0, self.conn.next_index()
        while True:
            attempts += 1
            try:
                rpc = self._rpc(method, first, attempts)
                return await rpc(call.request, timeout=core.remaining(deadline), metadata=metadata)
            except grpc.aio.AioRpcError as err:
                wait = self.conn.retry.wait(attempts, err.code(), deadline, self.conn.rng)
                if wait is None:
                    raise
                await asyncio.sleep(wait)

    async def _invoke_stream(self, method: str, call: Prepared[Any],
                             handle: core.StreamHandle) -> AsyncIterator[Any]:
        deadline = self.conn.deadline(call.timeout)
        metadata = self.conn.metadata(call.request_id)
        attempts, first = 0, self.conn.next_index()
        while not handle.cancelled:
            attempts += 1
            rpc = self._rpc(method, first, attempts)
            responses = handle.attempt = rpc(call.request, timeout=core.remaining(deadline), metadata=metadata)
            try:
                first = await responses.read()
            except grpc.aio.AioRpcError as err:
                wait = self.conn.retry.wait(attempts, err.code(), deadline, self.conn.rng)
                if wait is None:
                    raise
                await asyncio.sleep(wait)
                continue
            try:
                while first is not grpc.aio.EOF:
                    yield first
                    first = await responses.read()  # past the first message errors reach the caller
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

    async def health_status(self, service: str = "", *, timeout: float | None = None) -> str:
        """grpc.health.v1 status of the server ("") or of one model: SERVING, NOT_SERVING (NOT_FOUND if unknown)."""
        resp = await self._invoke("Health.Check", Prepared(health_pb2.HealthCheckRequest(service=service), timeout))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
