"""The parity rule every export follows: ONNX Runtime must reproduce PyTorch (or numpy) within a tolerance,
checked on shapes the export never saw, recorded in the manifest, and fatal when broken."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

PARITY_TOLERANCE = 1e-4  # float32 through a few layers: ~1e-6 is typical, 1e-4 still catches a wrong graph


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
