"""What every benchmark script shares: the `--smoke` flag, an exit status that counts dying threads, and the
bar chart of the scripts whose result is a handful of numbers.

`--smoke` runs a script's real code path end to end on a tiny repository (`plm build --profile tiny`) with the
smallest sizes (durations, rounds, calls), and still writes its result file and PNG: tests/test_benchmarks.py
runs every script in this folder that way, so a rename elsewhere that breaks one fails the suite. A smoke
run's figures mean nothing.

In a smoke run, `Servers` starts one `plm serve` for every configuration a full run starts a server for,
with all their settings at once: server starts would be most of its time, and every setting is still read.

`run(main)` is each script's entry point: the exit status is non-zero when `main` raised, or when any thread
of the process died with an exception, even one whose work `main` never looked at; `check_threads()` raises at
once, for a script to call before it computes a verdict from the threads' work.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from plm.client.local_server import LocalServer

SMOKE_HELP = ("a seconds-long run on a tiny repository (plm build --profile tiny): the same code path with the "
              "smallest sizes, result file and plot included (the test suite runs it); its figures mean nothing")

_deaths: list[str] = []
_lock = threading.Lock()


def add_smoke_flag(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--smoke", action="store_true", help=SMOKE_HELP)


class Servers:
    """`plm serve` processes over one repository, one per configuration (models and PLM_* settings).

    With `smoke`, every configuration but a `workers` one and one started with `shared=False` (settings the
    others would contradict) gets the same server instead, started with the union of `configs`' models and
    settings (where two set one setting, the last wins) and metrics on, and stopped by `close` or at exit.
    """

    def __init__(self, repository: Path, smoke: bool,
                 configs: Sequence[tuple[Sequence[str], Mapping[str, str]]] = ()) -> None:
        self.repository = repository
        self.shared: LocalServer | None = None
        if smoke:
            from plm.client.local_server import LocalServer

            models = sorted({m for ms, _ in configs for m in ms})
            env = {k: v for _, e in configs for k, v in e.items()}
            self.shared = LocalServer(repository, models, env, metrics=True)
            atexit.register(self.close)

    def start(self, models: Sequence[str], env: Mapping[str, str] | None = None, metrics: bool = False,
              workers: int = 1, shared: bool = True) -> contextlib.AbstractContextManager[LocalServer]:
        """A server for this configuration, stopped when the `with` block ends (the shared one at `close`)."""
        from plm.client.local_server import LocalServer

        if self.shared is not None and workers == 1 and shared:
            return contextlib.nullcontext(self.shared)
        return LocalServer(self.repository, models, dict(env or {}), metrics=metrics, workers=workers)

    def close(self) -> None:
        if self.shared is not None:
            self.shared.stop()
            self.shared = None

    def __enter__(self) -> Servers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _record_death(args: threading.ExceptHookArgs) -> None:
    """threading's hook for an exception that ends a thread: remembered, and the traceback printed as before."""
    name = args.thread.name if args.thread is not None else "a thread"
    with _lock:
        _deaths.append(f"{name}: {args.exc_type.__name__}: {args.exc_value}")
    threading.__excepthook__(args)


def check_threads() -> None:
    """Raises when a thread of this process has died with an exception (its traceback was printed then)."""
    with _lock:
        if _deaths:
            raise RuntimeError(f"{len(_deaths)} thread(s) died: " + "; ".join(_deaths))


def run(main: Callable[[], int | None]) -> NoReturn:
    """A script's entry point: `main()`'s return value is the exit status, unless a thread died (status 1).

    After `main` returns, the process ends as `sys.exit` would (threads joined, atexit handlers run, output
    flushed) but without the interpreter's teardown, which with torch and transformers loaded takes seconds.
    """
    threading.excepthook = _record_death
    code = main()
    for thread in threading.enumerate():  # what sys.exit waits for; a death in one counts too
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    try:
        check_threads()
    except RuntimeError as e:
        print(f"{Path(sys.argv[0]).name}: {e}", file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()  # servers stopped, temporary folders removed, logging flushed
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


def no_errors(errors: Mapping[str, int], what: str) -> None:
    """A smoke run's calls must all succeed: errors by status code raise (a full run reports them instead)."""
    if errors:
        raise RuntimeError(f"{what}: calls failed: {dict(errors)}")


def bar_plot(path: Path, values: Mapping[str, float], ylabel: str, title: str, log: bool = False) -> None:
    """One bar per label, written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(values) + 2), 4))
    ax.bar(range(len(values)), list(values.values()))
    ax.set_xticks(range(len(values)), list(values), rotation=25, ha="right", fontsize=8)
    ax.set(ylabel=ylabel, title=title)
    if log:
        ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
