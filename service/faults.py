"""Deaths that must stop the server: a thread, or a long-lived asyncio task, that ends with an exception.

A server thread that dies (the generation engine's, the log flusher's) or a batcher's worker task that ends with an
exception leaves the process answering health checks while that model's work waits until its deadlines. `watch`
turns each such death into one critical log line (with the traceback) and a call of the server's `on_fatal`, which
`serve()` answers by draining and exiting 1, so the supervisor or Kubernetes restarts the process.

Without `watch` (tests, an application embedding the server) a death is still logged at critical level. The hook
is process-wide (`threading.excepthook`), so one process watches for one server: `plm serve` runs one per process
(`--workers` runs processes).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any

log = logging.getLogger(__name__)

_on_fatal: Callable[[str], None] | None = None


def watch(loop: asyncio.AbstractEventLoop, on_fatal: Callable[[str], None]) -> Callable[[], None]:
    """Report thread deaths and `task_ended` deaths to `on_fatal(what)` on `loop`; returns the undo."""
    global _on_fatal
    previous = threading.excepthook

    def report(what: str) -> None:
        if not loop.is_closed():
            loop.call_soon_threadsafe(on_fatal, what)

    def hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        name = args.thread.name if args.thread is not None else "a thread"
        _log_death(f"thread {name}", args.exc_type, args.exc_value, args.exc_traceback)
        report(f"thread {name}")

    threading.excepthook = hook
    _on_fatal = report

    def undo() -> None:
        global _on_fatal
        threading.excepthook = previous
        _on_fatal = None

    return undo


def task_ended(task: asyncio.Task[Any]) -> None:
    """A done-callback for a task meant to run until the server closes: an exception in it is fatal."""
    if task.cancelled() or task.exception() is None:
        return
    exc = task.exception()
    assert exc is not None
    what = f"task {task.get_name()}"
    _log_death(what, type(exc), exc, exc.__traceback__)
    if _on_fatal is not None:
        _on_fatal(what)


def _log_death(what: str, kind: type[BaseException], exc: BaseException | None, tb: TracebackType | None) -> None:
    log.critical("%s died: %s: %s; the server stops", what, kind.__name__, exc,
                 exc_info=(kind, exc, tb) if exc is not None else False)
