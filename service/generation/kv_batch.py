"""The KV batch: the running sequences' keys and values, and how they are laid out again when sequences join
or leave.

The batch's keys and values are one left-padded (B, H, P, D) array per layer and kind: a decode step feeds
the previous step's presents straight back as its pasts, so nothing is copied while the batch stays the same
(on a GPU they stay in its memory as OrtValues, through ORT's IO binding: `runtime.io_binding`); the arrays
change only when a sequence joins or leaves: joiners take the rows of those who left, in place, while the
batch's width stays the same (`refill`); otherwise the batch is laid out again (rows dropped, leading padding
trimmed, joiners appended: `Scratch.layout` in host memory; on a GPU the runner's KV layout graph does the
same on the device). A sequence's KV memory is freed (or its row given to a joiner) when it leaves.

An encoder-decoder's batch also holds each row's cross-attention keys and values (`cross`, computed once from
its source when it joined) and its source mask: right-padded to the batch's widest source, moved with the row's
self-attention cache on every join and leave, never grown by a decode step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
from plm.service.generation.request import Slot
from plm.service.runtime import on_host

# A row left by a finished sequence waits this many steps for a joiner (see Batch) before the batch closes up; a
# hole costs one row's share of each step, growing the batch by a row costs a copy of every row.
HOLE_STEPS = 4


@dataclass(frozen=True)
class Batch:
    """Running sequences and their keys and values: row i belongs to slots[i]; each row's real columns are
    its last lengths[i] (left padding before them is masked out).

    A row in `holes` belongs to nobody: its sequence left and no joiner has taken it yet. It is kept for a
    few steps (decoding a pad token against nothing but itself) because a sequence that joins later then
    takes it with one row's copy, where growing the batch by a row lays every row out again."""

    slots: list[Slot]
    # 2 × n_layer tensors (B, H, P, D): k0, v0, k1, v1, …; numpy arrays, or under IO binding the decoder's
    # OrtValues where its provider made them (`to_host` turns a batch into arrays before rows are moved).
    kv: list[Any]
    mask: np.ndarray  # (B, P) int64
    lengths: np.ndarray  # (B,) int64: real past tokens per row
    holes: frozenset[int] = frozenset()
    holes_since: int = 0  # the engine's step count when the oldest of the holes opened
    # An encoder-decoder's 2 × n_layer cross-attention tensors (B, H, S, D), numpy, right-padded to the widest
    # source, and their (B, S) int64 source mask; empty (and None) for a decoder-only model.
    cross: list[np.ndarray] = dataclasses.field(default_factory=list)
    cross_mask: np.ndarray | None = None

    @property
    def live(self) -> list[Slot]:
        return [s for i, s in enumerate(self.slots) if i not in self.holes] if self.holes else self.slots

    @property
    def n_live(self) -> int:
        return len(self.slots) - len(self.holes)

    def stale(self, steps: int) -> bool:
        """Whether the holes waited `HOLE_STEPS` steps for a joiner (`steps`: the engine's step count): the batch
        closes up at once then."""
        return bool(self.holes) and steps - self.holes_since >= HOLE_STEPS


EMPTY = Batch([], [], np.zeros((0, 0), dtype=np.int64), np.zeros(0, dtype=np.int64))


def to_host(batch: Batch) -> Batch:
    """The batch with its keys and values as numpy arrays (copied from the GPU when IO binding left them there)."""
    if all(isinstance(a, np.ndarray) for a in batch.kv):
        return batch
    return dataclasses.replace(batch, kv=on_host(batch.kv))


def width_slack(longest: int) -> int:
    """How many leading columns no row uses a batch may keep rather than be laid out again to trim them: masked
    columns cost a decode step little (attention over them), a layout copies every row."""
    return max(8, longest // 4)


def refill(batch: Batch, keep: list[int], joined: Batch, rows: list[int], holes_kept: int = 0) -> Batch | None:
    """The batch with the rows of those who left given to those who join (`rows` of `joined`), in place: one
    row's copy per change instead of the whole batch's. Rows nobody takes stay holes, up to `holes_kept` of
    them; beyond that the batch's last live rows move down into them. None when that cannot be done: more join
    than there are free rows, a joiner is wider than the batch, or the batch would be wider than its longest
    sequence by more than `width_slack`."""
    width = batch.mask.shape[1]
    free = sorted(set(range(len(batch.slots))) - set(keep))  # rows that left, now or earlier (holes)
    longest = max(int(batch.lengths[keep].max(initial=0)), int(joined.lengths[rows].max(initial=0)))
    if len(rows) > len(free) or joined.mask.shape[1] > width or width - longest > width_slack(longest):
        return None
    if batch.cross and joined.cross and joined.cross[0].shape[2] > batch.cross[0].shape[2]:
        return None  # a joiner's source is wider than the batch's
    slots, mask, lengths = list(batch.slots), batch.mask.copy(), batch.lengths.copy()
    cross_mask = batch.cross_mask.copy() if batch.cross_mask is not None else None

    def move(dst: int, src_batch: Batch, src: int) -> None:
        w = src_batch.mask.shape[1]
        for a, b in zip(batch.kv, src_batch.kv, strict=True):
            a[dst, :, :width - w] = 0  # masked out, but must be finite: 0 × NaN is NaN
            a[dst, :, width - w:] = b[src, :, :]
        mask[dst, :width - w] = 0
        mask[dst, width - w:] = src_batch.mask[src]
        lengths[dst] = src_batch.lengths[src]
        slots[dst] = src_batch.slots[src]
        if cross_mask is not None and src_batch.cross_mask is not None:  # the source, right-padded
            s = src_batch.cross_mask.shape[1]
            for a, b in zip(batch.cross, src_batch.cross, strict=True):
                a[dst, :, :s] = b[src]
                a[dst, :, s:] = 0
            cross_mask[dst, :s] = src_batch.cross_mask[src]
            cross_mask[dst, s:] = 0

    for h, j in zip(free, rows, strict=False):
        move(h, joined, j)
    left = free[len(rows):]  # rows nobody took
    if len(left) <= holes_kept:  # they stay, masked out: a later joiner takes one without a layout
        mask[left] = 0  # (a hole's source mask stays: cross-attention over no column at all is NaN)
        lengths[left] = 0
        return Batch(slots, batch.kv, mask, lengths, frozenset(left), cross=batch.cross, cross_mask=cross_mask)
    size = len(slots) - len(left)  # else the batch's last live rows move into them
    tail = [r for r in range(size, len(slots)) if r not in left]
    for h, r in zip([h for h in left if h < size], tail, strict=True):
        move(h, batch, r)
    return Batch(slots[:size], [a[:size] for a in batch.kv], mask[:size], lengths[:size],
                 cross=[a[:size] for a in batch.cross], cross_mask=None if cross_mask is None else cross_mask[:size])


def nbytes(value: Any) -> int:
    """Bytes of a numpy array or an OrtValue (float32 or float16)."""
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    return int(np.prod(value.shape())) * (2 if "float16" in value.data_type() else 4)


class Scratch:
    """Where the batch is laid out again when sequences join or leave. The memory is kept from one layout to the
    next: touching a fresh array of a few MB (page faults) costs more than copying into memory already mapped.
    A layout lives until the next decode step's presents replace it; the engine drops it when it goes idle."""

    def __init__(self) -> None:
        self._buf = np.empty(0, dtype=np.float32)

    def layout(self, parts: list[tuple[Batch, list[int]]]) -> Batch:
        """The given rows of the given batches, in order, left-padded to the longest one's real length (so
        leading columns that no row uses any more are trimmed)."""
        parts = [(batch, rows) for batch, rows in parts if rows]
        laid = layout_rows(parts)
        if not laid.slots:
            return EMPTY
        _, h, _, d = parts[0][0].kv[0].shape
        (b, p), arrays = laid.mask.shape, len(parts[0][0].kv)
        size = b * h * p * d
        if self._buf.size < arrays * size or any(np.may_share_memory(self._buf, batch.kv[0]) for batch, _ in parts):
            self._buf = np.empty(arrays * size * 5 // 4, dtype=np.float32)  # room to grow by a row or two
        kv = [self._buf[j * size:(j + 1) * size].reshape(b, h, p, d) for j in range(arrays)]
        at = 0
        for batch, rows in parts:
            k, w = len(rows), min(p, batch.mask.shape[1])  # w: the source's last columns that are kept
            for src, dst in zip(batch.kv, kv, strict=True):
                dst[at:at + k, :, :p - w] = 0  # masked out, but must be finite: 0 × NaN is NaN
                dst[at:at + k, :, p - w:] = src[rows, :, src.shape[2] - w:]
            at += k
        return dataclasses.replace(laid, kv=kv, **lay_out_cross(parts))


def lay_out_cross(parts: list[tuple[Batch, list[int]]]) -> dict[str, Any]:
    """The `cross` and `cross_mask` fields of a layout of the given rows: right-padded to the widest of their
    sources (nothing for a decoder-only model's batches)."""
    if not parts[0][0].cross:
        return {}
    masks = [batch.cross_mask[rows] for batch, rows in parts if batch.cross_mask is not None]
    s = max(int(m.sum(axis=1).max()) for m in masks)  # the widest real source: trailing pads are trimmed
    cross_mask = np.concatenate([np.pad(m[:, :s], ((0, 0), (0, s - min(s, m.shape[1])))) for m in masks])
    cross = []
    for j in range(len(parts[0][0].cross)):
        _, h, _, d = parts[0][0].cross[j].shape
        out = np.zeros((len(cross_mask), h, s, d), dtype=np.float32)
        at = 0
        for batch, rows in parts:
            w = min(s, batch.cross[j].shape[2])
            out[at:at + len(rows), :, :w] = batch.cross[j][rows, :, :w]
            at += len(rows)
        cross.append(out)
    return {"cross": cross, "cross_mask": cross_mask}


def layout_rows(parts: list[tuple[Batch, list[int]]]) -> Batch:
    """The slots, mask and lengths of a layout of the given rows (no keys and values yet): left-padded to the
    longest real length, so leading columns that no row uses any more are trimmed."""
    parts = [(batch, rows) for batch, rows in parts if rows]
    if not parts:
        return EMPTY
    lengths = np.concatenate([batch.lengths[rows] for batch, rows in parts])
    p = int(lengths.max())
    mask = np.zeros((len(lengths), p), dtype=np.int64)
    at = 0
    for batch, rows in parts:
        w = min(p, batch.mask.shape[1])
        mask[at:at + len(rows), p - w:] = batch.mask[rows, batch.mask.shape[1] - w:]
        at += len(rows)
    return Batch([batch.slots[i] for batch, rows in parts for i in rows], [], mask, lengths)


def relayout_on_host(batch: Batch, keep: list[int], joined: Batch, rows: list[int], scratch: Scratch, steps: int,
                     stale: bool) -> Batch:
    """The kept rows of `batch` and the joiners' `rows` of `joined`, in host memory: joiners take the rows of
    those who left where they can (`refill`); else one copy for everyone (`scratch`). `steps`: the engine's step
    count (when holes opened); `stale`: the batch's holes waited long enough (`Batch.stale`) and close up now."""
    batch, joined = to_host(batch), to_host(joined)
    holes_kept = 0 if stale else len(batch.slots) // 4
    refilled = refill(batch, keep, joined, rows, holes_kept)
    if refilled is None:
        return scratch.layout([(batch, keep), (joined, rows)])
    since = batch.holes_since if batch.holes and refilled.holes else steps
    return dataclasses.replace(refilled, holes_since=since)
