"""The access line: written straight into the server's buffered handler, it must be the line `logging` writes."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from plm.service import logs


@pytest.fixture()
def stderr_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str, str], Path]]:
    """Set up the server's logging onto a file standing in for stderr (in the test body: pytest replaces
    sys.stderr between a fixture's set-up and the test); the root logger is restored after."""
    path = tmp_path / "stderr.log"
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    with path.open("w") as f:
        def setup(level: str, fmt: str) -> Path:
            monkeypatch.setattr(sys, "stderr", f)
            logs.setup_logging(level, fmt, buffer_seconds=60.0)
            return path

        yield setup
        for h in root.handlers:
            h.close()
        root.handlers[:], root.level = saved[0], saved[1]
        monkeypatch.setattr(logs, "_direct", None)


def _lines(path: Path) -> list[str]:
    logging.getLogger().handlers[0].flush()
    return path.read_text().splitlines()


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_direct_access_line_equals_the_logging_line(stderr_file: Callable[[str, str], Path], fmt: str) -> None:
    path = stderr_file("INFO", fmt)
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logs.BufferedStreamHandler) and logs._direct is handler
    logs.access("r-1", "Score", "gpt", "OK", 0.01234)  # the direct path
    logging.getLogger("plm.access").info("request_id=%s method=%s model=%s code=%s duration_ms=%.2f",
                                         "r-1", "Score", "gpt", "OK", 12.34)  # the logging path
    direct, through_logging = _lines(path)
    if fmt == "json":
        a, b = json.loads(direct), json.loads(through_logging)
        assert abs(a.pop("ts") - b.pop("ts")) < 1.0 and a == b
        assert a["msg"] == "request_id=r-1 method=Score model=gpt code=OK duration_ms=12.34"
    else:
        stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} "
        assert re.match(stamp, direct) and re.match(stamp, through_logging)
        assert direct[24:] == through_logging[24:]  # after the time: level, logger[pid]: message
        assert direct.endswith(f"INFO plm.access[{os.getpid()}]: request_id=r-1 method=Score model=gpt code=OK "
                               "duration_ms=12.34")


def test_cached_time_formats_as_logging_does() -> None:
    mine, plain = logs.TextFormatter(), logging.Formatter(logs.TEXT_FORMAT)
    for created in (1_700_000_000.0, 1_700_000_000.999, 1_700_000_001.5, 1_700_000_000.25):  # cache hit, miss, back
        record = logging.LogRecord("plm.access", logging.INFO, "", 0, "m %d", (1,), None)
        record.created, record.msecs = created, int((created - int(created)) * 1000) + 0.0
        assert mine.format(record) == plain.format(record)
        assert mine.line(created, "INFO", "plm.access", "m 1") == plain.format(record)


def test_access_lines_reach_other_handlers_and_respect_levels(stderr_file: Callable[[str, str], Path]) -> None:
    path = stderr_file("INFO", "text")
    seen: list[str] = []

    class Listing(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    other = Listing()
    logging.getLogger().addHandler(other)  # a second handler on the root: the line goes through logging
    logs.access("r-2", "Embed", "word2vec", "NOT_FOUND", 0.001)
    logging.getLogger().removeHandler(other)
    assert seen == ["request_id=r-2 method=Embed model=word2vec code=NOT_FOUND duration_ms=1.00"]
    assert _lines(path)[-1].endswith(f"INFO plm.access[{os.getpid()}]: {seen[0]}")
    logging.getLogger().setLevel(logging.WARNING)
    logs.access("r-3", "Embed", "word2vec", "OK", 0.001)
    assert not any("r-3" in line for line in _lines(path))


def test_the_buffered_handler_closes_twice(tmp_path: Path) -> None:
    """`logging.shutdown` closes every handler at exit, after the server closed its own: the second close must
    not raise (its stop event once shadowed logging.Handler's `_closed` flag, and the exit printed an error)."""
    with (tmp_path / "log").open("w") as f:
        handler = logs.BufferedStreamHandler(f.fileno(), 60.0)
        handler.write_line("one")
        handler.close()
        handler.close()
    assert (tmp_path / "log").read_text() == "one\n"
