"""Shared fixtures: the tiny model repository (built once per session) and a real server on loopback."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("PLM_CACHE", ROOT / "cache"))
# `plm serve` processes the tests start leave the OpenAI-compatible HTTP API off (its default port is fixed, and
# servers of several tests and sessions run at once); a test that wants it passes --http-port.
os.environ.setdefault("PLM_HTTP_PORT", "0")


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `--profile tiny` repository: every default model family, trained in seconds on a corpus slice."""
    if os.environ.get("PLM_TEST_REPOSITORY"):  # reuse a tiny repository while iterating locally
        return Path(os.environ["PLM_TEST_REPOSITORY"])
    from plm.export.build import build_repository  # torch and the trainers: only when building

    repo = tmp_path_factory.mktemp("repository")
    build_repository(profile="tiny", repository=repo, cache_dir=CACHE)
    return repo


class ServerThread:
    """A real grpc.aio server on its own event loop thread, bound to a free loopback port."""

    def __init__(self, config: object) -> None:
        from plm.service.server import RunningServer, start_server

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        fut = asyncio.run_coroutine_threadsafe(start_server(config), self.loop)  # type: ignore[arg-type]
        self.running: RunningServer = fut.result(timeout=120)
        self.target = f"127.0.0.1:{self.running.port}"

    def call(self, coro: object, timeout: float = 60) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    def stop(self) -> None:
        self.call(self.running.stop(grace=1.0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


def make_config(repo: Path, **changes: object) -> object:
    from plm.service.config import ServerConfig

    changes.setdefault("http_port", 0)  # HTTP off unless a test asks for it: test servers run side by side
    return replace(ServerConfig(), repository=repo, port=0, metrics_port=0, **changes)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def server(tiny_repo: Path) -> Iterator[ServerThread]:
    srv = ServerThread(make_config(tiny_repo))
    yield srv
    srv.stop()


@pytest.fixture()
def client(server: ServerThread) -> Iterator[object]:
    from plm.client.client import PlmClient

    with PlmClient(server.target, timeout=60) as c:
        yield c
