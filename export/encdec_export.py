"""PyTorch -> ONNX for the `encdec` family's Transformer: the encoder graph, the decoder-with-past graph, their I/O
contract, parity with PyTorch, and greedy decoding through ONNX Runtime (the check that cache and batching change
no token).

The server (no torch) depends on this contract (names in service/contract/graphs.py):

encoder.onnx — runs once per request
  inputs   input_ids [B, S] int64, attention_mask [B, S] int64   RIGHT-padded sources ending with </s>
  outputs  cross.{i}.key, cross.{i}.value [B, H, S, D] float32   per decoder layer i: the cross-attention keys and
                                                                 values, projected from the encoder's last layer
decoder.onnx — one generation step, T new tokens after P cached (P = 0 at the first step)
  inputs   input_ids [B, T], attention_mask [B, P + T], position_ids [B, T]     int64, as the GPT decoder's: LEFT
                                                      padding, positions cumsum(mask) - 1 (0 at pads), sliced to T
           encoder_attention_mask [B, S] int64        the encoder's attention_mask, unchanged
           past_key_values.{i}.key|value [B, H, P, D] the self-attention cache (zero-length at the first step)
           cross.{i}.key|value [B, H, S, D]           the encoder graph's outputs, unchanged at every step
  outputs  next_logprobs [B, V]                       log-softmax after each row's last real new token
           present.{i}.key|value [B, H, P + T, D]     the next step's pasts

The first step feeds <s> (decoder_start_id) with zero-length pasts. The cross tensors are inputs, never outputs: the
caller holds them beside each sequence's growing self-attention cache. The exporter is the TorchScript one
(`dynamo=False`), which keeps `dynamic_axes` as given, as for GPT and BERT.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
from plm.export.parity import PARITY_TOLERANCE, export_module, require_parity
from plm.models.gpt import position_ids_from_mask
from plm.models.transformer import Transformer
from plm.service.contract.graphs import (
    DECODER_INPUT_NAMES,
    DECODER_OUTPUT_NAMES,
    ENCODER_ATTENTION_MASK,
    ENCODER_INPUT_NAMES,
    cross_names,
    past_names,
    present_names,
)
from torch import Tensor
from torch.nn import functional as F

# Parity runs: (batch, source length, decoder step lengths): the first step is the prefill (past 0), the rest
# follow it; batch 1 and several, single- and multi-token steps.
PARITY_RUNS = ((1, 1, (1, 1, 1)), (1, 9, (3, 1, 1)), (3, 12, (1, 1, 2, 1)), (5, 7, (2, 1, 1)))
_DUMMY = (2, 5, 3, 4)  # batch, source length, new tokens, past length: distinct and > 1, so no axis specialises


class EncoderGraph(nn.Module):
    """(input_ids, attention_mask) -> every decoder layer's cross-attention key and value."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, ...]:
        cross = self.model.cross_kv(self.model.encode(input_ids, attention_mask))
        return tuple(t for kv in cross for t in kv)


class DecoderGraph(nn.Module):
    """One decoding step with a self-attention cache and precomputed cross keys/values (see the module docstring)."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model
        self.n_layer = model.config.n_decoder_layer

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, encoder_attention_mask: Tensor,
                *kv: Tensor) -> tuple[Tensor, ...]:
        B, T = input_ids.size()
        n = 2 * self.n_layer
        past = [(kv[2 * i], kv[2 * i + 1]) for i in range(self.n_layer)]
        cross = [(kv[n + 2 * i], kv[n + 2 * i + 1]) for i in range(self.n_layer)]
        logits, presents = self.model.decode(input_ids, cross, encoder_attention_mask, attention_mask, position_ids,
                                             past)  # (B, T, V)
        # The last real new column: argmax_t of mask[t] * (t + 1), as the GPT decoder graph.
        ranks = attention_mask[:, -T:] * torch.arange(1, T + 1, device=input_ids.device)  # (B, T)
        index = ranks.argmax(dim=1).view(B, 1, 1).expand(B, 1, logits.size(-1))  # (B, 1, V)
        next_logprobs = F.log_softmax(logits.gather(1, index)[:, 0], dim=-1)  # (B, V)
        return (next_logprobs, *[t for kv_ in presents for t in kv_])


def random_sources(vocab_size: int, batch: int, length: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Right-padded random sources of random real lengths (one row full), pad id 0."""
    ids = torch.randint(1, vocab_size, (batch, length), generator=generator)
    lengths = torch.randint(1, length + 1, (batch,), generator=generator)
    lengths[0] = length
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    return ids * mask, mask


def _max_diff(names: list[str], expected: list[Tensor] | tuple[Tensor, ...], got: list[np.ndarray]) -> float:
    worst = 0.0
    for name, e, g in zip(names, expected, got, strict=True):
        if g.shape != tuple(e.shape):
            raise RuntimeError(f"{name}: ONNX shape {g.shape} != PyTorch {tuple(e.shape)}")
        worst = max(worst, float(np.abs(g - e.numpy()).max()) if g.size else 0.0)
    return worst


def check_parity(model: Transformer, encoder_path: Path, decoder_path: Path, seed: int = 0) -> dict[str, Any]:
    """Encode random right-padded sources, then run prefill and decode steps with random tokens, ONNX Runtime
    feeding back its own presents and PyTorch its own; the decoder's rows are left-padded in the first step (as
    rows that joined later are). max |ONNX - PyTorch| over the cross keys/values, next_logprobs and presents."""
    cfg = model.config
    n = cfg.n_decoder_layer
    encoder = ort.InferenceSession(str(encoder_path), providers=["CPUExecutionProvider"])
    decoder = ort.InferenceSession(str(decoder_path), providers=["CPUExecutionProvider"])
    enc_graph, dec_graph = EncoderGraph(model).eval(), DecoderGraph(model).eval()
    outputs = [*DECODER_OUTPUT_NAMES, *present_names(n)]
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    checked: list[list[int]] = []
    head_dim = cfg.d_model // cfg.n_head
    for batch, length, steps in PARITY_RUNS:
        source, source_mask = random_sources(cfg.vocab_size, batch, length, generator)
        with torch.no_grad():
            cross = list(enc_graph(source, source_mask))
        got_cross = encoder.run(cross_names(n), {"input_ids": source.numpy(), "attention_mask": source_mask.numpy()})
        worst = max(worst, _max_diff(cross_names(n), cross, got_cross))
        torch_past = [torch.zeros(batch, cfg.n_head, 0, head_dim) for _ in range(2 * n)]
        ort_past = [t.numpy() for t in torch_past]
        mask = torch.zeros(batch, 0, dtype=torch.long)
        for step, T in enumerate(steps):
            ids = torch.randint(1, cfg.vocab_size, (batch, T), generator=generator)
            new = torch.ones(batch, T, dtype=torch.long)
            if step == 0 and T > 1:  # rows after the first start later: left pads
                new[1:, : T - 1] = 0
            mask = torch.cat((mask, new), dim=1)
            pos = position_ids_from_mask(mask)[:, -T:]
            with torch.no_grad():
                expected = dec_graph(ids, mask, pos, source_mask, *torch_past, *cross)
            feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": pos.numpy(),
                     ENCODER_ATTENTION_MASK: source_mask.numpy(),
                     **dict(zip(past_names(n), ort_past, strict=True)),
                     **dict(zip(cross_names(n), got_cross, strict=True))}
            got = decoder.run(outputs, feeds)
            worst = max(worst, _max_diff(outputs, expected, got))
            torch_past, ort_past = list(expected[1:]), got[1:]
            checked.append([batch, length, int(mask.size(1)) - T, T])  # batch, source, past, new
    return {"max_abs_diff": worst, "tolerance": PARITY_TOLERANCE, "checked_steps": checked}


def export_encdec(model: Transformer, folder: Path, *, opset: int = 17) -> dict[str, dict[str, Any]]:
    """Export the encoder and decoder graphs into `folder` (encoder.onnx, decoder.onnx), check them (onnx.checker,
    parity with PyTorch over prefill and decode steps) and return their manifest entries {"encoder", "decoder"}.
    Raises RuntimeError when ONNX and PyTorch differ by more than PARITY_TOLERANCE."""
    was_training = model.training
    model.eval()
    cfg = model.config
    n, head_dim = cfg.n_decoder_layer, cfg.d_model // cfg.n_head
    batch, length, new, past_length = _DUMMY
    generator = torch.Generator().manual_seed(0)
    source, source_mask = random_sources(cfg.vocab_size, batch, length, generator)
    crosses = cross_names(n)
    cross_axes = {0: "batch", 2: "source_sequence"}
    source_axes = {0: "batch", 1: "source_sequence"}
    encoder_path, decoder_path = folder / "encoder.onnx", folder / "decoder.onnx"
    export_module(EncoderGraph(model).eval(), (source, source_mask), encoder_path, ENCODER_INPUT_NAMES, crosses,
                  {**{name: source_axes for name in ENCODER_INPUT_NAMES}, **{name: cross_axes for name in crosses}},
                  opset)
    with torch.no_grad():
        cross = list(EncoderGraph(model).eval()(source, source_mask))
    mask = torch.ones(batch, past_length + new, dtype=torch.long)
    mask[1, :2] = 0
    ids = torch.randint(1, cfg.vocab_size, (batch, new), generator=generator)
    pos = position_ids_from_mask(mask)[:, -new:]
    past = [torch.randn(batch, cfg.n_head, past_length, head_dim, generator=generator) for _ in range(2 * n)]
    pasts, presents = past_names(n), present_names(n)
    inputs = [*DECODER_INPUT_NAMES, ENCODER_ATTENTION_MASK, *pasts, *crosses]
    seq = {0: "batch", 1: "sequence"}
    export_module(DecoderGraph(model).eval(), (ids, mask, pos, source_mask, *past, *cross), decoder_path, inputs,
                  [*DECODER_OUTPUT_NAMES, *presents], {
                      "input_ids": seq, "position_ids": seq,
                      "attention_mask": {0: "batch", 1: "past_sequence + sequence"},
                      ENCODER_ATTENTION_MASK: source_axes,
                      **{name: {0: "batch", 2: "past_sequence"} for name in pasts},
                      **{name: cross_axes for name in crosses},
                      "next_logprobs": {0: "batch"},
                      **{name: {0: "batch", 2: "past_sequence + sequence"} for name in presents},
                  }, opset)
    proto = onnx.load(str(decoder_path))  # shape inference loses V behind the gather: declare it
    next(o for o in proto.graph.output if o.name == "next_logprobs").type.tensor_type.shape.dim[1].dim_value = \
        cfg.vocab_size
    onnx.save(proto, str(decoder_path))
    onnx.checker.check_model(proto, full_check=True)
    parity = check_parity(model, encoder_path, decoder_path)
    require_parity(parity, f"{encoder_path.name} + {decoder_path.name}")
    model.train(was_training)

    def io(name: str, dtype: str, shape: list[Any]) -> dict[str, Any]:
        return {"name": name, "dtype": dtype, "shape": shape}

    def kv(axis: str) -> list[Any]:
        return ["batch", cfg.n_head, axis, head_dim]

    dims = {"n_layer": n, "n_head": cfg.n_head, "head_dim": head_dim, "opset": opset, "onnx_checker": "passed"}
    source_shape = ["batch", "source_sequence"]
    encoder = {"file": encoder_path.name, **dims, "padding": "right",
               "inputs": [io(name, "int64", source_shape) for name in ENCODER_INPUT_NAMES],
               "outputs": [io(name, "float32", kv("source_sequence")) for name in crosses]}
    decoder = {"file": decoder_path.name, **dims, "padding": "left", "parity": parity,
               "inputs": [io("input_ids", "int64", ["batch", "sequence"]),
                          io("attention_mask", "int64", ["batch", "past_sequence + sequence"]),
                          io("position_ids", "int64", ["batch", "sequence"]),
                          io(ENCODER_ATTENTION_MASK, "int64", source_shape),
                          *[io(name, "float32", kv("past_sequence")) for name in pasts],
                          *[io(name, "float32", kv("source_sequence")) for name in crosses]],
               "outputs": [io("next_logprobs", "float32", ["batch", cfg.vocab_size]),
                           *[io(name, "float32", kv("past_sequence + sequence")) for name in presents]]}
    return {"encoder": encoder, "decoder": decoder}


class OnnxGreedy:
    """Greedy decoding through the two graphs, as a server would run them: the encoder once, then the decoder one
    token at a time on its cache (`use_cache`), or recomputing the whole prefix each step (pasts of length 0)."""

    def __init__(self, folder: Path, n_layer: int, n_head: int, head_dim: int, bos: int, eos: int, pad: int) -> None:
        options = ["CPUExecutionProvider"]
        self.encoder = ort.InferenceSession(str(folder / "encoder.onnx"), providers=options)
        self.decoder = ort.InferenceSession(str(folder / "decoder.onnx"), providers=options)
        self.n_layer, self.n_head, self.head_dim = n_layer, n_head, head_dim
        self.bos, self.eos, self.pad = bos, eos, pad

    def generate(self, source: np.ndarray, source_mask: np.ndarray, max_new_tokens: int,
                 use_cache: bool = True) -> np.ndarray:
        """(B, S) right-padded int64 sources -> (B, n) tokens, </s> included, pad after it."""
        n = self.n_layer
        B = source.shape[0]
        cross = self.encoder.run(cross_names(n), {"input_ids": source, "attention_mask": source_mask})
        empty = [np.zeros((B, self.n_head, 0, self.head_dim), dtype=np.float32) for _ in range(2 * n)]
        past = empty
        tokens = np.full((B, 1), self.bos, dtype=np.int64)
        done = np.zeros(B, dtype=bool)
        outputs = [*DECODER_OUTPUT_NAMES, *present_names(n)]
        for _ in range(max_new_tokens):
            ids = tokens[:, -1:] if use_cache else tokens
            mask = np.ones((B, tokens.shape[1]), dtype=np.int64)
            feeds = {"input_ids": ids, "attention_mask": mask,
                     "position_ids": np.broadcast_to(np.arange(tokens.shape[1] - ids.shape[1], tokens.shape[1]),
                                                     ids.shape).astype(np.int64),
                     ENCODER_ATTENTION_MASK: source_mask,
                     **dict(zip(past_names(n), past if use_cache else empty, strict=True)),
                     **dict(zip(cross_names(n), cross, strict=True))}
            got = self.decoder.run(outputs, feeds)
            past = got[1:]
            nxt = np.where(done, self.pad, got[0].argmax(axis=-1))
            tokens = np.concatenate((tokens, nxt[:, None]), axis=1)
            done |= nxt == self.eos
            if done.all():
                break
        return tokens[:, 1:]
