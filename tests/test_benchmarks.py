"""Every script in benchmarks/ and every `plm loadtest` scenario in benchmarks/scenarios/ runs end to end in its
seconds-long smoke mode on the tiny repository, so a rename elsewhere that breaks one fails here; a thread that
dies in a script fails its run."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import ServerThread

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
# Every script, so that a new one without a smoke mode fails; `_`-modules are the scripts' shared helpers.
SCRIPTS = sorted(p for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_"))
SCENARIOS = sorted((BENCHMARKS / "scenarios").glob("*.json"))


def _run(argv: list[str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _tail(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_benchmark_smoke(script: Path, tiny_repo: Path, tmp_path: Path) -> None:
    out = tmp_path / f"{script.stem}.json"
    proc = _run([str(script), "--smoke", "--repository", str(tiny_repo), "--out", str(out)])
    assert proc.returncode == 0, _tail(proc)
    assert json.loads(out.read_text()), _tail(proc)
    assert out.with_suffix(".png").stat().st_size > 0, _tail(proc)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda p: p.stem)
def test_scenario_smoke(scenario: Path, server: ServerThread, tmp_path: Path) -> None:
    out = tmp_path / f"{scenario.stem}.json"
    proc = _run(["-m", "plm.cli", "loadtest", "--target", server.target, "--scenario", str(scenario),
                 "--concurrency", "2", "--duration", "1", "--warmup", "0", "--quiet", "--out", str(out)])
    assert proc.returncode == 0, _tail(proc)
    summary = json.loads(out.read_text())["summary"]
    assert summary["ok"] > 0 and not summary["errors"], summary
    assert out.with_suffix(".png").stat().st_size > 0


def test_a_dying_thread_fails_the_run(tmp_path: Path) -> None:
    """The exception of a thread the main code never joins still reaches the exit status, with its name."""
    script = tmp_path / "dies.py"
    script.write_text(textwrap.dedent(f"""
        import sys, threading
        sys.path.insert(0, {str(BENCHMARKS)!r})
        from _smoke import run

        def main() -> int:
            t = threading.Thread(target=lambda: 1 / 0, name="side-load")
            t.start()
            t.join()
            print("verdict: PASS")
            return 0

        run(main)
    """))
    proc = _run([str(script)])
    assert proc.returncode == 1, _tail(proc)
    assert "ZeroDivisionError" in proc.stderr and "side-load" in proc.stderr, _tail(proc)
