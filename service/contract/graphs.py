"""The graph I/O names of the KV-cache decoder and of the KV layout graph, and the layout graph's index feeds.

Export writes graphs with these names (export/onnx_export.py) and the generation runner feeds and reads them
(service/generation/runner.py): both import them from here, so a name is spelled once. numpy only.

The decoder: inputs `input_ids` (B, T), `attention_mask` (B, P + T), `position_ids` (B, T), then per layer
`past_key_values.{i}.key|value` (B, H, P, D); outputs `next_logprobs` (B, V), then per layer
`present.{i}.key|value` (B, H, P + T, D). The KV layout graph: inputs `a.{i}`, `b.{i}` (the running batch's
and the joiners' keys and values) and the index feeds of `kv_layout_feeds`; outputs `out.{i}`.
"""

from __future__ import annotations

import numpy as np

DECODER_INPUT_NAMES = ("input_ids", "attention_mask", "position_ids")  # then past_key_values.{i}.key|value
DECODER_OUTPUT_NAMES = ("next_logprobs",)  # then present.{i}.key|value
NEXT_LOGPROBS = DECODER_OUTPUT_NAMES[0]


def past_names(n_layer: int) -> list[str]:
    """`past_key_values.{i}.key`, `past_key_values.{i}.value` for every layer, in graph input order."""
    return [f"past_key_values.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]


def present_names(n_layer: int) -> list[str]:
    """`present.{i}.key`, `present.{i}.value` for every layer, in graph output order."""
    return [f"present.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]


# The encoder-decoder (`encdec`) graphs. Encoder: inputs ENCODER_INPUT_NAMES, (B, S) int64, right-padded; outputs
# `cross.{i}.key|value` (B, H, S, D) per decoder layer, the cross-attention keys and values computed once per source.
# Decoder: DECODER_INPUT_NAMES, then ENCODER_ATTENTION_MASK (B, S), then the self-attention pasts
# `past_key_values.{i}.key|value` (B, H, P, D), then `cross.{i}.key|value`; outputs as the GPT decoder's.
ENCODER_INPUT_NAMES = ("input_ids", "attention_mask")
ENCODER_ATTENTION_MASK = "encoder_attention_mask"


def cross_names(n_layer: int) -> list[str]:
    """`cross.{i}.key`, `cross.{i}.value` for every decoder layer: the encoder graph's outputs, the decoder's inputs."""
    return [f"cross.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]


def kv_layout_inputs(side: str, tensors: int) -> list[str]:
    """The layout graph's key and value inputs of one side (`a`: the running batch, `b`: the joiners)."""
    return [f"{side}.{i}" for i in range(tensors)]


def kv_layout_outputs(tensors: int) -> list[str]:
    """The layout graph's outputs, one per key or value array, in the decoder's present order."""
    return [f"out.{i}" for i in range(tensors)]


def kv_layout_feeds(a_rows: list[int], a_past: int, b_rows: list[int], b_past: int,
                    width: int) -> dict[str, np.ndarray]:
    """The KV layout graph's index inputs (export_kv_layout): the rows kept of each side, whose pasts have
    `a_past` and `b_past` columns, laid out `width` columns wide."""
    def pads(past: int) -> np.ndarray:
        return np.array([0, 0, width - min(past, width), 0, 0, 0, 0, 0], dtype=np.int64)
    return {"a_rows": np.asarray(a_rows, dtype=np.int64), "b_rows": np.asarray(b_rows, dtype=np.int64),
            "start": np.array([-width], dtype=np.int64), "a_pads": pads(a_past), "b_pads": pads(b_past)}
