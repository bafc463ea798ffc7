"""ONNX Runtime sessions: execution providers in priority order, threads and graph optimisation.

Providers that this onnxruntime build lacks are skipped with a warning and the session falls back to CPU:
the server never fails to start because a GPU is missing.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.config import Runtime

log = logging.getLogger(__name__)

_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


class OrtSession:
    """One ONNX graph, ready to run. `run` is blocking: call it from the model's batch thread."""

    def __init__(self, path: Path, runtime: Runtime, model: str) -> None:
        opts = ort.SessionOptions()
        # One batch runs at a time per model (one batching worker), so intra-op threads may use every core.
        opts.intra_op_num_threads = runtime.intra_op_threads or (os.cpu_count() or 1)
        opts.inter_op_num_threads = 1  # the graphs are sequential chains; parallel mode buys nothing
        opts.graph_optimization_level = _OPT_LEVELS[runtime.graph_optimization]
        opts.log_severity_level = 3  # warnings from ORT about unused initialisers are noise to operators
        available = set(ort.get_available_providers())
        wanted = list(runtime.providers)
        providers = [p for p in wanted if p in available]
        for p in wanted:
            if p not in available:
                log.warning("model %s: execution provider %s is not available here; skipped", model, p)
        if "CPUExecutionProvider" not in providers:
            providers.append("CPUExecutionProvider")  # the fallback of last resort
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        self.providers: list[str] = self.session.get_providers()
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, outputs: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(outputs, feeds)
