"""The KServe v2 task table: each plm task as named tensors and request parameters.

A KServe model is one task of one plm model: `<model>:<task>` (`gpt:generate`, `bert:fill_mask`), and the bare
`<model>` is its first task (the manifest's order). Text travels as BYTES tensors, one element per text. Each
`TaskSpec` says a task's input and output tensors and parameters (docs/kserve.md shows them per family), how
decoded tensors and parameters become the data plane's typed request, which data plane method runs it, how its
typed result becomes output arrays, and the names its errors give the data plane's fields.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from plm.service.dataplane import requests as rq
from plm.service.dataplane.plane import Call, DataPlane, probability
from plm.service.errors import InvalidArgument
from plm.service.families.base import ModelAdapter
from plm.service.tasks.classify import ClassifyResult
from plm.service.tasks.embed import EmbedResponse
from plm.service.tasks.fill_mask import FillResult
from plm.service.tasks.next_sentence import NspResult
from plm.service.tasks.next_word import NextResult
from plm.service.tasks.score import ScoreResult

TASK_SEP = ":"


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1 = variable (the first axis is the batch of texts)
    optional: bool = False


Inputs = Mapping[str, list[str]]
Params = Mapping[str, Any]
Outputs = dict[str, np.ndarray]
Runner = Callable[[DataPlane, Call, Any], Awaitable[rq.Served[Any]]]  # a data plane task method


@dataclass(frozen=True)
class TaskSpec:
    """One task as tensors: its request built from tensors and parameters, run by the data plane, its result
    read back as tensors."""

    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    params: Mapping[str, type]  # request parameter → its type (bool, int, float, str)
    request: Callable[[str, Inputs, Params], Any]  # (model, inputs, params) → the data plane's typed request
    run: Runner
    response: Callable[[Any], Outputs]  # the typed result → output arrays by tensor name
    names: Mapping[str, str]  # data plane field → this task's tensor or parameter, for error messages
    # Every tensor's first axis is the request's batch of texts (Triton's max_batch_size > 0). Not so where an
    # input lists labels or an output has a row per [MASK].
    batch_first: bool = True


def _spec(inputs: tuple[Tensor, ...], outputs: tuple[Tensor, ...], params: Mapping[str, type],
          request: Callable[[str, Inputs, Params], Any], run: Runner,
          response: Callable[[Any], Outputs], tensors: Mapping[str, str], batch_first: bool = True) -> TaskSpec:
    """A TaskSpec whose error names are `parameter <p>` for each parameter (a data plane field of the same
    name) and `input <tensor>` for the fields that `tensors` maps."""
    names = {**{p: f"parameter {p}" for p in params}, **{f: f"input {t}" for f, t in tensors.items()}}
    return TaskSpec(inputs, outputs, params, request, run, response, names, batch_first)


def _texts(name: str = "TEXT", optional: bool = False) -> Tensor:
    return Tensor(name, "BYTES", (-1,), optional)


def _padded(rows: Sequence[Sequence[Any]], pad: Any, dtype: Any) -> np.ndarray:
    """Ragged rows → one [rows, longest] array, short rows filled with `pad` (a tensor has one shape)."""
    width = max((len(r) for r in rows), default=0)
    out = np.full((len(rows), width), pad, dtype=dtype)
    for i, r in enumerate(rows):
        out[i, :len(r)] = list(r)
    return out


def _pairs(x: Inputs, a: str, b: str) -> list[tuple[str, str]]:
    """Two inputs read element by element: they must be equally long."""
    first, second = x.get(a, []), x.get(b, [])
    if len(first) != len(second):
        raise InvalidArgument(f"input {b}", f"has {len(second)} elements; {a} has {len(first)}, give one per pair")
    return list(zip(first, second, strict=True))


def _choice(p: Params, key: str, names: Sequence[str]) -> str | None:
    if key not in p:
        return None
    if p[key] not in names:
        raise InvalidArgument(f"parameter {key}", f"is {p[key]!r}; use one of {', '.join(names)}")
    return str(p[key])


def _generate_request(m: str, x: Inputs, p: Params) -> rq.GenerateRequest:
    return rq.GenerateRequest(
        m, x["TEXT"], temperature=p.get("temperature"), top_k=p.get("top_k"), top_p=p.get("top_p"),
        repetition_penalty=p.get("repetition_penalty"), max_new_tokens=p.get("max_new_tokens"),
        min_new_tokens=p.get("min_new_tokens"), stop=(p["stop"],) if "stop" in p else (), seed=p.get("seed"),
        truncate_prompt=p.get("truncate_prompt", False))


def _score_outputs(s: rq.Served[ScoreResult]) -> Outputs:
    r = s.result.sentences
    return {"LOG_PROB": np.array([x.log_prob for x in r], np.float64),
            "PERPLEXITY": np.array([x.perplexity for x in r], np.float64),
            "NUM_TOKENS": np.array([x.num_tokens for x in r], np.int32)}


def _next_outputs(s: rq.Served[list[NextResult]]) -> Outputs:
    return {"WORD": _padded([[c.text for c in q.words] for q in s.result], "", object),
            "PROB": _padded([[probability(c.log_prob) for c in q.words] for q in s.result], 0.0, np.float64)}


def _generate_outputs(s: rq.Served[list[rq.Generation]]) -> Outputs:
    return {"TEXT_OUTPUT": np.array([g.text for g in s.result], object),
            "FINISH_REASON": np.array([g.finish_reason for g in s.result], object),
            "GENERATED_TOKENS": np.array([g.generated_tokens for g in s.result], np.int32)}


def _fill_mask_outputs(s: rq.Served[list[FillResult]]) -> Outputs:
    blanks = [(i, m) for i, res in enumerate(s.result) for m in res.masks]  # one row per [MASK], text order
    return {
        "TOKEN": _padded([[c.token_str for c in m] for _, m in blanks], "", object),
        "SCORE": _padded([[probability(c.log_prob) for c in m] for _, m in blanks], 0.0, np.float64),
        "TEXT_INDEX": np.array([i for i, _ in blanks], dtype=np.int32),
    }


def _embed_outputs(s: rq.Served[EmbedResponse]) -> Outputs:
    embs = s.result.embeddings
    return {"EMBEDDING": np.array([e.vector if e.vector is not None else () for e in embs], np.float32)
            .reshape(len(embs), s.result.dimension)}


def _nsp_outputs(s: rq.Served[list[NspResult]]) -> Outputs:
    return {"IS_NEXT_PROB": np.array([x.prob for x in s.result], np.float64),
            "LOG_PROB": np.array([x.log_prob for x in s.result], np.float64)}


def _classify_outputs(s: rq.Served[tuple[list[ClassifyResult], int]]) -> Outputs:
    results, _ = s.result
    return {"LABEL": np.array([c.label for c in results], object),
            "PROB": _padded([[x.probability for x in c.scores] for c in results], 0.0, np.float64)}


TASKS: dict[str, TaskSpec] = {
    "score": _spec(
        (_texts(),),
        (Tensor("LOG_PROB", "FP64", (-1,)), Tensor("PERPLEXITY", "FP64", (-1,)), Tensor("NUM_TOKENS", "INT32", (-1,))),
        {"add_eos": bool},
        lambda m, x, p: rq.ScoreRequest(m, x["TEXT"], add_eos=p.get("add_eos"), per_token=False),
        DataPlane.score, _score_outputs, {"texts": "TEXT"},
    ),
    "predict_next": _spec(
        (_texts(),),
        (Tensor("WORD", "BYTES", (-1, -1)), Tensor("PROB", "FP64", (-1, -1))),
        {"top_k": int, "beam_width": int, "max_word_tokens": int},
        lambda m, x, p: rq.PredictNextRequest(m, x["TEXT"], top_k=p.get("top_k"), beam_width=p.get("beam_width"),
                                           max_word_tokens=p.get("max_word_tokens")),
        DataPlane.predict_next, _next_outputs, {"contexts": "TEXT"},
    ),
    "generate": _spec(
        (_texts(),),
        (Tensor("TEXT_OUTPUT", "BYTES", (-1,)), Tensor("FINISH_REASON", "BYTES", (-1,)),
         Tensor("GENERATED_TOKENS", "INT32", (-1,))),
        {"max_new_tokens": int, "min_new_tokens": int, "temperature": float, "top_k": int, "top_p": float,
         "repetition_penalty": float, "seed": int, "stop": str, "truncate_prompt": bool},
        _generate_request, DataPlane.generate, _generate_outputs, {"prompts": "TEXT"},
    ),
    "fill_mask": _spec(
        (_texts(),),
        (Tensor("TOKEN", "BYTES", (-1, -1)), Tensor("SCORE", "FP64", (-1, -1)), Tensor("TEXT_INDEX", "INT32", (-1,))),
        {"top_k": int},
        lambda m, x, p: rq.FillMaskRequest(m, x["TEXT"], top_k=p.get("top_k")),
        DataPlane.fill_mask, _fill_mask_outputs, {"texts": "TEXT"}, batch_first=False,
    ),
    "embed": _spec(
        (_texts(),), (Tensor("EMBEDDING", "FP32", (-1, -1)),),
        {"pooling": str, "normalize": bool},
        lambda m, x, p: rq.EmbedRequest(m, x["TEXT"], pooling=_choice(p, "pooling", ("mean", "cls")),
                                     normalize=p.get("normalize", False)),
        DataPlane.embed, _embed_outputs, {"texts": "TEXT"},
    ),
    "next_sentence": _spec(
        (_texts("TEXT_A"), _texts("TEXT_B")),
        (Tensor("IS_NEXT_PROB", "FP64", (-1,)), Tensor("LOG_PROB", "FP64", (-1,))),
        {},
        lambda m, x, p: rq.NextSentenceRequest(m, _pairs(x, "TEXT_A", "TEXT_B")),
        DataPlane.next_sentence, _nsp_outputs, {"pairs": "TEXT_A/TEXT_B"},
    ),
    "classify": _spec(
        (_texts(), _texts("LABELS"), _texts("DEMO_TEXT", True), _texts("DEMO_LABEL", True)),
        (Tensor("LABEL", "BYTES", (-1,)), Tensor("PROB", "FP64", (-1, -1))),
        {"instruction": str, "template": str, "scoring": str, "calibrate": bool, "content_free": str},
        lambda m, x, p: rq.ClassifyRequest(
            m, x["TEXT"], x["LABELS"], _pairs(x, "DEMO_TEXT", "DEMO_LABEL"), instruction=p.get("instruction", ""),
            template=p.get("template", ""), scoring=_choice(p, "scoring", ("sum", "token_mean", "per_char")),
            calibrate=p.get("calibrate", False), content_free=p.get("content_free", "")),
        DataPlane.classify, _classify_outputs,
        {"queries": "TEXT", "labels": "LABELS", "demonstrations": "DEMO_TEXT/DEMO_LABEL"}, batch_first=False,
    ),
}


def model_tasks(model: ModelAdapter) -> list[str]:
    """The KServe tasks of a model: its manifest's tasks, and classify for causal LMs (it scores labels)."""
    tasks = [t for t in model.tasks if t in TASKS]
    if "score" in tasks and getattr(model, "score_method", "") == "causal":
        tasks.append("classify")
    return tasks
