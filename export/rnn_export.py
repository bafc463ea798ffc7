"""PyTorch -> ONNX for the `nnlm` and `elmo` families: their graphs, I/O contracts and parity checks.

The server (no torch) depends on these contracts; `export_nnlm` / `export_elmo` return them for the manifest.

nnlm — input `context_ids` int64 [B, n−1] (the n−1 previous words, oldest first, `<s>`-padded at a
sentence start); output `next_logprobs` float32 [B, V] = log-softmax of the next word.

elmo — inputs `input_ids`, `attention_mask` int64 [B, T] (1 real, 0 pad; left or right padding, one
contiguous run of real tokens per row); outputs
  layers          float32 [B, 3, T, 2H]  ELMo's three layers: [e; e], [fwd_1; bwd_1], [fwd_2; bwd_2]; 0 at pads
  token_logprobs  float32 [B, T]         forward LM log P(x_t | x_<t); 0.0 at each row's first real token
                                         and at pads.
The per-row compaction and reversal (models/elmo.py) are Gather/GatherElements on indices computed from the
mask inside the graph, and each LSTM layer is one ONNX `LSTM` node (the TorchScript exporter, `dynamo=False`,
maps `nn.LSTM` to it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
import torch.nn as nn
from plm.export.parity import PARITY_TOLERANCE, export_module, require_parity
from plm.models.elmo import ELMo
from plm.models.nnlm import NNLM
from torch import Tensor

NNLM_PARITY_BATCHES = (1, 3, 17, 64)  # differ from the export dummy's 2
ELMO_PARITY_SHAPES = ((1, 1), (1, 5), (3, 11), (7, 9), (5, 16))  # (batch, length), differ from the dummy (2, 8)


class NNLMGraph(nn.Module):
    """context_ids (B, n−1) -> next_logprobs (B, V), log-softmax in the graph."""

    def __init__(self, model: NNLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, context_ids: Tensor) -> Tensor:
        logits, _ = self.model(context_ids)
        return torch.log_softmax(logits, dim=-1)  # (B, V)


def _max_diff(session: ort.InferenceSession, graph: nn.Module, feeds: dict[str, np.ndarray],
              outputs: Sequence[str], where: Callable[[str, np.ndarray], np.ndarray] | None = None) -> float:
    with torch.no_grad():
        expected = graph(*(torch.from_numpy(v) for v in feeds.values()))
    expected = expected if isinstance(expected, tuple) else (expected,)
    got = session.run(list(outputs), feeds)
    worst = 0.0
    for name, e, g in zip(outputs, expected, got, strict=True):
        if g.shape != tuple(e.shape):
            raise RuntimeError(f"{name}: ONNX shape {g.shape} != PyTorch {tuple(e.shape)}")
        diff = np.abs(g - e.numpy())
        worst = max(worst, float(diff.max()) if diff.size else 0.0)
    return worst


# ---------------------------------------------------------------------------------------------------- nnlm
def check_nnlm_parity(model: NNLM, path: Path, seed: int = 0) -> dict[str, Any]:
    """max |ONNX − PyTorch| of next_logprobs on random histories of NNLM_PARITY_BATCHES rows."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    graph = NNLMGraph(model).eval()
    rng = np.random.default_rng(seed)
    k = model.config.order - 1
    worst = 0.0
    for batch in NNLM_PARITY_BATCHES:
        feeds = {"context_ids": rng.integers(0, model.config.vocab_size, size=(batch, k), dtype=np.int64)}
        worst = max(worst, _max_diff(session, graph, feeds, ["next_logprobs"]))
    return {"max_abs_diff": worst, "tolerance": PARITY_TOLERANCE, "checked_batches": list(NNLM_PARITY_BATCHES)}


def export_nnlm(model: NNLM, path: Path, *, opset: int = 17) -> dict[str, Any]:
    """Export `model` to `path`, check it (onnx.checker, parity with PyTorch) and return its manifest entry.
    Raises RuntimeError when ONNX and PyTorch differ by more than PARITY_TOLERANCE."""
    was_training = model.training
    model.eval()
    cfg = model.config
    k = cfg.order - 1
    dummy = (torch.randint(0, cfg.vocab_size, (2, k), generator=torch.Generator().manual_seed(0)),)
    export_module(NNLMGraph(model).eval(), dummy, path, ["context_ids"], ["next_logprobs"],
            {"context_ids": {0: "batch"}, "next_logprobs": {0: "batch"}}, opset)
    parity = check_nnlm_parity(model, path)
    model.train(was_training)
    require_parity(parity, path.name)
    return {
        "file": path.name,
        "opset": opset,
        "inputs": [{"name": "context_ids", "dtype": "int64", "shape": ["batch", k]}],
        "outputs": [{"name": "next_logprobs", "dtype": "float32", "shape": ["batch", cfg.vocab_size]}],
        "parity": parity,
        "onnx_checker": "passed",
    }


# ---------------------------------------------------------------------------------------------------- elmo
ELMO_INPUTS = ("input_ids", "attention_mask")
ELMO_OUTPUTS = ("layers", "token_logprobs")


def random_padded_batch(vocab_size: int, batch: int, length: int, padding: str,
                        rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random ids, rows of random real lengths (row 0 full) padded on `padding` ('left'|'right'), pad id 3."""
    ids = rng.integers(0, vocab_size, size=(batch, length), dtype=np.int64)
    lengths = rng.integers(1, length + 1, size=batch)
    lengths[0] = length
    cols = np.arange(length)
    if padding == "right":
        mask = (cols[None, :] < lengths[:, None]).astype(np.int64)
    else:
        mask = (cols[None, :] >= length - lengths[:, None]).astype(np.int64)
    return {"input_ids": np.where(mask > 0, ids, 3), "attention_mask": mask}


def check_elmo_parity(model: ELMo, path: Path, shapes: tuple[tuple[int, int], ...] = ELMO_PARITY_SHAPES,
                      seed: int = 0) -> dict[str, Any]:
    """max |ONNX − PyTorch| over both outputs on random left- and right-padded batches of `shapes`."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    model.eval()
    rng = np.random.default_rng(seed)
    worst = 0.0
    checked: list[list[Any]] = []
    for batch, length in shapes:
        for padding in ("right", "left"):
            feeds = random_padded_batch(model.config.vocab_size, batch, length, padding, rng)
            worst = max(worst, _max_diff(session, model, feeds, ELMO_OUTPUTS))
            checked.append([batch, length, padding])
    return {"max_abs_diff": worst, "tolerance": PARITY_TOLERANCE, "checked_shapes": checked}


def export_elmo(model: ELMo, path: Path, *, opset: int = 17) -> dict[str, Any]:
    """Export `model` to `path`, check it (onnx.checker, `LSTM` nodes present, parity with PyTorch) and return
    its manifest entry. Raises RuntimeError on a parity failure or when the LSTMs were not exported as LSTM."""
    was_training = model.training
    model.eval()
    cfg = model.config
    dummy_np = random_padded_batch(cfg.vocab_size, 2, 8, "left", np.random.default_rng(0))
    dummy = tuple(torch.from_numpy(dummy_np[n]) for n in ELMO_INPUTS)
    axes = {0: "batch", 1: "sequence"}
    proto = export_module(model, dummy, path, ELMO_INPUTS, ELMO_OUTPUTS,
                    {"input_ids": axes, "attention_mask": axes, "layers": {0: "batch", 2: "sequence"},
                     "token_logprobs": axes}, opset)
    lstm_nodes = sum(1 for node in proto.graph.node if node.op_type == "LSTM")
    if lstm_nodes != 4:
        raise RuntimeError(f"{path.name}: expected 4 ONNX LSTM nodes (2 layers × 2 directions), found {lstm_nodes}")
    parity = check_elmo_parity(model, path)
    model.train(was_training)
    require_parity(parity, path.name)
    seq = ["batch", "sequence"]
    return {
        "file": path.name,
        "opset": opset,
        "inputs": [{"name": name, "dtype": "int64", "shape": seq} for name in ELMO_INPUTS],
        "outputs": [
            {"name": "layers", "dtype": "float32", "shape": ["batch", 3, "sequence", 2 * cfg.n_embd]},
            {"name": "token_logprobs", "dtype": "float32", "shape": seq},
        ],
        "lstm_nodes": lstm_nodes,
        "parity": parity,
        "onnx_checker": "passed",
    }
