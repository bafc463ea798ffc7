"""The rules every export follows: one way to call the exporter, and parity — ONNX Runtime must reproduce
PyTorch (or numpy) within a tolerance, checked on shapes the export never saw, recorded in the manifest, and
fatal when broken."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

PARITY_TOLERANCE = 1e-4  # float32 through a few layers: ~1e-6 is typical, 1e-4 still catches a wrong graph


def make_model(graph: onnx.GraphProto, opset: int) -> onnx.ModelProto:
    """A model of a hand-built graph with the oldest IR version its opset allows (8 for opset 17), as torch's
    exporter writes: onnx's own default is the newest IR it knows (14 for onnx 1.23), which onnxruntime
    releases before 1.32 refuse to load (onnxruntime-gpu 1.31 among them)."""
    opsets = [onnx.helper.make_opsetid("", opset)]
    return onnx.helper.make_model(graph, opset_imports=opsets, producer_name="plm",
                                  ir_version=onnx.helper.find_min_ir_version_for(opsets))


def export_module(graph: nn.Module, dummy: tuple[torch.Tensor, ...], path: Path, inputs: Sequence[str],
                  outputs: Sequence[str], dynamic_axes: dict[str, dict[int, str]], opset: int) -> onnx.ModelProto:
    """torch.onnx.export with the TorchScript exporter (`dynamo=False`: it keeps dynamic batch axes where
    the dynamo exporter fixes them), constant folding, the exporter's known noise silenced; then the full
    onnx.checker. Returns the loaded model."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        for message in ("You are using the legacy TorchScript-based ONNX export", "The feature will be removed"):
            warnings.filterwarnings("ignore", message=message, category=DeprecationWarning)
        # nn.LSTM with batch_first warns that the exported graph fixes no batch size; it does not (checked).
        warnings.filterwarnings("ignore", message=".*batch_size.*LSTM.*", category=UserWarning)
        # nn.LSTM's own shape assertions are Python bools to the tracer; they check, they compute nothing.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module="torch.nn.modules.rnn")
        torch.onnx.export(graph, dummy, str(path), dynamo=False, input_names=list(inputs),
                          output_names=list(outputs), dynamic_axes=dynamic_axes, opset_version=opset,
                          do_constant_folding=True)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    return proto


def output_diff(names: Sequence[str], expected: Sequence[np.ndarray], got: Sequence[np.ndarray],
                real: np.ndarray, per_token: Sequence[str] = ("hidden_states",)) -> float:
    """Largest |ONNX − reference| over the outputs; `per_token` outputs are compared at real positions only."""
    worst = 0.0
    for name, e, g in zip(names, expected, got, strict=True):
        if g.shape != e.shape:
            raise RuntimeError(f"{name}: ONNX shape {g.shape} != reference {e.shape}")
        diff = np.abs(g - e)[real] if name in per_token else np.abs(g - e)
        worst = max(worst, float(diff.max()) if diff.size else 0.0)
    return worst


def require_parity(parity: dict[str, Any], what: str) -> None:
    if parity["max_abs_diff"] > PARITY_TOLERANCE:
        raise RuntimeError(f"ONNX and the reference differ by {parity['max_abs_diff']:.3g} > {PARITY_TOLERANCE:g} "
                           f"on {what}")
