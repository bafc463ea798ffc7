"""The OpenAI-compatible HTTP front end: `/v1/completions`, `/v1/embeddings`, `/v1/models`, over the data plane.

The third sibling of plm.v1 and KServe v2: each handler translates an HTTP JSON body to the data plane's typed
request (openai_http_wire.py), awaits the data plane (admission, validation, model lease, the task, batchers
and engine are shared with gRPC, in the same process and event loop) and writes the typed result as JSON or,
for `stream: true`, as server-sent events ending `data: [DONE]`. Errors are OpenAI's error body with the HTTP
status of the error table (openai_http_wire.STATUS).

The server is aiohttp's: asyncio-native, so it runs on grpc.aio's own event loop and reaches the models with
no second copy and no thread hop; it streams responses, bounds request bodies, and cancels a handler whose
client went away (`handler_cancellation`), which closes a stream's generation so its engine slot frees.

Per call, as for gRPC: `X-Request-Id` in (or made) and out; a deadline from `X-Request-Timeout` (seconds) or,
for a unary call, the OpenAI SDKs' `X-Stainless-Read-Timeout`; `Authorization: Bearer` checked against
`[security]`'s tokens (all paths but `/health`); TLS from the same settings; metrics with protocol="http".
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from aiohttp import web
from plm.service.admission import GLOBAL
from plm.service.config import ServerConfig
from plm.service.dataplane import requests as rq
from plm.service.dataplane.plane import Call, DataPlane
from plm.service.errors import InvalidArgument
from plm.service.families.base import ModelAdapter
from plm.service.frontends import openai_http_wire as wire
from plm.service.security import bearer_accepted, server_ssl_context, token_bytes

log = logging.getLogger("plm.http")

PROTOCOL = "http"
OPEN_PATHS = frozenset(("/health",))  # probes carry no token (gRPC's health service is open likewise)
_CLOSE_SECONDS = 1.0  # after the drain: time for responses being written to finish
_NO_CHAT = ("plm serves no chat models: its generators are plain language models without a chat template or "
            "roles, so there is no honest mapping of messages to a prompt. Use POST /v1/completions with a prompt")
_JSON = "application/json"

Handler = Callable[["OpenAIFrontend", web.Request, Call], Awaitable[web.StreamResponse]]


def _json(status: int, body: Any, request_id: str | None = None) -> web.Response:
    headers = {"X-Request-Id": request_id} if request_id else None
    return web.Response(status=status, body=json.dumps(body, ensure_ascii=False).encode(), content_type=_JSON,
                        headers=headers)


def _seconds(request: web.Request, header: str) -> float | None:
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


def _edge(method: str, names: Mapping[str, str] = wire.COMPLETION_PARAMS) -> Callable[[Handler], Any]:
    """A handler `fn(self, request, call)` inside a data-plane call: admission, the request id, the deadline
    of X-Request-Timeout, and a failure as OpenAI's error body (an InvalidArgument's field renamed by `names`)."""
    def wrap(fn: Handler) -> Callable[[OpenAIFrontend, web.Request], Awaitable[web.StreamResponse]]:
        async def handler(self: OpenAIFrontend, request: web.Request) -> web.StreamResponse:
            call = self.plane.call(method, request.headers.get("X-Request-Id"), protocol=PROTOCOL)
            try:
                call.begin()
                timeout = _seconds(request, "X-Request-Timeout")
                if timeout is not None:
                    call.deadline = time.monotonic() + timeout
                return await fn(self, request, call)
            except BaseException as err:
                error = call.failed(err)
                if error is None:  # the client went away (aiohttp cancelled the handler)
                    raise
                status, body = wire.service_error_body(wire.renamed(error, names), call.request_id)
                return _json(status, body, call.request_id)
            finally:
                call.end()
        return handler
    return wrap


@dataclass
class HttpServer:
    """A started HTTP listener: its port, and `close` for the end of the drain."""

    runner: web.AppRunner
    port: int

    async def close(self) -> None:
        await self.runner.cleanup()


class OpenAIFrontend:
    def __init__(self, plane: DataPlane, config: ServerConfig) -> None:
        self.plane = plane
        self.max_inputs = config.limits.max_inputs_per_request
        self.max_body = config.limits.max_message_bytes
        self._tokens = token_bytes(config.security.tokens())

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body, middlewares=[self._guard])
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_get("/v1/models/{model}", self.get_model)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/health", self.health)
        return app

    @web.middleware
    async def _guard(self, request: web.Request,
                     handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        """The bearer token before any work, and aiohttp's own refusals (no route, wrong method) in OpenAI's
        error shape."""
        if self._tokens and request.path not in OPEN_PATHS and not bearer_accepted(
                request.headers.get("Authorization"), self._tokens):
            self.plane.metrics.rejections.labels(GLOBAL, "unauthenticated").inc()
            status, body = wire.error_body(
                "UNAUTHENTICATED", "missing or invalid credentials: send header 'Authorization: Bearer <token>'",
                None)
            return _json(status, body)
        try:
            return await handler(request)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            kind = "invalid_request_error" if e.status < 500 else "server_error"
            return _json(e.status, {"error": {"message": f"{request.method} {request.path}: {e.reason}",
                                              "type": kind, "param": None, "code": str(e.status)}})

    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise wire.BodyTooLarge(self.max_body) from None
        return wire.parse_body(raw)

    @staticmethod
    def _unary_deadline(request: web.Request, call: Call) -> None:
        """The OpenAI SDKs send their read timeout: for a unary call, the time the client waits for the answer."""
        if call.deadline is None:
            timeout = _seconds(request, "X-Stainless-Read-Timeout")
            if timeout is not None:
                call.deadline = time.monotonic() + timeout

    # ------------------------------------------------------------------------------------------ models

    @_edge("ListModels")
    async def list_models(self, request: web.Request, call: Call) -> web.StreamResponse:
        return _json(200, {"object": "list", "data": [_model(m) for m in self.plane.models()]}, call.request_id)

    @_edge("GetModel")
    async def get_model(self, request: web.Request, call: Call) -> web.StreamResponse:
        return _json(200, _model(self.plane.describe(call, request.match_info["model"])), call.request_id)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return _json(404, {"error": {"message": _NO_CHAT, "type": "invalid_request_error", "param": None,
                                     "code": "not_found"}})

    async def health(self, request: web.Request) -> web.StreamResponse:
        serving = self.plane.ready() and not self.plane.admission.draining
        return _json(200 if serving else 503, {"status": "SERVING" if serving else "NOT_SERVING"})

    # ------------------------------------------------------------------------------------- completions

    @_edge("Completions")
    async def completions(self, request: web.Request, call: Call) -> web.StreamResponse:
        c = wire.completion(await self._body(request), self.max_inputs)
        try:
            return await self._completions(request, call, c)
        except InvalidArgument as err:  # the data plane saw n copies of each prompt: name the client's prompt
            raise wire.renamed(err, wire.COMPLETION_PARAMS, c.n, c.single) from None

    async def _completions(self, request: web.Request, call: Call, c: wire.Completion) -> web.StreamResponse:
        if c.stream:
            return await self._stream(request, call, c)
        self._unary_deadline(request, call)
        if c.generate:
            served = await self.plane.generate(call, c.request)
            model, gens = served.model, served.result
        else:  # echo with max_tokens 0: the prompts as they are, scored below
            model = call.model(c.request.model).name
            gens = [rq.Generation(p, finish_reason="length") for p in c.request.prompts]
        scores = None
        if c.logprobs:
            scored = await self.plane.score(call, rq.ScoreRequest(
                model, [g.prompt + g.text for g in gens], add_eos=False, per_token=True))
            scores = scored.result.sentences
        if not c.generate:
            for g, s in zip(gens, scores or (), strict=False):
                g.prompt_tokens = s.num_tokens
            if scores is None:
                held = call.model(model)
                for g in gens:
                    g.prompt_tokens = len(held.encode_ids(g.prompt))
        return _json(200, wire.completion_body(c, call.request_id, model, gens, scores), call.request_id)

    async def _stream(self, request: web.Request, call: Call, c: wire.Completion) -> web.StreamResponse:
        """Server-sent events: a chunk per token (or per `stream_interval` tokens) of each choice. The first
        event is awaited before the response starts, so a refusal (a prompt too long for the window) is still
        its HTTP status; an error after that is an error event, and the stream ends without [DONE]."""
        served = await self.plane.generate_stream(call, c.request)
        events = served.result
        created = int(time.time())
        prompt_tokens = completion_tokens = 0
        try:
            first = await anext(events, None)
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                                   "X-Request-Id": call.request_id})
            await response.prepare(request)
            ev = first
            while ev is not None:
                finish = ev.finish_reason
                await response.write(wire.chunk(call.request_id, served.model, created, [
                    wire.completion_choice(ev.index, ev.text_delta, finish, None) if finish
                    else {"index": ev.index, "text": ev.text_delta, "logprobs": None, "finish_reason": None}]))
                if finish:
                    if ev.index % c.n == 0:
                        prompt_tokens += ev.prompt_tokens
                    completion_tokens += ev.generated_tokens
                try:
                    ev = await anext(events, None)
                except (asyncio.CancelledError, ConnectionResetError):
                    raise
                except Exception as err:  # after the status went out: tell the client in the stream
                    error = call.failed(err)  # a ServiceError as it is, anything else logged and INTERNAL
                    assert error is not None
                    await response.write(wire.stream_error(
                        wire.renamed(error, wire.COMPLETION_PARAMS, c.n, c.single), call.request_id))
                    return response
            if c.include_usage:  # OpenAI's last chunk then: no choices, the usage
                await response.write(wire.chunk(call.request_id, served.model, created, [],
                                                wire.usage(prompt_tokens, completion_tokens)))
            await response.write(wire.DONE)
            await response.write_eof()
            return response
        except ConnectionResetError:  # the client went away between aiohttp's notice and the handler's cancel
            call.failed(asyncio.CancelledError())
            return web.StreamResponse(status=499)
        finally:
            await _close(events)  # a cancelled or failed stream stops its generation: the engine frees its slots

    # -------------------------------------------------------------------------------------- embeddings

    @_edge("Embeddings", wire.EMBEDDING_PARAMS)
    async def embeddings(self, request: web.Request, call: Call) -> web.StreamResponse:
        e = wire.embedding(await self._body(request))
        self._unary_deadline(request, call)
        served = await self.plane.embed(call, e.request)
        wire.check_dimensions(e, served.model, served.result.dimension)
        held = call.model(served.model)
        tokens = sum(len(held.encode_ids(t)) for t in e.request.texts)
        return _json(200, wire.embedding_body(e, served.model, served.result, tokens), call.request_id)


async def _close(events: AsyncIterator[Any]) -> None:
    close = getattr(events, "aclose", None)
    if close is not None:
        await close()


def _model(m: ModelAdapter) -> dict[str, Any]:
    created = 0
    stamp = m.spec.created_at
    if stamp:
        try:
            created = int(datetime.fromisoformat(stamp).timestamp())
        except ValueError:
            created = 0
    return {"id": m.name, "object": "model", "created": created, "owned_by": "plm", "family": m.family,
            "version": m.version, "tasks": list(m.tasks), "max_length": m.max_length}


async def start_http(plane: DataPlane, config: ServerConfig) -> HttpServer:
    """Bind and start the HTTP API on `config.http_port` (workers share it with SO_REUSEPORT)."""
    runner = web.AppRunner(OpenAIFrontend(plane, config).app(), handle_signals=False, access_log=None,
                           handler_cancellation=True, shutdown_timeout=_CLOSE_SECONDS)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.http_port, ssl_context=server_ssl_context(config.security),
                       reuse_port=config.reuse_port or None)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    port = next((a[1] for a in runner.addresses if isinstance(a, tuple)), config.http_port)
    return HttpServer(runner, port)
