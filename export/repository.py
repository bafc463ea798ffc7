"""Writing model folders into the model repository (DESIGN.md §3), atomically and with a build key.

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

MANIFEST_SCHEMA = 1


def build_key(**facts: Any) -> str:
    """A stable hash of what a build depends on (profile, seed, corpus files, code version)."""
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def is_current(folder: Path, key: str) -> bool:
    """The folder holds a complete model built with this key."""
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        return False
    try:
        return bool(json.loads(manifest.read_text(encoding="utf-8")).get("build_key") == key)
    except (OSError, ValueError):
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
    """Complete the common fields and write manifest.json (pretty, UTF-8)."""
    now = dt.datetime.now(dt.UTC)
    full = {
        "schema_version": MANIFEST_SCHEMA,
        "version": now.strftime("%Y%m%dT%H%M%SZ"),
        "created_at": now.isoformat(timespec="seconds"),
        **manifest,
    }
    (folder / "manifest.json").write_text(json.dumps(full, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return full
