"""Iteration-level (continuous) batching over a KV-cache decoder graph (DESIGN.md §2; issue "Generation engine").

One engine per model, one worker task. Between two decode steps, waiting sequences join the running batch
(their prompts are prefilled together, left-padded, with an empty past) and finished or cancelled ones leave;
the batch is bounded by a count (`max_batch_size`) and by a token budget (`max_batch_tokens`: prompt plus
generated tokens of every running sequence). Each sequence keeps its own keys and values, (H, S, D) per
layer; a step left-pads them to the longest past of the batch, runs the graph on one new token per
sequence, and keeps each row's real columns of the presents. A sequence's KV memory is freed when it
finishes, when its client cancels (the request leaves at the next step) or when its deadline passes.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from service.config import Batching
from service.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from service.metrics import Metrics
from service.runtime import OrtSession
from service.tasks.generate import Sequence as GenSequence
from service.tasks.generate import StepEvent, choose

log = logging.getLogger(__name__)


@dataclass(eq=False)  # identity: compared with `in` on the batch lists
class _Request:
    """The sequences of one RPC and the queue its caller reads events from."""

    events: asyncio.Queue[StepEvent | BaseException | None]
    deadline: float | None
    running: int  # sequences not finished yet
    cancelled: bool = False


@dataclass(eq=False)
class _Slot:
    seq: GenSequence
    request: _Request
    past: list[np.ndarray] = field(default_factory=list)  # 2 × n_layer arrays (H, S, D): k0, v0, k1, v1, …

    @property
    def length(self) -> int:
        return len(self.seq.prompt_ids) + len(self.seq.generated)


def _drain(queue: asyncio.Queue[StepEvent | BaseException | None]) -> list[StepEvent | BaseException | None]:
    items = []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items


def _coalesce(items: list[StepEvent | BaseException | None]) -> collections.deque[StepEvent | BaseException | None]:
    """Events that piled up while their reader was busy: one token event per prompt (texts and ids joined,
    in order), finishes after it. Fewer messages exactly when the server is busiest; nothing is lost."""
    out: list[StepEvent | BaseException | None] = []
    open_at: dict[int, int] = {}  # prompt index → position of its pending token event in `out`
    for ev in items:
        if not isinstance(ev, StepEvent):
            open_at.clear()  # never merge across an error or the end
            out.append(ev)
        elif ev.finish_reason is None and ev.index in open_at:
            k = open_at[ev.index]
            prev = out[k]
            assert isinstance(prev, StepEvent)
            out[k] = StepEvent(ev.index, prev.text_delta + ev.text_delta, prev.token_ids + ev.token_ids)
        else:
            if ev.finish_reason is None:
                open_at[ev.index] = len(out)
            else:
                open_at.pop(ev.index, None)
            out.append(ev)
    return collections.deque(out)


class GenerationEngine:
    def __init__(self, model: str, session: OrtSession, n_layer: int, n_head: int, head_dim: int, bos_id: int,
                 pad_id: int, allowed: np.ndarray, batching: Batching, metrics: Metrics) -> None:
        self.model = model
        self.session = session
        self.n_layer, self.n_head, self.head_dim = n_layer, n_head, head_dim
        self.bos_id, self.pad_id = bos_id, pad_id
        self.allowed = allowed  # (V,) bool: tokens that may be generated
        self.cfg = batching
        self.metrics = metrics
        self.past_names = [f"past_key_values.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]
        self.present_names = [f"present.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]
        self._waiting: collections.deque[_Slot] = collections.deque()
        self._running: list[_Slot] = []
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"engine-{model}")
        self._closed = False
        self.steps = 0  # decode steps run (tests and benchmarks read it)
        # Prompt prefixes already run (few-shot demonstrations): sha256 of the ids → (presents, next logprobs),
        # least recently used first; bounded by bytes.
        self._prefixes: collections.OrderedDict[str, tuple[list[np.ndarray], np.ndarray]] = collections.OrderedDict()
        self._prefix_bytes = 0
        self.prefix_cache_max_bytes = 64 * 1024 * 1024

    # -- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._worker = asyncio.get_running_loop().create_task(self._work(), name=f"engine-{self.model}")

    async def close(self) -> None:
        self._closed = True
        for slot in [*self._waiting, *self._running]:
            slot.request.events.put_nowait(Unavailable(f"model {self.model!r} was unloaded"))
        self._waiting.clear()
        self._running.clear()
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        self._executor.shutdown(wait=True)

    @property
    def active(self) -> int:
        """Sequences holding KV memory or waiting for it."""
        return len(self._running) + len(self._waiting)

    def refuse_if_full(self, sequences: int = 1) -> None:
        """RESOURCE_EXHAUSTED unless `sequences` more fit in the waiting queue."""
        if len(self._waiting) + sequences > self.cfg.max_queue_size:
            self.metrics.rejections.labels(self.model, "queue_full").inc()
            raise ResourceExhausted(f"model {self.model!r}: {len(self._waiting)} sequences wait to generate "
                                    f"(max_queue_size {self.cfg.max_queue_size}); retry later")

    # -- the caller's side ---------------------------------------------------------------------------------
    async def generate(self, seqs: list[GenSequence], deadline: float | None) -> AsyncIterator[StepEvent]:
        if self._closed or self._wakeup is None:
            raise Unavailable(f"model {self.model!r} is not serving")
        self.refuse_if_full(len(seqs))
        request = _Request(asyncio.Queue(), deadline, len(seqs))
        self._waiting.extend(_Slot(s, request) for s in seqs)
        self._wakeup.set()
        held: collections.deque[StepEvent | BaseException | None] = collections.deque()
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
            self._wakeup.set()

    # -- the worker ----------------------------------------------------------------------------------------
    def _admit(self) -> list[_Slot]:
        """Move waiting sequences into the batch while the count and token budgets allow."""
        admitted: list[_Slot] = []
        tokens = sum(s.length for s in self._running)
        while self._waiting and len(self._running) + len(admitted) < self.cfg.max_batch_size:
            slot = self._waiting[0]
            budget = len(slot.seq.prompt_ids) + 1 + slot.seq.p.max_new_tokens
            if (self._running or admitted) and tokens + budget > self.cfg.max_batch_tokens:
                break
            tokens += budget
            admitted.append(self._waiting.popleft())
        return admitted

    def _drop_finished(self) -> None:
        now = time.monotonic()
        keep = []
        for slot in self._running:
            req = slot.request
            if slot.seq.finished or req.cancelled:
                continue  # its past is released with the slot
            if req.deadline is not None and now >= req.deadline:
                req.cancelled = True
                self.metrics.rejections.labels(self.model, "deadline").inc()
                req.events.put_nowait(DeadlineExceeded(f"model {self.model!r}: the deadline passed while "
                                                       "generating"))
                continue
            keep.append(slot)
        self._running = keep
        for slot in self._waiting:  # a request whose deadline passed while it waited is never prefilled
            req = slot.request
            if not req.cancelled and req.deadline is not None and now >= req.deadline:
                req.cancelled = True
                self.metrics.rejections.labels(self.model, "deadline").inc()
                req.events.put_nowait(DeadlineExceeded(f"model {self.model!r}: the deadline passed while "
                                                       "waiting to generate; the request was not run"))
        self._waiting = collections.deque(s for s in self._waiting if not s.request.cancelled)

    async def _work(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            self._drop_finished()
            self.metrics.active_sequences.labels(self.model).set(len(self._running))
            if not self._running and not self._waiting:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            admitted = self._admit()
            try:
                if admitted:
                    out = await loop.run_in_executor(self._executor, self._prefill, admitted)
                    self._emit(admitted, out)
                    self._running.extend(admitted)
                decoding = [s for s in self._running if s not in admitted and not s.seq.finished
                            and not s.request.cancelled]
                if decoding:
                    out = await loop.run_in_executor(self._executor, self._decode, decoding)
                    self.steps += 1
                    self._emit(decoding, out)
            except Exception as e:  # the step failed: every sequence in it hears about it
                log.exception("model %s: generation step failed", self.model)
                for slot in [*admitted, *self._running]:
                    slot.request.cancelled = True
                    slot.request.events.put_nowait(e)
            await asyncio.sleep(0)  # let callers consume events and new requests arrive

    def _emit(self, slots: Sequence[_Slot], logprobs: np.ndarray) -> None:
        live = [i for i, s in enumerate(slots) if not s.request.cancelled]
        if not live:
            return
        tokens = choose(logprobs[live], self.allowed, [slots[i].seq for i in live])
        for i, tok in zip(live, tokens, strict=True):
            for ev in slots[i].seq.advance(tok):
                slots[i].request.events.put_nowait(ev)

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
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._score_continuations, [self.bos_id, *prefix], rows)

    def _prefix_state(self, prefix: list[int]) -> tuple[list[np.ndarray], np.ndarray]:
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
        logprobs, presents = self._run(ids, mask, np.arange(len(prefix), dtype=np.int64)[None],
                                       [empty] * len(self.past_names), "prefill")
        state = (presents, logprobs[0])
        size = sum(p.nbytes for p in presents)
        self._prefixes[key] = state
        self._prefix_bytes += size
        while self._prefix_bytes > self.prefix_cache_max_bytes and len(self._prefixes) > 1:
            _, (old, _) = self._prefixes.popitem(last=False)
            self._prefix_bytes -= sum(p.nbytes for p in old)
        self.metrics.prefix_cache_bytes.labels(self.model).set(self._prefix_bytes)
        return state

    def _score_continuations(self, prefix: list[int], rows: list[tuple[list[int], list[int]]]) -> list[np.ndarray]:
        presents, after_prefix = self._prefix_state(prefix)
        b, p_len = len(rows), len(prefix)
        out = [np.zeros(len(targets), dtype=np.float64) for _, targets in rows]
        # Step 0: each row's context tokens, left-padded between the shared past and them (masked out).
        ctx_len = max(len(ctx) for ctx, _ in rows)
        if ctx_len == 0:  # no context after the prefix: the first target follows the prefix directly
            logprobs = np.repeat(after_prefix[None], b, axis=0)
            pasts = [np.repeat(p, b, axis=0) for p in presents]
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
            logprobs, pasts = self._run(ids, mask, pos, [np.repeat(p, b, axis=0) for p in presents], "prefill")
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
    def _run(self, input_ids: np.ndarray, mask: np.ndarray, position_ids: np.ndarray, pasts: list[np.ndarray],
             stage: str) -> tuple[np.ndarray, list[np.ndarray]]:
        feeds = {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids,
                 **dict(zip(self.past_names, pasts, strict=True))}
        self.metrics.batch_size.labels(self.model).observe(len(input_ids))
        out = self.session.run(["next_logprobs", *self.present_names], feeds, stage=stage)
        return out["next_logprobs"], [out[n] for n in self.present_names]

    def _prefill(self, slots: Sequence[_Slot]) -> np.ndarray:
        """Prompts (BOS first) left-padded into one batch with an empty past; keeps each row's presents."""
        rows = [[self.bos_id, *s.seq.prompt_ids] for s in slots]
        b, t = len(rows), max(len(r) for r in rows)
        ids = np.full((b, t), self.pad_id, dtype=np.int64)
        mask = np.zeros((b, t), dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, t - len(r):] = r
            mask[i, t - len(r):] = 1
        pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
        empty = np.zeros((b, self.n_head, 0, self.head_dim), dtype=np.float32)
        logprobs, presents = self._run(ids, mask, pos, [empty] * len(self.past_names), "prefill")
        for i, (slot, r) in enumerate(zip(slots, rows, strict=True)):
            slot.past = [p[i, :, t - len(r):].copy() for p in presents]  # (H, S_i, D): the real columns
        return logprobs

    def _decode(self, slots: Sequence[_Slot]) -> np.ndarray:
        """One new token per sequence; pasts left-padded to the longest, presents trimmed back per row."""
        lengths = [s.past[0].shape[1] for s in slots]
        b, p_max = len(slots), max(lengths)
        ids = np.array([[s.seq.generated[-1]] for s in slots], dtype=np.int64)  # (B, 1)
        mask = np.zeros((b, p_max + 1), dtype=np.int64)
        pasts = [np.zeros((b, self.n_head, p_max, self.head_dim), dtype=np.float32) for _ in self.past_names]
        for i, (slot, n) in enumerate(zip(slots, lengths, strict=True)):
            mask[i, p_max - n:] = 1
            for j, arr in enumerate(slot.past):
                pasts[j][i, :, p_max - n:] = arr
        pos = np.array([[n] for n in lengths], dtype=np.int64)  # the new token's position: after n real ones
        logprobs, presents = self._run(ids, mask, pos, pasts, "decode")
        for i, (slot, n) in enumerate(zip(slots, lengths, strict=True)):
            slot.past = [p[i, :, p_max - n:].copy() for p in presents]
        return logprobs
