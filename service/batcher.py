"""Dynamic batching: one queue and one worker per model.

Callers submit rows (one sequence each) and await their results. The worker takes the oldest row; when the
model is busy it waits up to `max_queue_delay_ms` for company (an idle model runs a lone row at once); then it
forms a batch bounded by a row count and a padded-token budget (rows × longest row), filled with the queued
rows nearest the oldest one in length while the batch's real tokens stay `min_padding_efficiency` of its padded
ones: a row that would be mostly padding waits for rows nearer its own length (benchmarks/serving.py's
`padding_floor_on_vs_off_gpt_score`, docs/benchmarks.md). Rows whose deadline passed are failed with
DEADLINE_EXCEEDED and never run; a request that cannot meet its deadline behind the rows already queued (full
batches ahead × the recent batch time) is refused at admission with DEADLINE_EXCEEDED, before it takes a
place in the queue; rows whose caller went away are dropped. The batch runs on the model's own thread
(blocking ONNX work stays off the event loop) and each row's result goes back to its caller. A full queue
refuses a request at once with RESOURCE_EXHAUSTED, before any work; a submission bigger than a quarter of the
queue goes in pieces.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from plm.service import faults
from plm.service.config import Batching
from plm.service.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from plm.service.metrics import Metrics, observe_many

P = TypeVar("P")
R = TypeVar("R")

log = logging.getLogger(__name__)


@dataclass
class _Row(Generic[P, R]):
    payload: P
    length: int  # tokens in this row, for the padded-token budget
    future: asyncio.Future[R]
    enqueued: float
    deadline: float | None  # time.monotonic() value, None = no deadline


class DynamicBatcher(Generic[P, R]):
    """Batches rows of one model. `run` maps a list of payloads to a list of results (same order)."""

    def __init__(
        self,
        model: str,
        run: Callable[[Sequence[P]], list[R]],
        batching: Batching,
        metrics: Metrics,
    ) -> None:
        self.model = model
        self._run = run
        self.cfg = batching
        self._metrics = metrics
        # This model's series, looked up once (a `labels()` call per row takes a lock and builds a key).
        self._m_depth = metrics.queue_depth.labels(model)
        self._m_wait = metrics.queue_wait.labels(model)
        self._m_batch = metrics.batch_size.labels(model)
        self._queue: collections.deque[_Row[P, R]] = collections.deque()
        # NOTE: asyncio primitives are created in start(), inside the running loop that will use them.
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"run-{model}")
        self._closed = False
        self.batches_run = 0
        self._arrivals = 0  # rows ever submitted
        self._busy = False  # rows arrived while the last batch ran: the model is under load
        # Run times of the recent batches (the first, cold one left out), for admission's estimate.
        self._recent_batches: collections.deque[float] = collections.deque(maxlen=16)

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._worker = asyncio.get_running_loop().create_task(self._work(), name=f"batcher-{self.model}")
        self._worker.add_done_callback(faults.task_ended)  # a worker that dies takes the model's calls with it

    @property
    def depth(self) -> int:
        return len(self._queue)

    async def submit(self, payloads: Sequence[P], lengths: Sequence[int], deadline: float | None = None) -> list[R]:
        """Queue rows and wait for their results (in order).

        A submission of more than a quarter of `max_queue_size` rows (BERT's pseudo-log-likelihood makes one
        row per token) goes in pieces, each queued when the one before is done: it can neither exceed the
        queue nor hold all of it while other callers wait.
        """
        piece = max(1, self.cfg.max_queue_size // 4)
        if len(payloads) <= piece:
            return await self._submit(payloads, lengths, deadline)
        out: list[R] = []
        for i in range(0, len(payloads), piece):
            out += await self._submit(payloads[i:i + piece], lengths[i:i + piece], deadline)
        return out

    async def _submit(self, payloads: Sequence[P], lengths: Sequence[int], deadline: float | None) -> list[R]:
        """Queue rows and wait for their results; all-or-nothing admission against the queue bound."""
        if self._closed or self._wakeup is None:
            raise Unavailable(f"model {self.model!r} is not serving (shutting down or not started)")
        self.refuse_if_full(len(payloads))
        now = time.monotonic()
        if deadline is not None:
            self._admit_deadline(deadline - now)
        loop = asyncio.get_running_loop()
        rows = [_Row(p, n, loop.create_future(), now, deadline) for p, n in zip(payloads, lengths, strict=True)]
        self._queue.extend(rows)
        self._arrivals += len(rows)
        self._m_depth.set(len(self._queue))
        self._wakeup.set()
        try:
            if len(rows) == 1:  # one text per call, the common case: no gather future between the row and its caller
                return [await rows[0].future]
            return list(await asyncio.gather(*(r.future for r in rows)))
        except BaseException:
            for r in rows:  # the caller is gone or one row failed: the others need not run
                r.future.cancel()
            raise

    def refuse_if_full(self, rows: int = 1) -> None:
        """RESOURCE_EXHAUSTED unless `rows` more rows fit in the queue (all-or-nothing per request)."""
        if len(self._queue) + rows > self.cfg.max_queue_size:
            self._metrics.rejections.labels(self.model, "queue_full").inc()
            raise ResourceExhausted(
                f"model {self.model!r}: queue full ({len(self._queue)} rows queued, max_queue_size "
                f"{self.cfg.max_queue_size}); retry later"
            )

    def expected_wait(self) -> float:
        """Seconds a new row waits at least before its batch starts: the full batches queued ahead of it.

        A lower bound by design: the fastest of the last 16 batches (0 before any), and neither its own batch
        nor a partly filled one ahead is counted; so admission refuses only what cannot make its deadline. (A
        moving average was not: ONNX Runtime's first runs of new shapes, or a busy moment, are many times slower
        than the rest, and it refused calls that had minutes to go — seen on a loaded CI runner.)
        """
        if not self._recent_batches:
            return 0.0
        return len(self._queue) // self.cfg.max_batch_size * min(self._recent_batches)

    def _admit_deadline(self, remaining: float) -> None:
        wait = self.expected_wait()
        if wait > remaining:
            self._metrics.rejections.labels(self.model, "deadline_admission").inc()
            raise DeadlineExceeded(
                f"model {self.model!r}: the deadline ({remaining:.3f}s left) cannot be met: about {wait:.3f}s of "
                f"queued work ({len(self._queue)} rows) runs first; the request was not queued"
            )

    async def close(self) -> None:
        """Stop taking rows, fail the queued ones with UNAVAILABLE, stop the worker."""
        self._closed = True
        while self._queue:
            row = self._queue.popleft()
            if not row.future.done():
                row.future.set_exception(Unavailable(f"model {self.model!r} was unloaded"))
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        self._executor.shutdown(wait=True)

    def _inline(self, batch: list[_Row[P, R]]) -> bool:
        """Run this batch on the event loop itself: the one call in flight in the server, one row, and a model
        whose fastest recent batch took less than `inline_max_ms`. Handing it to the model's thread and back
        costs two thread wake-ups, more than blocking the loop that long. Under load every batch goes to the
        thread: a blocked loop reads no new calls, so a model run inline could never see that it is busy."""
        return (len(batch) == 1 and not self._queue and not self._busy and self._metrics.inflight_now <= 1
                and bool(self._recent_batches) and min(self._recent_batches) * 1000 < self.cfg.inline_max_ms)

    def _timed_run(self, payloads: list[P]) -> tuple[list[R], float]:
        """The batch's results and the seconds the model took, on the thread that ran it: not the wait for the
        event loop to resume the worker afterwards, which a loop busy with other calls' requests (tokenizing a
        large one, say) stretches far beyond the run, and which would make admission refuse calls that have
        plenty of time."""
        started = time.monotonic()
        results = self._run(payloads)
        return results, time.monotonic() - started

    def _drop_dead(self) -> None:
        """Forget rows whose caller went away; fail the expired ones (they never run)."""
        now = time.monotonic()
        live: collections.deque[_Row[P, R]] = collections.deque()
        for row in self._queue:
            if row.future.done():  # cancelled by its caller
                continue
            if row.deadline is not None and now >= row.deadline:
                self._metrics.rejections.labels(self.model, "deadline").inc()
                row.future.set_exception(DeadlineExceeded(
                    f"model {self.model!r}: the deadline passed after {now - row.enqueued:.3f}s in the queue; "
                    "the request was not run"
                ))
                continue
            live.append(row)
        self._queue = live

    def _take_batch(self) -> list[_Row[P, R]]:
        """The oldest live row, then the rows nearest to it in length, within the count and padded-token budget.

        Bucketing by length keeps padding low when short and long inputs queue together; always taking the
        oldest row first bounds every row's wait (a skipped row only gets older, and becomes the oldest).
        Only the first few batches' worth of the queue is searched, so picking stays cheap.
        """
        self._drop_dead()
        if not self._queue:
            return []
        head = self._queue[0]
        window = list(itertools.islice(self._queue, 1, 4 * self.cfg.max_batch_size))
        window.sort(key=lambda r: abs(r.length - head.length))  # stable: the older first among equals
        batch, longest, tokens = [head], head.length, head.length
        min_eff = self.cfg.min_padding_efficiency
        for row in window:
            if len(batch) >= self.cfg.max_batch_size:
                break
            new_longest = max(longest, row.length)
            padded = new_longest * (len(batch) + 1)
            if padded > self.cfg.max_batch_tokens or tokens + row.length < min_eff * padded:
                continue  # over the budget, or mostly padding: it waits for rows nearer its own length
            longest, tokens = new_longest, tokens + row.length
            batch.append(row)
        chosen = {id(r) for r in batch}
        self._queue = collections.deque(r for r in self._queue if id(r) not in chosen)
        return batch

    async def _work(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        delay = self.cfg.max_queue_delay_ms / 1000.0
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            # Under load (rows arrived while the last batch ran), wait for company until the oldest row has
            # waited `delay` or the batch is full. An idle model runs what it has at once: at low load nobody
            # is coming, and waiting would only add `delay` to every request's latency.
            oldest = self._queue[0].enqueued
            while (self._busy or not self.cfg.idle_dispatch) and len(self._queue) < self.cfg.max_batch_size:
                remaining = oldest + delay - time.monotonic()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except TimeoutError:
                    break
            batch = self._take_batch()
            self._m_depth.set(len(self._queue))
            if not batch:
                continue
            started = time.monotonic()
            observe_many(self._m_wait, [started - row.enqueued for row in batch])
            arrivals = self._arrivals
            try:
                payloads = [r.payload for r in batch]
                if self._inline(batch):
                    results, took = self._timed_run(payloads)
                else:
                    results, took = await loop.run_in_executor(self._executor, self._timed_run, payloads)
            except Exception as e:  # the whole batch failed: every caller hears about it
                log.exception("model %s: batch of %d rows failed", self.model, len(batch))
                for row in batch:
                    if not row.future.done():
                        row.future.set_exception(e)
                continue
            finally:
                self._busy = self._arrivals > arrivals
            self.batches_run += 1
            if self.batches_run > 1:  # the first run allocates: it says nothing about the next ones
                self._recent_batches.append(took)
            self._m_batch.observe(len(batch))
            for row, result in zip(batch, results, strict=True):
                if not row.future.done():
                    row.future.set_result(result)
