"""What every importer shares: the one-line failure, the source's identity, and the atomic write into the
repository (a temporary folder beside the target, renamed into place; a failure leaves the repository as it was).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from plm.data.corpus import _sha256_file as sha256_of
from plm.export.repository import staging, write_manifest

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")  # one folder name: no separators, no "..", no dot first


class ImportFailed(Exception):
    """A source that cannot be imported; the message is one line naming the file and the problem."""

    def __init__(self, path: Path | str, problem: str) -> None:
        super().__init__(f"{path}: {' '.join(problem.split())}")


def read_json_file(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or ImportFailed naming it."""
    if not path.is_file():
        raise ImportFailed(path, "missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ImportFailed(path, f"not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ImportFailed(path, "expected a JSON object")
    return data


def source_identity(files: list[Path], **facts: Any) -> dict[str, Any]:
    """The manifest's `source`: each file's sha256 (by name) and the facts the importer knows."""
    return {**facts, "files": {f.name: sha256_of(f) for f in files if f.is_file()}}


def check_name(name: str, repository: Path, replace: bool) -> None:
    """A model name is one plain folder name, and an existing model is replaced only when asked."""
    if not _NAME.match(name):
        raise ImportFailed(name, "is not a model name (letters, digits, '.', '_' and '-'; no path separators)")
    if (repository / name).exists() and not replace:
        raise ImportFailed(repository / name, "exists already; pass --replace to replace it (the old version "
                                              "keeps serving until the new one is in place)")


@contextmanager
def model_folder(repository: Path, name: str, replace: bool) -> Iterator[Path]:
    """An empty folder to write the model into; on success it takes the place of `repository/name` in one rename
    (export/repository.py's staging), on failure it is removed and the repository is unchanged."""
    check_name(name, repository, replace)
    with staging(repository, name) as folder:
        yield folder


def finish(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write the manifest (the last file written: a folder without one is never served)."""
    return write_manifest(folder, manifest)
