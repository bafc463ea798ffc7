"""Iteration-level (continuous) batching over a KV-cache decoder graph (DESIGN.md §2; issue "Generation engine").

One engine per model, with a thread of its own that runs steps back to back. Between two decode steps,
waiting sequences join the running batch (their prompts are prefilled together, left-padded, with an empty
past) and finished or cancelled ones leave; the batch is bounded by a count (`max_batch_size`) and by a token
budget (`max_batch_tokens`: prompt plus generated tokens of every running sequence).

The batch's keys and values are one left-padded (B, H, P, D) array per layer and kind: a decode step feeds
the previous step's presents straight back as its pasts, so nothing is copied while the batch stays the same
(on a GPU they stay in its memory as OrtValues, through ORT's IO binding: `runtime.io_binding`); the arrays
change only when a sequence joins or leaves: joiners take the rows of those who left, in place, while the
batch's width stays the same; otherwise the batch is laid out again (rows dropped, leading padding trimmed,
joiners appended). On a GPU the KV layout graph does the latter on the device (a model built without it:
one copy to host memory and back). A sequence's KV memory is freed (or its row
given to a joiner) when it leaves: when it finishes, when its client cancels (it leaves at the next step) or
when its deadline passes. The thread hands each step's events to the event loop in one call, so the loop sends
them over gRPC while the next step runs.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import hashlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from plm.service.config import Batching
from plm.service.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from plm.service.metrics import Metrics
from plm.service.runtime import OrtSession, on_host
from plm.service.tasks.generate import Sequence as GenSequence
from plm.service.tasks.generate import StepEvent, choose

log = logging.getLogger(__name__)

_Item = StepEvent | BaseException | None  # what a request's queue carries; None ends it


@dataclass(eq=False)  # identity: compared with `in` on the batch lists
class _Request:
    """The sequences of one RPC and the queue its caller reads events from."""

    events: asyncio.Queue[_Item]
    deadline: float | None
    running: int  # sequences not finished yet
    cancelled: bool = False  # set by the caller's side; the engine thread drops its sequences at the next step


@dataclass(eq=False)
class _Slot:
    seq: GenSequence
    request: _Request

    @property
    def length(self) -> int:
        return len(self.seq.prompt_ids) + len(self.seq.generated)


@dataclass(frozen=True)
class _Batch:
    """Running sequences and their keys and values: row i belongs to slots[i]; each row's real columns are
    its last lengths[i] (left padding before them is masked out).

    A row in `holes` belongs to nobody: its sequence left and no joiner has taken it yet. It is kept for a
    few steps (decoding a pad token against nothing but itself) because a sequence that joins later then
    takes it with one row's copy, where growing the batch by a row lays every row out again."""

    slots: list[_Slot]
    # 2 × n_layer tensors (B, H, P, D): k0, v0, k1, v1, …; numpy arrays, or under IO binding the decoder's
    # OrtValues where its provider made them (`_host` turns a batch into arrays before rows are moved).
    kv: list[Any]
    mask: np.ndarray  # (B, P) int64
    lengths: np.ndarray  # (B,) int64: real past tokens per row
    holes: frozenset[int] = frozenset()
    holes_since: int = 0  # the engine's step count when the oldest of the holes opened

    @property
    def live(self) -> list[_Slot]:
        return [s for i, s in enumerate(self.slots) if i not in self.holes] if self.holes else self.slots

    @property
    def n_live(self) -> int:
        return len(self.slots) - len(self.holes)


_EMPTY = _Batch([], [], np.zeros((0, 0), dtype=np.int64), np.zeros(0, dtype=np.int64))


def _host(batch: _Batch) -> _Batch:
    """The batch with its keys and values as numpy arrays (copied from the GPU when IO binding left them there)."""
    if all(isinstance(a, np.ndarray) for a in batch.kv):
        return batch
    return dataclasses.replace(batch, kv=on_host(batch.kv))


def kv_layout_feeds(a_rows: list[int], a_past: int, b_rows: list[int], b_past: int,
                    width: int) -> dict[str, np.ndarray]:
    """The KV layout graph's index inputs (export_kv_layout): the rows kept of each side, whose pasts have
    `a_past` and `b_past` columns, laid out `width` columns wide."""
    def pads(past: int) -> np.ndarray:
        return np.array([0, 0, width - min(past, width), 0, 0, 0, 0, 0], dtype=np.int64)
    return {"a_rows": np.asarray(a_rows, dtype=np.int64), "b_rows": np.asarray(b_rows, dtype=np.int64),
            "start": np.array([-width], dtype=np.int64), "a_pads": pads(a_past), "b_pads": pads(b_past)}


def width_slack(longest: int) -> int:
    """How many leading columns no row uses a batch may keep rather than be laid out again to trim them: masked
    columns cost a decode step little (attention over them), a layout copies every row."""
    return max(8, longest // 4)


def _refill(batch: _Batch, keep: list[int], joined: _Batch, rows: list[int], holes_kept: int = 0) -> _Batch | None:
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
    slots, mask, lengths = list(batch.slots), batch.mask.copy(), batch.lengths.copy()

    def move(dst: int, src_batch: _Batch, src: int) -> None:
        w = src_batch.mask.shape[1]
        for a, b in zip(batch.kv, src_batch.kv, strict=True):
            a[dst, :, :width - w] = 0  # masked out, but must be finite: 0 × NaN is NaN
            a[dst, :, width - w:] = b[src, :, :]
        mask[dst, :width - w] = 0
        mask[dst, width - w:] = src_batch.mask[src]
        lengths[dst] = src_batch.lengths[src]
        slots[dst] = src_batch.slots[src]

    for h, j in zip(free, rows, strict=False):
        move(h, joined, j)
    left = free[len(rows):]  # rows nobody took
    if len(left) <= holes_kept:  # they stay, masked out: a later joiner takes one without a layout
        mask[left] = 0
        lengths[left] = 0
        return _Batch(slots, batch.kv, mask, lengths, frozenset(left))
    size = len(slots) - len(left)  # else the batch's last live rows move into them
    tail = [r for r in range(size, len(slots)) if r not in left]
    for h, r in zip([h for h in left if h < size], tail, strict=True):
        move(h, batch, r)
    return _Batch(slots[:size], [a[:size] for a in batch.kv], mask[:size], lengths[:size])


def _nbytes(value: Any) -> int:
    """Bytes of a numpy array or an OrtValue (float32 or float16)."""
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    return int(np.prod(value.shape())) * (2 if "float16" in value.data_type() else 4)


class _Scratch:
    """Where the batch is laid out again when sequences join or leave. The memory is kept from one layout to the
    next: touching a fresh array of a few MB (page faults) costs more than copying into memory already mapped.
    A layout lives until the next decode step's presents replace it; the engine drops it when it goes idle."""

    def __init__(self) -> None:
        self._buf = np.empty(0, dtype=np.float32)

    def layout(self, parts: list[tuple[_Batch, list[int]]]) -> _Batch:
        """The given rows of the given batches, in order, left-padded to the longest one's real length (so
        leading columns that no row uses any more are trimmed)."""
        parts = [(batch, rows) for batch, rows in parts if rows]
        laid = _layout_rows(parts)
        if not laid.slots:
            return _EMPTY
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
        return dataclasses.replace(laid, kv=kv)


def _layout_rows(parts: list[tuple[_Batch, list[int]]]) -> _Batch:
    """The slots, mask and lengths of a layout of the given rows (no keys and values yet): left-padded to the
    longest real length, so leading columns that no row uses any more are trimmed."""
    parts = [(batch, rows) for batch, rows in parts if rows]
    if not parts:
        return _EMPTY
    lengths = np.concatenate([batch.lengths[rows] for batch, rows in parts])
    p = int(lengths.max())
    mask = np.zeros((len(lengths), p), dtype=np.int64)
    at = 0
    for batch, rows in parts:
        w = min(p, batch.mask.shape[1])
        mask[at:at + len(rows), p - w:] = batch.mask[rows, batch.mask.shape[1] - w:]
        at += len(rows)
    return _Batch([batch.slots[i] for batch, rows in parts for i in rows], [], mask, lengths)


@dataclass(eq=False)
class _Job:
    """Work for the engine thread between two steps (Classify's scoring), answered through `future`."""

    fn: Callable[[], Any]
    future: asyncio.Future[Any]


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # its caller went away
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _drain(queue: asyncio.Queue[_Item]) -> list[_Item]:
    items = []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items


def _coalesce(items: list[_Item]) -> collections.deque[_Item]:
    """Events that piled up while their reader was busy: one token event per prompt (texts and ids joined,
    in order), finishes after it. Fewer messages exactly when the server is busiest; nothing is lost."""
    out: list[_Item] = []
    open_at: dict[int, int] = {}  # prompt index → position of its pending token event in `out`
    for ev in items:
        if not isinstance(ev, StepEvent):
            open_at.clear()  # never merge across an error or the end
            out.append(ev)
        elif ev.finish_reason is None and ev.index in open_at:
            k = open_at[ev.index]
            prev = out[k]
            assert isinstance(prev, StepEvent)
            out[k] = prev.then(ev)
        else:
            if ev.finish_reason is None:
                open_at[ev.index] = len(out)
            else:
                open_at.pop(ev.index, None)
            out.append(ev)
    return collections.deque(out)


class GenerationEngine:
    # A row left by a finished sequence waits this many steps for a joiner (see _Batch) before the batch closes
    # up; a hole costs one row's share of each step, growing the batch by a row costs a copy of every row.
    HOLE_STEPS = 4

    def __init__(self, model: str, session: OrtSession, n_layer: int, n_head: int, head_dim: int, bos_id: int,
                 pad_id: int, allowed: np.ndarray, batching: Batching, metrics: Metrics,
                 layout: OrtSession | None = None, prefix_reuse: bool = True) -> None:
        self.model = model
        self.session = session
        # Under IO binding, the KV layout graph (export_kv_layout) lays the batch out again on the decoder's
        # device when sequences join or leave; without it that goes through host memory.
        self.layout = layout if session.io_binding else None
        self.layout_outputs = [f"out.{i}" for i in range(2 * n_layer)]
        self.n_layer, self.n_head, self.head_dim = n_layer, n_head, head_dim
        self.bos_id, self.pad_id = bos_id, pad_id
        self.allowed = allowed  # (V,) bool: tokens that may be generated
        self.cfg = batching
        self.metrics = metrics
        self.past_names = [f"past_key_values.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]
        self.present_names = [f"present.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]
        # Handed from the event loop to the engine thread (deque appends and pops are atomic).
        self._inbox: collections.deque[_Slot] = collections.deque()
        self._jobs: collections.deque[_Job] = collections.deque()
        # ...and back: events for the loop, and whether a call to deliver them is already due.
        self._outbox: collections.deque[tuple[_Request, _Item]] = collections.deque()
        self._delivery_due = False
        # The engine thread's own.
        self._waiting: collections.deque[_Slot] = collections.deque()
        self._joining: list[_Slot] = []  # being prefilled
        self._batch = _EMPTY
        self._scratch = _Scratch()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self.steps = 0  # decode steps run (tests and benchmarks read it)
        # Prompt prefixes already run (few-shot demonstrations): sha256 of the ids → (presents, next logprobs),
        # least recently used first; bounded by bytes. The presents are one row, kept where the decoder runs
        # when it has the KV layout graph (OrtValues on the GPU), else numpy arrays.
        self._prefixes: collections.OrderedDict[str, tuple[list[Any], np.ndarray]] = collections.OrderedDict()
        self._prefix_bytes = 0
        self.prefix_cache_max_bytes = 64 * 1024 * 1024
        self.prefix_reuse = prefix_reuse  # whether Classify scores from the cached prefix (runtime.prefix_reuse)
        self._m_active = metrics.active_sequences.labels(model)
        self._m_batch = metrics.batch_size.labels(model)

    # -- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        # A daemon: a server that exits without closing its models does not wait for it.
        self._thread = threading.Thread(target=self._work, name=f"engine-{self.model}", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        self._closed = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        # The thread has stopped: what it held is the event loop's to fail now.
        for slot in [*self._inbox, *self._waiting, *self._joining, *self._batch.live]:
            slot.request.events.put_nowait(Unavailable(f"model {self.model!r} was unloaded"))
        self._inbox.clear()
        self._waiting.clear()
        self._joining = []
        self._batch = _EMPTY
        while self._jobs:
            _settle(self._jobs.popleft().future, None, Unavailable(f"model {self.model!r} was unloaded"))

    @property
    def active(self) -> int:
        """Sequences holding KV memory or waiting for it."""
        return self._batch.n_live + len(self._joining) + len(self._waiting) + len(self._inbox)

    def refuse_if_full(self, sequences: int = 1) -> None:
        """RESOURCE_EXHAUSTED unless `sequences` more fit in the waiting queue."""
        waiting = len(self._waiting) + len(self._inbox)
        if waiting + sequences > self.cfg.max_queue_size:
            self.metrics.rejections.labels(self.model, "queue_full").inc()
            raise ResourceExhausted(f"model {self.model!r}: {waiting} sequences wait to generate "
                                    f"(max_queue_size {self.cfg.max_queue_size}); retry later")

    # -- the caller's side (event loop) ------------------------------------------------------------------------
    async def generate(self, seqs: list[GenSequence], deadline: float | None) -> AsyncIterator[StepEvent]:
        if self._closed or self._loop is None:
            raise Unavailable(f"model {self.model!r} is not serving")
        self.refuse_if_full(len(seqs))
        request = _Request(asyncio.Queue(), deadline, len(seqs))
        self._inbox.extend(_Slot(s, request) for s in seqs)
        self._wake.set()
        held: collections.deque[_Item] = collections.deque()
        try:
            while request.running:
                if not held:
                    held.append(await request.events.get())
                    if not request.events.empty():
                        held = _coalesce([*held, *_drain(request.events)])
                item = held.popleft()
                if isinstance(item, BaseException):
                    raise item
                if item is None:
                    break
                if item.finish_reason is not None:
                    request.running -= 1
                yield item
        finally:  # the caller went away (or failed): its sequences leave at the next step and free their KV
            request.cancelled = True
            if request.running:
                self.metrics.rejections.labels(self.model, "cancelled").inc()
            self._wake.set()

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(*args)` on the engine thread between two steps (the decoder's session is the thread's)."""
        if self._closed or self._loop is None:
            raise Unavailable(f"model {self.model!r} is not serving")
        job = _Job(functools.partial(fn, *args), self._loop.create_future())
        self._jobs.append(job)
        self._wake.set()
        return await job.future

    def _deliver(self) -> None:
        """The events the engine thread handed over, into their requests' queues (on the event loop)."""
        self._delivery_due = False  # first: events handed over from here on schedule another call
        while self._outbox:
            request, item = self._outbox.popleft()
            request.events.put_nowait(item)

    # -- the engine thread -------------------------------------------------------------------------------------
    def _hand_over(self, items: list[tuple[_Request, _Item]]) -> None:
        """Events to the event loop. Waking the loop (call_soon_threadsafe writes to its socket, and getting the
        GIL back after that write can wait for the busy loop) happens only when no call is due already: a loop
        that is behind takes several steps' events in one go."""
        if not items or self._loop is None:
            return
        self._outbox.extend(items)  # before looking at the flag, which `_deliver` clears before draining
        items.clear()
        if not self._delivery_due:
            self._delivery_due = True
            with contextlib.suppress(RuntimeError):  # the loop closed under a server that did not close us
                self._loop.call_soon_threadsafe(self._deliver)

    def _work(self) -> None:
        out: list[tuple[_Request, _Item]] = []
        while not self._closed:
            self._wake.clear()  # before looking for work: a wake-up after this is not lost
            while self._inbox:
                self._waiting.append(self._inbox.popleft())
            while self._jobs:
                self._run_job(self._jobs.popleft())
            try:
                keep = self._still_running(out)
                if not keep and not self._waiting:  # idle: no KV memory held
                    self._batch, self._scratch = _EMPTY, _Scratch()
                    self._m_active.set(0)
                    self._hand_over(out)
                    self._wake.wait()
                    continue
                self._step(keep, out)
            except Exception as e:  # the step failed: every sequence in it hears about it (the thread goes on)
                log.exception("model %s: generation step failed", self.model)
                for slot in [*self._joining, *self._batch.live]:
                    slot.request.cancelled = True
                    out.append((slot.request, e))
                self._joining, self._batch = [], _EMPTY
            self._hand_over(out)

    def _run_job(self, job: _Job) -> None:
        assert self._loop is not None
        if job.future.cancelled():
            return
        try:
            result, error = job.fn(), None
        except Exception as e:
            result, error = None, e
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(_settle, job.future, result, error)

    def _step(self, keep: list[int], out: list[tuple[_Request, _Item]]) -> None:
        """Prefill whoever joins (their first tokens go out at once), lay the batch out again if anyone joined or
        left (`keep`: the rows still running), then one decode step for the whole batch."""
        batch = self._batch
        self._joining = self._admit([batch.slots[i] for i in keep])
        joined, rows = _EMPTY, []
        if self._joining:
            logprobs, joined = self._prefill(self._joining)
            self._emit(self._joining, logprobs, out)
            self._hand_over(out)
            rows = [i for i, s in enumerate(joined.slots) if not (s.seq.finished or s.request.cancelled)]
        stale = bool(batch.holes) and self.steps - batch.holes_since >= self.HOLE_STEPS
        if rows or len(keep) < batch.n_live or stale:
            if self.layout is not None:
                self._batch = self._layout_on_device(keep, joined, rows)
            else:  # joiners take the rows of those who left where they can; else one copy for everyone
                batch, joined = _host(batch), _host(joined)
                holes_kept = 0 if stale else len(batch.slots) // 4
                refilled = _refill(batch, keep, joined, rows, holes_kept)
                if refilled is None:
                    self._batch = self._scratch.layout([(batch, keep), (joined, rows)])
                else:
                    since = batch.holes_since if batch.holes and refilled.holes else self.steps
                    self._batch = dataclasses.replace(refilled, holes_since=since)
        self._joining = []
        self._m_active.set(self._batch.n_live)
        if self._batch.n_live:
            logprobs = self._decode()
            self.steps += 1
            self._emit(self._batch.slots, logprobs, out, self._batch.holes)

    def _layout_on_device(self, keep: list[int], joined: _Batch, rows: list[int]) -> _Batch:
        """The kept rows of the batch, then the joiners' `rows`, laid out by the KV layout graph where the
        decoder keeps them: what `_Scratch.layout` does in host memory, without the round trip."""
        laid = _layout_rows([(self._batch, keep), (joined, rows)])
        if not laid.slots:
            return _EMPTY
        kv = self._lay_out((self._batch.kv, keep, self._batch.mask.shape[1]), (joined.kv, rows, joined.mask.shape[1]),
                           laid.mask.shape[1])
        return dataclasses.replace(laid, kv=kv)

    def _lay_out(self, a: tuple[list[Any], list[int], int], b: tuple[list[Any], list[int], int],
                 width: int) -> list[Any]:
        """The KV layout graph's run: rows `a[1]` of keys and values `a[0]` (whose past is `a[2]` columns), then
        rows `b[1]` of `b[0]`, `width` columns wide, on the decoder's device (rows may repeat)."""
        empty = np.zeros((0, self.n_head, 0, self.head_dim), dtype=np.float32)
        feeds: dict[str, Any] = kv_layout_feeds(a[1], a[2], b[1], b[2], width)
        for i in range(len(self.layout_outputs)):
            feeds[f"a.{i}"] = a[0][i] if a[0] else empty
            feeds[f"b.{i}"] = b[0][i] if b[0] else empty
        assert self.layout is not None
        _, kv = self.layout.run_bound([], self.layout_outputs, feeds, stage="layout")
        return kv

    def _admit(self, running: list[_Slot]) -> list[_Slot]:
        """Move waiting sequences into the batch while the count and token budgets allow."""
        admitted: list[_Slot] = []
        if not self._waiting:
            return admitted
        tokens = sum(s.length for s in running)
        while self._waiting and len(running) + len(admitted) < self.cfg.max_batch_size:
            slot = self._waiting[0]
            budget = len(slot.seq.prompt_ids) + 1 + slot.seq.p.max_new_tokens
            if (running or admitted) and tokens + budget > self.cfg.max_batch_tokens:
                break
            tokens += budget
            admitted.append(self._waiting.popleft())
        return admitted

    def _still_running(self, out: list[tuple[_Request, _Item]]) -> list[int]:
        """The batch's rows that go on; finished, cancelled and out-of-time sequences leave (and free their KV at
        the next layout), and so do waiting ones whose deadline passed."""
        now = time.monotonic()

        def late(req: _Request, where: str) -> bool:
            if req.cancelled or req.deadline is None or now < req.deadline:
                return False
            req.cancelled = True
            self.metrics.rejections.labels(self.model, "deadline").inc()
            out.append((req, DeadlineExceeded(f"model {self.model!r}: the deadline passed {where}")))
            return True

        holes = self._batch.holes
        keep = [i for i, s in enumerate(self._batch.slots) if not (i in holes or s.seq.finished or s.request.cancelled
                                                                    or late(s.request, "while generating"))]
        if self._waiting:  # a request whose deadline passed while it waited is never prefilled
            for slot in self._waiting:
                late(slot.request, "while waiting to generate; the request was not run")
            self._waiting = collections.deque(s for s in self._waiting if not s.request.cancelled)
        return keep

    def _emit(self, slots: Sequence[_Slot], logprobs: np.ndarray, out: list[tuple[_Request, _Item]],
              holes: frozenset[int] = frozenset()) -> None:
        live = [i for i, s in enumerate(slots) if not (s.request.cancelled or i in holes)]
        if not live:
            return
        rows = logprobs if len(live) == len(slots) else logprobs[live]
        tokens = choose(rows, self.allowed, [slots[i].seq for i in live])
        for i, tok in zip(live, tokens, strict=True):
            request = slots[i].request
            out.extend((request, ev) for ev in slots[i].seq.advance(tok))

    # -- scoring continuations of a shared prefix (Classify) ------------------------------------------------
    async def score_continuations(self, prefix: list[int], rows: list[tuple[list[int], list[int]]],
                                  deadline: float | None) -> list[np.ndarray]:
        """log P of each target token of each row, after BOS + `prefix` + the row's context tokens.

        The prefix's keys and values are computed once and cached (LRU); every row then runs from them:
        its context tokens in one step, then its target tokens one step each (teacher forcing), all rows
        batched. Returns, per row, the (n_targets,) log-probabilities.
        """
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceeded(f"model {self.model!r}: the deadline passed before scoring")
        result: list[np.ndarray] = await self._call(self._score_continuations, [self.bos_id, *prefix], rows)
        return result

    def _prefix_state(self, prefix: list[int]) -> tuple[list[Any], np.ndarray]:
        key = hashlib.sha256(np.asarray(prefix, dtype=np.int64).tobytes()).hexdigest()
        hit = self._prefixes.get(key)
        if hit is not None:
            self._prefixes.move_to_end(key)
            self.metrics.prefix_cache.labels(self.model, "hit").inc()
            return hit
        self.metrics.prefix_cache.labels(self.model, "miss").inc()
        ids = np.asarray([prefix], dtype=np.int64)
        mask = np.ones_like(ids)
        empty = np.zeros((1, self.n_head, 0, self.head_dim), dtype=np.float32)
        # With the layout graph the prefix's keys and values stay on the decoder's device and each use repeats
        # them for its rows there; otherwise in host memory, repeated by numpy.
        logprobs, presents = self._run(ids, mask, np.arange(len(prefix), dtype=np.int64)[None],
                                       [empty] * len(self.past_names), "prefill", on_device=self.layout is not None)
        state = (presents, logprobs[0])
        size = sum(_nbytes(p) for p in state[0])
        self._prefixes[key] = state
        self._prefix_bytes += size
        while self._prefix_bytes > self.prefix_cache_max_bytes and len(self._prefixes) > 1:
            _, (old, _) = self._prefixes.popitem(last=False)
            self._prefix_bytes -= sum(_nbytes(p) for p in old)
        self.metrics.prefix_cache_bytes.labels(self.model).set(self._prefix_bytes)
        return state

    def _repeat(self, presents: list[Any], b: int, past: int) -> list[Any]:
        """The prefix's keys and values (one row) repeated for `b` rows: by the layout graph where they are kept on
        the device (no copy through host memory per call), else numpy."""
        if self.layout is not None and not isinstance(presents[0], np.ndarray):
            return self._lay_out((presents, [0] * b, past), ([], [], 0), past)
        return [np.repeat(p, b, axis=0) for p in presents]

    def _score_continuations(self, prefix: list[int], rows: list[tuple[list[int], list[int]]]) -> list[np.ndarray]:
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
            logprobs, pasts = self._run(ids, mask, pos, self._repeat(presents, b, p_len), "prefill")
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
            logprobs, pasts = self._run(ids, mask, pos, pasts, "decode")
        return out

    # -- graph runs (on the engine's thread) -----------------------------------------------------------------
    def _run(self, input_ids: np.ndarray, mask: np.ndarray, position_ids: np.ndarray, pasts: list[Any],
             stage: str, on_device: bool = True) -> tuple[np.ndarray, list[Any]]:
        """The next-token log-probs (B, V) in host memory and the presents: numpy arrays, or under IO binding
        (unless `on_device` is False: presents that are laid out in host memory next) OrtValues left where the
        provider made them, fed back as the next step's pasts as they are."""
        feeds = {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids,
                 **dict(zip(self.past_names, pasts, strict=True))}
        self._m_batch.observe(len(input_ids))
        if self.session.io_binding and on_device:
            host, presents = self.session.run_bound(["next_logprobs"], self.present_names, feeds, stage=stage)
            return host["next_logprobs"], presents
        out = self.session.run(["next_logprobs", *self.present_names], feeds, stage=stage)
        return out["next_logprobs"], [out[n] for n in self.present_names]

    def _prefill(self, slots: Sequence[_Slot]) -> tuple[np.ndarray, _Batch]:
        """Prompts (BOS first) left-padded into one batch with an empty past: their next-token log-probs (B, V)
        and their batch, ready to join the running one."""
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
        logprobs, presents = self._run(ids, mask, pos, [empty] * len(self.past_names), "prefill",
                                       on_device=self.layout is not None)
        return logprobs, _Batch(list(slots), presents, mask, np.array([len(r) for r in rows], dtype=np.int64))

    def _decode(self) -> np.ndarray:
        """One new token per running sequence; the presents become the batch's pasts as they are."""
        batch = self._batch
        holes = batch.holes  # rows nobody holds: a pad token, attending to nothing but its own
        ids = np.array([[self.pad_id if i in holes else s.seq.generated[-1]] for i, s in enumerate(batch.slots)],
                       dtype=np.int64)  # (B, 1)
        mask = np.concatenate([batch.mask, np.ones((len(ids), 1), dtype=np.int64)], axis=1)  # (B, P + 1)
        pos = batch.lengths[:, None]  # the new token's position: after the row's real ones
        logprobs, presents = self._run(ids, mask, pos, batch.kv, "decode")
        self._batch = dataclasses.replace(batch, kv=presents, mask=mask, lengths=batch.lengths + 1)
        return logprobs
