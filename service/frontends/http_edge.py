"""The HTTP edge of a data-plane call, shared by the protocols on the HTTP port (the OpenAI-compatible API in
openai_http.py, plm.v1 as JSON in json_http.py).

It owns what both need per call and nothing protocol-specific: the HTTP status of each status name of the error
table, the call's opening (request id from `X-Request-Id`, admission, a deadline from `X-Request-Timeout`), the
body read under `limits.max_message_bytes` and checked as one UTF-8 JSON object, and the JSON response with the
request id. Each protocol writes its own error body around these.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeVar

from aiohttp import web
from plm.service.dataplane.plane import Call, DataPlane
from plm.service.errors import InvalidArgument, ServiceError

T = TypeVar("T")

PROTOCOL = "http"  # the metrics' protocol label
JSON = "application/json"

# Status name (service/errors.py, gRPC's canonical names) → HTTP status, as grpc-gateway and Google's APIs map them.
HTTP_STATUS: Mapping[str, int] = {
    "INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "OUT_OF_RANGE": 400, "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403, "NOT_FOUND": 404, "ALREADY_EXISTS": 409, "ABORTED": 409, "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499, "INTERNAL": 500, "UNKNOWN": 500, "DATA_LOSS": 500, "UNIMPLEMENTED": 501, "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}


class BodyTooLarge(InvalidArgument):
    """A body over `limits.max_message_bytes`: the request's INVALID_ARGUMENT, answered 413 as HTTP does."""

    http_status = 413

    def __init__(self, limit: int) -> None:
        super().__init__("body", f"is over {limit} bytes (max_message_bytes)")


def http_status(error: ServiceError) -> int:
    """The HTTP status of a data-plane error (500 for a name the table lacks)."""
    return getattr(error, "http_status", None) or HTTP_STATUS.get(error.code, 500)


def json_response(status: int, body: Any, request_id: str | None = None) -> web.Response:
    headers = {"X-Request-Id": request_id} if request_id else None
    return web.Response(status=status, body=json.dumps(body, ensure_ascii=False).encode(), content_type=JSON,
                        headers=headers)


def header_seconds(request: web.Request, header: str) -> float | None:
    """A positive number of seconds from a header, None when it is absent."""
    value = request.headers.get(header)
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < 1e9:
        raise InvalidArgument(f"header {header}", f"is {value[:40]!r}; give seconds, a positive number")
    return seconds


def new_call(plane: DataPlane, method: str, request: web.Request) -> Call:
    """The data-plane call of one HTTP request (its id from `X-Request-Id`, or made); `admit` starts it."""
    return plane.call(method, request.headers.get("X-Request-Id"), protocol=PROTOCOL)


def admit(call: Call, request: web.Request) -> None:
    """Admission, then the deadline of `X-Request-Timeout`: raises when the call is refused."""
    call.begin()
    timeout = header_seconds(request, "X-Request-Timeout")
    if timeout is not None:
        call.deadline = time.monotonic() + timeout


async def read_body(request: web.Request, limit: int) -> bytes:
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise BodyTooLarge(limit) from None


def json_object(raw: bytes) -> dict[str, Any]:
    """The JSON object of a request body; malformed, non-UTF-8 or non-object bodies are refused (field `body`)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidArgument("body", f"is not UTF-8 (byte {e.start})") from None
    try:
        body = json.loads(text)
    except ValueError as e:
        raise InvalidArgument("body", f"is not JSON: {e}") from None
    except RecursionError:
        raise InvalidArgument("body", "is nested too deeply") from None
    if not isinstance(body, dict):
        raise InvalidArgument("body", f"must be a JSON object, got {json_kind(body)}")
    return body


def json_kind(value: object) -> str:
    """`a string`, `an array`, … : a JSON value's type as an error message names it."""
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


async def stream_response(request: web.Request, call: Call, events: AsyncIterator[T], headers: Mapping[str, str],
                          encode: Callable[[T], Awaitable[bytes]], error_event: Callable[[ServiceError], bytes],
                          tail: Callable[[], bytes] | None = None) -> web.StreamResponse:
    """A streamed answer: the first event is awaited before the response starts, so a refusal (a prompt too long
    for the window) still raises to the caller and becomes its HTTP status; then each event as `encode` writes
    it, and `tail()` after the last. A failure after the start (status 200 is out) is `error_event(error)` and
    ends the body. The events are closed however it ends: a generation's closing frees its engine slots."""
    try:
        ev = await anext(events, None)
        response = web.StreamResponse(headers={**headers, "X-Request-Id": call.request_id})
        await response.prepare(request)
        while ev is not None:
            try:
                await response.write(await encode(ev))
                ev = await anext(events, None)
            except (asyncio.CancelledError, ConnectionResetError):
                raise
            except Exception as err:  # after the status went out: tell the client in the body
                error = call.failed(err)  # a ServiceError as it is, anything else logged and INTERNAL
                assert error is not None
                await response.write(error_event(error))
                return response
        if tail is not None:
            await response.write(tail())
        await response.write_eof()
        return response
    except ConnectionResetError:  # the client went away between aiohttp's notice and the handler's cancel
        call.failed(asyncio.CancelledError())
        return web.StreamResponse(status=499)
    finally:
        await close_events(events)


async def close_events(events: AsyncIterator[Any]) -> None:
    """Close an async generator of events (a generation's: its engine slots free); another iterator as it is."""
    close = getattr(events, "aclose", None)
    if close is not None:
        await close()
