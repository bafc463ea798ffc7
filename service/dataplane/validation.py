"""Typed requests → validated, frozen task parameters: every check that needs no model.

Each check raises InvalidArgument naming the request field in the data plane's naming
(service/dataplane/requests.py) and, where there is one, the limit. Checks that need the model's tokenizer
(lengths in tokens) live with the tasks (service/tasks/common.py).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence

from plm.service.config import Limits
from plm.service.dataplane import requests as rq
from plm.service.errors import InvalidArgument
from plm.service.tasks.classify import DEFAULT_TEMPLATE, ClassifyParams, split_template
from plm.service.tasks.embed import EmbedParams
from plm.service.tasks.fill_mask import FillMaskParams
from plm.service.tasks.generate import GenerateParams, SamplingParams
from plm.service.tasks.next_sentence import NspParams
from plm.service.tasks.next_word import NextParams
from plm.service.tasks.score import ScoreParams

_FLOAT32_MAX = 3.4028234663852886e38
_SEED_MAX = 2**64 - 1


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
        _check_text(text, field, limits, allow_empty, f"[{i}]")
    return tuple(values)


def _check_text(text: str, field: str, limits: Limits, allow_empty: bool = False, at: str = "") -> None:
    if not allow_empty and not text.strip():
        raise InvalidArgument(field, "is empty", at)
    if len(text) > limits.max_text_chars:
        raise InvalidArgument(field, f"is {len(text)} characters; at most {limits.max_text_chars}", at)
    if "\x00" in text:
        raise InvalidArgument(field, "contains a NUL character", at)


def _count(values: Sequence[object], field: str, limit: int) -> None:
    if len(values) > limit:
        raise InvalidArgument(field, f"has {len(values)} entries; at most {limit}")


def _int_in(value: int | None, default: int, lo: int, hi: int, field: str) -> int:
    if value is None:
        return default
    value = int(value)
    if not lo <= value <= hi:
        raise InvalidArgument(field, f"is {value}; must be between {lo} and {hi}")
    return value


def _single(value: float) -> float:
    """The nearest single-precision value: sampling numbers have the precision of plm.v1's `float` fields,
    so a front end that carries doubles samples exactly as plm.v1 does."""
    if not abs(value) <= _FLOAT32_MAX:  # NaN, inf, or beyond float range: the range check refuses it as it is
        return value
    return float(struct.unpack("<f", struct.pack("<f", value))[0])


def _float_in(value: float | None, default: float, lo: float, hi: float, field: str, lo_open: bool = False) -> float:
    if value is None:
        return default
    value = _single(float(value))
    if math.isnan(value) or value > hi or value < lo or (lo_open and value == lo):
        bound = f"> {lo}" if lo_open else f">= {lo}"
        raise InvalidArgument(field, f"is {value}; must be {bound} and <= {hi}")
    return value


def _choice(value: str | None, default: str, names: tuple[str, ...], field: str) -> str:
    if value is None:
        return default
    if value not in names:
        raise InvalidArgument(field, f"is {value!r}; use one of {', '.join(names)}")
    return value


def score_params(req: rq.ScoreRequest, limits: Limits) -> ScoreParams:
    # An empty source: the model says why (only an encoder-decoder reads them).
    sources = _texts(req.sources, "sources", limits, allow_empty=True) if req.sources else ()
    if len(sources) not in (0, 1, len(req.texts)):
        raise InvalidArgument("sources", f"has {len(sources)} entries; give one for every text or one per text "
                                         f"({len(req.texts)})")
    return ScoreParams(
        texts=_texts(req.texts, "texts", limits),
        sources=sources,
        add_eos=req.add_eos if req.add_eos is not None else True,
        per_token=req.per_token if req.per_token is not None else True,
    )


def next_params(req: rq.PredictNextRequest, limits: Limits) -> NextParams:
    top_k = _int_in(req.top_k, 5, 1, limits.max_top_k, "top_k")
    return NextParams(
        contexts=_texts(req.contexts, "contexts", limits, allow_empty=True),
        top_k=top_k,
        include_tokens=req.include_tokens,
        beam_width=_int_in(req.beam_width, max(top_k, 4), 1, limits.max_beam_width, "beam_width"),
        max_word_tokens=_int_in(req.max_word_tokens, 4, 1, limits.max_word_tokens, "max_word_tokens"),
    )


def _min_new_tokens(req: rq.GenerateRequest, max_new: int) -> int:
    value = _int_in(req.min_new_tokens, 0, 0, 2**31 - 1, "min_new_tokens")
    if value > max_new:
        raise InvalidArgument("min_new_tokens", f"is {value}; must be at most sampling.max_new_tokens ({max_new})")
    return value


def generate_params(req: rq.GenerateRequest, limits: Limits) -> GenerateParams:
    _count(req.stop, "stop", limits.max_stop_sequences)
    for i, stop in enumerate(req.stop):
        if not stop or len(stop) > 256:
            raise InvalidArgument("stop", "must be 1 to 256 characters", f"[{i}]")
    max_new = _int_in(req.max_new_tokens, 32, 1, limits.max_new_tokens, "max_new_tokens")
    sampling = SamplingParams(
        temperature=_float_in(req.temperature, 1.0, 0.0, 100.0, "temperature"),
        top_k=_int_in(req.top_k, 0, 0, 1_000_000, "top_k"),
        top_p=_float_in(req.top_p, 1.0, 0.0, 1.0, "top_p", lo_open=True),
        repetition_penalty=_float_in(req.repetition_penalty, 1.0, 0.0, 100.0, "repetition_penalty", lo_open=True),
        max_new_tokens=max_new,
        min_new_tokens=_min_new_tokens(req, max_new),
        stop=tuple(req.stop),
        seed=_int_in(req.seed, 0, 0, _SEED_MAX, "seed") if req.seed is not None else None,
    )
    return GenerateParams(prompts=_texts(req.prompts, "prompts", limits, allow_empty=True), sampling=sampling,
                          truncate_prompt=req.truncate_prompt)


def fill_mask_params(req: rq.FillMaskRequest, limits: Limits) -> FillMaskParams:
    _count(req.targets, "targets", limits.max_top_k)
    for i, t in enumerate(req.targets):
        if not t.strip() or len(t) > 100:
            raise InvalidArgument("targets", "must be a word of 1 to 100 characters", f"[{i}]")
    return FillMaskParams(
        texts=_texts(req.texts, "texts", limits),
        top_k=_int_in(req.top_k, 5, 1, limits.max_top_k, "top_k"),
        targets=tuple(req.targets),
    )


def embed_params(req: rq.EmbedRequest, limits: Limits) -> EmbedParams:
    pooling = _choice(req.pooling, EmbedParams.pooling, rq.POOLINGS, "pooling")  # unset: the task's default
    if not req.texts and not req.analogies:
        raise InvalidArgument("texts", "is empty; give texts, analogies or both")
    _count(req.analogies, "analogies", limits.max_inputs_per_request)
    weights = tuple(float(w) for w in req.layer_weights)
    if weights and (len(weights) > 16 or not all(math.isfinite(w) for w in weights)):
        raise InvalidArgument("layer_weights", "must be finite numbers, one per layer of the model")
    for i, analogy in enumerate(req.analogies):
        for name, word in zip("abc", analogy, strict=True):
            if not word.strip():
                raise InvalidArgument("analogies", "is empty", f"[{i}].{name}")
    return EmbedParams(
        texts=_texts(req.texts, "texts", limits) if req.texts else (),
        pooling=pooling,
        normalize=req.normalize,
        layer_weights=weights or None,
        nearest_k=_int_in(req.nearest_k, 0, 1, limits.max_top_k, "nearest_k"),
        analogies=tuple((a, b, c) for a, b, c in req.analogies),
        include_tokens=req.include_tokens,
    )


def nsp_params(req: rq.NextSentenceRequest, limits: Limits) -> NspParams:
    if not req.pairs:
        raise InvalidArgument("pairs", "is empty; give at least one")
    _count(req.pairs, "pairs", limits.max_inputs_per_request)
    for i, (a, b) in enumerate(req.pairs):
        _check_text(a, "pairs", limits, at=f"[{i}].a")
        _check_text(b, "pairs", limits, at=f"[{i}].b")
    return NspParams(tuple((a, b) for a, b in req.pairs))


def classify_params(req: rq.ClassifyRequest, limits: Limits) -> ClassifyParams:
    scoring = _choice(req.scoring, "sum", rq.SCORINGS, "scoring")
    if len(req.labels) == 1:  # none: every label of a model's trained head (tasks.classify)
        raise InvalidArgument("labels", "has 1 entry; give at least 2 candidate labels, or none for a model with "
                                        "a label head")
    _count(req.labels, "labels", limits.max_top_k)
    if len(set(req.labels)) != len(req.labels):
        raise InvalidArgument("labels", "has duplicates")
    for i, label in enumerate(req.labels):
        _check_text(label, "labels", limits, at=f"[{i}]")
    _count(req.demonstrations, "demonstrations", limits.max_inputs_per_request)
    for i, (text, label) in enumerate(req.demonstrations):
        _check_text(text, "demonstrations", limits, at=f"[{i}].text")
        _check_text(label, "demonstrations", limits, at=f"[{i}].label")
    template = req.template or DEFAULT_TEMPLATE
    split_template(template)
    _check_text(req.instruction, "instruction", limits, allow_empty=True)
    content_free = req.content_free or "N/A"
    _check_text(content_free, "content_free", limits)
    return ClassifyParams(
        queries=_texts(req.queries, "queries", limits),
        labels=tuple(req.labels),
        demonstrations=tuple((t, lab) for t, lab in req.demonstrations),
        instruction=req.instruction,
        template=template,
        scoring=scoring,
        calibrate=req.calibrate,
        content_free=content_free,
    )
