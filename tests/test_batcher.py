"""The dynamic batcher alone: length bucketing, the oldest row first, deadlines, the queue bound."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

import pytest
from plm.service.batcher import DynamicBatcher
from plm.service.config import Batching
from plm.service.errors import DeadlineExceeded, ResourceExhausted
from plm.service.metrics import Metrics


def _run_with(batching: Batching, lengths: list[int], deadlines: list[float | None] | None = None,
              ) -> tuple[list[list[int]], list[object]]:
    """Queue one row per length at once; returns the batches the model saw and each row's outcome."""
    seen: list[list[int]] = []

    def run(rows: Sequence[int]) -> list[int]:
        seen.append(list(rows))
        time.sleep(0.005)  # a model run: later rows queue meanwhile
        return [r * 10 for r in rows]

    async def main() -> list[object]:
        b: DynamicBatcher[int, int] = DynamicBatcher("m", run, batching, Metrics())
        b.start()
        now = time.monotonic()
        calls = [b.submit([n], [n], None if deadlines is None or deadlines[i] is None else now + deadlines[i])
                 for i, n in enumerate(lengths)]
        out = await asyncio.gather(*calls, return_exceptions=True)
        await b.close()
        return list(out)

    return seen, asyncio.run(main())


def test_rows_of_similar_length_share_a_batch() -> None:
    lengths = [2, 40, 3, 41, 2, 39, 3, 40]
    seen, out = _run_with(Batching(max_batch_size=2, max_queue_delay_ms=20, max_batch_tokens=10_000), lengths)
    assert out == [[n * 10] for n in lengths]  # every caller got its own row's result
    assert seen[0][0] == 2  # the oldest row goes first
    for batch in seen:
        assert max(batch) <= 2 * min(batch)  # short with short, long with long: little padding


def test_fifo_order_when_lengths_are_equal() -> None:
    seen, _ = _run_with(Batching(max_batch_size=3, max_queue_delay_ms=20), [5, 6, 7, 8, 9, 10])
    flat = [r for batch in seen for r in batch]
    assert flat[0] == 5 and sorted(flat) == [5, 6, 7, 8, 9, 10]


def test_padded_token_budget_bounds_a_batch() -> None:
    seen, _ = _run_with(Batching(max_batch_size=8, max_queue_delay_ms=20, max_batch_tokens=100), [50, 50, 50, 10])
    for batch in seen:
        assert max(batch) * len(batch) <= 100 or len(batch) == 1


@pytest.mark.parametrize("min_eff", [0.0, 0.5, 0.8, 0.95])
def test_padding_efficiency_floor_keeps_mostly_padding_rows_apart(min_eff: float) -> None:
    """Rows join a batch only while real tokens stay ≥ min_eff of the padded ones; the oldest row always runs
    (alone if need be), and every row runs exactly once."""
    lengths = [10, 4, 9, 2, 10, 3, 8, 1, 10, 5, 7, 6]
    seen, out = _run_with(Batching(max_batch_size=12, max_queue_delay_ms=50, min_padding_efficiency=min_eff),
                          lengths)
    assert out == [[n * 10] for n in lengths]
    assert sorted(r for batch in seen for r in batch) == sorted(lengths) and seen[0][0] == 10
    for batch in seen:
        assert len(batch) == 1 or sum(batch) >= min_eff * max(batch) * len(batch), batch
    if min_eff == 0.0:  # no floor: the queued rows share as few batches as the count allows
        assert len(seen) <= 2
    if min_eff >= 0.8:
        assert len(seen) >= 3


def test_expired_rows_never_run() -> None:
    seen, out = _run_with(Batching(max_batch_size=1, max_queue_delay_ms=1), [4, 5, 6], deadlines=[None, 0.0, None])
    assert isinstance(out[1], DeadlineExceeded) and out[0] == [40] and out[2] == [60]
    assert 5 not in [r for batch in seen for r in batch]


def test_full_queue_refuses_at_once() -> None:
    gate = threading.Event()

    def run(rows: Sequence[int]) -> list[int]:
        gate.wait(10)  # the model is busy: what comes next stays queued
        return list(rows)

    async def main() -> None:
        b: DynamicBatcher[int, int] = DynamicBatcher("m", run, Batching(max_queue_size=2, max_batch_size=1),
                                                     Metrics())
        b.start()
        running = asyncio.ensure_future(b.submit([0], [1]))
        await asyncio.sleep(0.05)
        queued = [asyncio.ensure_future(b.submit([i], [1])) for i in (1, 2)]
        await asyncio.sleep(0.01)
        with pytest.raises(ResourceExhausted, match="max_queue_size 2"):
            await b.submit([3], [1])
        gate.set()
        assert await asyncio.gather(running, *queued) == [[0], [1], [2]]  # the admitted ones all complete
        await b.close()

    asyncio.run(main())


def test_an_idle_model_does_not_wait_for_company_a_busy_one_does() -> None:
    """max_queue_delay_ms of 60 s: a lone request on an idle model must not wait it out (the test's 30 s
    timeout would fail); with idle_dispatch off it would. Under load, rows that queued while a batch ran
    wait for company and leave together."""
    seen: list[list[int]] = []

    def run(rows: Sequence[int]) -> list[int]:
        seen.append(list(rows))
        time.sleep(0.05)
        return list(rows)

    async def main() -> None:
        b: DynamicBatcher[int, int] = DynamicBatcher("m", run, Batching(max_batch_size=3, max_queue_delay_ms=60_000),
                                                     Metrics())
        b.start()
        assert await asyncio.wait_for(b.submit([1], [1]), 10) == [1]  # idle: ran at once
        first = asyncio.ensure_future(b.submit([2], [1]))
        await asyncio.sleep(0.01)  # row 2's batch is running: the model is busy now
        later = [asyncio.ensure_future(b.submit([n], [1])) for n in (3, 4, 5)]
        await asyncio.wait_for(asyncio.gather(first, *later), 10)  # 3 rows fill a batch: no 60 s wait
        await b.close()

    asyncio.run(main())
    assert seen == [[1], [2], [3, 4, 5]]


def test_a_submission_bigger_than_the_queue_goes_in_pieces() -> None:
    """BERT's pseudo-log-likelihood submits one row per token: 30 rows through a queue of 8 all come back, in
    order, in pieces of at most a quarter of the queue."""
    seen: list[list[int]] = []

    def run(rows: Sequence[int]) -> list[int]:
        seen.append(list(rows))
        return [r * 10 for r in rows]

    async def main() -> list[int]:
        b: DynamicBatcher[int, int] = DynamicBatcher("m", run, Batching(max_batch_size=4, max_queue_size=8), Metrics())
        b.start()
        got = await b.submit(list(range(30)), [1] * 30)
        await b.close()
        return got

    assert asyncio.run(main()) == [r * 10 for r in range(30)]
    assert max(len(batch) for batch in seen) <= 2  # pieces of 8 // 4 rows


def test_a_fast_lone_row_of_an_idle_model_runs_on_the_loop_and_load_goes_to_the_thread() -> None:
    """`inline_max_ms`: once a batch has shown the model is fast, a lone row of an idle model runs on the event
    loop's own thread (no hand-off); rows that queue together still run on the model's thread."""
    threads: list[tuple[int, bool]] = []

    def run(rows: Sequence[int]) -> list[int]:
        threads.append((len(rows), threading.current_thread() is threading.main_thread()))
        return [r + 1 for r in rows]

    async def main(batching: Batching) -> None:
        b: DynamicBatcher[int, int] = DynamicBatcher("m", run, batching, Metrics())
        b.start()
        for i in range(4):  # one at a time: idle each time (the first two measure the model)
            assert await b.submit([i], [1]) == [i + 1]
        assert await asyncio.gather(*(b.submit([i], [1]) for i in range(6))) == [[i + 1] for i in range(6)]
        await b.close()

    metrics = Metrics()

    async def busy_server() -> None:  # another call in flight in the server: its lone rows go to the thread
        b: DynamicBatcher[int, int] = DynamicBatcher("m", run, Batching(inline_max_ms=50.0), metrics)
        b.start()
        for i in range(4):
            metrics.set_inflight(2 if i >= 2 else 1)
            assert await b.submit([i], [1]) == [i + 1]
        await b.close()

    asyncio.run(busy_server())
    assert [on_loop for _, on_loop in threads] == [False, False, False, False]
    threads.clear()
    asyncio.run(main(Batching(inline_max_ms=50.0, max_queue_delay_ms=5)))
    lone, rest = threads[:4], threads[4:]
    assert [on_loop for _, on_loop in lone] == [False, False, True, True]  # no estimate before two batches ran
    assert any(n > 1 for n, _ in rest) and not any(on_loop for n, on_loop in rest if n > 1)
    threads.clear()
    asyncio.run(main(Batching(inline_max_ms=0.0, max_queue_delay_ms=5)))  # off: every run on the thread
    assert not any(on_loop for _, on_loop in threads)


def test_admission_estimates_from_the_run_not_from_a_busy_loop() -> None:
    """The wait admission expects behind queued rows is built from how long the model ran, on its thread: a
    batch that finished while the event loop was busy (tokenizing a large request, say) does not count the
    time the loop took to come back to it, so a call with ample time is not refused."""
    release = threading.Event()

    def run(rows: Sequence[int]) -> list[int]:
        if rows[0] < 0:
            release.wait(10)  # holds the model while later rows queue
        time.sleep(0.002)
        return list(rows)

    async def main() -> float:
        b: DynamicBatcher[int, int] = DynamicBatcher("m", run, Batching(max_batch_size=1, max_queue_delay_ms=0),
                                                     Metrics())
        b.start()
        await b.submit([0], [1])  # the first, cold run: never counted
        second = asyncio.get_running_loop().create_task(b.submit([1], [1]))
        await asyncio.sleep(0.001)  # the second row is on the model's thread
        time.sleep(0.3)  # the loop is busy meanwhile, long after the run ended
        await second
        held = asyncio.get_running_loop().create_task(b.submit([-1], [1]))
        queued = [asyncio.get_running_loop().create_task(b.submit([i], [1])) for i in range(2, 6)]
        await asyncio.sleep(0.01)
        expected = b.expected_wait()
        # 4 rows ahead, about 10 ms of work: queued, not refused (a refusal raises DeadlineExceeded here)
        late = asyncio.get_running_loop().create_task(b.submit([9], [1], deadline=time.monotonic() + 0.5))
        await asyncio.sleep(0.01)
        release.set()
        await asyncio.gather(held, *queued)
        assert await late == [9]
        await b.close()
        return expected

    assert asyncio.run(main()) < 0.1
