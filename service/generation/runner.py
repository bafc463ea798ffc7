"""The model runner: the decoder graph's runs (prefill, decode, Classify's continuations) and the KV layout
graph's, on the engine's thread.

Under IO binding (`runtime.io_binding`) the presents stay where the decoder's provider made them (OrtValues on
the GPU) and go back in as the next step's pasts as they are; the KV layout graph lays the batch out again on
that device when sequences join or leave. Classify's shared prompt prefixes (few-shot demonstrations) are run
once and kept (LRU, bounded by bytes); every (query, label) row then runs from their keys and values.

An encoder-decoder's runner also holds its encoder graph (`Encoder`): a joiner's prefill runs it once on the
joiners' sources (right-padded, </s> appended) and the decoder's first step from its start token; every decode
step then feeds the batch's cross-attention keys and values and source mask beside the self-attention pasts.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from plm.service.contract.graphs import (
    ENCODER_ATTENTION_MASK,
    NEXT_LOGPROBS,
    cross_names,
    kv_layout_feeds,
    kv_layout_inputs,
    kv_layout_outputs,
    past_names,
    present_names,
)
from plm.service.generation.kv_batch import EMPTY, Batch, lay_out_cross, layout_rows, nbytes
from plm.service.generation.request import Slot
from plm.service.metrics import Metrics
from plm.service.runtime import OrtSession

# `Runner.decode` builds the next step's Batch field by field: a field added to Batch must be passed on there too.
_BATCH_FIELDS = ("slots", "kv", "mask", "lengths", "holes", "holes_since", "cross", "cross_mask")
if tuple(f.name for f in dataclasses.fields(Batch)) != _BATCH_FIELDS:
    raise TypeError("kv_batch.Batch's fields changed: pass the new ones on in Runner.decode")


@dataclasses.dataclass(frozen=True)
class Encoder:
    """An encoder-decoder's encoder graph and the id that ends every source (</s>)."""

    session: OrtSession
    eos_id: int

    def run(self, sources: Sequence[Sequence[int]], pad_id: int, n_layer: int) -> tuple[list[np.ndarray], np.ndarray]:
        """Sources (</s> appended here), right-padded: the cross-attention keys and values (B, H, S, D) per decoder
        layer and the (B, S) source mask."""
        rows = [[*src, self.eos_id] for src in sources]
        s = max(len(r) for r in rows)
        ids = np.full((len(rows), s), pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), s), dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = r
            mask[i, :len(r)] = 1
        out = self.session.run(cross_names(n_layer), {"input_ids": ids, "attention_mask": mask}, stage="encode")
        return [out[n] for n in cross_names(n_layer)], mask


class Runner:
    """Runs one model's decoder graph (and its KV layout graph, if any) for the engine."""

    def __init__(self, model: str, session: OrtSession, n_layer: int, n_head: int, head_dim: int, bos_id: int,
                 pad_id: int, metrics: Metrics, layout: OrtSession | None = None,
                 encoder: Encoder | None = None) -> None:
        self.model = model
        self.session = session
        self.encoder = encoder  # an encoder-decoder's encoder graph (bos_id is then its decoder start id)
        self.n_layer = n_layer
        self.cross_names = cross_names(n_layer) if encoder is not None else []
        # Under IO binding, the KV layout graph (export_kv_layout) lays the batch out again on the decoder's
        # device when sequences join or leave; without it that goes through host memory.
        self.layout = layout if session.io_binding else None
        self.layout_outputs = kv_layout_outputs(2 * n_layer)
        self.n_head, self.head_dim = n_head, head_dim
        self.bos_id, self.pad_id = bos_id, pad_id
        self.metrics = metrics
        self.past_names = past_names(n_layer)
        self.present_names = present_names(n_layer)
        # Prompt prefixes already run (few-shot demonstrations): sha256 of the ids → (presents, next logprobs),
        # least recently used first; bounded by bytes. The presents are one row, kept where the decoder runs
        # when it has the KV layout graph (OrtValues on the GPU), else numpy arrays.
        self.prefixes: collections.OrderedDict[str, tuple[list[Any], np.ndarray]] = collections.OrderedDict()
        self._prefix_bytes = 0
        self.prefix_cache_max_bytes = 64 * 1024 * 1024
        self._m_batch = metrics.batch_size.labels(model)

    # -- graph runs -------------------------------------------------------------------------------------------
    def run(self, input_ids: np.ndarray, mask: np.ndarray, position_ids: np.ndarray, pasts: list[Any],
            stage: str, on_device: bool = True, cross: tuple[list[np.ndarray], np.ndarray] | None = None
            ) -> tuple[np.ndarray, list[Any]]:
        """The next-token log-probs (B, V) in host memory and the presents: numpy arrays, or under IO binding
        (unless `on_device` is False: presents that are laid out in host memory next) OrtValues left where the
        provider made them, fed back as the next step's pasts as they are. An encoder-decoder's decoder also takes
        `cross`: the cross-attention keys and values and the source mask."""
        feeds = {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids,
                 **dict(zip(self.past_names, pasts, strict=True))}
        if cross is not None:
            feeds[ENCODER_ATTENTION_MASK] = cross[1]
            feeds.update(zip(self.cross_names, cross[0], strict=True))
        self._m_batch.observe(len(input_ids))
        if self.session.io_binding and on_device:
            host, presents = self.session.run_bound([NEXT_LOGPROBS], self.present_names, feeds, stage=stage)
            return host[NEXT_LOGPROBS], presents
        out = self.session.run([NEXT_LOGPROBS, *self.present_names], feeds, stage=stage)
        return out[NEXT_LOGPROBS], [out[n] for n in self.present_names]

    def prefill(self, slots: Sequence[Slot]) -> tuple[np.ndarray, Batch]:
        """Prompts (BOS first) left-padded into one batch with an empty past: their next-token log-probs (B, V)
        and their batch, ready to join the running one. An encoder-decoder's prompts are its sources: the encoder
        runs on them once, and the decoder from its start token alone."""
        if self.encoder is not None:
            return self._prefill_encdec(slots)
        rows = [[self.bos_id, *s.seq.prompt_ids] for s in slots]
        b, t = len(rows), max(len(r) for r in rows)
        ids = np.full((b, t), self.pad_id, dtype=np.int64)
        mask = np.zeros((b, t), dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, t - len(r):] = r
            mask[i, t - len(r):] = 1
        pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
        empty = np.zeros((b, self.n_head, 0, self.head_dim), dtype=np.float32)
        # Joiners' keys and values stay where the batch is laid out again: the device with the layout graph, else
        # host memory.
        logprobs, presents = self.run(ids, mask, pos, [empty] * len(self.past_names), "prefill",
                                      on_device=self.layout is not None)
        return logprobs, Batch(list(slots), presents, mask, np.array([len(r) for r in rows], dtype=np.int64))

    def _prefill_encdec(self, slots: Sequence[Slot]) -> tuple[np.ndarray, Batch]:
        assert self.encoder is not None
        cross, source_mask = self.encoder.run([s.seq.prompt_ids for s in slots], self.pad_id, self.n_layer)
        b = len(slots)
        ids = np.full((b, 1), self.bos_id, dtype=np.int64)  # the decoder's start token, at position 0
        mask = np.ones((b, 1), dtype=np.int64)
        empty = np.zeros((b, self.n_head, 0, self.head_dim), dtype=np.float32)
        logprobs, presents = self.run(ids, mask, np.zeros((b, 1), dtype=np.int64), [empty] * len(self.past_names),
                                      "prefill", on_device=False, cross=(cross, source_mask))
        return logprobs, Batch(list(slots), presents, mask, np.ones(b, dtype=np.int64), cross=cross,
                               cross_mask=source_mask)

    def decode(self, batch: Batch) -> tuple[np.ndarray, Batch]:
        """One new token per running sequence: the next-token log-probs (B, V) and the batch whose pasts are
        this step's presents, as they are."""
        holes = batch.holes  # rows nobody holds: a pad token, attending to nothing but its own
        ids = np.array([[self.pad_id if i in holes else s.seq.generated[-1]] for i, s in enumerate(batch.slots)],
                       dtype=np.int64)  # (B, 1)
        mask = np.concatenate([batch.mask, np.ones((len(ids), 1), dtype=np.int64)], axis=1)  # (B, P + 1)
        pos = batch.lengths[:, None]  # the new token's position: after the row's real ones
        cross = (batch.cross, batch.cross_mask) if batch.cross_mask is not None else None
        logprobs, presents = self.run(ids, mask, pos, batch.kv, "decode", cross=cross)
        # Every field of Batch (_BATCH_FIELDS), as dataclasses.replace would pass them on at a greater cost per step.
        return logprobs, Batch(batch.slots, presents, mask, batch.lengths + 1, batch.holes, batch.holes_since,
                               batch.cross, batch.cross_mask)

    def layout_on_device(self, batch: Batch, keep: list[int], joined: Batch, rows: list[int]) -> Batch:
        """The kept rows of `batch`, then the joiners' `rows`, laid out by the KV layout graph where the decoder
        keeps them: what `Scratch.layout` does in host memory, without the round trip."""
        laid = layout_rows([(batch, keep), (joined, rows)])
        if not laid.slots:
            return EMPTY
        kv = self._lay_out((batch.kv, keep, batch.mask.shape[1]), (joined.kv, rows, joined.mask.shape[1]),
                           laid.mask.shape[1])
        # An encoder-decoder's cross-attention rows move with their sequences here too (in host memory).
        return dataclasses.replace(laid, kv=kv, **lay_out_cross([(batch, keep), (joined, rows)]))

    def _lay_out(self, a: tuple[list[Any], list[int], int], b: tuple[list[Any], list[int], int],
                 width: int) -> list[Any]:
        """The KV layout graph's run: rows `a[1]` of keys and values `a[0]` (whose past is `a[2]` columns), then
        rows `b[1]` of `b[0]`, `width` columns wide, on the decoder's device (rows may repeat)."""
        empty = np.zeros((0, self.n_head, 0, self.head_dim), dtype=np.float32)
        feeds: dict[str, Any] = kv_layout_feeds(a[1], a[2], b[1], b[2], width)
        n = len(self.layout_outputs)
        for i, (a_name, b_name) in enumerate(zip(kv_layout_inputs("a", n), kv_layout_inputs("b", n), strict=True)):
            feeds[a_name] = a[0][i] if a[0] else empty
            feeds[b_name] = b[0][i] if b[0] else empty
        assert self.layout is not None
        _, kv = self.layout.run_bound([], self.layout_outputs, feeds, stage="layout")
        return kv

    # -- scoring continuations of a shared prefix (Classify) ------------------------------------------------
    def score_continuations(self, prefix: list[int], rows: list[tuple[list[int], list[int]]]) -> list[np.ndarray]:
        """log P of each target token of each row, after `prefix` (BOS first) + the row's context tokens: per
        row, the (n_targets,) log-probabilities.

        The prefix's keys and values come from the cache (run once); every row then runs from them: its
        context tokens in one step, then its target tokens one step each (teacher forcing), all rows batched.
        """
        presents, after_prefix = self._prefix_state(prefix)
        b, p_len = len(rows), len(prefix)
        out = [np.zeros(len(targets), dtype=np.float64) for _, targets in rows]
        # Step 0: each row's context tokens, left-padded between the shared past and them (masked out).
        ctx_len = max(len(ctx) for ctx, _ in rows)
        if ctx_len == 0:  # no context after the prefix: the first target follows the prefix directly
            logprobs = np.repeat(after_prefix[None], b, axis=0)
            pasts = self._repeat(presents, b, p_len)
            mask = np.ones((b, p_len), dtype=np.int64)
        else:
            ids = np.full((b, ctx_len), self.pad_id, dtype=np.int64)
            mask = np.concatenate([np.ones((b, p_len), dtype=np.int64), np.zeros((b, ctx_len), dtype=np.int64)], 1)
            for i, (ctx, _) in enumerate(rows):
                if ctx:
                    ids[i, ctx_len - len(ctx):] = ctx
                    mask[i, p_len + ctx_len - len(ctx):] = 1
                else:  # nothing new for this row: feed the pad, masked, and read the prefix's distribution below
                    ids[i, -1] = self.pad_id
            pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)[:, p_len:]
            logprobs, pasts = self.run(ids, mask, pos, self._repeat(presents, b, p_len), "prefill")
            for i, (ctx, _) in enumerate(rows):
                if not ctx:
                    logprobs[i] = after_prefix
        # Teacher forcing: target j is scored from the distribution after target j-1.
        for j in range(max(len(t) for _, t in rows)):
            for i, (_, targets) in enumerate(rows):
                if j < len(targets):
                    out[i][j] = logprobs[i, targets[j]]
            if j + 1 == max(len(t) for _, t in rows):
                break
            ids = np.array([[t[j] if j < len(t) else self.pad_id] for _, t in rows], dtype=np.int64)
            mask = np.concatenate([mask, np.ones((b, 1), dtype=np.int64)], axis=1)
            pos = (mask.sum(axis=1, keepdims=True) - 1).astype(np.int64)
            logprobs, pasts = self.run(ids, mask, pos, pasts, "decode")
        return out

    def _prefix_state(self, prefix: list[int]) -> tuple[list[Any], np.ndarray]:
        key = hashlib.sha256(np.asarray(prefix, dtype=np.int64).tobytes()).hexdigest()
        hit = self.prefixes.get(key)
        if hit is not None:
            self.prefixes.move_to_end(key)
            self.metrics.prefix_cache.labels(self.model, "hit").inc()
            return hit
        self.metrics.prefix_cache.labels(self.model, "miss").inc()
        ids = np.asarray([prefix], dtype=np.int64)
        mask = np.ones_like(ids)
        empty = np.zeros((1, self.n_head, 0, self.head_dim), dtype=np.float32)
        # With the layout graph the prefix's keys and values stay on the decoder's device and each use repeats
        # them for its rows there; otherwise in host memory, repeated by numpy.
        logprobs, presents = self.run(ids, mask, np.arange(len(prefix), dtype=np.int64)[None],
                                      [empty] * len(self.past_names), "prefill", on_device=self.layout is not None)
        state = (presents, logprobs[0])
        size = sum(nbytes(p) for p in state[0])
        self.prefixes[key] = state
        self._prefix_bytes += size
        while self._prefix_bytes > self.prefix_cache_max_bytes and len(self.prefixes) > 1:
            _, (old, _) = self.prefixes.popitem(last=False)
            self._prefix_bytes -= sum(nbytes(p) for p in old)
        self.metrics.prefix_cache_bytes.labels(self.model).set(self._prefix_bytes)
        return state

    def _repeat(self, presents: list[Any], b: int, past: int) -> list[Any]:
        """The prefix's keys and values (one row) repeated for `b` rows: by the layout graph where they are kept on
        the device (no copy through host memory per call), else numpy."""
        if self.layout is not None and not isinstance(presents[0], np.ndarray):
            return self._lay_out((presents, [0] * b, past), ([], [], 0), past)
        return [np.repeat(p, b, axis=0) for p in presents]
