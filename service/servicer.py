"""gRPC servicer: protobuf in, task call, protobuf out — and nothing else (DESIGN.md §7.2).

One wrapper per RPC kind gives every method the same edge: request id (from `x-request-id` or new), the
deadline, error → status mapping (service/errors.py), request metrics and one access-log line.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from plm.service import logs, reload, validation
from plm.service.admission import Admission
from plm.service.config import ServerConfig
from plm.service.errors import ServiceError
from plm.service.families.base import ModelAdapter
from plm.service.metrics import Metrics
from plm.service.registry import Registry
from plm.service.tasks import classify, fill_mask, next_sentence, next_word, score
from plm.service.tasks import embed as embed_task
from plm.service.tasks import generate as gen_task

from plm.api.v1 import admin_pb2 as admin_pb
from plm.api.v1 import admin_pb2_grpc as admin_grpc
from plm.api.v1 import plm_pb2 as pb
from plm.api.v1 import plm_pb2_grpc as pb_grpc

log = logging.getLogger("plm.access")

Req = TypeVar("Req")
Resp = TypeVar("Resp")

_FINISH = {
    gen_task.FINISH_LENGTH: pb.FINISH_REASON_LENGTH,
    gen_task.FINISH_STOP: pb.FINISH_REASON_STOP,
    gen_task.FINISH_EOS: pb.FINISH_REASON_EOS,
}


_INPUT_FIELDS = ("texts", "contexts", "prompts", "pairs")  # each is at least one row of the model's queue


@functools.cache
def _inputs_of(descriptor: Any) -> tuple[str, ...]:
    """The input fields a request type has (looked up once per type, not per call)."""
    return tuple(f for f in _INPUT_FIELDS if f in descriptor.fields_by_name)


class _Call:
    """Per-call facts gathered at the edge."""

    def __init__(self, context: grpc.aio.ServicerContext, registry: Registry, request: Any) -> None:
        request_id = next((v for k, v in context.invocation_metadata() or () if k == "x-request-id"), None)
        fields = _inputs_of(request.DESCRIPTOR)
        # At least one batch row per input: a lower bound of the rows this call will queue.
        self.inputs = max(1, sum(len(getattr(request, f)) for f in fields))
        self.request_id = str(request_id or os.urandom(8).hex())[:64]
        remaining = context.time_remaining()
        self.deadline = time.monotonic() + remaining if remaining is not None else None
        self.model_label = "-"
        self._registry = registry
        self._held: ModelAdapter | None = None

    def model(self, name: str, field: str = "model", work: bool = True, generate: bool = False) -> ModelAdapter:
        name = validation.model_name(name, field)
        if self._held is not None and self._held.name == name:
            model = self._held  # asked again (KServe resolves the model, then runs the plm.v1 method): one lease
        else:
            model = self._registry.acquire(name)
            self.release()
            self._held = model  # held until the call ends: a hot reload closes a replaced version only once free
        self.model_label = model.name  # only known names become label values: bounded cardinality
        if work:  # metadata calls (and Classify) are never refused here for a full queue
            model.refuse_if_full(self.inputs, generate)
        return model

    def release(self) -> None:
        if self._held is not None:
            self._registry.release(self._held)
            self._held = None


async def _fail(context: grpc.aio.ServicerContext, call: _Call, method: str, err: Exception) -> grpc.StatusCode:
    if isinstance(err, ServiceError):
        code, message = err.code, err.message
    else:
        log.exception("request_id=%s method=%s: unexpected error", call.request_id, method)
        code, message = grpc.StatusCode.INTERNAL, "internal error"
    await context.abort(code, f"{message} (request_id={call.request_id})")
    return code  # unreachable: abort raises


class _Edge:
    """What the edge of every RPC needs: the registry (models), admission, metrics."""

    def __init__(self, registry: Registry, admission: Admission, metrics: Metrics) -> None:
        self.registry = registry
        self.admission = admission
        self.metrics = metrics


class _EdgeCall:
    """One call's edge: admission, request id, error → status, metrics and the access-log line.

    The request id goes back in the trailing metadata of a unary call (with the response and status, in one
    write: a separate initial-metadata send cost 40 µs on top of the 217 µs of a bare grpc.aio call,
    benchmarks/grpc_floor.py) and in the initial metadata of a stream (the caller has it before the first token).
    A class with `begin`/`fail`/`end` rather than an async context manager: an async generator per call costs
    the event loop its creation, its registration with the loop and two extra coroutine steps.
    """

    __slots__ = ("admitted", "call", "code", "context", "method", "started", "svc")

    def __init__(self, svc: _Edge, method: str, request: Any, context: grpc.aio.ServicerContext) -> None:
        self.started = time.perf_counter()
        self.svc, self.method, self.context = svc, method, context
        self.call = _Call(context, svc.registry, request)
        self.code = grpc.StatusCode.OK
        self.admitted = False

    def begin(self) -> _Call:
        """Admission (raises when the call is refused); the call's facts once it is in."""
        self.svc.admission.enter()
        self.admitted = True
        return self.call

    async def fail(self, err: BaseException) -> None:
        """Record why the call failed; an error becomes its status (abort raises), a cancellation goes on."""
        if isinstance(err, Exception):
            self.code = err.code if isinstance(err, ServiceError) else grpc.StatusCode.INTERNAL
            await _fail(self.context, self.call, self.method, err)
        else:  # cancelled by the client (a stream stops here)
            self.code = grpc.StatusCode.CANCELLED

    def end(self) -> None:
        if self.admitted:
            self.svc.admission.leave()
        call = self.call
        call.release()
        elapsed = time.perf_counter() - self.started
        self.svc.metrics.request_done(self.method, call.model_label, self.code.name, elapsed)
        logs.access(call.request_id, self.method, call.model_label, self.code.name, elapsed)


def unary(method: str) -> Callable[[Callable[..., Awaitable[Resp]]], Callable[..., Awaitable[Resp]]]:
    def wrap(fn: Callable[..., Awaitable[Resp]]) -> Callable[..., Awaitable[Resp]]:
        @functools.wraps(fn)
        async def handler(self: _Edge, request: Any, context: grpc.aio.ServicerContext) -> Resp:
            edge = _EdgeCall(self, method, request, context)
            try:
                call = edge.begin()
                context.set_trailing_metadata((("x-request-id", call.request_id),))
                return await fn(self, request, call)
            except BaseException as err:
                await edge.fail(err)
                raise
            finally:
                edge.end()
        return handler
    return wrap


def streaming(method: str) -> Callable[[Callable[..., AsyncIterator[Resp]]], Callable[..., AsyncIterator[Resp]]]:
    def wrap(fn: Callable[..., AsyncIterator[Resp]]) -> Callable[..., AsyncIterator[Resp]]:
        @functools.wraps(fn)
        async def handler(self: _Edge, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Resp]:
            edge = _EdgeCall(self, method, request, context)
            try:
                call = edge.begin()
                await context.send_initial_metadata((("x-request-id", call.request_id),))
                async for item in fn(self, request, call):
                    yield item
            except BaseException as err:
                await edge.fail(err)
                raise
            finally:
                edge.end()
        return handler
    return wrap


class LanguageModelServicer(_Edge, pb_grpc.LanguageModelServiceServicer):
    def __init__(self, registry: Registry, admission: Admission, config: ServerConfig, metrics: Metrics) -> None:
        super().__init__(registry, admission, metrics)
        self.limits = config.limits
        self.stream_interval = config.stream_interval

    @unary("Score")
    async def Score(self, request: pb.ScoreRequest, call: _Call) -> pb.ScoreResponse:
        model = call.model(request.model)
        params = validation.score_params(request, self.limits)
        result = await score.score(model, params, call.deadline)
        return pb.ScoreResponse(
            model=model.name, model_version=model.version, method=result.method, ranking=result.ranking,
            scores=[pb.SentenceScore(
                text=s.text, log_prob=s.log_prob, log10_prob=s.log10_prob, perplexity=s.perplexity,
                word_perplexity=s.word_perplexity(result.add_eos), num_tokens=s.num_tokens,
                num_words=s.num_words, num_oov=s.num_oov,
                tokens=[pb.TokenScore(id=t.id, token=t.token, log_prob=t.log_prob, ngram_length=t.ngram_length,
                                      oov=t.oov) for t in s.tokens],
                words=[pb.WordScore(word=w, log_prob=lp) for w, lp in s.words],
            ) for s in result.sentences],
        )

    @unary("PredictNext")
    async def PredictNext(self, request: pb.PredictNextRequest, call: _Call) -> pb.PredictNextResponse:
        model = call.model(request.model)
        results = await next_word.predict_next(model, validation.next_params(request, self.limits), call.deadline)

        def cands(cs: tuple[next_word.CandidateResult, ...]) -> list[pb.Candidate]:
            return [pb.Candidate(text=c.text, prob=float(_exp(c.log_prob)), log_prob=c.log_prob,
                                 token_ids=c.token_ids) for c in cs]

        return pb.PredictNextResponse(model=model.name, model_version=model.version, predictions=[
            pb.NextPrediction(context=r.context, words=cands(r.words), tokens=cands(r.tokens)) for r in results
        ])

    @unary("Generate")
    async def Generate(self, request: pb.GenerateRequest, call: _Call) -> pb.GenerateResponse:
        model = call.model(request.model, generate=True)
        params = validation.generate_params(request, self.limits)
        gens = [pb.Generation(prompt=p) for p in params.prompts]
        async for ev in gen_task.generate(model, params, call.deadline, self.metrics):
            g = gens[ev.index]
            g.text += ev.text_delta
            g.token_ids.extend(ev.token_ids)
            g.tokens.extend(model.token_text(t) for t in ev.token_ids)
            if ev.finish_reason is not None:
                g.finish_reason = _FINISH[ev.finish_reason]
                g.prompt_tokens, g.generated_tokens = ev.prompt_tokens, ev.generated_tokens
        return pb.GenerateResponse(model=model.name, model_version=model.version, generations=gens)

    @streaming("GenerateStream")
    async def GenerateStream(
        self, request: pb.GenerateRequest, call: _Call
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        model = call.model(request.model, generate=True)
        params = validation.generate_params(request, self.limits)
        events = gen_task.generate(model, params, call.deadline, self.metrics)
        async for ev in gen_task.every(events, self.stream_interval):
            yield pb.GenerateStreamResponse(
                model=model.name, model_version=model.version, index=ev.index, text_delta=ev.text_delta,
                token_ids=ev.token_ids,
                finish_reason=_FINISH[ev.finish_reason] if ev.finish_reason else pb.FINISH_REASON_UNSPECIFIED,
                prompt_tokens=ev.prompt_tokens, generated_tokens=ev.generated_tokens,
            )

    @unary("FillMask")
    async def FillMask(self, request: pb.FillMaskRequest, call: _Call) -> pb.FillMaskResponse:
        model = call.model(request.model)
        results = await fill_mask.fill_mask(model, validation.fill_mask_params(request, self.limits), call.deadline)
        return pb.FillMaskResponse(model=model.name, model_version=model.version, results=[
            pb.FillMaskResult(text=r.text, masks=[
                pb.MaskFill(index=b, candidates=[
                    pb.FillMaskCandidate(score=_exp(c.log_prob), token=c.token_ids[0], token_str=c.token_str,
                                         sequence=c.sequence, log_prob=c.log_prob, token_ids=c.token_ids)
                    for c in cands])
                for b, cands in enumerate(r.masks)])
            for r in results])

    @unary("Embed")
    async def Embed(self, request: pb.EmbedRequest, call: _Call) -> pb.EmbedResponse:
        model = call.model(request.model)
        res = await embed_task.embed(model, validation.embed_params(request, self.limits), call.deadline)

        def neighbours(ns: tuple[tuple[str, float], ...]) -> list[pb.Neighbour]:
            return [pb.Neighbour(word=w, cosine=c) for w, c in ns]

        return pb.EmbedResponse(
            model=model.name, model_version=model.version, dimension=res.dimension,
            embeddings=[pb.Embedding(
                text=e.text, vector=e.vector.tolist() if e.vector is not None else [],
                tokens=[pb.TokenEmbedding(token=t, vector=v.tolist(), oov=oov) for t, v, oov in e.tokens],
                nearest=neighbours(e.nearest),
            ) for e in res.embeddings],
            analogies=[pb.AnalogyResult(query=pb.Analogy(a=a, b=b, c=c), answers=neighbours(ans))
                       for (a, b, c), ans in res.analogies],
        )

    @unary("PredictNextSentence")
    async def PredictNextSentence(self, request: pb.PredictNextSentenceRequest,
                                  call: _Call) -> pb.PredictNextSentenceResponse:
        model = call.model(request.model)
        results = await next_sentence.next_sentence(model, validation.nsp_params(request, self.limits), call.deadline)
        return pb.PredictNextSentenceResponse(model=model.name, model_version=model.version, results=[
            pb.NextSentenceResult(a=r.a, b=r.b, is_next_prob=r.prob, log_prob=r.log_prob) for r in results])

    @unary("Classify")
    async def Classify(self, request: pb.ClassifyRequest, call: _Call) -> pb.ClassifyResponse:
        model = call.model(request.model, work=False)  # its rows may go to the engine's prefix path: no bound here
        results, prefix_tokens = await classify.classify(
            model, validation.classify_params(request, self.limits), call.deadline)
        return pb.ClassifyResponse(model=model.name, model_version=model.version, prefix_tokens=prefix_tokens,
                                   results=[pb.Classification(query=r.query, label=r.label, scores=[
                                       pb.LabelScore(label=s.label, probability=s.probability,
                                                     log_likelihood=s.log_likelihood, score=s.score,
                                                     num_tokens=s.num_tokens) for s in r.scores])
                                            for r in results])

    @unary("ListModels")
    async def ListModels(self, request: pb.ListModelsRequest, call: _Call) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[model_info(m) for _, m in sorted(self.registry.models.items())])

    @unary("GetModel")
    async def GetModel(self, request: pb.GetModelRequest, call: _Call) -> pb.ModelInfo:
        return model_info(call.model(request.name, "name", work=False))


_ACTIONS = {reload.ADDED: admin_pb.RELOAD_ACTION_ADDED, reload.REPLACED: admin_pb.RELOAD_ACTION_REPLACED,
            reload.REMOVED: admin_pb.RELOAD_ACTION_REMOVED, reload.UNCHANGED: admin_pb.RELOAD_ACTION_UNCHANGED,
            reload.REJECTED: admin_pb.RELOAD_ACTION_REJECTED}


class AdminServicer(_Edge, admin_grpc.AdminServiceServicer):
    def __init__(self, reloader: reload.Reloader, admission: Admission, metrics: Metrics,
                 supervisor_pid: int = 0) -> None:
        super().__init__(reloader.registry, admission, metrics)
        self.reloader = reloader
        self.supervisor_pid = supervisor_pid

    @unary("ReloadModels")
    async def ReloadModels(self, request: admin_pb.ReloadModelsRequest, call: _Call) -> admin_pb.ReloadModelsResponse:
        """Reload this process's models and answer with the changes; one of several workers (service/workers.py)
        also asks its supervisor to have every worker reload (this one again: a no-op)."""
        changes = await self.reloader.reload()
        if self.supervisor_pid:
            os.kill(self.supervisor_pid, signal.SIGHUP)
        return admin_pb.ReloadModelsResponse(changes=[
            admin_pb.ModelChange(name=c.name, action=_ACTIONS[c.action], version=c.version, error=c.error)
            for c in changes])


def _exp(x: float) -> float:
    return math.exp(x) if x > -745 else 0.0  # below that exp underflows to 0 anyway; avoid -inf warnings


def model_info(m: ModelAdapter) -> pb.ModelInfo:
    """Manifest facts → ModelInfo. Numbers go to `figures`, short strings to `details`."""
    man = m.manifest
    info = pb.ModelInfo(
        name=m.name, version=m.version, family=m.family, tasks=m.tasks, vocab_size=m.vocab_size,
        max_length=m.max_length, tokenizer=m.tokenizer_kind, ready=True, providers=m.providers,
    )
    parity = man.get("parity") or {}
    if "max_abs_diff" in parity:
        info.parity_max_abs_diff = float(parity["max_abs_diff"])
        info.parity_tolerance = float(parity.get("tolerance", 0.0))
    for section in ("training", "evaluation"):
        for key, value in (man.get(section) or {}).items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                info.figures[f"{section}.{key}"] = float(value)
            elif isinstance(value, str) and len(value) <= 200:
                info.details[f"{section}.{key}"] = value
    for variant, spec in (man.get("variants") or {}).items():  # optimised graphs and what they cost in accuracy
        for key, value in (spec.get("accuracy") or {}).items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                info.figures[f"variants.{variant}.{key}"] = float(value)
    info.details["variant"] = m.variant or "exported"
    for key in ("created_at", "corpus_sha256", "description"):
        if isinstance(man.get(key), str):
            info.details[key] = man[key]
    for key, value in m.info().items():
        info.details[key] = ",".join(map(str, value)) if isinstance(value, list | tuple) else str(value)
    return info
