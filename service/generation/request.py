"""What the engine schedules: one RPC's sequences (`Request`, with the queue its caller reads events from) and
one sequence's place in the batch (`Slot`)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from plm.service.generation.sequence import Sequence, StepEvent

Item = StepEvent | BaseException | None  # what a request's queue carries; None ends it


@dataclass(eq=False)  # identity: compared with `in` on the batch lists
class Request:
    """The sequences of one RPC and the queue its caller reads events from."""

    events: asyncio.Queue[Item]
    deadline: float | None
    running: int  # sequences not finished yet
    cancelled: bool = False  # set by the caller's side; the engine thread drops its sequences at the next step


@dataclass(eq=False)
class Slot:
    """One sequence of a request: what holds a row of the KV batch (or waits for one)."""

    seq: Sequence
    request: Request

    @property
    def length(self) -> int:
        return len(self.seq.prompt_ids) + len(self.seq.generated)


Outgoing = list[tuple[Request, Item]]  # events the engine thread hands to the event loop, in order
