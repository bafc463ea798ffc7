"""Hot reload of the model repository: added, changed and removed model folders, applied under load.

A reload compares each model folder's fingerprint (every file's mtime and size) with the one its current
version was loaded from. A changed or new folder is loaded beside the serving version (off the event loop)
and swapped in only when it loaded; the replaced version keeps answering the calls that hold it and is
closed once they are done (or after `grace_seconds`). A version that fails to load (bad ONNX, bad manifest)
is rejected with one error log line and the serving version, if any, keeps serving; the same files are not
retried until they change. Per-model health follows: SERVING while a version serves, NOT_SERVING when none.

Two ways in: `plm.v1.AdminService/ReloadModels` applies the repository as it is now; the poller
(`reload_interval_seconds` > 0) applies only folders that did not change between two polls, so a model being
copied in or renamed into place is never loaded half-written and a replace-by-rename is never an unload.
KServe's RepositoryModelLoad and RepositoryModelUnload act on one model (`load`, `unload`); an unloaded model
stays unloaded through reloads and polls until it is loaded again.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from grpc_health.v1 import health, health_pb2
from plm.service.errors import NotFound, Unavailable
from plm.service.families.base import ModelAdapter
from plm.service.registry import Fingerprint, Registry, fingerprint, load_model

log = logging.getLogger(__name__)
T = TypeVar("T")

ADDED, REPLACED, REMOVED, UNCHANGED, REJECTED = "added", "replaced", "removed", "unchanged", "rejected"
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_GONE = ()  # the fingerprint of a folder that is not there, for comparing polls


@dataclass(frozen=True)
class Change:
    name: str
    action: str  # ADDED | REPLACED | REMOVED | UNCHANGED | REJECTED
    version: str = ""  # the version serving after the change ("" = none)
    error: str = ""  # why a new version was rejected


class Reloader:
    """Applies repository changes to a running server's registry and health service."""

    def __init__(self, registry: Registry, health_servicer: health.aio.HealthServicer, grace: float) -> None:
        self.registry = registry
        self._health = health_servicer
        self._grace = grace
        self._lock = asyncio.Lock()  # one reload at a time: the admin RPC and the poller may race
        self._last_poll: dict[str, Fingerprint | None] = dict(registry.fingerprints)
        self._retiring: set[asyncio.Task[None]] = set()
        # One thread for scans and loads (one reload runs at a time): the server's thread count stays flat.
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="reload")
        self._rejected: dict[str, str] = dict(registry.failed)  # why the files on disk were refused, by model
        self._unloaded: set[str] = set()  # unloaded on request (RepositoryModelUnload): reloads leave them out

    async def reload(self, settle: bool = False) -> list[Change]:
        """Apply the repository's changes; `settle` (the poller) skips folders changed since the last poll."""
        async with self._lock:
            reg = self.registry
            folders = await self._off_loop(reg.scan)
            now = await self._off_loop(lambda: {name: fingerprint(folder) for name, folder in folders.items()})
            previous, self._last_poll = self._last_poll, now
            changes = []
            for name in sorted(set(now) | set(reg.models) | set(reg.failed)):
                fp = now.get(name)
                if name in self._unloaded:
                    continue  # unloaded on request: only a load brings it back
                if name in folders and fp is None:
                    continue  # a file vanished while we looked: the folder is being rewritten; next time
                if settle and (previous.get(name) or _GONE) != (fp or _GONE):
                    continue  # still changing (being copied, renamed into place): look again next poll
                if fp is None:  # gone from the repository
                    changes.append((await self._remove(name, "removed from the repository"))[0])
                elif reg.fingerprints.get(name) == fp:  # these very files were loaded (or refused) already
                    model = reg.models.get(name)
                    version = model.version if model is not None else ""
                    error = self._rejected.get(name, "")
                    changes.append(Change(name, REJECTED if error else UNCHANGED, version, error))
                else:
                    changes.append(await self._load(name, fp))
            return changes

    @property
    def unloaded(self) -> frozenset[str]:
        """The models unloaded on request (and not loaded since)."""
        return frozenset(self._unloaded)

    async def load(self, name: str) -> Change:
        """Load one model folder now (RepositoryModelLoad): a new folder, an unloaded model, or changed files
        (loaded beside the serving version, as a reload does); files refused before are tried again. UNCHANGED
        when these very files serve already."""
        async with self._lock:
            reg = self.registry
            folder = (await self._off_loop(reg.scan)).get(name)
            if folder is None:
                raise NotFound(f"model {name!r} is not in the repository {reg.config.repository}")
            fp = await self._off_loop(lambda: fingerprint(folder))
            if fp is None:
                raise Unavailable(f"model {name!r}: its folder is being rewritten; retry")
            self._unloaded.discard(name)
            self._last_poll[name] = fp
            model = reg.models.get(name)
            if model is not None and reg.fingerprints.get(name) == fp and name not in self._rejected:
                return Change(name, UNCHANGED, model.version)
            return await self._load(name, fp)

    async def unload(self, name: str) -> Change:
        """Stop serving one model (RepositoryModelUnload) until `load`: new calls get NOT_FOUND at once; returns
        once the calls that hold it have finished (or after `grace_seconds`) and it is closed."""
        async with self._lock:
            reg = self.registry
            if name not in reg.models and name not in reg.failed:
                raise NotFound(f"model {name!r} is not loaded; models: {', '.join(sorted(reg.models)) or 'none'}")
            self._unloaded.add(name)
            change, retiring = await self._remove(name, "unloaded on request")
        if retiring is not None:
            await asyncio.shield(retiring)  # the drain; a caller that leaves does not stop the close
        return change

    async def _off_loop(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn)

    async def _load(self, name: str, fp: Fingerprint) -> Change:
        reg = self.registry
        old = reg.models.get(name)
        started = time.perf_counter()
        reg.fingerprints[name] = fp
        try:
            new = await self._off_loop(lambda: load_model(reg.config.repository / name, reg.config, reg.metrics))
            await new.start()
        except Exception as e:
            self._rejected[name] = str(e)
            reg.metrics.reloads.labels(name, REJECTED).inc()
            if old is not None:
                log.error("model %s: the new version is rejected, version %s keeps serving: %s", name, old.version, e)
                return Change(name, REJECTED, old.version, str(e))
            reg.failed[name] = str(e)
            reg.metrics.model_ready.labels(name).set(0)
            await self._health.set(name, _NOT_SERVING)
            log.error("model %s: rejected, not serving: %s", name, e)
            return Change(name, REJECTED, "", str(e))
        reg.models[name] = new  # from here new calls get the new version; calls holding the old one finish
        reg.failed.pop(name, None)
        self._rejected.pop(name, None)
        reg.loaded(name, time.perf_counter() - started)
        await self._health.set(name, _SERVING)
        action = ADDED if old is None else REPLACED
        reg.metrics.reloads.labels(name, action).inc()
        if old is not None:
            log.info("model %s: version %s replaces version %s", name, new.version, old.version)
            self._retire(old)
        return Change(name, action, new.version)

    async def _remove(self, name: str, why: str) -> tuple[Change, asyncio.Task[None] | None]:
        """Stop serving `name`; the task that closes its version once the calls holding it are done, if any."""
        reg = self.registry
        reg.fingerprints.pop(name, None)
        reg.failed.pop(name, None)
        self._rejected.pop(name, None)
        reg.metrics.model_ready.labels(name).set(0)
        await self._health.set(name, _NOT_SERVING)
        old = reg.models.pop(name, None)
        if old is None:
            return Change(name, REMOVED), None
        reg.metrics.reloads.labels(name, REMOVED).inc()
        log.info("model %s: %s, version %s unloads", name, why, old.version)
        return Change(name, REMOVED), self._retire(old)

    def _retire(self, old: ModelAdapter) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(self._close_when_free(old), name=f"retire-{old.name}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        return task

    async def _close_when_free(self, old: ModelAdapter) -> None:
        until = time.monotonic() + self._grace
        while self.registry.holders(old) and time.monotonic() < until:
            await asyncio.sleep(0.05)
        if self.registry.holders(old):
            log.warning("model %s: %d call(s) still hold the replaced version after %.1fs; closing it",
                        old.name, self.registry.holders(old), self._grace)
        await old.close()

    async def watch(self, interval: float) -> None:
        """Poll forever (cancel to stop)."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.reload(settle=True)
            except Exception:  # a vanished repository folder, say: log and keep polling
                log.exception("repository poll failed")

    async def close(self) -> None:
        """Wait for replaced versions to drain and close (called on shutdown)."""
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)
        self._thread.shutdown(wait=False)
