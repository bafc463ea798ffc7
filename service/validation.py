"""Request messages → validated, frozen task parameters. Protobuf stops here (DESIGN.md §7.3).

Every check that needs no model lives here and raises InvalidArgument naming the field and the limit.
Checks that need the model's tokenizer (lengths in tokens) live in service/tasks/common.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from plm.service.config import Limits
from plm.service.errors import InvalidArgument
from plm.service.tasks.classify import (
    DEFAULT_TEMPLATE,
    SCORING_PER_CHAR,
    SCORING_SUM,
    SCORING_TOKEN_MEAN,
    ClassifyParams,
    split_template,
)
from plm.service.tasks.embed import POOL_CLS, POOL_DEFAULT, POOL_MEAN, POOL_NONE, EmbedParams
from plm.service.tasks.fill_mask import FillMaskParams
from plm.service.tasks.generate import GenerateParams, SamplingParams
from plm.service.tasks.next_sentence import NspParams
from plm.service.tasks.next_word import NextParams
from plm.service.tasks.score import ScoreParams

from plm.api.v1 import plm_pb2 as pb


def model_name(value: str, field: str = "model") -> str:
    if not value:
        raise InvalidArgument(field, "is required (see ListModels for the names)")
    if len(value) > 64:
        raise InvalidArgument(field, f"is {len(value)} characters; model names have at most 64")
    return value


def _texts(values: Sequence[str], field: str, limits: Limits, allow_empty: bool = False) -> tuple[str, ...]:
    if not values:
        raise InvalidArgument(field, "is empty; give at least one")
    if len(values) > limits.max_inputs_per_request:
        raise InvalidArgument(
            field, f"has {len(values)} entries; at most {limits.max_inputs_per_request} per request"
        )
    for i, text in enumerate(values):
        _check_text(text, f"{field}[{i}]", limits, allow_empty)
    return tuple(values)


def _check_text(text: str, field: str, limits: Limits, allow_empty: bool = False) -> None:
    if not allow_empty and not text.strip():
        raise InvalidArgument(field, "is empty")
    if len(text) > limits.max_text_chars:
        raise InvalidArgument(field, f"is {len(text)} characters; at most {limits.max_text_chars}")
    if "\x00" in text:
        raise InvalidArgument(field, "contains a NUL character")


def _int_in(msg: Any, name: str, default: int, lo: int, hi: int, field: str) -> int:
    if not msg.HasField(name):
        return default
    value = int(getattr(msg, name))
    if not lo <= value <= hi:
        raise InvalidArgument(field, f"is {value}; must be between {lo} and {hi}")
    return value


def _float_in(msg: Any, name: str, default: float, lo: float, hi: float, field: str,
              lo_open: bool = False) -> float:
    if not msg.HasField(name):
        return default
    value = float(getattr(msg, name))
    if math.isnan(value) or value > hi or value < lo or (lo_open and value == lo):
        bound = f"> {lo}" if lo_open else f">= {lo}"
        raise InvalidArgument(field, f"is {value}; must be {bound} and <= {hi}")
    return value


def score_params(req: pb.ScoreRequest, limits: Limits) -> ScoreParams:
    return ScoreParams(
        texts=_texts(req.texts, "texts", limits),
        add_eos=req.add_eos if req.HasField("add_eos") else True,
        per_token=req.per_token if req.HasField("per_token") else True,
    )


def next_params(req: pb.PredictNextRequest, limits: Limits) -> NextParams:
    top_k = _int_in(req, "top_k", 5, 1, limits.max_top_k, "top_k")
    return NextParams(
        contexts=_texts(req.contexts, "contexts", limits, allow_empty=True),
        top_k=top_k,
        include_tokens=req.include_tokens,
        beam_width=_int_in(req, "beam_width", max(top_k, 4), 1, limits.max_beam_width, "beam_width"),
        max_word_tokens=_int_in(req, "max_word_tokens", 4, 1, limits.max_word_tokens, "max_word_tokens"),
    )


def _min_new_tokens(s: pb.SamplingParams, max_new: int) -> int:
    value = _int_in(s, "min_new_tokens", 0, 0, 2**31 - 1, "sampling.min_new_tokens")
    if value > max_new:
        raise InvalidArgument("sampling.min_new_tokens",
                              f"is {value}; must be at most sampling.max_new_tokens ({max_new})")
    return value


def generate_params(req: pb.GenerateRequest, limits: Limits) -> GenerateParams:
    s = req.sampling
    if len(s.stop) > limits.max_stop_sequences:
        raise InvalidArgument("sampling.stop", f"has {len(s.stop)} entries; at most {limits.max_stop_sequences}")
    for i, stop in enumerate(s.stop):
        if not stop or len(stop) > 256:
            raise InvalidArgument(f"sampling.stop[{i}]", "must be 1 to 256 characters")
    max_new = _int_in(s, "max_new_tokens", 32, 1, limits.max_new_tokens, "sampling.max_new_tokens")
    sampling = SamplingParams(
        temperature=_float_in(s, "temperature", 1.0, 0.0, 100.0, "sampling.temperature"),
        top_k=_int_in(s, "top_k", 0, 0, 1_000_000, "sampling.top_k"),
        top_p=_float_in(s, "top_p", 1.0, 0.0, 1.0, "sampling.top_p", lo_open=True),
        repetition_penalty=_float_in(s, "repetition_penalty", 1.0, 0.0, 100.0, "sampling.repetition_penalty",
                                     lo_open=True),
        max_new_tokens=max_new,
        min_new_tokens=_min_new_tokens(s, max_new),
        stop=tuple(s.stop),
        seed=int(s.seed) if s.HasField("seed") else None,
    )
    return GenerateParams(prompts=_texts(req.prompts, "prompts", limits, allow_empty=True), sampling=sampling,
                          truncate_prompt=req.truncate_prompt)


def fill_mask_params(req: pb.FillMaskRequest, limits: Limits) -> FillMaskParams:
    if len(req.targets) > limits.max_top_k:
        raise InvalidArgument("targets", f"has {len(req.targets)} entries; at most {limits.max_top_k}")
    for i, t in enumerate(req.targets):
        if not t.strip() or len(t) > 100:
            raise InvalidArgument(f"targets[{i}]", "must be a word of 1 to 100 characters")
    return FillMaskParams(
        texts=_texts(req.texts, "texts", limits),
        top_k=_int_in(req, "top_k", 5, 1, limits.max_top_k, "top_k"),
        targets=tuple(req.targets),
    )


_POOLING = {pb.POOLING_UNSPECIFIED: POOL_DEFAULT, pb.POOLING_MEAN: POOL_MEAN, pb.POOLING_CLS: POOL_CLS,
            pb.POOLING_NONE: POOL_NONE}


def embed_params(req: pb.EmbedRequest, limits: Limits) -> EmbedParams:
    if req.pooling not in _POOLING:
        raise InvalidArgument("pooling", f"unknown value {req.pooling}; use POOLING_MEAN, POOLING_CLS or POOLING_NONE")
    if not req.texts and not req.analogies:
        raise InvalidArgument("texts", "is empty; give texts, analogies or both")
    if len(req.analogies) > limits.max_inputs_per_request:
        raise InvalidArgument("analogies", f"has {len(req.analogies)} entries; at most {limits.max_inputs_per_request}")
    weights = tuple(float(w) for w in req.layer_weights)
    if weights and (len(weights) > 16 or not all(math.isfinite(w) for w in weights)):
        raise InvalidArgument("layer_weights", "must be finite numbers, one per layer of the model")
    for i, a in enumerate(req.analogies):
        for name in ("a", "b", "c"):
            if not getattr(a, name).strip():
                raise InvalidArgument(f"analogies[{i}].{name}", "is empty")
    return EmbedParams(
        texts=_texts(req.texts, "texts", limits) if req.texts else (),
        pooling=_POOLING[req.pooling],
        normalize=req.normalize,
        layer_weights=weights or None,
        nearest_k=_int_in(req, "nearest_k", 0, 1, limits.max_top_k, "nearest_k"),
        analogies=tuple((a.a, a.b, a.c) for a in req.analogies),
        include_tokens=req.include_tokens,
    )


def nsp_params(req: pb.PredictNextSentenceRequest, limits: Limits) -> NspParams:
    if not req.pairs:
        raise InvalidArgument("pairs", "is empty; give at least one")
    if len(req.pairs) > limits.max_inputs_per_request:
        raise InvalidArgument("pairs", f"has {len(req.pairs)} entries; at most {limits.max_inputs_per_request}")
    pairs = []
    for i, p in enumerate(req.pairs):
        for name in ("a", "b"):
            _check_text(getattr(p, name), f"pairs[{i}].{name}", limits)
        pairs.append((p.a, p.b))
    return NspParams(tuple(pairs))


_SCORING = {pb.LABEL_SCORING_UNSPECIFIED: SCORING_SUM, pb.LABEL_SCORING_SUM: SCORING_SUM,
            pb.LABEL_SCORING_TOKEN_MEAN: SCORING_TOKEN_MEAN, pb.LABEL_SCORING_PER_CHAR: SCORING_PER_CHAR}


def classify_params(req: pb.ClassifyRequest, limits: Limits) -> ClassifyParams:
    if req.scoring not in _SCORING:
        raise InvalidArgument("scoring", f"unknown value {req.scoring}; use LABEL_SCORING_SUM/_TOKEN_MEAN/_PER_CHAR")
    if len(req.labels) < 2:
        raise InvalidArgument("labels", f"has {len(req.labels)} entries; give at least 2 candidate labels")
    if len(req.labels) > limits.max_top_k:
        raise InvalidArgument("labels", f"has {len(req.labels)} entries; at most {limits.max_top_k}")
    if len(set(req.labels)) != len(req.labels):
        raise InvalidArgument("labels", "has duplicates")
    for i, label in enumerate(req.labels):
        _check_text(label, f"labels[{i}]", limits)
    if len(req.demonstrations) > limits.max_inputs_per_request:
        raise InvalidArgument("demonstrations", f"has {len(req.demonstrations)} entries; at most "
                                                f"{limits.max_inputs_per_request}")
    for i, d in enumerate(req.demonstrations):
        _check_text(d.text, f"demonstrations[{i}].text", limits)
        _check_text(d.label, f"demonstrations[{i}].label", limits)
    template = req.template or DEFAULT_TEMPLATE
    split_template(template)
    _check_text(req.instruction, "instruction", limits, allow_empty=True)
    content_free = req.content_free or "N/A"
    _check_text(content_free, "content_free", limits)
    return ClassifyParams(
        queries=_texts(req.queries, "queries", limits),
        labels=tuple(req.labels),
        demonstrations=tuple((d.text, d.label) for d in req.demonstrations),
        instruction=req.instruction,
        template=template,
        scoring=_SCORING[req.scoring],
        calibrate=req.calibrate,
        content_free=content_free,
    )
