"""Every script in benchmarks/ and every `plm loadtest` scenario in benchmarks/scenarios/ runs end to end in its
seconds-long smoke mode on the tiny repository, so a rename elsewhere that breaks one fails here; a thread that
dies in a script fails its run."""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
# Every script, so that a new one without a smoke mode fails; `_`-modules are the scripts' shared helpers.
SCRIPTS = sorted(p for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_"))
SCENARIOS = sorted((BENCHMARKS / "scenarios").glob("*.json"))


def _run(argv: list[str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _tail(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"


# Smoke runs three at a time: much of a run is a server starting, a client waiting for one or a process
# ending, so on the 2 cores of the target machine a third run fills the gaps that two leave.
SMOKE_PARALLEL = 3
# The slowest smoke runs, slowest first: started first, so that the short ones fill in beside them and the
# lanes end together (longest processing time first). Other scripts start after them, the scenarios last.
SLOWEST_FIRST = ("embed_vs_st", "encdec_report", "serving", "generation", "downstream", "gpu", "train_recipe",
                 "grpc_floor", "word2vec_vs_gensim")


def _selected(session: pytest.Session, param: str) -> list[Path]:
    """The paths of the `param`-parametrised tests of this module that this session runs (after -k, -m, ids)."""
    tests = {"script": test_benchmark_smoke, "scenario": test_scenario_smoke}
    return sorted({item.callspec.params[param] for item in session.items
                   if getattr(item, "function", None) is tests[param] and hasattr(item, "callspec")})


@pytest.fixture(scope="module")
def smoke_runs(request: pytest.FixtureRequest, tiny_repo: Path,
               tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Any]]:
    """The smoke run of every selected script and scenario, SMOKE_PARALLEL at a time, slowest first: a script's
    stem or "scenario <stem>" -> (its --out, its process). Scenarios load the session's in-process server."""
    folder = tmp_path_factory.mktemp("smoke")
    rank = {stem: i for i, stem in enumerate(SLOWEST_FIRST)}
    scripts = sorted(_selected(request.session, "script"), key=lambda p: rank.get(p.stem, len(rank)))
    scenarios = _selected(request.session, "scenario")

    def one(argv: list[str]) -> tuple[Path, Any]:
        try:
            proc: Any = _run(argv)
        except subprocess.TimeoutExpired as e:  # reported by the job's own test, not the fixture
            proc = subprocess.CompletedProcess(e.cmd, -9, str(e.stdout or ""), f"timed out after {e.timeout} s")
        return Path(argv[-1]), proc

    with concurrent.futures.ThreadPoolExecutor(SMOKE_PARALLEL) as pool:
        jobs = {script.stem: pool.submit(one, [str(script), "--smoke", "--repository", str(tiny_repo),
                                               "--out", str(folder / f"{script.stem}.json")]) for script in scripts}
        if scenarios:  # the server starts while the scripts run; the scenarios queue behind them
            target = request.getfixturevalue("server").target
            jobs |= {f"scenario {s.stem}": pool.submit(one, [
                "-m", "plm.cli", "loadtest", "--target", target, "--scenario", str(s), "--concurrency", "2",
                "--duration", "0.5", "--warmup", "0", "--quiet", "--out", str(folder / f"scenario_{s.stem}.json")])
                for s in scenarios}
        return {key: job.result() for key, job in jobs.items()}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_benchmark_smoke(script: Path, smoke_runs: dict[str, tuple[Path, Any]]) -> None:
    out, proc = smoke_runs[script.stem]
    assert proc.returncode == 0, _tail(proc)
    assert json.loads(out.read_text()), _tail(proc)
    assert out.with_suffix(".png").stat().st_size > 0, _tail(proc)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda p: p.stem)
def test_scenario_smoke(scenario: Path, smoke_runs: dict[str, tuple[Path, Any]]) -> None:
    out, proc = smoke_runs[f"scenario {scenario.stem}"]
    assert proc.returncode == 0, _tail(proc)
    summary = json.loads(out.read_text())["summary"]
    assert summary["ok"] > 0 and not summary["errors"], summary
    assert out.with_suffix(".png").stat().st_size > 0


@pytest.mark.parametrize("wait", ["t.join()", ""], ids=["died before main returned", "dies after main returned"])
def test_a_dying_thread_fails_the_run(tmp_path: Path, wait: str) -> None:
    """The exception of a thread whose work the main code never looks at still reaches the exit status, with its
    name, also when the thread dies after `main` returned (the process waits for it, as at interpreter exit)."""
    script = tmp_path / "dies.py"
    script.write_text(textwrap.dedent(f"""
        import sys, threading, time
        sys.path.insert(0, {str(BENCHMARKS)!r})
        from _smoke import run

        def side_load() -> None:
            time.sleep(0.3)
            1 / 0

        def main() -> int:
            t = threading.Thread(target=side_load, name="side-load")
            t.start()
            {wait}
            print("verdict: PASS")
            return 0

        run(main)
    """))
    proc = _run([str(script)])
    assert proc.returncode == 1, _tail(proc)
    assert "ZeroDivisionError" in proc.stderr and "side-load" in proc.stderr, _tail(proc)
