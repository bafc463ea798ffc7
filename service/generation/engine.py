"""The generation engine: iteration-level (continuous) batching over a KV-cache decoder graph, and the bridge
between the server's event loop and the engine's own thread.

One engine per model, with a thread of its own that runs steps back to back. Each step is schedule → run →
update: the scheduler says which running sequences go on and which waiting ones join (scheduler.py); the
runner prefills the joiners (their first tokens go out at once), the KV batch is laid out again if anyone
joined or left (kv_batch.py; on the device by the runner's layout graph), and the runner decodes one token for
the whole batch (runner.py); then each sequence takes its token (`choose`, `Sequence.advance`: sequence.py).
A step's events go to the event loop in one hand-over, made just before the next step's decode run: the loop
wakes while that run holds no interpreter lock, and sends them over gRPC during it. Classify's scoring runs on
the same thread between two steps.

An encoder-decoder's engine is the same with an `Encoder` given: a joiner's prefill encodes its source once and
the batch carries the cross-attention keys and values beside the self-attention cache (kv_batch.py), so joins,
leaves, cancellation and deadlines move and free both. Its scoring and infilling jobs (`call`) run between
two steps like Classify's.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from plm.service.config import Batching
from plm.service.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from plm.service.generation.kv_batch import EMPTY, Batch, Scratch, relayout_on_host
from plm.service.generation.request import Item, Outgoing, Request, Slot
from plm.service.generation.runner import Encoder, Runner
from plm.service.generation.scheduler import Scheduler
from plm.service.generation.sequence import Sequence as GenSequence
from plm.service.generation.sequence import StepEvent, choose, observe_step
from plm.service.metrics import Metrics
from plm.service.runtime import OrtSession

log = logging.getLogger(__name__)


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


def _drain(queue: asyncio.Queue[Item]) -> list[Item]:
    items = []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items


def _coalesce(items: list[Item]) -> collections.deque[Item]:
    """Events that piled up while their reader was busy: one token event per prompt (texts and ids joined,
    in order), finishes after it. Fewer messages exactly when the server is busiest; nothing is lost."""
    out: list[Item] = []
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
    """One model's generation: `generate` and `score_continuations` on the event loop, steps on the engine's
    thread."""

    def __init__(self, model: str, session: OrtSession, n_layer: int, n_head: int, head_dim: int, bos_id: int,
                 pad_id: int, allowed: np.ndarray, batching: Batching, metrics: Metrics,
                 layout: OrtSession | None = None, prefix_reuse: bool = True, encoder: Encoder | None = None) -> None:
        self.model = model
        self.runner = Runner(model, session, n_layer, n_head, head_dim, bos_id, pad_id, metrics, layout, encoder)
        self.scheduler = Scheduler(model, batching, metrics)
        self.bos_id = bos_id
        self.allowed = allowed  # (V,) bool: tokens that may be generated
        self._banned = np.flatnonzero(~allowed)  # the others' ids, for every step's mask
        self.cfg = batching
        self.metrics = metrics
        # Handed from the event loop to the engine thread (deque appends and pops are atomic).
        self._inbox: collections.deque[Slot] = collections.deque()
        self._jobs: collections.deque[_Job] = collections.deque()
        # ...and back: events for the loop, and whether a call to deliver them is already due.
        self._outbox: collections.deque[tuple[Request, Item]] = collections.deque()
        self._delivery_due = False
        # The engine thread's own (and the scheduler's waiting queue).
        self._joining: list[Slot] = []  # being prefilled
        self._batch = EMPTY
        self._scratch = Scratch()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self.steps = 0  # decode steps run (tests and benchmarks read it)
        self.prefix_reuse = prefix_reuse  # whether Classify scores from the cached prefix (runtime.prefix_reuse)
        self._m_active = metrics.active_sequences.labels(model)

    @property
    def session(self) -> OrtSession:
        """The decoder graph's session."""
        return self.runner.session

    @property
    def layout(self) -> OrtSession | None:
        """The KV layout graph's session, when the batch is laid out on the decoder's device."""
        return self.runner.layout

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
        for slot in [*self._inbox, *self.scheduler.waiting, *self._joining, *self._batch.live]:
            slot.request.events.put_nowait(Unavailable(f"model {self.model!r} was unloaded"))
        self._inbox.clear()
        self.scheduler.waiting.clear()
        self._joining = []
        self._batch = EMPTY
        while self._jobs:
            _settle(self._jobs.popleft().future, None, Unavailable(f"model {self.model!r} was unloaded"))

    @property
    def active(self) -> int:
        """Sequences holding KV memory or waiting for it."""
        return self._batch.n_live + len(self._joining) + len(self.scheduler.waiting) + len(self._inbox)

    def refuse_if_full(self, sequences: int = 1) -> None:
        """RESOURCE_EXHAUSTED unless `sequences` more fit in the waiting queue."""
        waiting = len(self.scheduler.waiting) + len(self._inbox)
        if waiting + sequences > self.cfg.max_queue_size:
            self.metrics.rejections.labels(self.model, "queue_full").inc()
            raise ResourceExhausted(f"model {self.model!r}: {waiting} sequences wait to generate "
                                    f"(max_queue_size {self.cfg.max_queue_size}); retry later")

    # -- the caller's side (event loop) ------------------------------------------------------------------------
    async def generate(self, seqs: list[GenSequence], deadline: float | None) -> AsyncIterator[StepEvent]:
        if self._closed or self._loop is None:
            raise Unavailable(f"model {self.model!r} is not serving")
        self.refuse_if_full(len(seqs))
        request = Request(asyncio.Queue(), deadline, len(seqs))
        self._inbox.extend(Slot(s, request) for s in seqs)
        self._wake.set()
        held: collections.deque[Item] = collections.deque()
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

    async def score_continuations(self, prefix: list[int], rows: list[tuple[list[int], list[int]]],
                                  deadline: float | None) -> list[np.ndarray]:
        """log P of each target token of each row, after BOS + `prefix` + the row's context tokens.

        The prefix's keys and values are computed once and cached (LRU); every row then runs from them:
        its context tokens in one step, then its target tokens one step each (teacher forcing), all rows
        batched. Returns, per row, the (n_targets,) log-probabilities.
        """
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceeded(f"model {self.model!r}: the deadline passed before scoring")
        result: list[np.ndarray] = await self._call(self.runner.score_continuations, [self.bos_id, *prefix], rows)
        return result

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(*args)` on the engine thread between two steps (a family's own jobs: an encoder-decoder's
        scoring and infilling), failing fast with UNAVAILABLE when the engine is not serving."""
        return await self._call(fn, *args)

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
    def _hand_over(self, items: Outgoing) -> None:
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
        out: Outgoing = []
        while not self._closed:
            self._wake.clear()  # before looking for work: a wake-up after this is not lost
            while self._inbox:
                self.scheduler.waiting.append(self._inbox.popleft())
            if self._jobs:
                self._hand_over(out)  # the last step's events do not wait for a job
                while self._jobs:
                    self._run_job(self._jobs.popleft())
            try:
                if not self._step(out):  # idle: no KV memory held
                    self._batch, self._scratch = EMPTY, Scratch()
                    self._m_active.set(0)
                    self._hand_over(out)
                    self._wake.wait()
                    continue
            except Exception as e:  # the step failed: every sequence in it hears about it (the thread goes on)
                log.exception("model %s: generation step failed", self.model)
                for slot in [*self._joining, *self._batch.live]:
                    slot.request.cancelled = True
                    out.append((slot.request, e))
                self._joining, self._batch = [], EMPTY
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

    def _step(self, out: Outgoing) -> bool:
        """One step: schedule → run → update. False when nobody runs or waits (nothing is run)."""
        # schedule: the batch's rows that go on (`keep`) and the waiting sequences that join
        plan = self.scheduler.schedule(self._batch, out)
        if plan is None:
            return False
        keep, self._joining = plan
        # run: the joiners' prefill (update: their first tokens go out at once), the batch laid out again if
        # anyone joined or left, one decode step for the whole batch
        joined, rows = self._prefill(out)
        self._lay_out(keep, joined, rows)
        # The last step's events go to the event loop now, as this step's graph runs (with the interpreter lock
        # released): the loop's work on them overlaps the run instead of the engine's own Python around it.
        self._hand_over(out)
        if self._batch.n_live:
            logprobs = self._decode()
            self.steps += 1
            # update: each running sequence takes its token
            self._update(self._batch.slots, logprobs, out, self._batch.holes)
        return True

    def _prefill(self, out: Outgoing) -> tuple[Batch, list[int]]:
        """The joiners' prompts run (their first tokens handed over at once): their batch, and its rows that go on
        into the running one."""
        if not self._joining:
            return EMPTY, []
        logprobs, joined = self.runner.prefill(self._joining)
        self._update(self._joining, logprobs, out)
        self._hand_over(out)
        return joined, [i for i, s in enumerate(joined.slots) if not (s.seq.finished or s.request.cancelled)]

    def _lay_out(self, keep: list[int], joined: Batch, rows: list[int]) -> None:
        """The batch laid out again if anyone joined or left (`keep`: its rows still running; `rows`: the joiners'
        that go on) or its holes waited long enough; else it stays as it is, not a byte copied."""
        batch = self._batch
        stale = batch.stale(self.steps)
        if rows or len(keep) < batch.n_live or stale:
            if self.runner.layout is not None:
                self._batch = self.runner.layout_on_device(batch, keep, joined, rows)
            else:  # joiners take the rows of those who left where they can; else one copy for everyone
                self._batch = relayout_on_host(batch, keep, joined, rows, self._scratch, self.steps, stale)
        self._joining = []
        self._m_active.set(self._batch.n_live)

    def _decode(self) -> np.ndarray:
        """One new token per running sequence; the presents become the batch's pasts as they are."""
        logprobs, self._batch = self.runner.decode(self._batch)
        return logprobs

    def _update(self, slots: Sequence[Slot], logprobs: np.ndarray, out: Outgoing,
                holes: frozenset[int] = frozenset()) -> None:
        """Each live sequence of `slots` takes its next token from its row of `logprobs`; their events into `out`."""
        live = [i for i, s in enumerate(slots) if not (s.request.cancelled or i in holes)]
        if not live:
            return
        rows = logprobs if len(live) == len(slots) else logprobs[live]
        seqs = [slots[i].seq for i in live]
        # The decode run's output is the engine's own: the mask and penalties go into it in place.
        tokens = choose(rows, self.allowed, seqs, owned=True, banned=self._banned)
        observe_step(seqs, time.monotonic())  # the step's metrics in one update per series
        for i, seq, tok in zip(live, seqs, tokens, strict=True):
            request = slots[i].request
            for ev in seq.advance(tok, observed=True):
                out.append((request, ev))
