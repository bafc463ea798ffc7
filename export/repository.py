"""Writing model folders into the model repository, atomically and with a build key.

A model is built into a temporary folder beside its final place and renamed into place only when complete,
so a server never sees half a model. The manifest's `build_key` says what the model was built from; a later
build with the same key skips the model (the `make serve` cache).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from plm.service.contract import manifest as contract


def build_key(**facts: Any) -> str:
    """A stable hash of what a build depends on (profile, seed, corpus files, code version)."""
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def is_current(folder: Path, key: str) -> bool:
    """The folder holds a complete model built with this key."""
    path = folder / contract.MANIFEST_FILE
    if not path.is_file():
        return False
    try:
        return contract.load(path).build_key == key
    except (OSError, ValueError):  # unreadable or not a manifest this code reads: build again
        return False


@contextmanager
def staging(repository: Path, name: str) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it replaces `repository/name` in one rename."""
    repository.mkdir(parents=True, exist_ok=True)
    tmp = repository / f".{name}.building"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    final = repository / name
    old = repository / f".{name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def write_manifest(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Complete the common fields, validate against the repository contract and write manifest.json; returns
    the JSON written. A manifest the server could not read fails here, at build time, naming the field."""
    now = dt.datetime.now(dt.UTC)
    full = {
        "version": now.strftime("%Y%m%dT%H%M%SZ"),
        "created_at": now.isoformat(timespec="seconds"),
        **manifest,
    }
    typed = contract.from_json(full, source=str(folder / contract.MANIFEST_FILE))
    contract.write(folder, typed)
    return contract.dump(typed)
