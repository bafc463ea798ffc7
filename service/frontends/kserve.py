"""The KServe v2 / Triton front end (`inference.GRPCInferenceService`): generic inference clients (tritonclient,
perf_analyzer, KServe) call plm's models as named tensors.

ModelInfer only translates: tensors + parameters → the data plane's typed request (the task table,
kserve_tasks.py) → the data plane (admission, validation, model lookup, the task and the model's batcher or
engine, exactly as for plm.v1) → the typed result → tensors. So both protocols give the same numbers, and
ModelInfer is one more `method` in the same request metrics and access log. A validation error's field is
renamed to the task's tensor or parameter through the task's table (`texts[2]` → `input TEXT[2]`).

Outputs always travel in `raw_output_contents`, as Triton sends them; inputs may come either way.

The repository calls act on whole plm models (`gpt`, not `gpt:generate`): RepositoryIndex lists every model
the server knows with its state, RepositoryModelLoad/Unload go through the hot reloader (service/reload.py)
and need what plm.v1.AdminService needs (a bearer token, when tokens are on). ModelConfig describes a task as
a Triton ModelConfig (tensors, batch size, the model's batcher settings); ModelStatistics reads the running
sums the metrics keep (service/metrics.py). The rest of Triton's service (streaming, shared memory, trace,
logging) answers UNIMPLEMENTED (the generated base class).
"""

from __future__ import annotations

import importlib.metadata
import struct
from collections.abc import Sequence
from typing import Any

import grpc
import numpy as np
from plm.service import reload
from plm.service.admission import GLOBAL
from plm.service.config import Batching
from plm.service.dataplane import validation
from plm.service.dataplane.plane import Call, DataPlane
from plm.service.errors import FailedPrecondition, InvalidArgument, NotFound, ServiceError, Unavailable
from plm.service.families.base import ModelAdapter
from plm.service.frontends.grpc_edge import unary
from plm.service.frontends.kserve_tasks import TASK_SEP, TASKS, Outputs, TaskSpec, model_tasks
from plm.service.metrics import Metrics
from plm.service.security import metadata_accepted, token_bytes

from plm.api.triton import grpc_service_pb2 as kv
from plm.api.triton import grpc_service_pb2_grpc as kv_grpc
from plm.api.triton import model_config_pb2 as mc
from plm.api.v1 import admin_pb2

SERVICE_NAME = kv.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name
# Triton's own request parameters (tritonclient refuses them as user parameters); we accept and ignore them.
_TRITON_PARAMS = {"sequence_id", "sequence_start", "sequence_end", "priority", "timeout", "headers",
                  "binary_data_output"}
_NUMPY: dict[str, np.dtype[Any]] = {"FP64": np.dtype("<f8"), "FP32": np.dtype("<f4"), "INT32": np.dtype("<i4"),
                                    "INT64": np.dtype("<i8")}  # the raw layout is little-endian
_CONFIG_TYPES = {"BYTES": mc.TYPE_STRING, "FP64": mc.TYPE_FP64, "FP32": mc.TYPE_FP32, "INT32": mc.TYPE_INT32,
                 "INT64": mc.TYPE_INT64}
# Calls that name a model but run none of its work: left out of ModelStatistics.
_DESCRIBING = frozenset({"GetModel", "ModelMetadata", "ModelReady", "ModelConfig", "ModelStatistics"})
_ADMIN_REFUSAL = (f"missing or invalid credentials: repository load and unload need what {ADMIN_SERVICE} needs; "
                  "send metadata 'authorization: Bearer <token>'")


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


# ------------------------------------------------------------------------------- config and statistics


def platform(model: ModelAdapter) -> str:
    return "plm_ngram_arpa" if model.family == "ngram" else "onnxruntime_onnx"


def batching(model: ModelAdapter) -> Batching | None:
    """The settings of the model's dynamic batcher (or generation engine); None: it runs unbatched."""
    runner = getattr(model, "_batcher", None) or getattr(model, "engine", None)
    return runner.cfg if runner is not None else None


def model_config(name: str, model: ModelAdapter, spec: TaskSpec, max_inputs: int) -> mc.ModelConfig:
    """One task as Triton's ModelConfig. With max_batch_size > 0 the dims leave out the first axis (the batch),
    as Triton's do; ModelMetadata's shapes are [-1] + dims then, and the dims themselves when it is 0."""
    cfg = batching(model)
    max_batch = (min(cfg.max_batch_size, max_inputs) if cfg is not None else max_inputs) if spec.batch_first else 0
    skip = 1 if max_batch else 0
    config = mc.ModelConfig(
        name=name, platform=platform(model), max_batch_size=max_batch,
        version_policy=mc.ModelVersionPolicy(latest=mc.ModelVersionPolicy.Latest(num_versions=1)),
        input=[mc.ModelInput(name=t.name, data_type=_CONFIG_TYPES[t.datatype], dims=t.shape[skip:],
                             optional=t.optional) for t in spec.inputs],
        output=[mc.ModelOutput(name=t.name, data_type=_CONFIG_TYPES[t.datatype], dims=t.shape[skip:])
                for t in spec.outputs],
    )
    if cfg is not None:  # rows of concurrent requests run together: Triton's dynamic batching
        config.dynamic_batching.CopyFrom(mc.ModelDynamicBatching(
            max_queue_delay_microseconds=round(cfg.max_queue_delay_ms * 1000),
            default_queue_policy=mc.ModelQueuePolicy(max_queue_size=cfg.max_queue_size)))
        for key in ("max_batch_size", "max_batch_tokens", "min_padding_efficiency", "idle_dispatch"):
            config.parameters[f"batching.{key}"].string_value = str(getattr(cfg, key))
    return config


def _duration(into: kv.StatisticDuration, count: int, seconds: float) -> None:
    into.count += count
    into.ns += round(seconds * 1e9)


def model_statistics(name: str, model: ModelAdapter, metrics: Metrics) -> kv.ModelStatistics:
    """Triton's statistics of one model, from this process's running sums (every protocol and task together):
    success/fail are finished calls and their wall time, queue the rows' waits in the batcher, compute_infer
    the model's runs; execution_count and inference_count are batched runs and their rows."""
    stats = kv.ModelStatistics(name=name, version=model.version)
    infer, last = stats.inference_stats, 0.0
    for method, code, calls, seconds, ended in metrics.request_totals(model.name):
        if method not in _DESCRIBING:
            _duration(infer.success if code == "OK" else infer.fail, calls, seconds)
            last = max(last, ended)
    stats.last_inference = int(last * 1000)  # ms since the epoch
    _duration(infer.queue, *metrics.model_totals(metrics.queue_wait, model.name))
    _duration(infer.compute_infer, *metrics.model_totals(metrics.inference_duration, model.name))
    runs, rows = metrics.model_totals(metrics.batch_size, model.name)
    stats.execution_count, stats.inference_count = runs, round(rows)
    return stats


# ---------------------------------------------------------------------------------------------- servicer


class KServeServicer(kv_grpc.GRPCInferenceServiceServicer):
    """KServe v2's required RPCs and Triton's config, statistics and repository RPCs over the data plane:
    admission (the in-flight limit and the drain are shared with plm.v1), request ids, metrics; repository
    load and unload through the server's hot reloader."""

    def __init__(self, plane: DataPlane, reloader: reload.Reloader | None = None) -> None:
        self.plane = plane
        self.reloader = reloader  # None: repository load and unload answer UNIMPLEMENTED
        security = plane.registry.config.security
        self._tokens = token_bytes(security.tokens())
        self._admin_open = ADMIN_SERVICE in security.open_services

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
            platform=platform(model),
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

    @unary("ModelConfig")
    async def ModelConfig(self, request: kv.ModelConfigRequest, call: Call) -> kv.ModelConfigResponse:
        model, spec = self._resolve(call, request.name, request.version)
        return kv.ModelConfigResponse(
            config=model_config(request.name, model, spec, self.plane.limits.max_inputs_per_request))

    @unary("ModelStatistics")
    async def ModelStatistics(self, request: kv.ModelStatisticsRequest, call: Call) -> kv.ModelStatisticsResponse:
        """One model (`name`, any of its tasks: the numbers are the model's), or every served model."""
        if request.name:
            models = [(request.name, self._resolve(call, request.name, request.version)[0])]
        else:
            models = [(m.name, m) for m in self.plane.models()]
        metrics = self.plane.metrics
        return kv.ModelStatisticsResponse(model_stats=[model_statistics(n, m, metrics) for n, m in models])

    # ------------------------------------------------------------------------------------------ repository

    @unary("RepositoryIndex")
    async def RepositoryIndex(self, request: kv.RepositoryIndexRequest, call: Call) -> kv.RepositoryIndexResponse:
        """Every model this server knows: READY (serving, with its version), or UNAVAILABLE with why (its load
        error, or unloaded on request); `ready` lists only the READY ones."""
        _one_repository(request.repository_name)
        reg, entry = self.plane.registry, kv.RepositoryIndexResponse.ModelIndex
        unloaded = self.reloader.unloaded if self.reloader is not None else frozenset()
        index = []
        for name in sorted({*reg.models, *reg.failed, *unloaded}):
            model = reg.models.get(name)
            if model is not None:
                index.append(entry(name=name, version=model.version, state="READY"))
            elif not request.ready:
                index.append(entry(name=name, state="UNAVAILABLE", reason=reg.failed.get(name, "unloaded")))
        return kv.RepositoryIndexResponse(models=index)

    async def RepositoryModelLoad(self, request: kv.RepositoryModelLoadRequest,
                                  context: grpc.aio.ServicerContext) -> kv.RepositoryModelLoadResponse:
        await self._admin_only(context)
        return await self._load(request, context)

    async def RepositoryModelUnload(self, request: kv.RepositoryModelUnloadRequest,
                                    context: grpc.aio.ServicerContext) -> kv.RepositoryModelUnloadResponse:
        await self._admin_only(context)
        return await self._unload(request, context)

    @unary("RepositoryModelLoad")
    async def _load(self, request: kv.RepositoryModelLoadRequest, call: Call) -> kv.RepositoryModelLoadResponse:
        """Load (or reload) the folder as it is on disk; a folder that fails to load is FAILED_PRECONDITION with
        its error (the version serving before, if any, keeps serving)."""
        reloader, name = self._repository_call(request, set())
        change = await reloader.load(name)
        if change.action == reload.REJECTED:
            kept = f"; version {change.version} keeps serving" if change.version else ""
            raise FailedPrecondition(f"model {name!r} failed to load: {change.error}{kept}")
        return kv.RepositoryModelLoadResponse()

    @unary("RepositoryModelUnload")
    async def _unload(self, request: kv.RepositoryModelUnloadRequest,
                      call: Call) -> kv.RepositoryModelUnloadResponse:
        """Stop serving the model; answers once its calls in flight have finished and it is closed."""
        reloader, name = self._repository_call(request, {"unload_dependents"})  # plm models have none
        await reloader.unload(name)
        return kv.RepositoryModelUnloadResponse()

    def _repository_call(self, request: kv.RepositoryModelLoadRequest | kv.RepositoryModelUnloadRequest,
                         ignored: set[str]) -> tuple[reload.Reloader, str]:
        """The reloader and the model a load or unload names, or why not."""
        _one_repository(request.repository_name)
        name = validation.model_name(request.model_name, "model_name")
        if TASK_SEP in name:
            raise InvalidArgument("model_name", f"is {name!r}, a task; load and unload act on the whole model: "
                                                f"{name.partition(TASK_SEP)[0]!r}")
        for key in request.parameters:
            if key not in ignored:
                raise InvalidArgument(f"parameter {key}", "is not supported: plm loads the model folder as it is in "
                                                          "the repository (no config override, no uploaded files)")
        if self.reloader is None:
            raise _Unimplemented("this server has no hot reloader")
        if self.plane.registry.config.supervisor_pid:
            raise FailedPrecondition("each of plm serve's --workers processes has its own models, and this call "
                                     "reaches one of them; use plm.v1.AdminService/ReloadModels (every worker)")
        return self.reloader, name

    async def _admin_only(self, context: grpc.aio.ServicerContext) -> None:
        """Refuse (UNAUTHENTICATED, counted as the token check counts it) a call that plm.v1.AdminService would
        refuse: bearer tokens are on, the admin service is not among `open_services`, and the call carries no
        accepted token. The token interceptor (service/security.py) already did this for the whole KServe
        service unless `open_services` opens it; then load and unload still need the admin's token."""
        if not self._tokens or self._admin_open:
            return
        if metadata_accepted(context.invocation_metadata(), self._tokens):
            return
        self.plane.metrics.rejections.labels(GLOBAL, "unauthenticated").inc()
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, _ADMIN_REFUSAL)


class _Unimplemented(ServiceError):
    code = "UNIMPLEMENTED"


def _one_repository(name: str) -> None:
    if name:
        raise InvalidArgument("repository_name", f"is {name!r}; plm serves one repository: leave it empty")
