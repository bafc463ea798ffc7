"""The model repository (DESIGN.md §3): finds model folders, checks their manifests, builds adapters.

A folder that fails to load is logged and left out; the others still serve. Names and file references are
checked so that nothing outside the repository folder is ever read, and only ONNX, ARPA, counts and JSON
files are loaded (never pickle or code).
"""

from __future__ import annotations

import importlib
import logging
import re
import time
from pathlib import Path
from typing import Any

from service.config import ServerConfig
from service.errors import NotFound
from service.families.base import ModelAdapter, read_json
from service.metrics import Metrics
from service.runtime import provider_name

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# family → adapter class; each takes (name, folder, manifest, config, metrics). Imported on first use.
FAMILIES = {
    "ngram": "service.families.ngram:NgramAdapter",
    "gpt": "service.families.gpt:GptAdapter",
    "nnlm": "service.families.nnlm:NnlmAdapter",
    "word2vec": "service.families.word2vec:Word2VecAdapter",
    "elmo": "service.families.elmo:ElmoAdapter",
    "bert": "service.families.bert:BertAdapter",
}
_REQUIRED = ("name", "family", "tasks", "max_length", "vocab_size", "tokenizer")


def _inside(folder: Path, relative: str) -> Path:
    """Resolve a file named by a manifest, refusing anything that escapes the model folder."""
    path = (folder / relative).resolve()
    if not path.is_relative_to(folder.resolve()) or not path.is_file():
        raise ValueError(f"{folder.name}: manifest names {relative!r}, which is not a file inside the model folder")
    return path


def _check_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    missing = [k for k in _REQUIRED if k not in manifest]
    if missing:
        raise ValueError(f"{folder / 'manifest.json'}: missing {', '.join(missing)}")
    if manifest["name"] != folder.name:
        raise ValueError(f"{folder / 'manifest.json'}: name {manifest['name']!r} differs from the folder name")
    _inside(folder, manifest["tokenizer"]["file"])
    files = [graph["file"] for graph in manifest.get("graphs", {}).values()]
    files += [f for v in (manifest.get("variants") or {}).values() for f in v.get("graphs", {}).values()]
    for file in files:
        if not str(file).endswith(".onnx"):
            raise ValueError(f"{folder.name}: graph {file!r} is not an .onnx file")
        _inside(folder, file)
    if "ngram" in manifest:
        _inside(folder, manifest["ngram"]["file"])


def load_model(folder: Path, config: ServerConfig, metrics: Metrics) -> ModelAdapter:
    """Build the adapter of one model folder (blocking: reads files, creates ONNX sessions)."""
    manifest = read_json(folder / "manifest.json")
    _check_manifest(folder, manifest)
    family = manifest["family"]
    if family not in FAMILIES:
        raise ValueError(f"{folder.name}: unknown family {family!r} (known: {', '.join(sorted(FAMILIES))})")
    module, cls = FAMILIES[family].split(":")
    adapter: type[ModelAdapter] = getattr(importlib.import_module(module), cls)
    return adapter(folder.name, folder, manifest, config, metrics)  # type: ignore[call-arg]


class Registry:
    """The loaded models by name."""

    def __init__(self, config: ServerConfig, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self.models: dict[str, ModelAdapter] = {}
        self.failed: dict[str, str] = {}

    def load_all(self) -> None:
        for runtime in (self.config.runtime, *self.config.model_runtime.values()):  # a typo fails the start
            for name in (*runtime.providers, *runtime.provider_options):
                provider_name(name)
        root = self.config.repository
        if not root.is_dir():
            raise FileNotFoundError(f"model repository {root} does not exist (build it with `plm build`)")
        for folder in sorted(p for p in root.iterdir() if (p / "manifest.json").is_file()):
            name = folder.name
            if self.config.models and name not in self.config.models:
                continue
            if not NAME_RE.match(name):
                log.error("model folder %r: not a valid model name; skipped", name)
                continue
            started = time.perf_counter()
            try:
                self.models[name] = load_model(folder, self.config, self.metrics)
            except Exception as e:  # one broken model must not take the others down
                self.failed[name] = str(e)
                self.metrics.model_ready.labels(name).set(0)
                log.error("model %s failed to load: %s", name, e)
                continue
            seconds = time.perf_counter() - started
            self.metrics.model_load_seconds.labels(name).set(seconds)
            self.metrics.model_ready.labels(name).set(1)
            log.info("model %s (%s) loaded in %.2fs", name, self.models[name].family, seconds)

    def get(self, name: str) -> ModelAdapter:
        model = self.models.get(name)
        if model is None:
            known = ", ".join(sorted(self.models)) or "none"
            raise NotFound(f"model {name!r} is not served here; models: {known}")
        return model
