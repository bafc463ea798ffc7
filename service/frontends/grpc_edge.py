"""The gRPC edge of a data-plane call, shared by the gRPC front ends (plm.v1, KServe v2).

One wrapper per RPC kind: it reads the request id (`x-request-id`) and the time left from the gRPC context,
opens the data plane's Call, passes admission, and turns a failure into its status — an InvalidArgument's field
renamed through the method's table — with the request id in the message.

The request id goes back in the trailing metadata of a unary call (with the response and status, in one
write: a separate initial-metadata send costs a whole extra write) and in the initial metadata of a stream
(the caller has it before the first token).
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Protocol, TypeVar

import grpc
from plm.service.dataplane.plane import Call, DataPlane
from plm.service.errors import InvalidArgument

Resp = TypeVar("Resp")
_STATUS = {code.name: code for code in grpc.StatusCode}
_NO_NAMES: Mapping[str, str] = {}


class Frontend(Protocol):
    plane: DataPlane


def open_call(plane: DataPlane, method: str, context: grpc.aio.ServicerContext) -> Call:
    request_id = next((v for k, v in context.invocation_metadata() or () if k == "x-request-id"), None)
    return plane.call(method, request_id, context.time_remaining())


async def fail(context: grpc.aio.ServicerContext, call: Call, err: BaseException, names: Mapping[str, str]) -> None:
    """An error becomes the call's status (abort raises); a cancellation goes on."""
    error = call.failed(err)
    if error is None:
        return
    if isinstance(error, InvalidArgument):
        error = error.renamed(names)
    await context.abort(_STATUS[error.code], f"{error.message} (request_id={call.request_id})")


def unary(method: str, names: Mapping[str, str] = _NO_NAMES
          ) -> Callable[[Callable[..., Awaitable[Resp]]], Callable[..., Awaitable[Resp]]]:
    """A unary RPC `fn(self, request, call)`; `names`: data plane field → this method's field, for errors."""
    def wrap(fn: Callable[..., Awaitable[Resp]]) -> Callable[..., Awaitable[Resp]]:
        @functools.wraps(fn)
        async def handler(self: Frontend, request: Any, context: grpc.aio.ServicerContext) -> Resp:
            call = open_call(self.plane, method, context)
            try:
                call.begin()
                context.set_trailing_metadata((("x-request-id", call.request_id),))
                return await fn(self, request, call)
            except BaseException as err:
                await fail(context, call, err, names)
                raise
            finally:
                call.end()
        return handler
    return wrap


def streaming(method: str, names: Mapping[str, str] = _NO_NAMES
              ) -> Callable[[Callable[..., AsyncIterator[Resp]]], Callable[..., AsyncIterator[Resp]]]:
    """A server-streaming RPC `fn(self, request, call)` (an async generator)."""
    def wrap(fn: Callable[..., AsyncIterator[Resp]]) -> Callable[..., AsyncIterator[Resp]]:
        @functools.wraps(fn)
        async def handler(self: Frontend, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Resp]:
            call = open_call(self.plane, method, context)
            try:
                call.begin()
                await context.send_initial_metadata((("x-request-id", call.request_id),))
                async for item in fn(self, request, call):
                    yield item
            except BaseException as err:
                await fail(context, call, err, names)
                raise
            finally:
                call.end()
        return handler
    return wrap
