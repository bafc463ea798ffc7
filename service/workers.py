"""Several server processes on one port: `plm serve --workers N`.

One Python process answers calls on one event-loop thread; on the n-gram model that thread, not the model,
is the ceiling (benchmarks/grpc_floor.py). With `workers = N` a supervisor process starts N ordinary
`plm serve` processes that bind the same port with SO_REUSEPORT, so the kernel spreads connections over
them, and it:

- serves /metrics for all of them: each worker writes its metrics to files in a fresh
  `PROMETHEUS_MULTIPROC_DIR`, the supervisor's MultiProcessCollector adds them up (gauges by their
  `multiprocess_mode` in service/metrics.py);
- gives each worker `cores // N` ONNX Runtime threads when the config leaves the count to the server;
- forwards SIGTERM/SIGINT (each worker drains as a single server does) and exits 0 when all exited 0;
- forwards SIGHUP, which makes every worker reload the repository; a worker that ran AdminService/
  ReloadModels sends its supervisor SIGHUP, so all workers end up serving the same versions;
- restarts a worker that died, with a backoff; stops everything (exit 1) if a worker dies three times in a
  row soon after starting (it cannot start here: the models are unreadable, ...), (exit 1) at once if a
  worker finds its port taken (`plm serve` checks both ports before it starts any worker, and a worker's one
  line names the port when another program took it meanwhile), and (exit 2) at once if a worker refuses its
  config.

Every worker loads every model: memory grows N-fold, and batches form per worker.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from plm.service.config import ServerConfig
from plm.service.runtime import cores

log = logging.getLogger("plm.workers")

_CONFIG_ERROR = 2  # `plm serve`'s exit code for a config it refuses: restarting would not help
PORT_TAKEN = 3  # a worker's exit code when another program holds its port (it has said so): restarting won't help
_BACKOFF_MAX = 30.0
_HEALTHY_AFTER = 60.0  # a worker that ran this long resets the restart backoff
_KILL_AFTER_GRACE = 15.0  # on stop, a worker still alive this long after its grace period is killed
_GIVE_UP_AFTER = 3  # a worker that died this many times in a row, each soon after its start, stops the server


class _Worker:
    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.backoff = 1.0
        self.restart_at = 0.0
        self.quick_deaths = 0  # deaths in a row within _HEALTHY_AFTER of a start


class Supervisor:
    def __init__(self, config: ServerConfig, argv: list[str]) -> None:
        self.config = config
        self.metrics_dir = Path(tempfile.mkdtemp(prefix="plm-metrics-"))
        self.env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir), "PLM_REUSE_PORT": "true",
                    "PLM_SUPERVISOR_PID": str(os.getpid())}
        if config.runtime.intra_op_threads == 0:  # left to the server: share the cores out
            self.env["PLM_RUNTIME__INTRA_OP_THREADS"] = str(max(1, cores() // config.workers))
        # The worker's command: the same `plm serve` flags, as one worker without its own /metrics.
        self.command = [sys.executable, "-m", "plm.cli", "serve", *argv, "--workers", "1", "--metrics-port", "0"]
        self.workers = [_Worker(i) for i in range(config.workers)]
        self._stopping = threading.Event()
        self._exit_code = 0

    def _spawn(self, w: _Worker) -> None:
        w.proc = subprocess.Popen(self.command, env={**self.env, "PLM_WORKER_INDEX": str(w.index)})
        w.started = time.monotonic()
        log.info("worker %d started (pid %d)", w.index, w.proc.pid)

    def _signal_all(self, sig: int) -> None:
        for w in self.workers:
            if w.proc is not None and w.proc.poll() is None:
                w.proc.send_signal(sig)

    def _on_stop(self, signum: int, _frame: Any) -> None:
        if not self._stopping.is_set():
            log.info("%s: stopping %d workers (each drains for up to %.1fs)", signal.Signals(signum).name,
                     len(self.workers), self.config.grace_seconds)
            self._stopping.set()
        self._signal_all(signal.SIGTERM)

    def _on_reload(self, _signum: int, _frame: Any) -> None:
        log.info("SIGHUP: every worker reloads the repository")
        self._signal_all(signal.SIGHUP)

    def _serve_metrics(self) -> None:
        from prometheus_client import CollectorRegistry, start_http_server
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(self.metrics_dir))
        start_http_server(self.config.metrics_port, addr=self.config.host, registry=registry)
        log.info("metrics of %d workers on http://%s:%d/metrics", len(self.workers), self.config.host,
                 self.config.metrics_port)

    def _reap(self, w: _Worker) -> None:
        """A worker exited: note it, and restart it unless the server is stopping or it refused its config."""
        from prometheus_client import multiprocess

        assert w.proc is not None
        code, pid = w.proc.returncode, w.proc.pid
        multiprocess.mark_process_dead(pid, str(self.metrics_dir))  # its live gauges leave the sums
        w.proc = None
        if self._stopping.is_set():
            self._exit_code = self._exit_code or (1 if code else 0)
            log.info("worker %d (pid %d) exited with %d", w.index, pid, code)
            return
        if code == PORT_TAKEN:  # the worker's own line named the port: stop without adding to it
            self._exit_code = 1
            self._stopping.set()
            self._signal_all(signal.SIGTERM)
            return
        if code == _CONFIG_ERROR:
            log.error("worker %d refused its config (exit %d): stopping", w.index, code)
            self._exit_code = _CONFIG_ERROR
            self._on_stop(signal.SIGTERM, None)
            return
        now = time.monotonic()
        if now - w.started > _HEALTHY_AFTER:
            w.backoff, w.quick_deaths = 1.0, 0
        w.quick_deaths += 1
        if w.quick_deaths >= _GIVE_UP_AFTER:  # it cannot start here (models unreadable, ...)
            log.error("worker %d died %d times in a row soon after starting (last exit %d): stopping", w.index,
                      w.quick_deaths, code)
            self._exit_code = 1
            self._on_stop(signal.SIGTERM, None)
            return
        w.restart_at = now + w.backoff
        log.error("worker %d (pid %d) died with %d: restarting in %.0fs", w.index, pid, code, w.backoff)
        w.backoff = min(w.backoff * 2, _BACKOFF_MAX)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_reload)
        try:
            if self.config.metrics_port:
                self._serve_metrics()
            for w in self.workers:
                self._spawn(w)
            log.info("%d workers on %s:%d (SO_REUSEPORT)", len(self.workers), self.config.host, self.config.port)
            stop_by: float | None = None
            while True:
                for w in self.workers:
                    if w.proc is not None and w.proc.poll() is not None:
                        self._reap(w)
                    elif w.proc is None and not self._stopping.is_set() and time.monotonic() >= w.restart_at:
                        self._spawn(w)
                if self._stopping.is_set():
                    if all(w.proc is None for w in self.workers):
                        return self._exit_code
                    if stop_by is None:
                        stop_by = time.monotonic() + self.config.grace_seconds + _KILL_AFTER_GRACE
                    elif time.monotonic() > stop_by:
                        log.error("workers still running %.0fs after the grace period: killing them", _KILL_AFTER_GRACE)
                        self._signal_all(signal.SIGKILL)
                time.sleep(0.1)  # a signal's handler runs at once; this only paces the polling of workers
        finally:
            for w in self.workers:  # only on an error of our own: workers must not outlive the supervisor
                if w.proc is not None and w.proc.poll() is None:
                    w.proc.kill()
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
