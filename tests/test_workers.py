"""`plm serve --workers N`: N server processes on one port under a supervisor (service/workers.py).

Connections spread over the workers, /metrics adds their counters up, a killed worker is restarted while the
others answer, ReloadModels on any worker reloads all of them, and SIGTERM drains every worker to exit 0.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from plm.client import PlmClient
from plm.client.loadtest import LoadConfig, RequestSpec, run_loadtest
from plm.client.local_server import LocalServer

from plm.api.v1.admin_pb2 import ReloadModelsRequest
from plm.api.v1.admin_pb2_grpc import AdminServiceStub
from plm.cli import main as cli_main
from tests.test_deploy import run, tool


def _children(pid: int) -> set[int]:
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        if int(fields[1]) == pid:
            out.add(int(stat.parent.name))
    return out


def _access_pids(srv: LocalServer) -> set[int]:
    return {int(p) for p in re.findall(r"plm\.access\[(\d+)\]", srv.log_text())}


def _ok_total(srv: LocalServer, method: str) -> float:
    assert srv.metrics_url is not None
    text = urllib.request.urlopen(srv.metrics_url, timeout=10).read().decode()
    m = re.search(rf'plm_requests_total\{{code="OK",method="{method}",model="ngram-kn",protocol="grpc"\}} (\S+)', text)
    return float(m.group(1)) if m else 0.0


def _wait(cond: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.fixture()
def repo(tiny_repo: Path, tmp_path: Path) -> Path:
    """A repository of its own holding only ngram-kn: the reload test adds a model to it."""
    shutil.copytree(tiny_repo / "ngram-kn", tmp_path / "repo" / "ngram-kn")
    return tmp_path / "repo"


def test_workers_share_the_port_metrics_restart_reload_and_drain(repo: Path, tiny_repo: Path) -> None:
    srv = LocalServer(repo, [], metrics=True, workers=2)
    try:
        workers = _children(srv.proc.pid)
        assert len(workers) == 2
        for i in range(40):  # a new connection each time: the kernel spreads connections, not calls
            with PlmClient(srv.target, timeout=30) as c:
                assert c.score("ngram-kn", [f"the king is dead {i}"]).scores[0].log_prob < 0
        _wait(lambda: len(_access_pids(srv)) == 2)
        assert _access_pids(srv) == workers  # both answered
        assert _ok_total(srv, "Score") == 40  # one /metrics for all workers: the sum
        assert srv.metrics_url is not None
        exposition = urllib.request.urlopen(srv.metrics_url, timeout=10).read().decode()
        assert 'plm_model_ready{model="ngram-kn"} 1.0' in exposition  # a gauge combined (livemin), not per pid
        check = run(tool("promtool"), "check", "metrics", stdin=exposition)
        assert check.returncode == 0 and check.stdout.strip() == "", check.stdout + check.stderr

        # The load generator's connections (16 per process) reach both workers too: one would reach one.
        log_before = len(srv.log_text())
        cfg = LoadConfig(targets=(srv.target,), specs=(RequestSpec(1.0, "PredictNext", "ngram-kn", 1, {}),),
                         inputs=("the king is", "to be or not"), concurrency=16, requests=200, warmup=0.0,
                         connections=16)
        assert run_loadtest(cfg, progress=False)["summary"]["errors"] == {}
        _wait(lambda: {int(p) for p in re.findall(r"plm\.access\[(\d+)\]", srv.log_text()[log_before:])} == workers)

        # A worker killed outright: the other keeps answering and the supervisor starts a new one.
        victim = sorted(workers)[0]
        os.kill(victim, signal.SIGKILL)
        with PlmClient(srv.target, timeout=30) as c:
            for _ in range(10):
                assert c.score("ngram-kn", ["to be or not to be"]).scores[0].log_prob < 0
        _wait(lambda: len(_children(srv.proc.pid) - workers) == 1 and srv.serving_processes() >= 3)
        assert "died with -9: restarting" in srv.log_text()
        workers = _children(srv.proc.pid)
        assert len(workers) == 2

        # ReloadModels on one worker: every worker serves the added model.
        shutil.copytree(tiny_repo / "ngram-laplace", repo / "ngram-laplace")
        with grpc.insecure_channel(srv.target) as channel:
            changes = AdminServiceStub(channel).ReloadModels(ReloadModelsRequest(), timeout=60).changes
        assert "ngram-laplace" in [c.name for c in changes], changes

        def all_have_laplace() -> bool:
            for _ in range(12):
                with PlmClient(srv.target, timeout=30) as c:
                    if "ngram-laplace" not in {m.name for m in c.list_models().models}:
                        return False
            return True

        _wait(all_have_laplace, timeout=60)
    finally:
        tail = srv.stop()
    assert srv.proc.returncode == 0, tail
    assert tail.count("exited with 0") == 2, tail


def test_workers_need_a_fixed_port(tiny_repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["serve", "--repository", str(tiny_repo), "--port", "0", "--workers", "2"]) == 2
    assert "fixed port" in capsys.readouterr().err


def test_workers_that_cannot_start_stop_the_server(tmp_path: Path) -> None:
    """The repository is missing: each worker dies at start; after three quick deaths in a row the supervisor
    gives up with exit 1 instead of restarting forever. (A taken port stops it at once, in one line:
    tests/test_first_run.py.)"""
    import subprocess
    import sys

    from plm.client.local_server import free_port

    proc = subprocess.run(
        [sys.executable, "-m", "plm.cli", "serve", "--repository", str(tmp_path / "missing"), "--port",
         str(free_port()), "--metrics-port", "0", "--workers", "2"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "died 3 times in a row soon after starting" in proc.stderr


def test_workers_serve_the_http_api_on_one_port(tiny_repo: Path) -> None:
    """Each worker serves the OpenAI-compatible API too, on the one --http-port (SO_REUSEPORT, as gRPC): fresh
    connections reach both workers, and /v1/models and /v1/embeddings answer from either."""
    import json

    srv = LocalServer(tiny_repo, ["ngram-kn", "word2vec-skipgram"], workers=2, http=True)
    try:
        workers = _children(srv.proc.pid)
        assert len(workers) == 2 and srv.http_url is not None
        log_before = len(srv.log_text())
        for i in range(40):  # urllib opens a new connection per request: the kernel spreads connections
            with urllib.request.urlopen(f"{srv.http_url}/v1/models", timeout=30) as resp:
                assert {m["id"] for m in json.loads(resp.read())["data"]} == {"ngram-kn", "word2vec-skipgram"}
            body = json.dumps({"model": "word2vec-skipgram", "input": [f"the king is dead {i}"]}).encode()
            req = urllib.request.Request(f"{srv.http_url}/v1/embeddings", data=body,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=30) as resp:
                (item,) = json.loads(resp.read())["data"]
                assert item["object"] == "embedding" and len(item["embedding"]) > 0
        _wait(lambda: {int(p) for p in re.findall(r"plm\.access\[(\d+)\]", srv.log_text()[log_before:])} == workers)
    finally:
        tail = srv.stop()
    assert srv.proc.returncode == 0, tail
