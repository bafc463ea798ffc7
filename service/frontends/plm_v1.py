"""The plm.v1 gRPC front end (`LanguageModelService`, `AdminService`): protobuf in, data plane, protobuf out.

Each method translates its request message to the data plane's typed request (service/dataplane/requests.py),
awaits the data plane's task method (admission, validation, model lookup, the task and the model's batcher
or engine happen there) and writes the typed result as the response message. A validation error's field is
renamed to the proto field through the method's table below (`max_new_tokens` → `sampling.max_new_tokens`).
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator, Mapping
from typing import Any

from plm.service import reload
from plm.service.config import ServerConfig
from plm.service.dataplane import requests as rq
from plm.service.dataplane.plane import Call, DataPlane, probability
from plm.service.errors import InvalidArgument
from plm.service.families.base import ModelAdapter
from plm.service.frontends.grpc_edge import streaming, unary
from plm.service.tasks import generate as gen_task
from plm.service.tasks import next_word

from plm.api.v1 import admin_pb2 as admin_pb
from plm.api.v1 import admin_pb2_grpc as admin_grpc
from plm.api.v1 import plm_pb2 as pb
from plm.api.v1 import plm_pb2_grpc as pb_grpc

_FINISH = {
    gen_task.FINISH_LENGTH: pb.FINISH_REASON_LENGTH,
    gen_task.FINISH_STOP: pb.FINISH_REASON_STOP,
    gen_task.FINISH_EOS: pb.FINISH_REASON_EOS,
}
_POOLING = {pb.POOLING_UNSPECIFIED: None, pb.POOLING_MEAN: "mean", pb.POOLING_CLS: "cls", pb.POOLING_NONE: "none"}
_SCORING = {pb.LABEL_SCORING_UNSPECIFIED: None, pb.LABEL_SCORING_SUM: "sum",
            pb.LABEL_SCORING_TOKEN_MEAN: "token_mean", pb.LABEL_SCORING_PER_CHAR: "per_char"}


def _same(*fields: str) -> dict[str, str]:
    return {f: f for f in fields}


# Data plane field → proto field, per method (the `at` part, `[2]` or `[0].a`, follows either name).
_SAMPLING = ("temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens", "min_new_tokens", "stop",
             "seed")
FIELDS: Mapping[str, Mapping[str, str]] = {
    "Score": _same("model", "texts", "add_eos", "per_token", "sources"),
    "PredictNext": _same("model", "contexts", "top_k", "include_tokens", "beam_width", "max_word_tokens"),
    "Generate": {**_same("model", "prompts", "truncate_prompt"), **{f: f"sampling.{f}" for f in _SAMPLING}},
    "FillMask": _same("model", "texts", "top_k", "targets"),
    "Embed": _same("model", "texts", "pooling", "normalize", "layer_weights", "nearest_k", "analogies",
                   "include_tokens"),
    "PredictNextSentence": _same("model", "pairs"),
    "Classify": _same("model", "queries", "labels", "demonstrations", "instruction", "template", "scoring",
                      "calibrate", "content_free"),
    "GetModel": {"model": "name"},
}


def _generate_request(r: pb.GenerateRequest) -> rq.GenerateRequest:
    s = r.sampling
    return rq.GenerateRequest(
        r.model, r.prompts,
        temperature=s.temperature if s.HasField("temperature") else None,
        top_k=s.top_k if s.HasField("top_k") else None,
        top_p=s.top_p if s.HasField("top_p") else None,
        repetition_penalty=s.repetition_penalty if s.HasField("repetition_penalty") else None,
        max_new_tokens=s.max_new_tokens if s.HasField("max_new_tokens") else None,
        min_new_tokens=s.min_new_tokens if s.HasField("min_new_tokens") else None,
        stop=s.stop, seed=s.seed if s.HasField("seed") else None, truncate_prompt=r.truncate_prompt)


def _add_candidates(field: Any, cs: tuple[next_word.CandidateResult, ...]) -> None:
    """Candidates written into a repeated field in place (`add`): a message built apart and then put in the
    list is built twice, as protobuf copies it in."""
    add = field.add
    for c in cs:
        add(text=c.text, prob=probability(c.log_prob), log_prob=c.log_prob, token_ids=c.token_ids)


def _neighbours(ns: tuple[tuple[str, float], ...]) -> list[pb.Neighbour]:
    return [pb.Neighbour(word=w, cosine=c) for w, c in ns]


class LanguageModelServicer(pb_grpc.LanguageModelServiceServicer):
    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    @unary("Score", FIELDS["Score"])
    async def Score(self, request: pb.ScoreRequest, call: Call) -> pb.ScoreResponse:
        served = await self.plane.score(call, rq.ScoreRequest(
            request.model, request.texts, request.add_eos if request.HasField("add_eos") else None,
            request.per_token if request.HasField("per_token") else None, request.sources))
        result = served.result
        response = pb.ScoreResponse(model=served.model, model_version=served.version, method=result.method,
                                    ranking=result.ranking)
        add_score = response.scores.add
        for s in result.sentences:  # written in place (`add`): a message built apart is copied in again
            m = add_score(text=s.text, log_prob=s.log_prob, log10_prob=s.log10_prob, perplexity=s.perplexity,
                          word_perplexity=s.word_perplexity(result.add_eos), num_tokens=s.num_tokens,
                          num_words=s.num_words, num_oov=s.num_oov)
            add_token, add_word = m.tokens.add, m.words.add
            for t in s.tokens:
                add_token(id=t.id, token=t.token, log_prob=t.log_prob, ngram_length=t.ngram_length, oov=t.oov)
            for w, lp in s.words:
                add_word(word=w, log_prob=lp)
        return response

    @unary("PredictNext", FIELDS["PredictNext"])
    async def PredictNext(self, request: pb.PredictNextRequest, call: Call) -> pb.PredictNextResponse:
        served = await self.plane.predict_next(call, rq.PredictNextRequest(
            request.model, request.contexts, request.top_k if request.HasField("top_k") else None,
            request.include_tokens, request.beam_width if request.HasField("beam_width") else None,
            request.max_word_tokens if request.HasField("max_word_tokens") else None))
        response = pb.PredictNextResponse(model=served.model, model_version=served.version)
        for r in served.result:
            prediction = response.predictions.add(context=r.context)
            _add_candidates(prediction.words, r.words)
            if r.tokens:
                _add_candidates(prediction.tokens, r.tokens)
        return response

    @unary("Generate", FIELDS["Generate"])
    async def Generate(self, request: pb.GenerateRequest, call: Call) -> pb.GenerateResponse:
        served = await self.plane.generate(call, _generate_request(request))
        return pb.GenerateResponse(model=served.model, model_version=served.version, generations=[
            pb.Generation(prompt=g.prompt, text=g.text, token_ids=g.token_ids, tokens=g.tokens,
                          finish_reason=_FINISH.get(g.finish_reason, pb.FINISH_REASON_UNSPECIFIED),
                          prompt_tokens=g.prompt_tokens, generated_tokens=g.generated_tokens)
            for g in served.result])

    @streaming("GenerateStream", FIELDS["Generate"])
    async def GenerateStream(self, request: pb.GenerateRequest, call: Call) -> AsyncIterator[pb.GenerateStreamResponse]:
        served = await self.plane.generate_stream(call, _generate_request(request))
        async for ev in served.result:
            yield pb.GenerateStreamResponse(
                model=served.model, model_version=served.version, index=ev.index, text_delta=ev.text_delta,
                token_ids=ev.token_ids,
                finish_reason=_FINISH[ev.finish_reason] if ev.finish_reason else pb.FINISH_REASON_UNSPECIFIED,
                prompt_tokens=ev.prompt_tokens, generated_tokens=ev.generated_tokens,
            )

    @unary("FillMask", FIELDS["FillMask"])
    async def FillMask(self, request: pb.FillMaskRequest, call: Call) -> pb.FillMaskResponse:
        served = await self.plane.fill_mask(call, rq.FillMaskRequest(
            request.model, request.texts, request.top_k if request.HasField("top_k") else None, request.targets))
        response = pb.FillMaskResponse(model=served.model, model_version=served.version)
        for r in served.result:  # written in place (`add`), as PredictNext's
            result = response.results.add(text=r.text, completed=r.completed)
            for b, cands in enumerate(r.masks):
                add = result.masks.add(index=b).candidates.add
                for c in cands:
                    add(score=probability(c.log_prob), token=c.token_ids[0], token_str=c.token_str,
                        sequence=c.sequence, log_prob=c.log_prob, token_ids=c.token_ids)
        return response

    @unary("Embed", FIELDS["Embed"])
    async def Embed(self, request: pb.EmbedRequest, call: Call) -> pb.EmbedResponse:
        if request.pooling not in _POOLING:
            raise InvalidArgument("pooling", f"unknown value {request.pooling}; use POOLING_MEAN, POOLING_CLS or "
                                             "POOLING_NONE")
        served = await self.plane.embed(call, rq.EmbedRequest(
            request.model, request.texts, _POOLING[request.pooling], request.normalize, request.layer_weights,
            request.nearest_k if request.HasField("nearest_k") else None,
            [(a.a, a.b, a.c) for a in request.analogies], request.include_tokens))
        res = served.result
        return pb.EmbedResponse(
            model=served.model, model_version=served.version, dimension=res.dimension,
            embeddings=[pb.Embedding(
                text=e.text, vector=e.vector.tolist() if e.vector is not None else [],
                tokens=[pb.TokenEmbedding(token=t, vector=v.tolist(), oov=oov) for t, v, oov in e.tokens],
                nearest=_neighbours(e.nearest),
            ) for e in res.embeddings],
            analogies=[pb.AnalogyResult(query=pb.Analogy(a=a, b=b, c=c), answers=_neighbours(ans))
                       for (a, b, c), ans in res.analogies],
        )

    @unary("PredictNextSentence", FIELDS["PredictNextSentence"])
    async def PredictNextSentence(self, request: pb.PredictNextSentenceRequest,
                                  call: Call) -> pb.PredictNextSentenceResponse:
        served = await self.plane.next_sentence(call, rq.NextSentenceRequest(
            request.model, [(p.a, p.b) for p in request.pairs]))
        return pb.PredictNextSentenceResponse(model=served.model, model_version=served.version, results=[
            pb.NextSentenceResult(a=r.a, b=r.b, is_next_prob=r.prob, log_prob=r.log_prob) for r in served.result])

    @unary("Classify", FIELDS["Classify"])
    async def Classify(self, request: pb.ClassifyRequest, call: Call) -> pb.ClassifyResponse:
        if request.scoring not in _SCORING:
            raise InvalidArgument("scoring", f"unknown value {request.scoring}; use "
                                             "LABEL_SCORING_SUM/_TOKEN_MEAN/_PER_CHAR")
        served = await self.plane.classify(call, rq.ClassifyRequest(
            request.model, request.queries, request.labels,
            [(d.text, d.label) for d in request.demonstrations], request.instruction, request.template,
            _SCORING[request.scoring], request.calibrate, request.content_free))
        results, prefix_tokens = served.result
        return pb.ClassifyResponse(model=served.model, model_version=served.version, prefix_tokens=prefix_tokens,
                                   results=[pb.Classification(query=r.query, label=r.label, scores=[
                                       pb.LabelScore(label=s.label, probability=s.probability,
                                                     log_likelihood=s.log_likelihood, score=s.score,
                                                     num_tokens=s.num_tokens) for s in r.scores])
                                            for r in results])

    @unary("ListModels")
    async def ListModels(self, request: pb.ListModelsRequest, call: Call) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[model_info(m) for m in self.plane.models()])

    @unary("GetModel", FIELDS["GetModel"])
    async def GetModel(self, request: pb.GetModelRequest, call: Call) -> pb.ModelInfo:
        return model_info(self.plane.describe(call, request.name))


_ACTIONS = {reload.ADDED: admin_pb.RELOAD_ACTION_ADDED, reload.REPLACED: admin_pb.RELOAD_ACTION_REPLACED,
            reload.REMOVED: admin_pb.RELOAD_ACTION_REMOVED, reload.UNCHANGED: admin_pb.RELOAD_ACTION_UNCHANGED,
            reload.REJECTED: admin_pb.RELOAD_ACTION_REJECTED}


class AdminServicer(admin_grpc.AdminServiceServicer):
    """plm.v1's admin service: the same per-call edge (admission, metrics, access log) as the data plane's."""

    def __init__(self, plane: DataPlane, reloader: reload.Reloader, config: ServerConfig) -> None:
        self.plane = plane
        self.reloader = reloader
        self.supervisor_pid = config.supervisor_pid

    @unary("ReloadModels")
    async def ReloadModels(self, request: admin_pb.ReloadModelsRequest, call: Call) -> admin_pb.ReloadModelsResponse:
        """Reload this process's models and answer with the changes; one of several workers (service/workers.py)
        also asks its supervisor to have every worker reload (this one again: a no-op)."""
        changes = await self.reloader.reload()
        if self.supervisor_pid:
            os.kill(self.supervisor_pid, signal.SIGHUP)
        return admin_pb.ReloadModelsResponse(changes=[
            admin_pb.ModelChange(name=c.name, action=_ACTIONS[c.action], version=c.version, error=c.error)
            for c in changes])


def model_info(m: ModelAdapter) -> pb.ModelInfo:
    """Manifest facts → ModelInfo. Numbers go to `figures`, short strings to `details`."""
    spec = m.spec
    info = pb.ModelInfo(
        name=m.name, version=m.version, family=m.family, tasks=m.tasks, vocab_size=m.vocab_size,
        max_length=m.max_length, tokenizer=m.tokenizer_kind, ready=True, providers=m.providers,
    )
    parity = spec.parity
    if "max_abs_diff" in parity:
        info.parity_max_abs_diff = float(parity["max_abs_diff"])
        info.parity_tolerance = float(parity.get("tolerance", 0.0))
    for section, facts in (("training", spec.training), ("evaluation", spec.evaluation)):
        for key, value in facts.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                info.figures[f"{section}.{key}"] = float(value)
            elif isinstance(value, str) and len(value) <= 200:
                info.details[f"{section}.{key}"] = value
    for variant, graphs in spec.variants.items():  # optimised graphs and what they cost in accuracy
        for key, value in graphs.accuracy.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                info.figures[f"variants.{variant}.{key}"] = float(value)
    info.details["variant"] = m.variant or "exported"
    info.details.update(created_at=spec.created_at, corpus_sha256=spec.corpus_sha256, description=spec.description)
    for key, value in m.info().items():
        info.details[key] = ",".join(map(str, value)) if isinstance(value, list | tuple) else str(value)
    return info
