"""A server thread or batcher task that dies stops the server loudly (service/faults.py), never silently."""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest
from plm.service import faults
from plm.service.batcher import DynamicBatcher
from plm.service.config import Batching
from plm.service.metrics import Metrics


def test_a_thread_that_dies_is_fatal(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> list[str]:
        died: list[str] = []
        event = asyncio.Event()

        def on_fatal(what: str) -> None:
            died.append(what)
            event.set()

        undo = faults.watch(asyncio.get_running_loop(), on_fatal)
        try:
            def boom() -> None:
                raise RuntimeError("flusher broke")

            t = threading.Thread(target=boom, name="plm-log-flush")
            t.start()
            t.join()
            await asyncio.wait_for(event.wait(), 5)
        finally:
            undo()
        return died

    before = threading.excepthook
    with caplog.at_level(logging.CRITICAL, logger="plm.service.faults"):
        assert asyncio.run(main()) == ["thread plm-log-flush"]
    assert "thread plm-log-flush died: RuntimeError: flusher broke" in caplog.text
    assert threading.excepthook is before  # undone


def test_a_batcher_worker_that_dies_is_fatal(caplog: pytest.LogCaptureFixture) -> None:
    """The worker task ending with an exception (outside its own try) reaches on_fatal; a closed one does not."""

    async def main() -> list[str]:
        died: list[str] = []
        undo = faults.watch(asyncio.get_running_loop(), died.append)
        try:
            broken = DynamicBatcher("m", lambda rows: rows, Batching(), Metrics())

            async def crash() -> None:
                raise ValueError("worker broke")

            broken._work = crash  # type: ignore[method-assign]
            broken.start()
            await asyncio.sleep(0.05)
            healthy = DynamicBatcher("n", lambda rows: rows, Batching(), Metrics())
            healthy.start()
            await healthy.close()
            await asyncio.sleep(0.05)
        finally:
            undo()
        return died

    with caplog.at_level(logging.CRITICAL, logger="plm.service.faults"):
        assert asyncio.run(main()) == ["task batcher-m"]
    assert "task batcher-m died: ValueError: worker broke" in caplog.text
