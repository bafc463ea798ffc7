"""`plm import` into the repository of a running server: the poller (`--reload-interval`) or `plm client reload`
serves the new model without a restart, and `--replace` of a served model keeps the old version answering every
call while the new one is exported and checked, then switches to it, failing no call."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.conftest import ServerThread, make_config
from tests.test_import_bert import TRAIN_TEXT, wordpiece_folder

TEXT = "the king is [MASK] long live the king"


def _mlm(folder: Path, seed: int) -> Path:
    """A random BertForMaskedLM (small, so an import takes seconds) with its own WordPiece tokenizer."""
    import torch
    import transformers

    vocab = wordpiece_folder(folder, TRAIN_TEXT)
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)
    transformers.BertForMaskedLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two checkpoints of one shape whose weights (and so answers) differ: the old and the new."""
    return _mlm(tmp_path_factory.mktemp("old"), 0), _mlm(tmp_path_factory.mktemp("new"), 1)


@pytest.fixture(scope="module")
def polled(tmp_path_factory: pytest.TempPathFactory, checkpoints: tuple[Path, Path]) -> Iterator[ServerThread]:
    """A server polling its repository every 0.2 s, started with one imported model, `a` (the old checkpoint)."""
    from plm.export.importers import import_model

    repo = tmp_path_factory.mktemp("polled")
    import_model("bert", checkpoints[0], repo, name="a")
    srv = ServerThread(make_config(repo, reload_interval_seconds=0.2))
    yield srv
    srv.stop()


def _answer(stub: Any, model: str) -> tuple[str, tuple[tuple[int, float], ...]]:
    """The serving version and FillMask's top 5 (token, score) for TEXT."""
    from plm.api.v1 import plm_pb2 as pb

    r = stub.FillMask(pb.FillMaskRequest(model=model, texts=[TEXT], top_k=5), timeout=30)
    return r.model_version, tuple((c.token, round(c.score, 5)) for c in r.results[0].masks[0].candidates)


def _wait_for(what: str, predicate: Any, seconds: float = 60, state: Any = None) -> None:
    """Wait until `predicate()`; on timeout the failure names `what` and, if given, `state()` (what was seen)."""
    until = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < until, f"{what}: not within {seconds} s" + (f"; {state()}" if state else "")
        time.sleep(0.1)


def _reload_state(polled: ServerThread, name: str) -> str:
    """The poller's view of one model, for a failure message: is the poll task alive, which fingerprints it
    holds against the folder's, what it refused, and the repository's folders."""
    from plm.service.registry import fingerprint

    running = polled.running
    repo = running.config.repository
    now = fingerprint(repo / name)
    reloader = running.reloader
    model = running.registry.models.get(name)
    watcher = running.watcher
    ended = repr(watcher.exception()) if watcher and watcher.done() and not watcher.cancelled() else ""
    return (f"watcher done={watcher.done() if watcher else None} {ended}; "
            f"serving version {model.version if model else None}; folder fingerprint == loaded: "
            f"{running.registry.fingerprints.get(name) == now}, == last poll: {reloader._last_poll.get(name) == now}; "
            f"rejected: {reloader._rejected.get(name)!r}; lock held: {reloader._lock.locked()}; "
            f"repository: {sorted(p.name for p in repo.iterdir())}")


@pytest.fixture()
def stub(polled: ServerThread) -> Iterator[Any]:
    from plm.api.v1 import plm_pb2_grpc as pb_grpc

    with grpc.insecure_channel(polled.target) as ch:
        yield pb_grpc.LanguageModelServiceStub(ch)


def test_the_poller_serves_an_imported_model(polled: ServerThread, stub: Any, checkpoints: tuple[Path, Path],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from plm.api.v1 import plm_pb2 as pb
    from plm.cli import main

    repo = polled.running.config.repository
    names = lambda: [m.name for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models]  # noqa: E731
    assert names() == ["a"]
    assert main(["import", "bert", str(checkpoints[1]), "--repository", str(repo), "--name", "b"]) == 0
    capsys.readouterr()
    _wait_for("the imported model b listed", lambda: "b" in names())
    info = stub.GetModel(pb.GetModelRequest(name="b"), timeout=10)
    assert info.family == "bert" and sorted(info.tasks) == ["embed", "fill_mask", "score"]
    assert _answer(stub, "b")[1] != _answer(stub, "a")[1]  # another checkpoint's answers


def test_replace_keeps_the_old_version_serving_until_the_new_one_is_ready(
        polled: ServerThread, stub: Any, checkpoints: tuple[Path, Path]) -> None:
    """FillMask on `a` in a loop while `plm import --replace` writes the new checkpoint over it: every call
    succeeds; every answer given while the new version was exported and checked is the old version's, then the
    answers switch once to the new version's (the new checkpoint's answers, as `b` gives them) and stay there."""
    from plm.export.importers import import_model

    from plm.api.v1 import plm_pb2 as pb

    repo = polled.running.config.repository
    if "b" not in [m.name for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models]:
        import_model("bert", checkpoints[1], repo, name="b")  # the new checkpoint's answers, to compare with
        _wait_for("b listed", lambda: "b" in [m.name for m in stub.ListModels(pb.ListModelsRequest()).models])
    old_version, old = _answer(stub, "a")
    new_answer = _answer(stub, "b")[1]
    assert old != new_answer
    seen: list[tuple[float, str, Any]] = []  # (when answered, version, answer), or (when, "", status) on error
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            try:
                version, answer = _answer(stub, "a")
                seen.append((time.time(), version, answer))
            except grpc.RpcError as e:
                seen.append((time.time(), "", e.code().name))

    thread = threading.Thread(target=load, name="fill-mask-load", daemon=True)
    thread.start()
    try:
        started = time.time()
        import_model("bert", checkpoints[1], repo, name="a", replace=True)
        # The manifest is written after the export and its parity check and before the folder is renamed into
        # place: no server could have loaded the new version before then, however late this thread resumed.
        written = (repo / "a" / "manifest.json").stat().st_mtime
        _wait_for("the new version served", lambda: any(v not in ("", old_version) for _, v, _ in seen[-5:]),
                  state=lambda: f"{len(seen)} calls, the last {seen[-3:]}, load thread alive "
                                f"{thread.is_alive()}; {_reload_state(polled, 'a')}")
        time.sleep(0.5)  # a few more calls on the new version
    finally:
        stop.set()
        thread.join(timeout=60)
    errors = [(t, a) for t, v, a in seen if not v]
    assert not errors, errors[:5]
    during = [(v, a) for t, v, a in seen if started <= t <= written]
    assert len(during) >= 5, "too few calls answered while the import ran to prove anything"
    assert all(va == (old_version, old) for va in during)
    switch = next(i for i, (_, v, _) in enumerate(seen) if v != old_version)
    assert all((v, a) == (old_version, old) for _, v, a in seen[:switch])
    new_version = seen[switch][1]
    assert new_version > old_version and all((v, a) == (new_version, new_answer) for _, v, a in seen[switch:])
    assert len(seen) - switch >= 3


def test_client_reload_serves_an_imported_model(checkpoints: tuple[Path, Path], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Without the poller, the imported model is served after `plm client reload` (and not before)."""
    from plm.export.importers import import_model

    from plm.cli import main

    repo = tmp_path / "repo"
    import_model("bert", checkpoints[0], repo, name="a")
    srv = ServerThread(make_config(repo))
    try:
        import_model("bert", checkpoints[1], repo, name="c")
        assert main(["client", "--target", srv.target, "--json", "models"]) == 0
        assert "\"c\"" not in capsys.readouterr().out
        assert main(["client", "--target", srv.target, "reload"]) == 0
        assert re.search(r"^c +added +\S", capsys.readouterr().out, re.M)
        assert main(["client", "--target", srv.target, "--json", "fill", "c", TEXT]) == 0
        assert "\"candidates\"" in capsys.readouterr().out
    finally:
        srv.stop()
