"""Hot reload under load, over real gRPC: adding, replacing and removing models fails no request; a broken
new version (bad ONNX, bad manifest) is rejected with a clear log line while the old one keeps serving; per-
model health follows; the poller never loads a folder that is still changing."""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from plm.api.v1 import admin_pb2 as apb
from plm.api.v1 import admin_pb2_grpc
from plm.api.v1 import plm_pb2 as pb
from plm.api.v1 import plm_pb2_grpc as pb_grpc
from tests.conftest import ServerThread, make_config

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def _copy_model(src: Path, repo: Path, name: str, **manifest_changes: object) -> None:
    """Write a model folder the way `plm build` does: beside its place, then renamed into place."""
    tmp = repo / f".{name}.building"
    shutil.copytree(src, tmp)
    manifest = json.loads((tmp / "manifest.json").read_text())
    manifest.update(manifest_changes, name=name)
    (tmp / "manifest.json").write_text(json.dumps(manifest))
    old = repo / f".{name}.old"
    if (repo / name).exists():
        (repo / name).rename(old)
    tmp.rename(repo / name)
    shutil.rmtree(old, ignore_errors=True)


class Load:
    """Closed-loop Score calls on some models from a few threads; every outcome is kept."""

    def __init__(self, target: str, models: list[str], threads: int = 3) -> None:
        self.codes: Counter[tuple[str, str]] = Counter()
        self.versions: set[str] = set()
        self._stop = threading.Event()
        self._models = models
        self._threads = [threading.Thread(target=self._run, args=(target,), daemon=True) for _ in range(threads)]
        for t in self._threads:
            t.start()

    def _run(self, target: str) -> None:
        with grpc.insecure_channel(target) as ch:
            stub = pb_grpc.LanguageModelServiceStub(ch)
            while not self._stop.is_set():
                for model in self._models:
                    try:
                        r = stub.Score(pb.ScoreRequest(model=model, texts=["the king is dead", "long live the king"]),
                                       timeout=30)
                        self.codes[(model, "OK")] += 1
                        self.versions.add(r.model_version)
                    except grpc.RpcError as e:
                        self.codes[(model, e.code().name)] += 1

    def stop(self) -> Counter[tuple[str, str]]:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)
        return self.codes


@pytest.fixture()
def repo(tiny_repo: Path, tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("nnlm", "ngram-kn"):
        shutil.copytree(tiny_repo / name, repo / name)
    return repo


@pytest.fixture()
def server(repo: Path) -> Iterator[ServerThread]:
    srv = ServerThread(make_config(repo, grace_seconds=5.0))
    yield srv
    srv.stop()


def _reload(ch: grpc.Channel) -> dict[str, apb.ModelChange]:
    resp = admin_pb2_grpc.AdminServiceStub(ch).ReloadModels(apb.ReloadModelsRequest(), timeout=60)
    return {c.name: c for c in resp.changes}


def _health(ch: grpc.Channel, name: str) -> int:
    return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status  # type: ignore[no-any-return]


@pytest.mark.timeout(180)
def test_reload_under_load_fails_no_request(server: ServerThread, repo: Path, tiny_repo: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="plm.service.reload")
    load = Load(server.target, ["nnlm", "ngram-kn"])
    with grpc.insecure_channel(server.target) as ch:
        stub = pb_grpc.LanguageModelServiceStub(ch)
        assert all(c.action == apb.RELOAD_ACTION_UNCHANGED for c in _reload(ch).values())

        _copy_model(tiny_repo / "ngram-kn", repo, "ngram-new")  # added
        change = _reload(ch)["ngram-new"]
        assert change.action == apb.RELOAD_ACTION_ADDED and _health(ch, "ngram-new") == SERVING
        assert stub.Score(pb.ScoreRequest(model="ngram-new", texts=["the king"]), timeout=10).model == "ngram-new"

        _copy_model(tiny_repo / "nnlm", repo, "nnlm", version="v2")  # replaced
        change = _reload(ch)["nnlm"]
        assert (change.action, change.version) == (apb.RELOAD_ACTION_REPLACED, "v2")
        assert stub.Score(pb.ScoreRequest(model="nnlm", texts=["the king"]), timeout=10).model_version == "v2"

        (repo / "nnlm" / "model.onnx").write_bytes(b"not an onnx graph")  # a broken new version: rejected
        change = _reload(ch)["nnlm"]
        assert (change.action, change.version) == (apb.RELOAD_ACTION_REJECTED, "v2") and change.error
        assert "model nnlm: the new version is rejected, version v2 keeps serving" in caplog.text
        assert _health(ch, "nnlm") == SERVING
        again = _reload(ch)["nnlm"]  # the same broken files: not loaded again, still reported
        assert (again.action, again.version, again.error) == (apb.RELOAD_ACTION_REJECTED, "v2", change.error)

        (repo / "bad").mkdir()  # a new model with a broken manifest: rejected, not serving
        (repo / "bad" / "manifest.json").write_text("{not json")
        change = _reload(ch)["bad"]
        assert change.action == apb.RELOAD_ACTION_REJECTED and not change.version and _health(ch, "bad") == NOT_SERVING
        assert "model bad: rejected, not serving" in caplog.text

        shutil.rmtree(repo / "ngram-new")  # removed
        assert _reload(ch)["ngram-new"].action == apb.RELOAD_ACTION_REMOVED
        assert _health(ch, "ngram-new") == NOT_SERVING
        with pytest.raises(grpc.RpcError) as e:
            stub.Score(pb.ScoreRequest(model="ngram-new", texts=["the king"]), timeout=10)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        time.sleep(0.5)  # let the load run on the final state too
    codes = load.stop()
    assert {code for (_, code) in codes} == {"OK"}, codes  # not one request failed across the changes
    assert codes[("nnlm", "OK")] > 10 and {"v2"} < load.versions  # the load saw both versions
    text = server.running.metrics.exposition().decode()
    for action in ("added", "replaced", "rejected", "removed"):
        assert f'action="{action}"' in text


def test_poller_loads_only_settled_folders(server: ServerThread, repo: Path, tiny_repo: Path) -> None:
    """`settle` (the poller's mode) applies a change only once two polls saw the same files."""
    reloader = server.running.reloader

    def poll() -> dict[str, str]:
        return {c.name: c.action for c in server.call(reloader.reload(settle=True))}  # type: ignore[attr-defined]

    assert poll() == {"nnlm": "unchanged", "ngram-kn": "unchanged"}
    _copy_model(tiny_repo / "ngram-kn", repo, "ngram-new")
    assert "ngram-new" not in poll()  # first sight: it may still be being written
    assert poll()["ngram-new"] == "added"
    (repo / "ngram-kn").rename(repo / ".ngram-kn.old")  # a replace-by-rename caught in its gap...
    assert "ngram-kn" not in poll()  # ...is not a removal
    (repo / ".ngram-kn.old").rename(repo / "ngram-kn")
    assert "ngram-kn" not in poll()  # back: seen once, not yet settled
    assert poll()["ngram-kn"] == "unchanged"  # the very files loaded before: nothing to reload
    assert "ngram-kn" in server.running.registry.models


@pytest.mark.timeout(60)
def test_repository_watch_by_polling(repo: Path, tiny_repo: Path) -> None:
    srv = ServerThread(make_config(repo, reload_interval_seconds=0.1))
    try:
        with grpc.insecure_channel(srv.target) as ch:
            _copy_model(tiny_repo / "ngram-kn", repo, "ngram-new")
            until = time.monotonic() + 30  # generous: two polls 0.1 s apart plus a load, on a busy machine
            while "ngram-new" not in srv.running.registry.models and time.monotonic() < until:
                time.sleep(0.05)
            assert _health(ch, "ngram-new") == SERVING
    finally:
        srv.stop()
