"""The KServe v2 / Triton front end (`inference.GRPCInferenceService`): generic inference clients (tritonclient,
perf_analyzer, KServe) call plm's models as named tensors.

ModelInfer only translates: tensors + parameters → the data plane's typed request (the task table,
kserve_tasks.py) → the data plane (admission, validation, model lookup, the task and the model's batcher or
engine, exactly as for plm.v1) → the typed result → tensors. So both protocols give the same numbers, and
ModelInfer is one more `method` in the same request metrics and access log. A validation error's field is
renamed to the task's tensor or parameter through the task's table (`texts[2]` → `input TEXT[2]`).

Outputs always travel in `raw_output_contents`, as Triton sends them; inputs may come either way. The rest of
Triton's service (streaming, repository, shared memory, ...) answers UNIMPLEMENTED (the generated base class).
"""

from __future__ import annotations

import importlib.metadata
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
from plm.service.dataplane.plane import Call, DataPlane
from plm.service.errors import InvalidArgument, NotFound, Unavailable
from plm.service.families.base import ModelAdapter
from plm.service.frontends.grpc_edge import unary
from plm.service.frontends.kserve_tasks import TASK_SEP, TASKS, Outputs, TaskSpec, model_tasks

from plm.api.triton import grpc_service_pb2 as kv
from plm.api.triton import grpc_service_pb2_grpc as kv_grpc

SERVICE_NAME = kv.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
# Triton's own request parameters (tritonclient refuses them as user parameters); we accept and ignore them.
_TRITON_PARAMS = {"sequence_id", "sequence_start", "sequence_end", "priority", "timeout", "headers",
                  "binary_data_output"}
_NUMPY: dict[str, np.dtype[Any]] = {"FP64": np.dtype("<f8"), "FP32": np.dtype("<f4"), "INT32": np.dtype("<i4"),
                                    "INT64": np.dtype("<i8")}  # the raw layout is little-endian


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


class KServeServicer(kv_grpc.GRPCInferenceServiceServicer):
    """The required KServe v2 RPCs over the data plane: admission (the in-flight limit and the drain are
    shared with plm.v1), request ids, metrics."""

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    def _resolve(self, call: Call, name: str, version: str) -> tuple[ModelAdapter, TaskSpec]:
        """`model[:task]` → the model and the task's spec; NOT_FOUND for anything not served."""
        base, _, task = name.partition(TASK_SEP)
        model = self.plane.describe(call, base)  # the data plane checks the queue when the task runs
        tasks = model_tasks(model)
        task = task or (tasks[0] if tasks else "")
        if task not in tasks:
            raise NotFound(f"model {name!r} is not served: {base!r} serves "
                           + ", ".join(f"{base}{TASK_SEP}{t}" for t in tasks))
        if version and version != model.version:
            raise NotFound(f"model {base!r} has version {model.version!r}, not {version!r}")
        return model, TASKS[task]

    @unary("ServerLive")
    async def ServerLive(self, request: kv.ServerLiveRequest, call: Call) -> kv.ServerLiveResponse:
        return kv.ServerLiveResponse(live=True)

    @unary("ServerReady")
    async def ServerReady(self, request: kv.ServerReadyRequest, call: Call) -> kv.ServerReadyResponse:
        return kv.ServerReadyResponse(ready=self.plane.ready())

    @unary("ModelReady")
    async def ModelReady(self, request: kv.ModelReadyRequest, call: Call) -> kv.ModelReadyResponse:
        try:
            self._resolve(call, request.name, request.version)
        except (NotFound, Unavailable):  # unknown, or failed to load: not ready (a probe wants a yes or no)
            return kv.ModelReadyResponse(ready=False)
        return kv.ModelReadyResponse(ready=True)

    @unary("ServerMetadata")
    async def ServerMetadata(self, request: kv.ServerMetadataRequest, call: Call) -> kv.ServerMetadataResponse:
        try:
            version = importlib.metadata.version("plm")
        except importlib.metadata.PackageNotFoundError:
            version = "0+unknown"
        return kv.ServerMetadataResponse(name="plm", version=version, extensions=["parameters"])

    @unary("ModelMetadata")
    async def ModelMetadata(self, request: kv.ModelMetadataRequest, call: Call) -> kv.ModelMetadataResponse:
        model, spec = self._resolve(call, request.name, request.version)
        meta = kv.ModelMetadataResponse.TensorMetadata
        return kv.ModelMetadataResponse(
            name=request.name, versions=[model.version],
            platform="plm_ngram_arpa" if model.family == "ngram" else "onnxruntime_onnx",
            inputs=[meta(name=t.name, datatype=t.datatype, shape=t.shape) for t in spec.inputs],
            outputs=[meta(name=t.name, datatype=t.datatype, shape=t.shape) for t in spec.outputs],
        )

    @unary("ModelInfer")
    async def ModelInfer(self, request: kv.ModelInferRequest, call: Call) -> kv.ModelInferResponse:
        model, spec = self._resolve(call, request.model_name, request.model_version)
        inputs = _decode_inputs(request, spec, self.plane.limits.max_inputs_per_request)
        params = _decode_params(request, spec)
        typed = spec.request(model.name, inputs, params)
        try:
            served = await spec.run(self.plane, call, typed)
        except InvalidArgument as e:
            raise e.renamed(spec.names) from None
        response = kv.ModelInferResponse(model_name=request.model_name, model_version=served.version, id=request.id)
        _encode_outputs(spec, spec.response(served), [o.name for o in request.outputs], response)
        return response
