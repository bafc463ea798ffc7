"""ONNX Runtime sessions: execution providers in priority order, threads and graph optimisation.

Providers that this onnxruntime build lacks are skipped with a warning and the session falls back to CPU:
the server never fails to start because a GPU is missing.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.config import Runtime
from service.metrics import Metrics

log = logging.getLogger(__name__)

_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


class OrtSession:
    """One ONNX graph, ready to run. `run` is blocking: call it from the model's batch thread."""

    def __init__(self, path: Path, runtime: Runtime, model: str, metrics: Metrics | None = None) -> None:
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
        self.model = model
        self._metrics = metrics

    def run(self, outputs: list[str], feeds: dict[str, np.ndarray], stage: str = "forward") -> dict[str, np.ndarray]:
        """Run the graph for the named outputs; records the batch metrics when `feeds` has an attention mask."""
        started = time.perf_counter()
        results = dict(zip(outputs, self.session.run(outputs, feeds), strict=True))
        if self._metrics is not None:
            m = self._metrics
            m.inference_duration.labels(self.model, stage).observe(time.perf_counter() - started)
            mask = feeds.get("attention_mask")
            if mask is not None and mask.ndim == 2 and mask.size:
                m.batch_tokens.labels(self.model).observe(mask.size)
                m.padding_efficiency.labels(self.model).observe(float(mask.sum()) / mask.size)
        return results


def pad_right(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad id rows into `input_ids` and `attention_mask`, both int64 (B, T)."""
    b, t = len(rows), max((len(r) for r in rows), default=0)
    ids = np.full((b, t), pad_id, dtype=np.int64)
    mask = np.zeros((b, t), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return ids, mask
