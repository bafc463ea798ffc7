"""PyTorch -> ONNX for the `gpt` family: the scoring graph, its I/O contract, and the parity check.

The server (no torch) depends on this contract, and `export_gpt` returns it for the model manifest:

inputs (int64, dynamic batch B and sequence T):
  input_ids       [B, T]
  attention_mask  [B, T]   1 real token, 0 pad; left or right padding
  position_ids    [B, T]   `cumsum(mask) - 1` at real tokens, 0 at pads (models.gpt.position_ids_from_mask)
outputs (float32):
  token_logprobs  [B, T]   log P(x_t | x_<t) where tokens t-1 and t are both real; 0.0 elsewhere: column 0,
                           the first real token of a left-padded row (nothing before it), and pads. A row's
                           sum is therefore the log-probability of its tokens after the first.
  next_logprobs   [B, V]   log-softmax over the token that follows each row's last real token
  hidden_states   [B, T, C] final-LayerNorm output (sentence embeddings pool it over real tokens)

Log-softmax and the gathers run in the graph, so the [B, T, V] logits never leave it.

`export_gpt_decoder` exports a second graph for generation, with a KV cache (GPTDecoderGraph): one merged
graph for prefill (zero-length pasts) and decode, Optimum's `past_key_values.{i}.key|value` ->
`present.{i}.key|value` [B, n_head, S, head_dim], LEFT-padded batches; see its docstring for the contract.
The exporter is the TorchScript one (`dynamo=False`): it maps `scaled_dot_product_attention` with a
boolean mask to MatMul/Where/Add/Softmax from opset 14, and keeps `dynamic_axes` as given.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
from plm.export.parity import PARITY_TOLERANCE, export_module, make_model, output_diff, require_parity
from plm.models.gpt import GPT, position_ids_from_mask
from plm.service.contract.graphs import (
    DECODER_INPUT_NAMES,
    DECODER_OUTPUT_NAMES,
    kv_layout_feeds,
    kv_layout_inputs,
    kv_layout_outputs,
    past_names,
    present_names,
)
from torch import Tensor
from torch.nn import functional as F

INPUT_NAMES = ("input_ids", "attention_mask", "position_ids")
OUTPUT_NAMES = ("token_logprobs", "next_logprobs", "hidden_states")
# Shapes that differ from the export dummy (2, 8) in both batch and length, and include batch 1 and 7.
PARITY_SHAPES = ((1, 1), (1, 5), (3, 11), (7, 9), (5, 16))
_DUMMY_SHAPE = (2, 8)

# Exporter messages that are noise for us: the notice that the TorchScript exporter is legacy (we choose
# it on purpose, see the module docstring) and a deprecation inside its own implementation.


class GPTScoringGraph(nn.Module):
    """The graph the server runs: GPT hidden states, then log-probabilities computed in-graph."""

    def __init__(self, model: GPT) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> tuple[Tensor, ...]:
        B, T = input_ids.size()
        hidden = self.model.hidden_states(input_ids, attention_mask, position_ids)  # (B, T, C)
        logprobs = F.log_softmax(self.model.lm_head(hidden), dim=-1)  # (B, T, V)
        # log P(x_t | x_<t) is read at position t-1: gather input_ids[:, 1:] from logprobs[:, :-1].
        scored = logprobs[:, :-1].gather(-1, input_ids[:, 1:].unsqueeze(-1))[..., 0]  # (B, T-1)
        real = attention_mask > 0  # (B, T)
        scored = torch.where(real[:, 1:] & real[:, :-1], scored, torch.zeros_like(scored))
        first = torch.zeros_like(input_ids[:, :1], dtype=scored.dtype)  # (B, 1); scored is empty at T=1
        token_logprobs = torch.cat((first, scored), dim=1)  # (B, T)
        # The last real column of each row, left or right padded: argmax_t of mask[t] * (t + 1).
        ranks = attention_mask * torch.arange(1, T + 1, device=input_ids.device)  # (B, T)
        last = ranks.argmax(dim=1)  # (B,); the maximum is unique, as real columns have distinct ranks
        index = last.view(B, 1, 1).expand(B, 1, logprobs.size(-1))  # (B, 1, V)
        next_logprobs = logprobs.gather(1, index)[:, 0]  # (B, V); squeeze(1) would export as an If
        return token_logprobs, next_logprobs, hidden


def _random_batch(
    vocab_size: int, batch: int, length: int, padding: str, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """Random ids with rows of random real lengths (one row full) padded on `padding` ('left'|'right')."""
    ids = torch.randint(0, vocab_size, (batch, length), generator=generator)
    lengths = torch.randint(1, length + 1, (batch,), generator=generator)
    lengths[0] = length
    cols = torch.arange(length)
    if padding == "right":
        mask = (cols[None, :] < lengths[:, None]).long()
    else:
        mask = (cols[None, :] >= length - lengths[:, None]).long()
    ids = ids * mask  # pad id 0, as the server pads (any id must do)
    return ids, mask, position_ids_from_mask(mask)


def check_parity(
    model: GPT, path: Path, shapes: tuple[tuple[int, int], ...] = PARITY_SHAPES, seed: int = 0
) -> dict[str, Any]:
    """Run ONNX Runtime and PyTorch on random left- and right-padded batches of `shapes` (one session, so
    the batch and sequence axes are shown to be dynamic); max |ONNX - PyTorch| over the three outputs at
    real positions (hidden_states at real tokens; the other two are defined everywhere)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    graph = GPTScoringGraph(model).eval()
    generator = torch.Generator().manual_seed(seed)
    max_diff = 0.0
    checked: list[list[Any]] = []
    for batch, length in shapes:
        length = min(length, model.config.block_size)
        for padding in ("right", "left"):
            inputs = _random_batch(model.config.vocab_size, batch, length, padding, generator)
            with torch.no_grad():
                expected = [t.numpy() for t in graph(*inputs)]
            feeds = {name: t.numpy() for name, t in zip(INPUT_NAMES, inputs, strict=True)}
            got = session.run(list(OUTPUT_NAMES), feeds)
            max_diff = max(max_diff, output_diff(OUTPUT_NAMES, expected, got, feeds["attention_mask"] > 0))
            checked.append([batch, length, padding])
    return {"max_abs_diff": max_diff, "tolerance": PARITY_TOLERANCE, "checked_shapes": checked}


def _check_exported(path: Path, vocab_size: int, parity: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Declare `next_logprobs`' vocabulary axis, check again, and run the parity check (fatal if off)."""
    proto = onnx.load(str(path))
    # The exporter's shape inference loses V behind the gather; declare it, as hidden_states declares C.
    next_output = next(o for o in proto.graph.output if o.name == "next_logprobs")
    next_output.type.tensor_type.shape.dim[1].dim_value = vocab_size
    onnx.save(proto, str(path))
    onnx.checker.check_model(proto, full_check=True)
    result = parity()
    require_parity(result, path.name)
    return result


def export_gpt(model: GPT, path: Path, *, opset: int = 17) -> dict[str, Any]:
    """Export `model`'s scoring graph to `path`, check it (onnx.checker, parity with PyTorch) and return
    its manifest entry. Raises RuntimeError when ONNX and PyTorch differ by more than PARITY_TOLERANCE."""
    was_training = model.training
    model.eval()
    cfg = model.config
    graph = GPTScoringGraph(model).eval()
    dummy = _random_batch(cfg.vocab_size, *_DUMMY_SHAPE, "left", torch.Generator().manual_seed(0))
    axes = {0: "batch", 1: "sequence"}
    export_module(graph, dummy, path, INPUT_NAMES, OUTPUT_NAMES, {
        **{name: axes for name in INPUT_NAMES},
        "token_logprobs": axes,
        "next_logprobs": {0: "batch"},
        "hidden_states": axes,
    }, opset)
    parity = _check_exported(path, cfg.vocab_size, lambda: check_parity(model, path))
    model.train(was_training)
    seq = ["batch", "sequence"]
    return {
        "file": path.name,
        "opset": opset,
        "inputs": [{"name": name, "dtype": "int64", "shape": seq} for name in INPUT_NAMES],
        "outputs": [
            {"name": "token_logprobs", "dtype": "float32", "shape": seq},
            {"name": "next_logprobs", "dtype": "float32", "shape": ["batch", cfg.vocab_size]},
            {"name": "hidden_states", "dtype": "float32", "shape": [*seq, cfg.n_embd]},
        ],
        "parity": parity,
        "onnx_checker": "passed",
    }


# --- the KV-cache decoder graph (generation) ------------------------------------------------------------

# (batch, prompt length, then the lengths of the following steps): prefill at past 0, one-token decodes,
# and multi-token steps (T > 1 after a past), in batches of 1 and several with left padding.
DECODER_PARITY_RUNS = ((1, 1, (1, 1, 1)), (1, 6, (1, 1, 1, 2)), (3, 7, (1, 1, 3, 1)), (5, 4, (2, 1, 1, 1)))
_DECODER_DUMMY = (2, 3, 4)  # batch, new tokens, past length: all distinct and > 1, so no axis specialises


class GPTDecoderGraph(nn.Module):
    """One step of generation with a KV cache: T new tokens after P cached positions (P may be 0).

    Inputs: input_ids (B, T), attention_mask (B, P + T), position_ids (B, T), then per layer the past
    key and value (B, nh, P, hs). Outputs: next_logprobs (B, V), the log-softmax after each row's last
    real new token (the last column for left-padded batches and for every decode step), then per layer the
    present key and value (B, nh, P + T, hs). Only that one position goes through the LM head.
    """

    def __init__(self, model: GPT) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, *past: Tensor
    ) -> tuple[Tensor, ...]:
        B, T = input_ids.size()
        layers = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
        hidden, presents = self.model.hidden_states_with_cache(input_ids, attention_mask, position_ids, layers)
        # The last real column among the T new ones: argmax_t of mask[t] * (t + 1) (see GPTScoringGraph).
        ranks = attention_mask[:, -T:] * torch.arange(1, T + 1, device=input_ids.device)  # (B, T)
        last = ranks.argmax(dim=1)  # (B,)
        index = last.view(B, 1, 1).expand(B, 1, hidden.size(-1))  # (B, 1, C)
        last_hidden = hidden.gather(1, index)[:, 0]  # (B, C)
        next_logprobs = F.log_softmax(self.model.lm_head(last_hidden), dim=-1)  # (B, V)
        return (next_logprobs, *[t for kv in presents for t in kv])


def _empty_past(model: GPT, batch: int) -> list[Tensor]:
    """Past keys and values of length 0 for every layer: what the first (prefill) step takes."""
    cfg = model.config
    shape = (batch, cfg.n_head, 0, cfg.n_embd // cfg.n_head)
    return [torch.zeros(shape) for _ in range(2 * cfg.n_layer)]


def check_decoder_parity(
    model: GPT, path: Path, runs: tuple[tuple[int, int, tuple[int, ...]], ...] = DECODER_PARITY_RUNS, seed: int = 0
) -> dict[str, Any]:
    """Prefill random left-padded prompts (past length 0), then run the given decode steps with random
    tokens, ONNX Runtime feeding its presents back as pasts and PyTorch its own; max |ONNX - PyTorch| over
    next_logprobs and every present."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    graph = GPTDecoderGraph(model).eval()
    n_layer = model.config.n_layer
    output_names = [*DECODER_OUTPUT_NAMES, *present_names(n_layer)]
    generator = torch.Generator().manual_seed(seed)
    max_diff = 0.0
    checked: list[list[Any]] = []
    for batch, prompt_length, steps in runs:
        prompt, full_mask, _ = _random_batch(model.config.vocab_size, batch, prompt_length, "left", generator)
        torch_past = _empty_past(model, batch)
        ort_past = [t.numpy() for t in torch_past]
        for step, T in enumerate((prompt_length, *steps)):
            ids = prompt
            if step > 0:  # T new real tokens appended at the right
                ids = torch.randint(0, model.config.vocab_size, (batch, T), generator=generator)
                full_mask = torch.cat((full_mask, torch.ones_like(ids)), dim=1)
            pos = position_ids_from_mask(full_mask)[:, -T:]
            with torch.no_grad():
                expected = graph(ids, full_mask, pos, *torch_past)
            feeds = {"input_ids": ids.numpy(), "attention_mask": full_mask.numpy(), "position_ids": pos.numpy()}
            feeds.update(zip(past_names(n_layer), ort_past, strict=True))
            got = session.run(output_names, feeds)
            for name, e, g in zip(output_names, expected, got, strict=True):
                if g.shape != tuple(e.shape):
                    raise RuntimeError(f"{name}: ONNX shape {g.shape} != PyTorch {tuple(e.shape)}")
                max_diff = max(max_diff, float(np.abs(g - e.numpy()).max()))
            torch_past, ort_past = list(expected[1:]), got[1:]
            checked.append([batch, int(full_mask.size(1)) - T, T])  # batch, past length, new tokens
    return {"max_abs_diff": max_diff, "tolerance": PARITY_TOLERANCE, "checked_steps": checked}


def export_gpt_decoder(model: GPT, path: Path, *, opset: int = 17) -> dict[str, Any]:
    """Export `model`'s KV-cache decoder (GPTDecoderGraph) to `path`, check it (onnx.checker, parity with
    PyTorch over prefill and decode steps) and return its manifest entry.

    One merged graph serves prefill (past length 0: ONNX Runtime takes zero-length past tensors) and decode
    (T >= 1 new tokens). Padding convention: LEFT padding. The prompt batch is left padded, each step
    appends its tokens at the right with mask 1, so `next_logprobs` is always the last column's; the graph
    reads the last real new column, so a right-padded prefill also gives the right next_logprobs, but its
    pads then sit between prompt and continuation (masked, harmless). The caller keeps the mask over past +
    new columns and passes `position_ids = (cumsum(mask) - 1)` clamped at 0, sliced to the last T columns.
    Raises RuntimeError when ONNX and PyTorch differ by more than PARITY_TOLERANCE.
    """
    was_training = model.training
    model.eval()
    cfg = model.config
    head_dim = cfg.n_embd // cfg.n_head
    graph = GPTDecoderGraph(model).eval()
    batch, new, past_length = _DECODER_DUMMY
    generator = torch.Generator().manual_seed(0)
    ids, mask, _ = _random_batch(cfg.vocab_size, batch, past_length + new, "left", generator)
    pos = position_ids_from_mask(mask)[:, -new:]
    past = [torch.randn(batch, cfg.n_head, past_length, head_dim, generator=generator) for _ in range(2 * cfg.n_layer)]
    dummy = (ids[:, -new:], mask, pos, *past)
    inputs, pasts, presents = list(DECODER_INPUT_NAMES), past_names(cfg.n_layer), present_names(cfg.n_layer)
    seq = {0: "batch", 1: "sequence"}
    kv_in = {0: "batch", 2: "past_sequence"}
    kv_out = {0: "batch", 2: "past_sequence + sequence"}
    export_module(graph, dummy, path, inputs + pasts, [*DECODER_OUTPUT_NAMES, *presents], {
        "input_ids": seq,
        "attention_mask": {0: "batch", 1: "past_sequence + sequence"},
        "position_ids": seq,
        **{name: kv_in for name in pasts},
        "next_logprobs": {0: "batch"},
        **{name: kv_out for name in presents},
    }, opset)
    parity = _check_exported(path, cfg.vocab_size, lambda: check_decoder_parity(model, path))
    model.train(was_training)

    def kv_shape(axis: str) -> list[Any]:
        return ["batch", cfg.n_head, axis, head_dim]

    return {
        "file": path.name,
        "opset": opset,
        "inputs": [
            {"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]},
            {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "past_sequence + sequence"]},
            {"name": "position_ids", "dtype": "int64", "shape": ["batch", "sequence"]},
            *[{"name": name, "dtype": "float32", "shape": kv_shape("past_sequence")} for name in pasts],
        ],
        "outputs": [
            {"name": "next_logprobs", "dtype": "float32", "shape": ["batch", cfg.vocab_size]},
            *[{"name": name, "dtype": "float32", "shape": kv_shape("past_sequence + sequence")} for name in presents],
        ],
        "padding": "left",
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "head_dim": head_dim,
        "parity": parity,
        "onnx_checker": "passed",
    }


# --- the KV layout graph (the engine's joins and leaves on the decoder's device) -------------------------------


def export_kv_layout(path: Path, tensors: int, *, opset: int = 17) -> dict[str, Any]:
    """A graph that lays the generation engine's keys and values out again where the decoder keeps them (a GPU
    under IO binding), instead of a round trip through host memory when sequences join or leave.

    Inputs: `a.{i}` (Ba, H, Pa, D) and `b.{i}` (Bb, H, Pb, D) float for i < `tensors` (the running batch's and
    the joiners' keys and values), `a_rows` (Ka,) and `b_rows` (Kb,) int64 (the rows kept, in order),
    `start` (1,) int64 = −width, and `a_pads`, `b_pads` (8,) int64: ONNX Pad's pads, zero but for the left
    padding of the past axis, width − min(P, width) (the caller knows the shapes: computing them here would
    put shape arithmetic on the CPU between GPU kernels). Output `out.{i}` (Ka + Kb, H, width, D): the kept rows
    of a, then those of b, each cut to its last `width` columns or left-padded with zeros to them
    (service/generation/kv_batch.py, `Scratch.layout`, does the same in numpy). Checked against numpy here.
    """
    from onnx import TensorProto, helper

    nodes: list[Any] = [
        helper.make_node("Constant", [], ["axis2"], value=helper.make_tensor("axis2", TensorProto.INT64, [1], [2])),
        helper.make_node("Constant", [], ["big"], value=helper.make_tensor("big", TensorProto.INT64, [1], [2**62])),
    ]
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, [d]) for n, d in
              (("a_rows", "ka"), ("b_rows", "kb"), ("start", 1), ("a_pads", 8), ("b_pads", 8))]
    outputs = []
    names = {side: kv_layout_inputs(side, tensors) for side in ("a", "b")}
    for i, out in enumerate(kv_layout_outputs(tensors)):
        parts = []
        for side in ("a", "b"):
            x, tag = names[side][i], f"{side}{i}"
            inputs.append(helper.make_tensor_value_info(x, TensorProto.FLOAT, [f"{side}_batch", "heads", f"{side}_past",
                                                                               "head_dim"]))
            nodes += [
                helper.make_node("Gather", [x, f"{side}_rows"], [f"{tag}_g"], axis=0),
                helper.make_node("Slice", [f"{tag}_g", "start", "big", "axis2"], [f"{tag}_s"]),  # last columns
                helper.make_node("Pad", [f"{tag}_s", f"{side}_pads"], [f"{tag}_p"], mode="constant"),
            ]
            parts.append(f"{tag}_p")
        nodes.append(helper.make_node("Concat", parts, [out], axis=0))
        outputs.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, ["rows", "heads", "width", "head_dim"]))
    model = make_model(helper.make_graph(nodes, "kv_layout", inputs, outputs), opset)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    _check_kv_layout(path, tensors)
    return {"file": path.name, "opset": opset, "tensors": tensors,
            "inputs": ["a.{i}", "b.{i}", "a_rows", "b_rows", "start", "a_pads", "b_pads"], "outputs": ["out.{i}"]}


def kv_layout_reference(a: np.ndarray, a_rows: np.ndarray, b: np.ndarray, b_rows: np.ndarray,
                        width: int) -> np.ndarray:
    """What the layout graph computes, in numpy."""
    def side(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
        kept = x[rows][:, :, max(0, x.shape[2] - width):]
        return np.pad(kept, ((0, 0), (0, 0), (width - kept.shape[2], 0), (0, 0)))
    return np.concatenate([side(a, a_rows), side(b, b_rows)])


def _check_kv_layout(path: Path, tensors: int) -> None:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for pa, pb, width, ka, kb in ((7, 3, 7, [2, 0], [1]), (9, 0, 5, [0, 1, 2], []), (4, 6, 6, [], [0, 1]),
                                  (0, 5, 5, [], [0])):
        a = [rng.standard_normal((3, 2, pa, 4)).astype(np.float32) for _ in range(tensors)]
        b = [rng.standard_normal((2, 2, pb, 4)).astype(np.float32) for _ in range(tensors)]
        feeds = {**kv_layout_feeds(ka, pa, kb, pb, width),
                 **dict(zip(kv_layout_inputs("a", tensors), a, strict=True)),
                 **dict(zip(kv_layout_inputs("b", tensors), b, strict=True))}
        got = session.run(None, feeds)
        for i in range(tensors):
            want = kv_layout_reference(a[i], feeds["a_rows"], b[i], feeds["b_rows"], width)
            if got[i].shape != want.shape or not np.array_equal(got[i], want):
                raise RuntimeError(f"{path.name}: the KV layout graph differs from numpy at {(pa, pb, width, ka, kb)}")
