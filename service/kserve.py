"""KServe v2 / Triton `inference.GRPCInferenceService`: generic inference clients (tritonclient, perf_analyzer,
KServe) call plm's models as named tensors.

A KServe model is one task of one plm model: `<model>:<task>` (`gpt:generate`, `bert:fill_mask`), and the bare
`<model>` is its first task (the manifest's order). Text travels as BYTES tensors, one element per text; the
`TASKS` table below says each task's input and output tensors and request parameters (docs/kserve.md shows it
per family). ModelInfer only translates: tensors + parameters → the plm.v1 request → the plm.v1 servicer's own
method body (validation, task code, batcher) → the plm.v1 response → tensors. So both protocols give the same
numbers, and ModelInfer is one more `method` in the same request metrics and access log.

Outputs always travel in `raw_output_contents`, as Triton sends them; inputs may come either way.
"""

from __future__ import annotations

import importlib.metadata
import re
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from plm.service.config import ServerConfig
from plm.service.errors import InvalidArgument, NotFound, Unavailable
from plm.service.families.base import ModelAdapter
from plm.service.metrics import Metrics
from plm.service.registry import Registry
from plm.service.servicer import LanguageModelServicer, _Call, _Edge, unary

from plm.api.triton import grpc_service_pb2 as kv
from plm.api.triton import grpc_service_pb2_grpc as kv_grpc
from plm.api.v1 import plm_pb2 as pb

SERVICE_NAME = kv.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
TASK_SEP = ":"
# Triton's own request parameters (tritonclient refuses them as user parameters); we accept and ignore them.
_TRITON_PARAMS = {"sequence_id", "sequence_start", "sequence_end", "priority", "timeout", "headers",
                  "binary_data_output"}
_NUMPY: dict[str, np.dtype[Any]] = {"FP64": np.dtype("<f8"), "FP32": np.dtype("<f4"), "INT32": np.dtype("<i4"),
                                    "INT64": np.dtype("<i8")}  # the raw layout is little-endian


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1 = variable (the first axis is the batch of texts)
    optional: bool = False


Inputs = Mapping[str, list[str]]
Params = Mapping[str, Any]
Outputs = dict[str, np.ndarray]


@dataclass(frozen=True)
class TaskSpec:
    """One task as tensors: which plm.v1 method serves it, how its request is built and its response read."""

    method: str
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    params: Mapping[str, type]  # request parameter → its type (bool, int, float, str)
    request: Callable[[str, Inputs, Params], Any]  # (model, inputs, params) → the plm.v1 request
    response: Callable[[Any], Outputs]  # the plm.v1 response → output arrays by tensor name
    fields: Mapping[str, str] = field(default_factory=dict)  # plm.v1 field → tensor, for error messages


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


def _sampling(p: Params) -> pb.SamplingParams:
    keys = ("temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens", "min_new_tokens", "seed")
    return pb.SamplingParams(stop=[p["stop"]] if "stop" in p else [], **{k: p[k] for k in keys if k in p})


_FINISH = {pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_EOS: "eos"}
_POOLING = {"mean": pb.POOLING_MEAN, "cls": pb.POOLING_CLS}
_SCORING = {"sum": pb.LABEL_SCORING_SUM, "token_mean": pb.LABEL_SCORING_TOKEN_MEAN,
            "per_char": pb.LABEL_SCORING_PER_CHAR}


def _choice(p: Params, key: str, names: Mapping[str, int]) -> Any:  # a plm.v1 enum value, or None
    if key not in p:
        return None
    if p[key] not in names:
        raise InvalidArgument(f"parameter {key}", f"is {p[key]!r}; use one of {', '.join(names)}")
    return names[p[key]]


def _fill_mask_outputs(r: pb.FillMaskResponse) -> Outputs:
    blanks = [(i, m) for i, res in enumerate(r.results) for m in res.masks]  # one row per [MASK], text order
    return {
        "TOKEN": _padded([[c.token_str for c in m.candidates] for _, m in blanks], "", object),
        "SCORE": _padded([[c.score for c in m.candidates] for _, m in blanks], 0.0, np.float64),
        "TEXT_INDEX": np.array([i for i, _ in blanks], dtype=np.int32),
    }


TASKS: dict[str, TaskSpec] = {
    "score": TaskSpec(
        "Score", (_texts(),),
        (Tensor("LOG_PROB", "FP64", (-1,)), Tensor("PERPLEXITY", "FP64", (-1,)), Tensor("NUM_TOKENS", "INT32", (-1,))),
        {"add_eos": bool},
        lambda m, x, p: pb.ScoreRequest(model=m, texts=x["TEXT"], add_eos=p.get("add_eos"), per_token=False),
        lambda r: {"LOG_PROB": np.array([s.log_prob for s in r.scores], np.float64),
                   "PERPLEXITY": np.array([s.perplexity for s in r.scores], np.float64),
                   "NUM_TOKENS": np.array([s.num_tokens for s in r.scores], np.int32)},
        {"texts": "TEXT"},
    ),
    "predict_next": TaskSpec(
        "PredictNext", (_texts(),),
        (Tensor("WORD", "BYTES", (-1, -1)), Tensor("PROB", "FP64", (-1, -1))),
        {"top_k": int, "beam_width": int, "max_word_tokens": int},
        lambda m, x, p: pb.PredictNextRequest(model=m, contexts=x["TEXT"], top_k=p.get("top_k"),
                                              beam_width=p.get("beam_width"),
                                              max_word_tokens=p.get("max_word_tokens")),
        lambda r: {"WORD": _padded([[c.text for c in q.words] for q in r.predictions], "", object),
                   "PROB": _padded([[c.prob for c in q.words] for q in r.predictions], 0.0, np.float64)},
        {"contexts": "TEXT"},
    ),
    "generate": TaskSpec(
        "Generate", (_texts(),),
        (Tensor("TEXT_OUTPUT", "BYTES", (-1,)), Tensor("FINISH_REASON", "BYTES", (-1,)),
         Tensor("GENERATED_TOKENS", "INT32", (-1,))),
        {"max_new_tokens": int, "min_new_tokens": int, "temperature": float, "top_k": int, "top_p": float,
         "repetition_penalty": float, "seed": int, "stop": str, "truncate_prompt": bool},
        lambda m, x, p: pb.GenerateRequest(model=m, prompts=x["TEXT"], sampling=_sampling(p),
                                           truncate_prompt=p.get("truncate_prompt", False)),
        lambda r: {"TEXT_OUTPUT": np.array([g.text for g in r.generations], object),
                   "FINISH_REASON": np.array([_FINISH.get(g.finish_reason, "") for g in r.generations], object),
                   "GENERATED_TOKENS": np.array([g.generated_tokens for g in r.generations], np.int32)},
        {"prompts": "TEXT"},
    ),
    "fill_mask": TaskSpec(
        "FillMask", (_texts(),),
        (Tensor("TOKEN", "BYTES", (-1, -1)), Tensor("SCORE", "FP64", (-1, -1)), Tensor("TEXT_INDEX", "INT32", (-1,))),
        {"top_k": int},
        lambda m, x, p: pb.FillMaskRequest(model=m, texts=x["TEXT"], top_k=p.get("top_k")),
        _fill_mask_outputs,
        {"texts": "TEXT"},
    ),
    "embed": TaskSpec(
        "Embed", (_texts(),), (Tensor("EMBEDDING", "FP32", (-1, -1)),),
        {"pooling": str, "normalize": bool},
        lambda m, x, p: pb.EmbedRequest(model=m, texts=x["TEXT"], pooling=_choice(p, "pooling", _POOLING),
                                        normalize=p.get("normalize", False)),
        lambda r: {"EMBEDDING": np.array([list(e.vector) for e in r.embeddings], np.float32)
                   .reshape(len(r.embeddings), r.dimension)},
        {"texts": "TEXT"},
    ),
    "next_sentence": TaskSpec(
        "PredictNextSentence", (_texts("TEXT_A"), _texts("TEXT_B")),
        (Tensor("IS_NEXT_PROB", "FP64", (-1,)), Tensor("LOG_PROB", "FP64", (-1,))),
        {},
        lambda m, x, p: pb.PredictNextSentenceRequest(model=m, pairs=[
            pb.SentencePair(a=a, b=b) for a, b in _pairs(x, "TEXT_A", "TEXT_B")]),
        lambda r: {"IS_NEXT_PROB": np.array([x.is_next_prob for x in r.results], np.float64),
                   "LOG_PROB": np.array([x.log_prob for x in r.results], np.float64)},
        {"pairs": "TEXT_A/TEXT_B"},
    ),
    "classify": TaskSpec(
        "Classify", (_texts(), _texts("LABELS"), _texts("DEMO_TEXT", True), _texts("DEMO_LABEL", True)),
        (Tensor("LABEL", "BYTES", (-1,)), Tensor("PROB", "FP64", (-1, -1))),
        {"instruction": str, "template": str, "scoring": str, "calibrate": bool, "content_free": str},
        lambda m, x, p: pb.ClassifyRequest(
            model=m, queries=x["TEXT"], labels=x["LABELS"], instruction=p.get("instruction", ""),
            demonstrations=[pb.Demonstration(text=t, label=lab) for t, lab in _pairs(x, "DEMO_TEXT", "DEMO_LABEL")],
            template=p.get("template", ""), scoring=_choice(p, "scoring", _SCORING),
            calibrate=p.get("calibrate", False), content_free=p.get("content_free", "")),
        lambda r: {"LABEL": np.array([c.label for c in r.results], object),
                   "PROB": _padded([[s.probability for s in c.scores] for c in r.results], 0.0, np.float64)},
        {"queries": "TEXT", "labels": "LABELS", "demonstrations": "DEMO_TEXT/DEMO_LABEL"},
    ),
}


def model_tasks(model: ModelAdapter) -> list[str]:
    """The KServe tasks of a model: its manifest's tasks, and classify for causal LMs (it scores labels)."""
    tasks = [t for t in model.tasks if t in TASKS]
    if "score" in tasks and getattr(model, "score_method", "") == "causal":
        tasks.append("classify")
    return tasks


# ------------------------------------------------------------------------------------------ tensor codec


def split_bytes(raw: bytes, count: int, where: str) -> list[bytes]:
    """The BYTES raw layout: each element is a 4-byte little-endian length, then that many bytes."""
    out: list[bytes] = []
    pos = 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise InvalidArgument(where, f"ends inside an element's 4-byte length prefix at byte {pos}")
        (n,) = struct.unpack_from("<I", raw, pos)
        if pos + 4 + n > len(raw):
            raise InvalidArgument(where, f"element {len(out)} claims {n} bytes; only {len(raw) - pos - 4} remain")
        out.append(raw[pos + 4:pos + 4 + n])
        pos += 4 + n
    if len(out) != count:
        raise InvalidArgument(where, f"holds {len(out)} elements; its shape says {count}")
    return out


def join_bytes(values: Sequence[str]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in (v.encode() for v in values))


def _decode_inputs(request: kv.ModelInferRequest, spec: TaskSpec, limit: int) -> dict[str, list[str]]:
    known = {t.name: t for t in spec.inputs}
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument("raw_input_contents", f"has {len(raw)} entries for {len(request.inputs)} inputs; "
                                                    "give one per input, or use contents for all of them")
    values: dict[str, list[str]] = {}
    for i, t in enumerate(request.inputs):
        where = f"input {t.name}"
        if t.name not in known:
            raise InvalidArgument(where, f"is not an input of this task; its inputs are {', '.join(known)}")
        if t.name in values:
            raise InvalidArgument(where, "is given twice")
        if t.datatype != "BYTES":
            raise InvalidArgument(where, f"has datatype {t.datatype}; text inputs are BYTES (UTF-8)")
        shape = list(t.shape)
        if not 1 <= len(shape) <= 2 or shape[0] < 0 or shape[1:] not in ([], [1]):
            raise InvalidArgument(where, f"has shape {shape}; use [N] or [N, 1] (one element per text)")
        if shape[0] > limit:
            raise InvalidArgument(where, f"has {shape[0]} elements; at most {limit} per request")
        items = split_bytes(raw[i], shape[0], where) if raw else list(t.contents.bytes_contents)
        if len(items) != shape[0]:
            raise InvalidArgument(where, f"holds {len(items)} elements; its shape says {shape[0]}")
        try:
            values[t.name] = [b.decode("utf-8") for b in items]
        except UnicodeDecodeError as e:
            raise InvalidArgument(where, f"is not UTF-8 text ({e.reason} at byte {e.start})") from None
    missing = [n for n, t in known.items() if n not in values and not t.optional]
    if missing:
        raise InvalidArgument("inputs", f"lack {', '.join(missing)}")
    return values


def _decode_params(request: kv.ModelInferRequest, spec: TaskSpec) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for key, p in request.parameters.items():
        if key in _TRITON_PARAMS or key.startswith("triton_"):
            continue
        if key not in spec.params:
            known = ", ".join(spec.params) or "none"
            raise InvalidArgument(f"parameter {key}", f"is not a parameter of this task; its parameters: {known}")
        kind, which = spec.params[key], p.WhichOneof("parameter_choice")
        value = getattr(p, which) if which else None
        ok = {bool: which == "bool_param", str: which == "string_param",
              int: which in ("int64_param", "uint64_param"),
              float: which in ("double_param", "int64_param", "uint64_param")}[kind]
        if not ok:
            raise InvalidArgument(f"parameter {key}", f"must be a {kind.__name__} (got {which or 'nothing'})")
        params[key] = kind(value)
    return params


def _encode_outputs(spec: TaskSpec, outputs: Outputs, requested: Sequence[str],
                    response: kv.ModelInferResponse) -> None:
    declared = {t.name: t for t in spec.outputs}
    for name in requested:
        if name not in declared:
            raise InvalidArgument(f"output {name}", f"is not an output of this task; its outputs are "
                                                    f"{', '.join(declared)}")
    for name in requested or list(declared):
        array, datatype = outputs[name], declared[name].datatype
        response.outputs.add(name=name, datatype=datatype, shape=list(array.shape))
        response.raw_output_contents.append(
            join_bytes([str(v) for v in array.reshape(-1)]) if datatype == "BYTES"
            else np.ascontiguousarray(array, dtype=_NUMPY[datatype]).tobytes())


# ---------------------------------------------------------------------------------------------- servicer


class KServeServicer(_Edge, kv_grpc.GRPCInferenceServiceServicer):
    """The required KServe v2 RPCs. The rest of Triton's service (streaming, repository, shared memory, ...)
    answers UNIMPLEMENTED (the generated base class). Same edge as plm.v1: admission (the in-flight limit and
    the drain are shared with it), request ids, metrics."""

    def __init__(self, registry: Registry, config: ServerConfig, metrics: Metrics,
                 plm: LanguageModelServicer) -> None:
        super().__init__(registry, plm.admission, metrics)
        self.limits = config.limits
        self.plm = plm

    def _resolve(self, call: _Call, name: str, version: str) -> tuple[ModelAdapter, str, TaskSpec]:
        """`model[:task]` → the model, the task name and its spec; NOT_FOUND for anything not served."""
        base, _, task = name.partition(TASK_SEP)
        model = call.model(base, work=False)  # ModelInfer's plm.v1 method checks the queue for its own rows
        tasks = model_tasks(model)
        task = task or (tasks[0] if tasks else "")
        if task not in tasks:
            raise NotFound(f"model {name!r} is not served: {base!r} serves "
                           + ", ".join(f"{base}{TASK_SEP}{t}" for t in tasks))
        if version and version != model.version:
            raise NotFound(f"model {base!r} has version {model.version!r}, not {version!r}")
        return model, task, TASKS[task]

    @unary("ServerLive")
    async def ServerLive(self, request: kv.ServerLiveRequest, call: _Call) -> kv.ServerLiveResponse:
        return kv.ServerLiveResponse(live=True)

    @unary("ServerReady")
    async def ServerReady(self, request: kv.ServerReadyRequest, call: _Call) -> kv.ServerReadyResponse:
        return kv.ServerReadyResponse(ready=bool(self.registry.models) and not self.registry.failed)

    @unary("ModelReady")
    async def ModelReady(self, request: kv.ModelReadyRequest, call: _Call) -> kv.ModelReadyResponse:
        try:
            self._resolve(call, request.name, request.version)
        except (NotFound, Unavailable):  # unknown, or failed to load: not ready (a probe wants a yes or no)
            return kv.ModelReadyResponse(ready=False)
        return kv.ModelReadyResponse(ready=True)

    @unary("ServerMetadata")
    async def ServerMetadata(self, request: kv.ServerMetadataRequest, call: _Call) -> kv.ServerMetadataResponse:
        try:
            version = importlib.metadata.version("plm")
        except importlib.metadata.PackageNotFoundError:
            version = "0+unknown"
        return kv.ServerMetadataResponse(name="plm", version=version, extensions=["parameters"])

    @unary("ModelMetadata")
    async def ModelMetadata(self, request: kv.ModelMetadataRequest, call: _Call) -> kv.ModelMetadataResponse:
        model, _, spec = self._resolve(call, request.name, request.version)
        meta = kv.ModelMetadataResponse.TensorMetadata
        return kv.ModelMetadataResponse(
            name=request.name, versions=[model.version],
            platform="plm_ngram_arpa" if model.family == "ngram" else "onnxruntime_onnx",
            inputs=[meta(name=t.name, datatype=t.datatype, shape=t.shape) for t in spec.inputs],
            outputs=[meta(name=t.name, datatype=t.datatype, shape=t.shape) for t in spec.outputs],
        )

    @unary("ModelInfer")
    async def ModelInfer(self, request: kv.ModelInferRequest, call: _Call) -> kv.ModelInferResponse:
        model, _, spec = self._resolve(call, request.model_name, request.model_version)
        inputs = _decode_inputs(request, spec, self.limits.max_inputs_per_request)
        params = _decode_params(request, spec)
        plm_request = spec.request(model.name, inputs, params)
        try:
            # The plm.v1 method's body, without its gRPC edge (this call already has one): same validation,
            # task code and batcher as plm.v1.
            plm_response = await getattr(LanguageModelServicer, spec.method).__wrapped__(self.plm, plm_request, call)
        except InvalidArgument as e:
            raise _renamed(e, spec) from None
        response = kv.ModelInferResponse(model_name=request.model_name, model_version=model.version, id=request.id)
        _encode_outputs(spec, spec.response(plm_response), [o.name for o in request.outputs], response)
        return response


def _renamed(err: InvalidArgument, spec: TaskSpec) -> InvalidArgument:
    """plm.v1's field names in a validation error → this task's tensors and parameters ("texts[2]" →
    "input TEXT[2]", "sampling.top_p" → "parameter top_p", "top_k" → "parameter top_k")."""
    head = re.split(r"[.\[]", err.field, maxsplit=1)[0]
    rest, problem = err.field[len(head):], err.message[len(err.field) + 2:]
    if head == "sampling":
        return InvalidArgument(f"parameter {rest.lstrip('.')}", problem)
    if head in spec.params:
        return InvalidArgument(f"parameter {err.field}", problem)
    if head in spec.fields:
        return InvalidArgument(f"input {spec.fields[head]}{rest}", problem)
    return err
