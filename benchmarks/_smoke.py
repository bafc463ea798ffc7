"""What every benchmark script shares: the `--smoke` flag, an exit status that counts dying threads, and the
bar chart of the scripts whose result is a handful of numbers.

`--smoke` runs a script's real code path end to end on a tiny repository (`plm build --profile tiny`) with the
smallest sizes (durations, rounds, calls), and still writes its result file and PNG: tests/test_benchmarks.py
runs every script in this folder that way, so a rename elsewhere that breaks one fails the suite. A smoke
run's figures mean nothing.

`run(main)` is each script's entry point: the exit status is non-zero when `main` raised, or when any thread
of the process died with an exception, even one whose work `main` never looked at; `check_threads()` raises at
once, for a script to call before it computes a verdict from the threads' work.
"""

from __future__ import annotations

import argparse
import sys
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NoReturn

SMOKE_HELP = ("a seconds-long run on a tiny repository (plm build --profile tiny): the same code path with the "
              "smallest sizes, result file and plot included (the test suite runs it); its figures mean nothing")

_deaths: list[str] = []
_lock = threading.Lock()


def add_smoke_flag(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--smoke", action="store_true", help=SMOKE_HELP)


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
    """A script's entry point: `main()`'s return value is the exit status, unless a thread died (status 1)."""
    threading.excepthook = _record_death
    code = main()
    try:
        check_threads()
    except RuntimeError as e:
        print(f"{Path(sys.argv[0]).name}: {e}", file=sys.stderr)
        sys.exit(1)
    sys.exit(code or 0)


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
