"""Who joins and who leaves the running batch each step.

Sequences wait in arrival order; between two decode steps waiting ones join the running batch while its
count (`max_batch_size`) and token budget (`max_batch_tokens`: prompt plus generated tokens of every running
sequence) allow, and finished, cancelled and out-of-time ones leave (freeing their KV memory at the next
layout). A waiting sequence whose deadline passes is never prefilled.
"""

from __future__ import annotations

import collections
import time

from plm.service.config import Batching
from plm.service.errors import DeadlineExceeded
from plm.service.generation.kv_batch import Batch
from plm.service.generation.request import Outgoing, Request, Slot
from plm.service.metrics import Metrics


class Scheduler:
    """The engine thread's waiting queue and the step's plan: the batch's rows that go on, the sequences that
    join."""

    def __init__(self, model: str, batching: Batching, metrics: Metrics) -> None:
        self.model = model
        self.cfg = batching
        self.metrics = metrics
        self.waiting: collections.deque[Slot] = collections.deque()

    def schedule(self, batch: Batch, out: Outgoing) -> tuple[list[int], list[Slot]] | None:
        """The rows of `batch` that go on and the waiting sequences that join it; None when nobody runs or waits
        (the engine goes idle). Those who leave for their deadline get their error in `out`."""
        keep = self.still_running(batch, out)
        if not keep and not self.waiting:
            return None
        return keep, self.admit([batch.slots[i] for i in keep])

    def admit(self, running: list[Slot]) -> list[Slot]:
        """Move waiting sequences into the batch while the count and token budgets allow."""
        admitted: list[Slot] = []
        if not self.waiting:
            return admitted
        tokens = sum(s.length for s in running)
        while self.waiting and len(running) + len(admitted) < self.cfg.max_batch_size:
            slot = self.waiting[0]
            budget = len(slot.seq.prompt_ids) + 1 + slot.seq.p.max_new_tokens
            if (running or admitted) and tokens + budget > self.cfg.max_batch_tokens:
                break
            tokens += budget
            admitted.append(self.waiting.popleft())
        return admitted

    def still_running(self, batch: Batch, out: Outgoing) -> list[int]:
        """The batch's rows that go on; finished, cancelled and out-of-time sequences leave (and free their KV at
        the next layout), and so do waiting ones whose deadline passed."""
        now = time.monotonic()

        def late(req: Request, where: str) -> bool:
            if req.cancelled or req.deadline is None or now < req.deadline:
                return False
            req.cancelled = True
            self.metrics.rejections.labels(self.model, "deadline").inc()
            out.append((req, DeadlineExceeded(f"model {self.model!r}: the deadline passed {where}")))
            return True

        holes = batch.holes
        keep = [i for i, s in enumerate(batch.slots) if not (i in holes or s.seq.finished or s.request.cancelled
                                                             or late(s.request, "while generating"))]
        if self.waiting:  # a request whose deadline passed while it waited is never prefilled
            for slot in self.waiting:
                late(slot.request, "while waiting to generate; the request was not run")
            self.waiting = collections.deque(s for s in self.waiting if not s.request.cancelled)
        return keep
