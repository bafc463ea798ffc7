"""ONNX Runtime sessions: execution providers in priority order, threads and graph optimisation.

Providers that this onnxruntime build lacks are skipped with a warning and the session falls back to CPU:
the server never fails to start because a GPU is missing.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from plm.service.config import Runtime
from plm.service.contract.manifest import Manifest
from plm.service.metrics import Metrics

log = logging.getLogger(__name__)

_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


# Short names a config may use for ONNX Runtime's provider names.
ALIASES = {
    "tensorrt": "TensorrtExecutionProvider", "trt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider",
    "openvino": "OpenVINOExecutionProvider", "coreml": "CoreMLExecutionProvider", "dml": "DmlExecutionProvider",
}
CPU = "CPUExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
AUTO = (TENSORRT, "CUDAExecutionProvider", CPU)  # `providers = []`: the best this build has
# Providers whose tensors live in GPU memory: the device OrtValues are bound on ("cuda" for ORT's IO binding).
GPU = {TENSORRT: "cuda", "CUDAExecutionProvider": "cuda"}


def cores() -> int:
    """CPUs this process may run on (its affinity mask, which containers and taskset narrow): what "one per core"
    means for ONNX Runtime's threads, the decoder's and the workers' share."""
    return len(os.sched_getaffinity(0))


def provider_name(name: str) -> str:
    """ORT's name of a provider given by full name or alias; an unknown name is a config error naming the list."""
    full = ALIASES.get(name.lower(), name)
    if full not in ort.get_all_providers():
        raise ValueError(f"runtime.providers: unknown execution provider {name!r} (aliases: "
                         f"{', '.join(sorted(ALIASES))}; ONNX Runtime knows: {', '.join(ort.get_all_providers())})")
    return full


def choose_providers(runtime: Runtime, model: str) -> list[tuple[str, dict[str, Any]]]:
    """The configured providers this onnxruntime build has, in priority order, each with its options; CPU last.

    A provider that is configured but missing here (a CPU-only wheel, no GPU) is skipped with a warning: the
    server starts on what it has.
    """
    available = set(ort.get_available_providers())
    options = {provider_name(k): v for k, v in runtime.provider_options.items()}
    chosen: list[tuple[str, dict[str, Any]]] = []
    for name in map(provider_name, runtime.providers or AUTO):
        if name == TENSORRT and not runtime.providers and name in available and not tensorrt_loadable():
            continue  # onnxruntime-gpu lists it whether or not TensorRT is installed: the automatic choice skips it
        if name in available:
            chosen.append((name, dict(options.get(name, {}))))
        elif runtime.providers:  # asked for by name: say that it is not used (automatic choice stays quiet)
            log.warning("model %s: execution provider %s is not available in this onnxruntime build (it has %s); "
                        "falling back to the next one", model, name, ", ".join(sorted(available)))
    if all(name != CPU for name, _ in chosen):
        chosen.append((CPU, dict(options.get(CPU, {}))))  # the fallback of last resort
    if any(name in GPU for name, _ in chosen):
        _load_gpu_libraries()
    return chosen


@functools.cache
def tensorrt_loadable() -> bool:
    """Whether TensorRT's runtime library loads here. Without it the TensorRT provider fails every session start
    (ORT prints an error and falls back); the automatic choice skips it instead, saying so once."""
    for lib in ("libnvinfer.so.10", "libnvinfer.so"):
        try:
            ctypes.CDLL(lib)
            return True
        except OSError:
            continue
    log.info("TensorRT's libraries (libnvinfer) are not installed: automatic providers start at CUDA")
    return False


@functools.cache
def _load_gpu_libraries() -> None:
    """onnxruntime-gpu from PyPI finds CUDA and cuDNN in the nvidia-* wheels (its `cuda` and `cudnn` extras, or
    PyTorch's) only once they are loaded (ORT's `preload_dlls`); libraries on the loader's path need nothing.
    Once per process; a failure is a warning, and starting the session says what is missing."""
    if not hasattr(ort, "preload_dlls"):
        return
    try:
        ort.preload_dlls()
    except Exception as e:
        log.warning("could not preload the CUDA/cuDNN libraries of the nvidia-* wheels (%s); relying on the "
                    "loader's path", e)


def session_options(runtime: Runtime) -> ort.SessionOptions:
    """Session options for 2-core serving (docs/architecture.md, "ONNX Runtime settings")."""
    opts = ort.SessionOptions()
    # One batch runs at a time per model (one batching worker), so intra-op threads may use every core.
    opts.intra_op_num_threads = runtime.intra_op_threads or cores()
    opts.inter_op_num_threads = 1  # the graphs are sequential chains; parallel mode buys nothing
    opts.graph_optimization_level = _OPT_LEVELS[runtime.graph_optimization]
    opts.enable_cpu_mem_arena = runtime.memory_arena
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if runtime.spin_wait else "0")
    opts.log_severity_level = 3  # warnings from ORT about unused initialisers are noise to operators
    return opts


class OrtSession:
    """One ONNX graph, ready to run. `run` is blocking: call it from the model's batch thread."""

    def __init__(self, path: Path, runtime: Runtime, model: str, metrics: Metrics | None = None,
                 variant: str = "") -> None:
        self.variant = variant  # the optimised graph this is ("" = the exported graph)
        opts = session_options(runtime)
        chosen = choose_providers(runtime, model)
        while True:
            try:
                self.session = ort.InferenceSession(str(path), sess_options=opts, providers=[n for n, _ in chosen],
                                                    provider_options=[o for _, o in chosen])
                break
            except Exception as e:  # a provider in the build may still fail: driver, libraries, memory, options
                if len(chosen) == 1:
                    raise
                log.warning("model %s: ONNX Runtime could not start %s (%s); trying %s", model, chosen[0][0],
                            str(e).splitlines()[0] if str(e) else type(e).__name__, chosen[1][0])
                chosen = chosen[1:]
        self.providers: list[str] = self.session.get_providers()
        wanted_first = chosen[0][0]
        if self.providers[0] != wanted_first:  # ORT itself may drop a provider it cannot initialise
            log.warning("model %s: %s requested but ONNX Runtime runs it on %s", model, wanted_first,
                        ", ".join(self.providers))
        # Where the first provider keeps its tensors: what IO binding binds outputs to (runtime.io_binding).
        self.device = GPU.get(self.providers[0], "cpu")
        self.device_id = int(dict(chosen).get(self.providers[0], {}).get("device_id", 0)) if self.device != "cpu" else 0
        self.io_binding = runtime.io_binding == "on" or (runtime.io_binding == "auto" and self.device != "cpu")
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.model = model
        self._metrics = metrics
        self._durations: dict[str, Any] = {}  # stage → its labelled inference_duration
        if metrics is not None:
            for name in self.providers:
                metrics.execution_provider.labels(model, name).set(1)
            self._batch_tokens = metrics.batch_tokens.labels(model)
            self._padding = metrics.padding_efficiency.labels(model)

    def run(self, outputs: list[str], feeds: dict[str, np.ndarray], stage: str = "forward") -> dict[str, np.ndarray]:
        """Run the graph for the named outputs; records the batch metrics when `feeds` has an attention mask."""
        started = time.perf_counter()
        results = dict(zip(outputs, self.session.run(outputs, feeds), strict=True))
        self._observe(started, feeds, stage)
        return results

    def run_bound(self, host: list[str], device: list[str], feeds: dict[str, np.ndarray | ort.OrtValue],
                  stage: str = "forward") -> tuple[dict[str, np.ndarray], list[ort.OrtValue]]:
        """Run with ORT's IO binding: `host` outputs come back as numpy arrays, `device` outputs stay where the
        provider made them (OrtValues on `self.device`), and OrtValue feeds are used where they are, uncopied.
        What feeds a decode step from the last one's presents without a round trip through host memory."""
        started = time.perf_counter()
        results = run_bound(self.session, host, device, feeds, self.device, self.device_id)
        self._observe(started, feeds, stage)
        return results

    def _observe(self, started: float, feeds: dict[str, Any], stage: str) -> None:
        if self._metrics is not None:
            m = self._metrics
            duration = self._durations.get(stage)
            if duration is None:  # `labels()` takes a lock and a lookup: once per stage, not once per run
                duration = self._durations[stage] = m.inference_duration.labels(self.model, stage)
            duration.observe(time.perf_counter() - started)
            mask = feeds.get("attention_mask")
            if isinstance(mask, np.ndarray) and mask.ndim == 2 and mask.size:
                self._batch_tokens.observe(mask.size)
                self._padding.observe(float(mask.sum()) / mask.size)


def run_bound(session: ort.InferenceSession, host: list[str], device: list[str],
              feeds: dict[str, np.ndarray | ort.OrtValue], where: str = "cuda",
              device_id: int = 0) -> tuple[dict[str, np.ndarray], list[ort.OrtValue]]:
    """One run of a bare session with ORT's IO binding (OrtSession.run_bound; the benchmarks' raw loops)."""
    binding = session.io_binding()
    for name, value in feeds.items():
        if isinstance(value, ort.OrtValue):
            binding.bind_ortvalue_input(name, value)
        else:
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
    for name in host:
        binding.bind_output(name, "cpu")
    for name in device:
        binding.bind_output(name, where, device_id)
    session.run_with_iobinding(binding)
    values = binding.get_outputs()
    return {name: value.numpy() for name, value in zip(host, values, strict=False)}, values[len(host):]


def on_host(values: Sequence[np.ndarray | ort.OrtValue]) -> list[np.ndarray]:
    """Numpy arrays of tensors that may be OrtValues (on a GPU: copied to host memory)."""
    return [v.numpy() if isinstance(v, ort.OrtValue) else v for v in values]


def open_graph(folder: Path, manifest: Manifest, key: str, runtime: Runtime, model: str,
               metrics: Metrics | None) -> OrtSession:
    """A session on the manifest's graph `key`: the configured optimised variant when the folder has one.

    Variants (`plm build --variants`) are listed in the manifest's `variants`, each with its graph files;
    a model without the requested variant serves its exported graph, and says so in the log.
    """
    path, variant = folder / manifest.graphs[key].file, ""
    if runtime.variant:
        chosen = manifest.variants.get(runtime.variant)
        if chosen is not None and key in chosen.graphs:
            path, variant = folder / chosen.graphs[key], runtime.variant
        else:
            log.info("model %s: no %r variant of graph %r; serving the exported graph", model, runtime.variant, key)
    return OrtSession(path, runtime, model, metrics, variant)


def pad_right(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad id rows into `input_ids` and `attention_mask`, both int64 (B, T)."""
    b, t = len(rows), max((len(r) for r in rows), default=0)
    ids = np.full((b, t), pad_id, dtype=np.int64)
    mask = np.zeros((b, t), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return ids, mask
