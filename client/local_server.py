"""`plm serve` in a child process on a free loopback port: for benchmarks, and for scripts that want a
server of their own. Its GIL and cores are not the caller's, as in production."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
from plm.client.client import PlmClient


class LocalServer:
    """Starts `plm serve --repository R --models ...` and waits until its health says SERVING.

    `env` adds settings as PLM_* variables (e.g. {"PLM_BATCHING__MAX_BATCH_SIZE": "1"}). With `workers` > 1
    it is a supervisor of that many server processes (service/workers.py), ready once every one is serving.
    """

    def __init__(self, repository: Path, models: Sequence[str], env: dict[str, str] | None = None,
                 metrics: bool = False, start_timeout: float = 120.0, workers: int = 1, http: bool = False) -> None:
        self.port, self.metrics_port = free_port(), (free_port() if metrics else 0)
        self.http_port = free_port() if http else 0  # the OpenAI-compatible HTTP API; off unless asked for
        # The log goes to a file: a pipe nobody reads fills up and blocks the server's event loop mid-run.
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 — closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "plm.cli", "serve", "--repository", str(repository), "--port", str(self.port),
             "--metrics-port", str(self.metrics_port), "--http-port", str(self.http_port), "--workers", str(workers),
             *(["--models", *models] if models else [])],
            env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=self.log)
        self.target = f"127.0.0.1:{self.port}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics" if metrics else None
        self.http_url = f"http://127.0.0.1:{self.http_port}" if http else None
        deadline = time.monotonic() + start_timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                with PlmClient(self.target, timeout=2) as c:
                    if c.health_status("") == "SERVING" and self.serving_processes() >= workers:
                        return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
        err = self.stop()
        raise RuntimeError(f"plm serve did not start within {start_timeout:.0f} s: {err[-2000:]}")

    def log_text(self) -> str:
        """The server's log so far (its lines reach the file within `log_buffer_seconds`)."""
        fd = self.log.fileno()  # pread: the file position is shared with the server's stderr and stays put
        return os.pread(fd, os.fstat(fd).st_size, 0).decode(errors="replace")

    def serving_processes(self) -> int:
        """Server processes that logged they are serving (workers restarted after a crash count again)."""
        return len(re.findall(r"serving \d+ model\(s\)", self.log_text()))  # a text or a JSON log line

    def stop(self) -> str:
        """SIGTERM, wait; returns the end of the server's log."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.seek(0, os.SEEK_END)
        self.log.seek(max(0, self.log.tell() - 20_000))
        tail = self.log.read().decode(errors="replace")
        self.log.close()
        return tail

    def __enter__(self) -> LocalServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
