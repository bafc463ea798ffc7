"""word2vec -> ONNX: the two graphs the `word2vec` adapter runs, their I/O contract, and the parity check.

The graphs are small enough to write node by node with `onnx.helper` (no tracing): the served vocabulary is
the model's, with two rows put in front of it, `SPECIALS` = ("<unk>", "[MASK]") at ids 0 and 1. Their input
vectors are zero and their cloze logit is `SPECIAL_LOGIT`, so they are never predicted.

vectors.onnx
  input_ids     int64   [B]     served ids
  vectors       float32 [B, D]  the L2-normalised input vector (wv); the zero rows of the specials stay zero
cloze.onnx    ("context → centre word", CBOW's own training objective, read as a fill-in-the-blank)
  context_ids   int64   [B, C]  the words around the blank
  context_mask  int64   [B, C]  1 real, 0 pad
  logprobs      float32 [B, V]  log_softmax over the vocabulary of mean(real context wv) · syn1negᵀ

The cloze formula is the CBOW forward pass (the mean, `cbow_mean=1`) scored against every output vector, i.e.
the full softmax that negative sampling approximates. A skip-gram model gets the same graph over its own
matrices: it was trained to score (context → centre) one context word at a time, so the mean of its context
vectors is an approximation it was never trained on, but it ranks plausible centre words well in practice.
A row with no real context word has a zero mean: every ordinary word gets logit 0 (uniform).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from plm.export.parity import PARITY_TOLERANCE, make_model, require_parity

SPECIALS = ("<unk>", "[MASK]")  # served ids 0 and 1, ahead of the trained vocabulary
UNK_ID, MASK_ID = 0, 1
# Finite rather than -inf, so JSON manifests and |ONNX - numpy| stay finite; exp(-1e9) is exactly 0 in float32.
SPECIAL_LOGIT = -1e9
OPSET = 17


def served_matrices(wv: np.ndarray, syn1neg: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(V+2, D) input and output matrices with the special rows in front, and the (V+2,) logit bias."""
    d = wv.shape[1]
    pad = np.zeros((len(SPECIALS), d), dtype=np.float32)
    bias = np.zeros(len(SPECIALS) + len(wv), dtype=np.float32)
    bias[: len(SPECIALS)] = SPECIAL_LOGIT
    return (np.concatenate([pad, wv.astype(np.float32)]), np.concatenate([pad, syn1neg.astype(np.float32)]), bias)


# ------------------------------------------------------------------------------------ numpy references


def vectors_reference(wv: np.ndarray, ids: np.ndarray) -> np.ndarray:
    rows = wv[ids].astype(np.float64)
    return (rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def cloze_reference(wv: np.ndarray, syn1neg: np.ndarray, bias: np.ndarray, ids: np.ndarray,
                    mask: np.ndarray) -> np.ndarray:
    m = mask.astype(np.float64)[..., None]  # (B, C, 1)
    h = (wv[ids].astype(np.float64) * m).sum(1) / np.maximum(m.sum(1), 1.0)  # (B, D)
    logits = h @ syn1neg.T.astype(np.float64) + bias  # (B, V)
    logits -= logits.max(1, keepdims=True)
    return (logits - np.log(np.exp(logits).sum(1, keepdims=True))).astype(np.float32)


# ------------------------------------------------------------------------------------ graphs


def _const(name: str, value: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(value, name)


def vectors_graph(wv: np.ndarray) -> onnx.ModelProto:
    d = wv.shape[1]
    nodes = [
        helper.make_node("Gather", ["wv", "input_ids"], ["rows"], axis=0),  # (B, D)
        helper.make_node("ReduceL2", ["rows"], ["norm"], axes=[-1], keepdims=1),  # (B, 1); opset 17: axes attr
        helper.make_node("Max", ["norm", "eps"], ["safe_norm"]),  # zero rows (specials) stay zero
        helper.make_node("Div", ["rows", "safe_norm"], ["vectors"]),
    ]
    graph = helper.make_graph(
        nodes, "word2vec_vectors",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info("vectors", TensorProto.FLOAT, ["batch", d])],
        [_const("wv", wv), _const("eps", np.array(1e-12, dtype=np.float32))],
    )
    return make_model(graph, OPSET)


def cloze_graph(wv: np.ndarray, syn1neg: np.ndarray, bias: np.ndarray) -> onnx.ModelProto:
    v = syn1neg.shape[0]
    nodes = [
        helper.make_node("Gather", ["wv", "context_ids"], ["ctx"], axis=0),  # (B, C, D)
        helper.make_node("Cast", ["context_mask"], ["maskf"], to=TensorProto.FLOAT),  # (B, C)
        helper.make_node("Unsqueeze", ["maskf", "axis_last"], ["mask3"]),  # (B, C, 1)
        helper.make_node("Mul", ["ctx", "mask3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axis_one"], ["total"], keepdims=0),  # (B, D)
        helper.make_node("ReduceSum", ["maskf", "axis_last"], ["count"], keepdims=1),  # (B, 1)
        helper.make_node("Max", ["count", "one"], ["safe_count"]),  # no context: a zero mean
        helper.make_node("Div", ["total", "safe_count"], ["h"]),  # (B, D)
        helper.make_node("MatMul", ["h", "syn1neg_t"], ["scores"]),  # (B, V)
        helper.make_node("Add", ["scores", "bias"], ["logits"]),
        helper.make_node("LogSoftmax", ["logits"], ["logprobs"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes, "word2vec_cloze",
        [helper.make_tensor_value_info("context_ids", TensorProto.INT64, ["batch", "context"]),
         helper.make_tensor_value_info("context_mask", TensorProto.INT64, ["batch", "context"])],
        [helper.make_tensor_value_info("logprobs", TensorProto.FLOAT, ["batch", v])],
        [_const("wv", wv), _const("syn1neg_t", np.ascontiguousarray(syn1neg.T)), _const("bias", bias),
         _const("axis_last", np.array([-1], dtype=np.int64)), _const("axis_one", np.array([1], dtype=np.int64)),
         _const("one", np.array(1.0, dtype=np.float32))],
    )
    return make_model(graph, OPSET)


# ------------------------------------------------------------------------------------ export + parity


def check_parity(folder: Path, wv: np.ndarray, syn1neg: np.ndarray, bias: np.ndarray,
                 seed: int = 0) -> dict[str, Any]:
    """max |ONNX − numpy| of both graphs on random batches of several shapes (one session each, so the
    dynamic axes are exercised), with every special id and some all-pad context rows included."""
    rng = np.random.default_rng(seed)
    v = len(wv)
    vec = ort.InferenceSession(str(folder / "vectors.onnx"), providers=["CPUExecutionProvider"])
    cloze = ort.InferenceSession(str(folder / "cloze.onnx"), providers=["CPUExecutionProvider"])
    diffs = {"vectors": 0.0, "cloze": 0.0}
    shapes = ((1, 1), (3, 4), (7, 10), (16, 2))
    for b, c in shapes:
        ids = rng.integers(0, v, size=b).astype(np.int64)
        ids[0] = UNK_ID
        (got,) = vec.run(["vectors"], {"input_ids": ids})
        diffs["vectors"] = max(diffs["vectors"], float(np.abs(got - vectors_reference(wv, ids)).max()))
        ctx = rng.integers(0, v, size=(b, c)).astype(np.int64)
        mask = (rng.random((b, c)) < 0.7).astype(np.int64)
        mask[-1] = 0  # a row without context
        (lp,) = cloze.run(["logprobs"], {"context_ids": ctx, "context_mask": mask})
        diffs["cloze"] = max(diffs["cloze"], float(np.abs(lp - cloze_reference(wv, syn1neg, bias, ctx, mask)).max()))
    return {"max_abs_diff": max(diffs.values()), "per_graph": diffs, "tolerance": PARITY_TOLERANCE,
            "reference": "numpy (float64)", "checked_shapes": [list(s) for s in shapes]}


def export_word2vec(wv: np.ndarray, syn1neg: np.ndarray, folder: Path) -> dict[str, Any]:
    """Write vectors.onnx and cloze.onnx for trained (V, D) matrices (specials added in front); check them
    (onnx.checker, parity with numpy) and return the manifest's `graphs` and `parity` entries.
    Raises RuntimeError when ONNX and numpy differ by more than PARITY_TOLERANCE."""
    swv, ssyn, bias = served_matrices(wv, syn1neg)
    v, d = swv.shape
    folder.mkdir(parents=True, exist_ok=True)
    for name, proto in (("vectors", vectors_graph(swv)), ("cloze", cloze_graph(swv, ssyn, bias))):
        onnx.checker.check_model(proto, full_check=True)
        onnx.save(proto, str(folder / f"{name}.onnx"))
    parity = check_parity(folder, swv, ssyn, bias)
    require_parity(parity, "word2vec vectors.onnx / cloze.onnx")
    graphs = {
        "vectors": {
            "file": "vectors.onnx", "opset": OPSET,
            "inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch"]}],
            "outputs": [{"name": "vectors", "dtype": "float32", "shape": ["batch", d]}],
            "onnx_checker": "passed",
        },
        "cloze": {
            "file": "cloze.onnx", "opset": OPSET,
            "inputs": [{"name": "context_ids", "dtype": "int64", "shape": ["batch", "context"]},
                       {"name": "context_mask", "dtype": "int64", "shape": ["batch", "context"]}],
            "outputs": [{"name": "logprobs", "dtype": "float32", "shape": ["batch", v]}],
            "onnx_checker": "passed",
        },
    }
    return {"graphs": graphs, "parity": parity, "vocab_size": v, "dimension": d}
