"""The model repository: finds model folders, checks their manifests, builds adapters.

A folder that fails to load is logged and left out; the others still serve. The manifest is read and
validated by the repository contract (service/contract/manifest.py), and its `tasks` checked against the
capabilities its family's adapter declares (service/families/capabilities.py); names and file references are
checked here so that nothing outside the repository folder is ever read, and only ONNX, ARPA, counts and JSON files
are loaded (never pickle or code).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from plm.service.config import ServerConfig
from plm.service.contract import manifest as contract
from plm.service.errors import NotFound
from plm.service.families.base import ModelAdapter
from plm.service.families.bert import BertAdapter
from plm.service.families.capabilities import check_tasks
from plm.service.families.classifier import ClassifierAdapter
from plm.service.families.elmo import ElmoAdapter
from plm.service.families.encdec import EncDecAdapter
from plm.service.families.gpt import GptAdapter
from plm.service.families.ngram import NgramAdapter
from plm.service.families.nnlm import NnlmAdapter
from plm.service.families.word2vec import Word2VecAdapter
from plm.service.metrics import Metrics
from plm.service.runtime import provider_name

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class AdapterClass(Protocol):
    """What the registry builds a model with: an adapter class of one family."""

    def __call__(self, name: str, folder: Path, manifest: contract.Manifest | Mapping[str, Any],
                 config: ServerConfig, metrics: Metrics) -> ModelAdapter: ...


# The manifest's `family` → the adapter that serves it.
FAMILIES: dict[str, AdapterClass] = {
    "ngram": NgramAdapter,
    "gpt": GptAdapter,
    "nnlm": NnlmAdapter,
    "word2vec": Word2VecAdapter,
    "elmo": ElmoAdapter,
    "bert": BertAdapter,
    "encdec": EncDecAdapter,
    "classifier": ClassifierAdapter,
}


def _inside(folder: Path, relative: str) -> Path:
    """Resolve a file named by a manifest, refusing anything that escapes the model folder."""
    path = (folder / relative).resolve()
    if not path.is_relative_to(folder.resolve()) or not path.is_file():
        raise ValueError(f"{folder.name}: manifest names {relative!r}, which is not a file inside the model folder")
    return path


def _check_manifest(folder: Path, manifest: contract.Manifest) -> None:
    if manifest.name != folder.name:
        raise ValueError(f"{folder / contract.MANIFEST_FILE}: name {manifest.name!r} differs from the folder name")
    graphs = [g.file for g in manifest.graphs.values()]
    graphs += [f for v in manifest.variants.values() for f in v.graphs.values()]
    for file in graphs:
        if not file.endswith(".onnx"):
            raise ValueError(f"{folder.name}: graph {file!r} is not an .onnx file")
    for file in manifest.files():
        _inside(folder, file)


def load_model(folder: Path, config: ServerConfig, metrics: Metrics) -> ModelAdapter:
    """Build the adapter of one model folder (blocking: reads files, creates ONNX sessions)."""
    manifest = contract.load(folder / contract.MANIFEST_FILE)
    _check_manifest(folder, manifest)
    adapter = FAMILIES.get(manifest.family)
    if adapter is None:
        raise ValueError(f"{folder.name}: unknown family {manifest.family!r} (known: {', '.join(sorted(FAMILIES))})")
    # Before any graph is opened: a task the family cannot serve is a broken folder, not a request-time refusal.
    check_tasks(adapter, manifest.family, manifest.tasks, str(folder / contract.MANIFEST_FILE))
    return adapter(folder.name, folder, manifest, config, metrics)


Fingerprint = tuple[tuple[str, int, int], ...]  # (file, mtime_ns, size) of every file of a model folder


def fingerprint(folder: Path) -> Fingerprint | None:
    """What changes when any file of the folder is written, added or removed; None = the folder is gone."""
    try:
        return tuple(sorted((str(p.relative_to(folder)), st.st_mtime_ns, st.st_size)
                            for p in folder.rglob("*") if p.is_file() and (st := p.stat())))
    except OSError:  # a file vanished while we looked: the folder is being rewritten
        return None


class Registry:
    """The loaded models by name, and how many calls hold each (so a replaced model drains before closing)."""

    def __init__(self, config: ServerConfig, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self.models: dict[str, ModelAdapter] = {}
        self.failed: dict[str, str] = {}
        self.fingerprints: dict[str, Fingerprint | None] = {}  # of the files each load attempt read
        self._leases: dict[int, int] = {}  # id(adapter) → calls holding it

    def scan(self) -> dict[str, Path]:
        """The model folders the repository holds now that this server may serve, by name."""
        root = self.config.repository
        if not root.is_dir():
            raise FileNotFoundError(f"model repository {root} does not exist (build it with `plm build`)")
        found = {}
        for folder in sorted(p for p in root.iterdir() if (p / contract.MANIFEST_FILE).is_file()):
            name = folder.name
            if name.startswith(".") or (self.config.models and name not in self.config.models):
                continue  # dot-folders are models being written (`.name.building`)
            if not NAME_RE.match(name):
                log.error("model folder %r: not a valid model name; skipped", name)
                continue
            found[name] = folder
        return found

    def load_all(self) -> None:
        for runtime in (self.config.runtime, *self.config.model_runtime.values()):  # a typo fails the start
            for provider in (*runtime.providers, *runtime.provider_options):
                provider_name(provider)
        for name, folder in self.scan().items():
            self.fingerprints[name] = fingerprint(folder)
            started = time.perf_counter()
            try:
                self.models[name] = load_model(folder, self.config, self.metrics)
            except Exception as e:  # one broken model must not take the others down
                self.failed[name] = str(e)
                self.metrics.model_ready.labels(name).set(0)
                log.error("model %s failed to load: %s", name, e)
                continue
            self.loaded(name, time.perf_counter() - started)

    def loaded(self, name: str, seconds: float) -> None:
        self.metrics.model_load_seconds.labels(name).set(seconds)
        self.metrics.model_ready.labels(name).set(1)
        model = self.models[name]
        log.info("model %s (%s, version %s) loaded in %.2fs", name, model.family, model.version, seconds)

    def get(self, name: str) -> ModelAdapter:
        model = self.models.get(name)
        if model is None:
            known = ", ".join(sorted(self.models)) or "none"
            raise NotFound(f"model {name!r} is not served here; models: {known}")
        return model

    def acquire(self, name: str) -> ModelAdapter:
        """`get`, holding the model until `release`: a reload closes a replaced model only once it is free."""
        model = self.get(name)
        self._leases[id(model)] = self._leases.get(id(model), 0) + 1
        return model

    def release(self, model: ModelAdapter) -> None:
        left = self._leases.pop(id(model)) - 1
        if left:
            self._leases[id(model)] = left

    def holders(self, model: ModelAdapter) -> int:
        return self._leases.get(id(model), 0)
