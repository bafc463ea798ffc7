"""PyTorch -> ONNX for the `bert` family: the serving graph, its I/O contract, and the parity check.

The server (no torch) depends on this contract, and `export_bert` returns it for the model manifest:

inputs (int64, dynamic batch B, sequence T and blanks M):
  input_ids       [B, T]   `[CLS] A [SEP]` or `[CLS] A [SEP] B [SEP]`, right-padded (positions are columns)
  attention_mask  [B, T]   1 real token, 0 pad
  token_type_ids  [B, T]   0 for [CLS], A and its [SEP]; 1 for B and its [SEP]; 0 at pads
  mask_positions  [B, M]   column indices of the blanks to predict; rows with fewer blanks pad with 0
outputs (float32):
  mask_logprobs   [B, M, V] log-softmax of the MLM head at those columns
  nsp_logprobs    [B, 2]    log-softmax of the NSP head; index 0 = IsNext
  hidden_states   [B, T, C] final encoder layer (token vectors; column 0 is [CLS])

The gather happens before the MLM head, so the [B, T, V] logits are never even computed. The exporter is
the TorchScript one (`dynamo=False`), as for GPT (export/onnx_export.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
from plm.export.parity import PARITY_TOLERANCE, export_module, output_diff, require_parity
from plm.models.bert import Bert
from torch import Tensor
from torch.nn import functional as F

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids", "mask_positions")
OUTPUT_NAMES = ("mask_logprobs", "nsp_logprobs", "hidden_states")
# (batch, sequence, blanks): unlike the export dummy (2, 8, 2) in every axis; batch 1 and 7 included.
PARITY_SHAPES = ((1, 3, 1), (1, 9, 3), (3, 12, 1), (7, 10, 4), (5, 17, 2))
_DUMMY_SHAPE = (2, 8, 2)


class BertServingGraph(nn.Module):
    """The graph the server runs: encoder states, the MLM head at the blanks only, and the NSP head."""

    def __init__(self, model: Bert) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor, mask_positions: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        hidden = self.model.hidden_states(input_ids, attention_mask, token_type_ids)  # (B, T, C)
        index = mask_positions.unsqueeze(-1).expand(-1, -1, hidden.size(-1))  # (B, M, C)
        at_blanks = hidden.gather(1, index)  # (B, M, C)
        mask_logprobs = F.log_softmax(self.model.mlm_logits(at_blanks), dim=-1)  # (B, M, V)
        nsp_logprobs = F.log_softmax(self.model.nsp_logits(hidden), dim=-1)  # (B, 2)
        return mask_logprobs, nsp_logprobs, hidden


def random_batch(
    vocab_size: int, batch: int, length: int, masks: int, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Random right-padded rows (one full length) with random segment boundaries and blank positions."""
    ids = torch.randint(5, vocab_size, (batch, length), generator=generator)
    lengths = torch.randint(1, length + 1, (batch,), generator=generator)
    lengths[0] = length
    cols = torch.arange(length)
    mask = (cols[None, :] < lengths[:, None]).long()  # (B, T)
    split = (torch.rand(batch, generator=generator) * lengths).long()  # segment B starts at column split
    types = ((cols[None, :] >= split[:, None]) & (mask > 0)).long()
    positions = (torch.rand(batch, masks, generator=generator) * lengths[:, None]).long()  # real columns
    return ids * mask, mask, types, positions  # pad id 0, as the server pads


def check_parity(
    model: Bert, path: Path, shapes: tuple[tuple[int, int, int], ...] = PARITY_SHAPES, seed: int = 0
) -> dict[str, Any]:
    """max |ONNX - PyTorch| over the three outputs (hidden_states at real tokens) on random padded batches of
    `shapes`, all through one session, so the dynamic axes are exercised."""
    return graph_parity(BertServingGraph(model).eval(), path, model.config.vocab_size, model.config.max_position,
                        OUTPUT_NAMES, shapes, seed)


def graph_parity(graph: nn.Module, path: Path, vocab_size: int, window: int, outputs: tuple[str, ...],
                 shapes: tuple[tuple[int, int, int], ...] = PARITY_SHAPES, seed: int = 0) -> dict[str, Any]:
    """`check_parity` for any module that serves this contract (an imported checkpoint's too): its `outputs`."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(seed)
    max_diff = 0.0
    checked: list[list[int]] = []
    for batch, length, masks in shapes:
        length = min(length, window)
        inputs = random_batch(vocab_size, batch, length, masks, generator)
        with torch.no_grad():
            expected = [t.numpy() for t in graph(*inputs)]
        feeds = {name: t.numpy() for name, t in zip(INPUT_NAMES, inputs, strict=True)}
        got = session.run(list(outputs), feeds)
        max_diff = max(max_diff, output_diff(outputs, expected, got, feeds["attention_mask"] > 0))
        checked.append([batch, length, masks])
    return {"max_abs_diff": max_diff, "tolerance": PARITY_TOLERANCE, "checked_shapes": checked}


def export_bert(model: Bert, path: Path, *, opset: int = 17) -> dict[str, Any]:
    """Export `model`'s serving graph to `path`, check it (onnx.checker, parity with PyTorch) and return its
    manifest entry. Raises RuntimeError when ONNX and PyTorch differ by more than PARITY_TOLERANCE."""
    was_training = model.training
    model.eval()
    cfg = model.config
    graph = BertServingGraph(model).eval()
    dummy = random_batch(cfg.vocab_size, *_DUMMY_SHAPE, torch.Generator().manual_seed(0))
    seq = {0: "batch", 1: "sequence"}
    proto = export_module(graph, dummy, path, INPUT_NAMES, OUTPUT_NAMES, {
        "input_ids": seq, "attention_mask": seq, "token_type_ids": seq,
        "mask_positions": {0: "batch", 1: "masks"},
        "mask_logprobs": {0: "batch", 1: "masks"},
        "nsp_logprobs": {0: "batch"},
        "hidden_states": seq,
    }, opset)
    # Declare the static sizes that shape inference may lose behind the gathers.
    static = {"mask_logprobs": (2, cfg.vocab_size), "nsp_logprobs": (1, 2), "hidden_states": (2, cfg.n_embd)}
    for output in proto.graph.output:
        if output.name in static:
            axis, size = static[output.name]
            output.type.tensor_type.shape.dim[axis].dim_value = size
    onnx.save(proto, str(path))
    onnx.checker.check_model(proto, full_check=True)
    parity = check_parity(model, path)
    model.train(was_training)
    require_parity(parity, path.name)
    tokens = ["batch", "sequence"]
    return {
        "file": path.name,
        "opset": opset,
        "inputs": [
            *({"name": name, "dtype": "int64", "shape": tokens} for name in INPUT_NAMES[:3]),
            {"name": "mask_positions", "dtype": "int64", "shape": ["batch", "masks"]},
        ],
        "outputs": [
            {"name": "mask_logprobs", "dtype": "float32", "shape": ["batch", "masks", cfg.vocab_size]},
            {"name": "nsp_logprobs", "dtype": "float32", "shape": ["batch", 2]},
            {"name": "hidden_states", "dtype": "float32", "shape": [*tokens, cfg.n_embd]},
        ],
        "parity": parity,
        "onnx_checker": "passed",
    }
