"""The `plm` command as a user runs it: `plm serve` in its own process, `plm client` verbs, /metrics, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from plm.client.local_server import free_port

PLM = [sys.executable, "-m", "plm.cli"]


@pytest.fixture(scope="module")
def served(tiny_repo: Path) -> Iterator[tuple[str, int, subprocess.Popen[str]]]:
    port, metrics_port = free_port(), free_port()
    proc = subprocess.Popen(
        [*PLM, "serve", "--repository", str(tiny_repo), "--port", str(port), "--metrics-port", str(metrics_port),
         "--log-format", "json"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    target = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"plm serve exited early: {proc.stdout.read() if proc.stdout else ''}")
        if _plm("client", "--target", target, "health", check=False).stdout.strip() == "SERVING":
            break
        time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail("plm serve did not become SERVING within 60 s")
    yield target, metrics_port, proc
    if proc.poll() is None:
        proc.kill()


def _plm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PLM, *args], capture_output=True, text=True, timeout=60, check=check)


def test_help_documents_defaults() -> None:
    out = _plm("serve", "--help").stdout
    assert "50051" in out and "9090" in out and "--config" in out
    assert "tiny" in _plm("build", "--help").stdout


def test_client_verbs(served: tuple[str, int, subprocess.Popen[str]]) -> None:
    target = served[0]
    models = _plm("client", "--target", target, "models").stdout
    assert "gpt" in models and "ngram-kn" in models
    out = _plm("client", "--target", target, "score", "ngram-kn", "the king is dead", "dead is king the").stdout
    assert out.startswith("#1") and "#2" in out and "</s>" in out
    data = json.loads(_plm("client", "--target", target, "--json", "score", "gpt", "Hello there").stdout)
    assert data["model"] == "gpt" and data["scores"][0]["num_tokens"] >= 2
    nxt = _plm("client", "--target", target, "next", "ngram-kn", "the king", "-k", "3").stdout
    assert nxt.count("\n") >= 4
    gen = json.loads(
        _plm("client", "--target", target, "--json", "generate", "gpt", "The", "-n", "5", "--seed", "1").stdout
    )
    assert gen["generations"][0]["generated_tokens"] <= 5
    stream = _plm("client", "--target", target, "stream", "gpt", "The", "-n", "5", "--seed", "1").stdout
    assert "FINISH_REASON" in stream
    assert json.loads(_plm("client", "--target", target, "--json", "model", "gpt").stdout)["family"] == "gpt"
    cls = _plm("client", "--target", target, "classify", "gpt", "Alas!", "--label", "tragedy", "--label", "comedy",
               "--demo", "Ha ha!=comedy").stdout
    assert cls.split()[0] in ("tragedy", "comedy") and "Alas!" in cls
    fill = _plm("client", "--target", target, "fill", "bert", "the king is [MASK] .").stdout
    assert fill.count("the king is") >= 5
    emb = _plm("client", "--target", target, "embed", "word2vec-skipgram", "king", "--nearest", "3").stdout
    assert emb.startswith("dimension") and emb.count("\n") >= 4
    nsp = _plm("client", "--target", target, "nsp", "bert", "the king is dead .", "long live the king .").stdout
    assert 0 <= float(nsp.split()[0]) <= 1


def test_client_reports_errors(served: tuple[str, int, subprocess.Popen[str]]) -> None:
    r = _plm("client", "--target", served[0], "score", "nope", "x", check=False)
    assert r.returncode == 1 and "NOT_FOUND" in r.stderr and "nope" in r.stderr


def test_metrics_endpoint(served: tuple[str, int, subprocess.Popen[str]]) -> None:
    _plm("client", "--target", served[0], "score", "gpt", "The king")
    with urllib.request.urlopen(f"http://127.0.0.1:{served[1]}/metrics", timeout=10) as r:
        body = r.read().decode()
    assert 'plm_requests_total{code="OK",method="Score",model="gpt",protocol="grpc"}' in body
    assert "plm_model_ready" in body


def test_sigterm_drains_and_exits_zero(served: tuple[str, int, subprocess.Popen[str]]) -> None:
    proc = served[2]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    logs = proc.stdout.read() if proc.stdout else ""
    lines = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    assert any("shutting down" in line["msg"] for line in lines)
    assert any(line["logger"] == "plm.access" and "method=Score" in line["msg"] for line in lines)
