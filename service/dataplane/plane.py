"""The data plane: one typed request in, its task run, one typed result out — under every protocol.

One request's path: a front end (service/frontends/: plm.v1 gRPC, KServe v2, OpenAI HTTP) translates its wire format
to a typed request (requests.py) and opens a `Call`; `Call.begin` is admission. The DataPlane method then resolves
the model (name check, registry lease, the queue-full refusal), validates the request into the task's frozen
parameters (validation.py), and runs the task (service/tasks/), which tokenizes and calls the model family
(service/families/), whose batcher or runtime — or KV-cache engine, for generation — does the inference. The
typed result goes back to the front end, which writes its wire format; `Call.end` records the call.

What every front end needs per call lives here, protocol-free: the request id, the deadline, admission, the
model lease, the status of a failure (a ServiceError's code; anything else is logged and becomes INTERNAL),
the request metrics and the access-log line.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import AsyncIterator

from plm.service import logs
from plm.service.admission import Admission
from plm.service.config import Limits
from plm.service.dataplane import requests as rq
from plm.service.dataplane import validation
from plm.service.errors import Internal, ServiceError
from plm.service.families.base import ModelAdapter
from plm.service.metrics import Metrics
from plm.service.registry import Registry
from plm.service.tasks import classify, fill_mask, next_sentence, next_word, score
from plm.service.tasks import embed as embed_task
from plm.service.tasks import generate as gen_task
from plm.service.tasks.generate import StepEvent

log = logging.getLogger("plm.access")

OK, CANCELLED = "OK", "CANCELLED"


def probability(log_prob: float) -> float:
    """exp(log_prob), 0 where exp underflows anyway (no -inf warnings)."""
    return math.exp(log_prob) if log_prob > -745 else 0.0


class Call:
    """One call's facts and its edge: admission (`begin`), the model lease, the status (`failed`), and on `end`
    the request metrics and the access-log line.

    A class with `begin`/`failed`/`end` rather than an async context manager: an async generator per call costs
    the event loop its creation, its registration with the loop and two extra coroutine steps.
    """

    __slots__ = ("_held", "admitted", "code", "deadline", "method", "model_label", "plane", "protocol", "request_id",
                 "started")

    def __init__(self, plane: DataPlane, method: str, request_id: str | None, timeout: float | None,
                 protocol: str = "grpc") -> None:
        self.started = time.perf_counter()
        self.plane, self.method, self.protocol = plane, method, protocol
        # A generated id needs to be unique, not secret: `random` (reseeded in each forked worker) takes no system
        # call, where os.urandom's lets go of the GIL and must win it back from the model's thread.
        self.request_id = str(request_id or f"{random.getrandbits(64):016x}")[:64]
        self.deadline = time.monotonic() + timeout if timeout is not None else None
        self.model_label = "-"
        self.code = OK
        self.admitted = False
        self._held: ModelAdapter | None = None

    def begin(self) -> None:
        """Admission: raises when the call is refused (in-flight limit, drain)."""
        self.plane.admission.enter()
        self.admitted = True

    def model(self, name: str, field: str = "model", rows: int = 0, generate: bool = False) -> ModelAdapter:
        """The model by name, leased until the call ends; with `rows` (a lower bound of the rows the call will
        queue) refused at once when its queue cannot take them. Metadata calls pass no rows."""
        name = validation.model_name(name, field)
        if self._held is not None and self._held.name == name:
            model = self._held  # asked again (a front end resolves the model, then runs its task): one lease
        else:
            model = self.plane.registry.acquire(name)
            self.release()
            self._held = model  # held until the call ends: a hot reload closes a replaced version only once free
        self.model_label = model.name  # only known names become label values: bounded cardinality
        if rows:
            model.refuse_if_full(rows, generate)
        return model

    def release(self) -> None:
        if self._held is not None:
            self.plane.registry.release(self._held)
            self._held = None

    def failed(self, err: BaseException) -> ServiceError | None:
        """Record why the call failed and return the error to report: a ServiceError as it is, anything else as
        INTERNAL (logged with the request id, traceback included). None: cancelled by the client."""
        if isinstance(err, ServiceError):
            self.code = err.code
            return err
        if isinstance(err, Exception):
            log.exception("request_id=%s method=%s: unexpected error", self.request_id, self.method)
            self.code = Internal.code
            return Internal("internal error")
        self.code = CANCELLED  # a stream stops here
        return None

    def end(self) -> None:
        plane = self.plane
        if self.admitted:
            plane.admission.leave()
        self.release()
        elapsed = time.perf_counter() - self.started
        plane.metrics.request_done(self.method, self.model_label, self.code, elapsed, self.protocol)
        logs.access(self.request_id, self.method, self.model_label, self.code, elapsed)


class DataPlane:
    """The registry (models), admission, metrics and limits, and one method per task."""

    def __init__(self, registry: Registry, admission: Admission, metrics: Metrics, limits: Limits,
                 stream_interval: int = 1) -> None:
        self.registry = registry
        self.admission = admission
        self.metrics = metrics
        self.limits = limits
        self.stream_interval = stream_interval

    def call(self, method: str, request_id: str | None = None, timeout: float | None = None,
             protocol: str = "grpc") -> Call:
        """A new call of `method` (its name in metrics and the access log); `timeout`: seconds left to it;
        `protocol`: the metrics' protocol label (grpc, http)."""
        return Call(self, method, request_id, timeout, protocol)

    # ------------------------------------------------------------------------------------------ models

    def ready(self) -> bool:
        """Every model loaded, and at least one."""
        return bool(self.registry.models) and not self.registry.failed

    def models(self) -> list[ModelAdapter]:
        """The models served, by name."""
        return [m for _, m in sorted(self.registry.models.items())]

    def describe(self, call: Call, name: str) -> ModelAdapter:
        """One model, for its metadata (never refused for a full queue)."""
        return call.model(name)

    # ------------------------------------------------------------------------------------------- tasks

    async def score(self, call: Call, req: rq.ScoreRequest) -> rq.Served[score.ScoreResult]:
        model = call.model(req.model, rows=max(1, len(req.texts)))
        result = await score.score(model, validation.score_params(req, self.limits), call.deadline)
        return rq.Served(model.name, model.version, result)

    async def predict_next(self, call: Call, req: rq.PredictNextRequest) -> rq.Served[list[next_word.NextResult]]:
        model = call.model(req.model, rows=max(1, len(req.contexts)))
        result = await next_word.predict_next(model, validation.next_params(req, self.limits), call.deadline)
        return rq.Served(model.name, model.version, result)

    async def generate(self, call: Call, req: rq.GenerateRequest) -> rq.Served[list[rq.Generation]]:
        """Every prompt's whole generation."""
        model = call.model(req.model, rows=max(1, len(req.prompts)), generate=True)
        params = validation.generate_params(req, self.limits)
        gens = [rq.Generation(p) for p in params.prompts]
        async for ev in gen_task.generate(model, params, call.deadline, self.metrics):
            g = gens[ev.index]
            g.text += ev.text_delta
            g.token_ids.extend(ev.token_ids)
            g.tokens.extend(model.token_text(t) for t in ev.token_ids)
            if ev.finish_reason is not None:
                g.finish_reason = ev.finish_reason
                g.prompt_tokens, g.generated_tokens = ev.prompt_tokens, ev.generated_tokens
        return rq.Served(model.name, model.version, gens)

    async def generate_stream(self, call: Call, req: rq.GenerateRequest) -> rq.Served[AsyncIterator[StepEvent]]:
        """The model and the request's fields checked now, the token-level checks (window, truncation) with the
        first event; the events as tokens come, each prompt's merged per `stream_interval` tokens (its first and
        last go out at once). A front end that must answer a refusal with its own status awaits the first event
        before it starts the response (the HTTP front end does)."""
        model = call.model(req.model, rows=max(1, len(req.prompts)), generate=True)
        params = validation.generate_params(req, self.limits)
        events = gen_task.every(gen_task.generate(model, params, call.deadline, self.metrics), self.stream_interval)
        return rq.Served(model.name, model.version, events)

    async def fill_mask(self, call: Call, req: rq.FillMaskRequest) -> rq.Served[list[fill_mask.FillResult]]:
        model = call.model(req.model, rows=max(1, len(req.texts)))
        result = await fill_mask.fill_mask(model, validation.fill_mask_params(req, self.limits), call.deadline)
        return rq.Served(model.name, model.version, result)

    async def embed(self, call: Call, req: rq.EmbedRequest) -> rq.Served[embed_task.EmbedResponse]:
        model = call.model(req.model, rows=max(1, len(req.texts)))
        result = await embed_task.embed(model, validation.embed_params(req, self.limits), call.deadline)
        return rq.Served(model.name, model.version, result)

    async def next_sentence(self, call: Call, req: rq.NextSentenceRequest) -> rq.Served[list[next_sentence.NspResult]]:
        model = call.model(req.model, rows=max(1, len(req.pairs)))
        result = await next_sentence.next_sentence(model, validation.nsp_params(req, self.limits), call.deadline)
        return rq.Served(model.name, model.version, result)

    async def classify(self, call: Call,
                       req: rq.ClassifyRequest) -> rq.Served[tuple[list[classify.ClassifyResult], int]]:
        """The classifications and the prefix's token count."""
        model = call.model(req.model)  # its rows may go to the engine's prefix path: no queue bound here
        result = await classify.classify(model, validation.classify_params(req, self.limits), call.deadline)
        return rq.Served(model.name, model.version, result)
