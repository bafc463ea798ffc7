"""The OpenAI-compatible HTTP front end: `/v1/completions`, `/v1/embeddings`, `/v1/models`, over the data plane.

The third sibling of plm.v1 and KServe v2: each handler translates an HTTP JSON body to the data plane's typed
request (openai_http_wire.py), awaits the data plane (admission, validation, model lease, the task, batchers
and engine are shared with gRPC, in the same process and event loop) and writes the typed result as JSON or,
for `stream: true`, as server-sent events ending `data: [DONE]`. Errors are OpenAI's error body with the HTTP
status of the error table (openai_http_wire.STATUS).

The server is aiohttp's: asyncio-native, so it runs on grpc.aio's own event loop and reaches the models with
no second copy and no thread hop; it streams responses, bounds request bodies, and cancels a handler whose
client went away (`handler_cancellation`), which closes a stream's generation so its engine slot frees.

The same app serves plm.v1 itself as JSON (json_http.py: `POST /plm.v1.LanguageModelService/<Method>`).

Per call, as for gRPC: `X-Request-Id` in (or made) and out; a deadline from `X-Request-Timeout` (seconds) or,
for a unary call, the OpenAI SDKs' `X-Stainless-Read-Timeout`; `Authorization: Bearer` checked against
`[security]`'s tokens (all paths but `/health`); TLS from the same settings; metrics with protocol="http".
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from aiohttp import web
from plm.service.admission import GLOBAL
from plm.service.config import ServerConfig
from plm.service.dataplane import requests as rq
from plm.service.dataplane.plane import Call, DataPlane
from plm.service.errors import InvalidArgument, ServiceError
from plm.service.families.base import ModelAdapter
from plm.service.frontends import json_http, openai_logprobs
from plm.service.frontends import openai_http_wire as wire
from plm.service.frontends.http_edge import (
    admit,
    close_events,
    header_seconds,
    json_object,
    json_response,
    new_call,
    read_body,
    stream_response,
)
from plm.service.security import bearer_accepted, server_ssl_context, token_bytes
from plm.service.tasks import generate as gen_task
from plm.service.tasks.generate import StepEvent
from plm.service.tasks.score import SentenceResult

log = logging.getLogger("plm.http")

OPEN_PATHS = frozenset(("/health",))  # probes carry no token (gRPC's health service is open likewise)
_CLOSE_SECONDS = 1.0  # after the drain: time for responses being written to finish
_NO_CHAT = ("plm serves no chat models: its generators are plain language models without a chat template or "
            "roles, so there is no honest mapping of messages to a prompt. Use POST /v1/completions with a prompt")
_json = json_response

Handler = Callable[["OpenAIFrontend", web.Request, Call], Awaitable[web.StreamResponse]]


def _edge(method: str, names: Mapping[str, str] = wire.COMPLETION_PARAMS) -> Callable[[Handler], Any]:
    """A handler `fn(self, request, call)` inside a data-plane call: admission, the request id, the deadline
    of X-Request-Timeout, and a failure as OpenAI's error body (an InvalidArgument's field renamed by `names`)."""
    def wrap(fn: Handler) -> Callable[[OpenAIFrontend, web.Request], Awaitable[web.StreamResponse]]:
        async def handler(self: OpenAIFrontend, request: web.Request) -> web.StreamResponse:
            call = new_call(self.plane, method, request)
            try:
                admit(call, request)
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
        self.json = json_http.JsonFrontend(plane, config.limits.max_message_bytes)
        self._open_prefixes = tuple(p for p in self.json.prefixes if p.strip("/") in config.security.open_services)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body, middlewares=[self._guard])
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_get("/v1/models/{model}", self.get_model)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/health", self.health)
        self.json.add_routes(app)
        return app

    @web.middleware
    async def _guard(self, request: web.Request,
                     handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        """The bearer token before any work (paths of `[security] open_services` and /health are open), and
        aiohttp's own refusals (no route, wrong method) in OpenAI's error shape, or Google's under plm.v1's JSON."""
        path = request.path
        if (self._tokens and path not in OPEN_PATHS and not path.startswith(self._open_prefixes)
                and not bearer_accepted(request.headers.get("Authorization"), self._tokens)):
            self.plane.metrics.rejections.labels(GLOBAL, "unauthenticated").inc()
            message = "missing or invalid credentials: send header 'Authorization: Bearer <token>'"
            if self.json.owns(path):
                return json_http.error_response("UNAUTHENTICATED", message)
            status, body = wire.error_body("UNAUTHENTICATED", message, None)
            return _json(status, body)
        try:
            return await handler(request)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            message = f"{request.method} {path}: {e.reason}"
            if self.json.owns(path):
                return json_http.error_response(json_http.status_name(e.status), message, http=e.status)
            kind = "invalid_request_error" if e.status < 500 else "server_error"
            return _json(e.status, {"error": {"message": message, "type": kind, "param": None,
                                              "code": str(e.status)}})

    async def _body(self, request: web.Request) -> dict[str, Any]:
        return json_object(await read_body(request, self.max_body))

    @staticmethod
    def _unary_deadline(request: web.Request, call: Call) -> None:
        """The OpenAI SDKs send their read timeout: for a unary call, the time the client waits for the answer."""
        if call.deadline is None:
            timeout = header_seconds(request, "X-Stainless-Read-Timeout")
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
        if c.logprobs is not None and (c.logprobs > 0 or (c.stream and c.generate)):
            # alternatives, or a stream's per-token figures: a model without them is refused before any work
            openai_logprobs.predictor(call, c.request.model, c.logprobs)
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
        if c.logprobs is not None:
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
        tops = None
        if c.logprobs and scores is not None:
            tops = await _alternatives(call, model, scores, [0 if c.echo else len(g.prompt) for g in gens],
                                       c.logprobs)
        return _json(200, wire.completion_body(c, call.request_id, model, gens, scores, tops), call.request_id)

    async def _stream(self, request: web.Request, call: Call, c: wire.Completion) -> web.StreamResponse:
        """Server-sent events: a chunk per token (or per `stream_interval` tokens) of each choice, after its
        echoed prompt; the first event is awaited before the response starts, so a refusal (a prompt too long
        for the window) is still its HTTP status; an error after that is an error event, and the stream ends
        without [DONE]."""
        if c.generate:
            served = await self.plane.generate_stream(call, c.request)
            model, events = served.model, served.result
        else:  # echo with max_tokens 0: each prompt's chunk and its end
            held = call.model(c.request.model)
            model, events = held.name, _finished(held, c.request.prompts)
        stream = _Stream(call, c, model, int(time.time()))
        try:
            await stream.score_prompts(self.plane)
        except BaseException:
            await close_events(events)  # not started yet: no generation ran
            raise

        def error_event(error: ServiceError) -> bytes:
            return wire.stream_error(wire.renamed(error, wire.COMPLETION_PARAMS, c.n, c.single), call.request_id)

        return await stream_response(request, call, events, {"Content-Type": "text/event-stream",
                                                             "Cache-Control": "no-cache"},
                                     stream.encode, error_event, stream.tail)

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


async def _alternatives(call: Call, model: str, scores: Sequence[SentenceResult], starts: Sequence[int],
                        k: int) -> list[list[dict[str, float]]]:
    """Per scored text, the k alternatives at each of its tokens from character `starts[i]` on (wire.reported),
    every text's positions in one call."""
    contexts: list[list[int]] = []
    chosen: list[int] = []
    owners: list[int] = []
    for i, sentence in enumerate(scores):
        ids = [t.id for t in sentence.tokens]
        for j, _ in wire.reported(sentence, starts[i]):
            contexts.append(ids[:j])
            chosen.append(ids[j])
            owners.append(i)
    found = await openai_logprobs.positions(call, model, contexts, chosen, k)
    tops: list[list[dict[str, float]]] = [[] for _ in scores]
    for i, position in zip(owners, found, strict=True):
        tops[i].append(position.top)
    return tops


async def _finished(model: ModelAdapter, prompts: Sequence[str]) -> AsyncIterator[StepEvent]:
    """The events of choices that generate nothing (echo with max_tokens 0): each ends at once."""
    for i, prompt in enumerate(prompts):
        yield StepEvent(i, "", (), gen_task.FINISH_LENGTH, len(model.encode_ids(prompt)))


class _Stream:
    """A streamed completion's chunks: each choice's echoed prompt before its first text, its tokens'
    log-probabilities (and alternatives) as they come, the usage at the end."""

    def __init__(self, call: Call, c: wire.Completion, model: str, created: int) -> None:
        self.call, self.c, self.model, self.created = call, c, model, created
        self.prompt_tokens = self.completion_tokens = 0
        self.started: set[int] = set()
        self.prompt_ids: list[list[int]] = []  # per prompt (not per choice): the context of its first new token
        self.prompt_scores: Sequence[SentenceResult] = ()
        self.prompt_tops: list[list[dict[str, float]]] | None = None
        self.context: dict[int, list[int]] = {}  # choice → its prompt's ids and the tokens so far
        self.offset: dict[int, int] = {}  # choice → characters of prompt and completion so far

    async def score_prompts(self, plane: DataPlane) -> None:
        """What the stream needs of its prompts before the first event: their ids (the first token's context),
        and, echoed with logprobs, their Score and alternatives."""
        c = self.c
        if c.logprobs is None:
            return
        held = self.call.model(self.model)
        self.prompt_ids = [held.encode_ids(p) for p in c.prompts]
        if c.echo:
            scored = await plane.score(self.call, rq.ScoreRequest(self.model, c.prompts, add_eos=False,
                                                                  per_token=True))
            self.prompt_scores = scored.result.sentences
            if c.logprobs:
                self.prompt_tops = await _alternatives(self.call, self.model, self.prompt_scores,
                                                       [0] * len(c.prompts), c.logprobs)

    def _chunk(self, choice: dict[str, Any]) -> bytes:
        return wire.chunk(self.call.request_id, self.model, self.created, [choice])

    async def encode(self, ev: StepEvent) -> bytes:
        c, i = self.c, ev.index
        out = b""
        if i not in self.started:
            self.started.add(i)
            prompt = c.request.prompts[i]
            self.offset[i] = len(prompt)
            if c.logprobs is not None:
                self.context[i] = list(self.prompt_ids[i // c.n])
            if c.echo:
                lp = None
                if c.logprobs is not None:
                    tops = self.prompt_tops[i // c.n] if self.prompt_tops is not None else None
                    lp = wire.sentence_logprobs(self.prompt_scores[i // c.n], 0, tops)
                out += self._chunk({"index": i, "text": prompt, "logprobs": lp, "finish_reason": None})
        lp = None
        if c.logprobs is not None and ev.token_ids:
            lp = await self._logprobs(ev)
        self.offset[i] += len(ev.text_delta)
        finish = ev.finish_reason
        if finish:
            if i % c.n == 0:
                self.prompt_tokens += ev.prompt_tokens
            self.completion_tokens += ev.generated_tokens
            return out + self._chunk(wire.completion_choice(i, ev.text_delta, finish, lp))
        return out + self._chunk({"index": i, "text": ev.text_delta, "logprobs": lp, "finish_reason": None})

    async def _logprobs(self, ev: StepEvent) -> dict[str, Any]:
        """The generated tokens of one event: log P(token | BOS, prompt, tokens before it) and the alternatives,
        read at the engine's own token ids."""
        context, ids = self.context[ev.index], list(ev.token_ids)
        k = self.c.logprobs or 0
        found = await openai_logprobs.positions(self.call, self.model, [context + ids[:j] for j in range(len(ids))],
                                                ids, k)
        context.extend(ids)
        held = self.call.model(self.model)
        texts = [held.token_text(t) for t in ids]
        base = self.offset[ev.index]
        offsets = [base + o for o in wire.text_offsets(ev.text_delta, texts)]
        return wire.logprobs_body(texts, [p.log_prob for p in found], offsets,
                                  [p.top for p in found] if k else None)

    def tail(self) -> bytes:
        """OpenAI's last chunk with stream_options.include_usage (no choices, the usage), then [DONE]."""
        if not self.c.include_usage:
            return wire.DONE
        return wire.chunk(self.call.request_id, self.model, self.created, [],
                          wire.usage(self.prompt_tokens, self.completion_tokens)) + wire.DONE


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
