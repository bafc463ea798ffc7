"""Request messages → validated, frozen task parameters. Protobuf stops here (DESIGN.md §7.3).

Every check that needs no model lives here and raises InvalidArgument naming the field and the limit.
Checks that need the model's tokenizer (lengths in tokens) live in service/tasks/common.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from service.config import Limits
from service.errors import InvalidArgument
from service.pb.plm.v1 import plm_pb2 as pb
from service.tasks.generate import GenerateParams, SamplingParams
from service.tasks.next_word import NextParams
from service.tasks.score import ScoreParams


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
        if not allow_empty and not text.strip():
            raise InvalidArgument(f"{field}[{i}]", "is empty")
        if len(text) > limits.max_text_chars:
            raise InvalidArgument(f"{field}[{i}]", f"is {len(text)} characters; at most {limits.max_text_chars}")
        if "\x00" in text:
            raise InvalidArgument(f"{field}[{i}]", "contains a NUL character")
    return tuple(values)


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


def generate_params(req: pb.GenerateRequest, limits: Limits) -> GenerateParams:
    s = req.sampling
    if len(s.stop) > limits.max_stop_sequences:
        raise InvalidArgument("sampling.stop", f"has {len(s.stop)} entries; at most {limits.max_stop_sequences}")
    for i, stop in enumerate(s.stop):
        if not stop or len(stop) > 256:
            raise InvalidArgument(f"sampling.stop[{i}]", "must be 1 to 256 characters")
    sampling = SamplingParams(
        temperature=_float_in(s, "temperature", 1.0, 0.0, 100.0, "sampling.temperature"),
        top_k=_int_in(s, "top_k", 0, 0, 1_000_000, "sampling.top_k"),
        top_p=_float_in(s, "top_p", 1.0, 0.0, 1.0, "sampling.top_p", lo_open=True),
        repetition_penalty=_float_in(s, "repetition_penalty", 1.0, 0.0, 100.0, "sampling.repetition_penalty",
                                     lo_open=True),
        max_new_tokens=_int_in(s, "max_new_tokens", 32, 1, limits.max_new_tokens, "sampling.max_new_tokens"),
        stop=tuple(s.stop),
        seed=int(s.seed) if s.HasField("seed") else None,
    )
    return GenerateParams(prompts=_texts(req.prompts, "prompts", limits, allow_empty=True), sampling=sampling)
