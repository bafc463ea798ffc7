"""Logging: the server's handler and formats, and the per-call access line.

Every RPC writes one access line (`plm.access`). Through `logging` that line costs the event loop a LogRecord,
the caller's frame, the handler's lock and a strftime per call, a visible share of a bare gRPC call
(benchmarks/grpc_floor.py measures both). `access()` writes the same line, byte for byte, straight into
the buffered handler `setup_logging` installs, whenever that handler alone would have received it (the
`plm.access` logger enabled for INFO, no handlers or filters of its own, the root logger's only handler ours);
otherwise (tests capturing logs, an embedding application's handlers) it goes through `logging` as before.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from typing import Any

_ACCESS = logging.getLogger("plm.access")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"


def _json_line(created: float, level: str, name: str, pid: int, msg: str, exc: str | None = None) -> str:
    entry: dict[str, Any] = {"ts": round(created, 3), "level": level, "logger": name, "pid": pid, "msg": msg}
    if exc:
        entry["exc"] = exc
    return json.dumps(entry, ensure_ascii=False)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, pid, msg (and exc)."""

    def format(self, record: logging.LogRecord) -> str:
        exc = self.formatException(record.exc_info) if record.exc_info else None
        return _json_line(record.created, record.levelname, record.name, record.process or 0,
                          record.getMessage(), exc)

    def line(self, created: float, level: str, name: str, msg: str) -> str:
        return _json_line(created, level, name, os.getpid(), msg)


class TextFormatter(logging.Formatter):
    """`TEXT_FORMAT`, with the date part of the time formatted once a second instead of once a line."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)
        self._second: tuple[int, str] = (-1, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        return self._asctime(record.created)

    def _asctime(self, created: float) -> str:
        second = int(created)
        cached = self._second  # one read: another thread may replace it meanwhile
        if cached[0] != second:
            cached = self._second = (second, time.strftime(self.default_time_format, self.converter(created)))
        return f"{cached[1]},{int((created - second) * 1000):03d}"  # logging's default_msec_format

    def line(self, created: float, level: str, name: str, msg: str) -> str:
        return f"{self._asctime(created)} {level} {name}[{os.getpid()}]: {msg}"


class BufferedStreamHandler(logging.StreamHandler):
    """A log handler that does not make a write system call per line.

    stderr is line-buffered, so every access line was a `write(2)` on the event-loop thread, which also hands
    the GIL to gRPC's poller thread and waits to get it back. Lines go through a 64 KiB buffer instead, written
    out when it fills, at once for WARNING and above, and otherwise every `interval` seconds by a daemon
    thread (and at exit by `logging.shutdown`): a killed process loses at most that much of its access log.
    """

    def __init__(self, fd: int, interval: float) -> None:
        super().__init__(open(fd, "w", buffering=1 << 16, encoding="utf-8", errors="backslashreplace",  # noqa: SIM115
                              closefd=False))
        self._stop = threading.Event()
        self._interval = interval
        threading.Thread(target=self._flush_every, name="plm-log-flush", daemon=True).start()

    def _flush_every(self) -> None:
        while not self._stop.wait(self._interval):
            self.flush()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.write_line(self.format(record), record.levelno >= logging.WARNING)
        except Exception:
            self.handleError(record)

    def write_line(self, line: str, flush: bool = False) -> None:
        with self.lock:  # type: ignore[union-attr]
            self.stream.write(line + self.terminator)
            if flush:
                self.stream.flush()

    def close(self) -> None:
        self._stop.set()
        self.flush()
        super().close()


_direct: BufferedStreamHandler | None = None  # the handler access lines may be written to straight


def setup_logging(level: str, fmt: str, buffer_seconds: float) -> None:
    """The root logger's one handler: stderr, buffered when `buffer_seconds` > 0, text or JSON lines."""
    global _direct
    handler: logging.Handler = logging.StreamHandler(sys.stderr)
    _direct = None
    if buffer_seconds > 0:
        try:
            fd = sys.stderr.fileno()
        except (AttributeError, OSError, ValueError):  # stderr is not a file (captured): write it line by line
            fd = -1
        if fd >= 0:
            sys.stderr.flush()
            handler = _direct = BufferedStreamHandler(fd, buffer_seconds)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in root.handlers:  # set up again (tests, the CLI): the old buffer is written out, its thread ends
        old.close()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def access(request_id: str, method: str, model: str, code: str, seconds: float) -> None:
    """One call's access line on `plm.access` at INFO."""
    if not _ACCESS.isEnabledFor(logging.INFO):
        return
    msg = f"request_id={request_id} method={method} model={model} code={code} duration_ms={seconds * 1000:.2f}"
    handler = _direct
    root = logging.root.handlers
    if (handler is not None and len(root) == 1 and root[0] is handler and not _ACCESS.handlers
            and not _ACCESS.filters and not handler.filters and _ACCESS.propagate and handler.level <= logging.INFO
            and isinstance(handler.formatter, TextFormatter | JsonFormatter)):
        handler.write_line(handler.formatter.line(time.time(), "INFO", _ACCESS.name, msg))
    else:
        _ACCESS.info("%s", msg)
