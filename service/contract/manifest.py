"""The model manifest (`manifest.json` of each model folder) as typed, frozen dataclasses, validated on load.

Export writes a manifest with `write`; the server reads it with `load`. Every field the server or the build
reads has a typed home here; the free-form facts a build records (training, evaluation, parity, config) are
`Facts`, and a key this schema does not name is kept in the `extra` of its object, so an importer may add
its own and a load → dump round trip loses nothing. A file that does not match raises `ManifestError`,
which names the file and the field: `repository/gpt/manifest.json: field 'vocab_size' must be an int, got str`.

Schema versions: 1 is the only one. A file without `schema_version` is version 1 (folders written before the
field existed); a newer version than this code knows is refused rather than half-read.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"

T = TypeVar("T")
Facts = Mapping[str, Any]  # free-form JSON facts a build records (numbers, strings, nested lists)


class ManifestError(ValueError):
    """A manifest that does not match the schema; the message names the file and the field."""


@dataclass(frozen=True)
class TokenizerSpec:
    """`tokenizer`: the tokenizer file and the special tokens it names (None: the family's default)."""

    file: str
    kind: str = ""  # bpe | wordpiece | word
    bos: str | None = None
    eos: str | None = None
    pad: str | None = None
    unk: str | None = None
    cls: str | None = None
    sep: str | None = None
    mask: str | None = None
    extra: Facts = field(default_factory=dict)

    def special(self, role: Literal["bos", "eos", "pad", "unk", "cls", "sep", "mask"], default: str) -> str:
        """The token playing `role`, or the family's `default` when the manifest names none."""
        token: str | None = getattr(self, role)
        return default if token is None else token


@dataclass(frozen=True)
class GraphSpec:
    """One entry of `graphs`: an ONNX file and, for a KV-cache decoder, its cache dimensions."""

    file: str
    n_layer: int | None = None
    n_head: int | None = None
    head_dim: int | None = None
    extra: Facts = field(default_factory=dict)  # opset, inputs, outputs, parity, padding ... as export recorded them

    def cache_dims(self) -> tuple[int, int, int]:
        """(n_layer, n_head, head_dim) of a KV-cache decoder graph."""
        if self.n_layer is None or self.n_head is None or self.head_dim is None:
            raise ManifestError(f"graph {self.file!r}: a decoder graph needs n_layer, n_head and head_dim")
        return self.n_layer, self.n_head, self.head_dim


@dataclass(frozen=True)
class VariantSpec:
    """One entry of `variants` (`plm build --variants`): the optimised file of each graph and its accuracy."""

    graphs: Mapping[str, str]
    accuracy: Facts = field(default_factory=dict)
    extra: Facts = field(default_factory=dict)


@dataclass(frozen=True)
class NgramSpec:
    """`ngram`: the model file (service/contract/ngram_format.py) and how it was estimated."""

    file: str
    format: Literal["arpa", "counts"]
    order: int
    smoothing: str = ""
    extra: Facts = field(default_factory=dict)


@dataclass(frozen=True)
class NnlmSpec:
    """`nnlm`: how many words the model sees (order - 1 of context)."""

    order: int
    extra: Facts = field(default_factory=dict)


@dataclass(frozen=True)
class ElmoSpec:
    """`elmo`: the default mix of the three layers (softmax weights s and scale γ)."""

    layer_weights: tuple[float, ...] = (0.0, 0.0, 0.0)
    gamma: float = 1.0
    extra: Facts = field(default_factory=dict)


@dataclass(frozen=True)
class Word2VecSpec:
    """`word2vec`: the id → word file and the training window the cloze graph averages over."""

    vocab_file: str
    window: int
    unk_id: int = 0
    mask_id: int = 1
    architecture: str = ""
    extra: Facts = field(default_factory=dict)


@dataclass(frozen=True)
class EncDecSpec:
    """`encdec`: an encoder-decoder's architecture, the ids its decoding and its blanks use, and its windows."""

    architecture: Literal["transformer", "rnn"]
    pad_id: int
    decoder_start_id: int  # the decoder's first input (<s>)
    eos_id: int
    first_sentinel_id: int  # <extra_id_0>; sentinel k is first_sentinel_id + k
    sentinels: int
    max_source_length: int  # the encoder's window, </s> included
    max_target_length: int  # the decoder's window, <s> included
    extra: Facts = field(default_factory=dict)


@dataclass(frozen=True)
class ClassifierSpec:
    """`classifier`: the head's labels, one per column of the graph's `logits`, and what it was trained from."""

    labels: tuple[str, ...]
    pooling: Literal["cls", "mean"] = "cls"
    frozen_layers: int = 0
    base_model: str = ""
    base_version: str = ""
    extra: Facts = field(default_factory=dict)


@dataclass(frozen=True)
class Manifest:
    """One model folder's manifest. The first six fields are required; each family reads its own section."""

    name: str
    family: str
    tasks: tuple[str, ...]
    max_length: int
    vocab_size: int
    tokenizer: TokenizerSpec
    schema_version: int = SCHEMA_VERSION
    version: str = "1"
    created_at: str = ""
    description: str = ""
    graphs: Mapping[str, GraphSpec] = field(default_factory=dict)
    variants: Mapping[str, VariantSpec] = field(default_factory=dict)
    ngram: NgramSpec | None = None
    nnlm: NnlmSpec | None = None
    elmo: ElmoSpec | None = None
    word2vec: Word2VecSpec | None = None
    encdec: EncDecSpec | None = None
    classifier: ClassifierSpec | None = None
    batching: Facts | None = None  # per-model batching overrides (ServerConfig.batching_for checks them)
    weights: str | None = None  # a weights file for oracles and benchmarks; the server never reads it
    parity: Facts = field(default_factory=dict)
    config: Facts = field(default_factory=dict)
    training: Facts = field(default_factory=dict)
    evaluation: Facts = field(default_factory=dict)
    build_key: str = ""
    corpus_sha256: str = ""
    extra: Facts = field(default_factory=dict)  # top-level keys this schema does not name (an importer's `source`, say)

    def files(self) -> list[str]:
        """Every file the manifest names that a server may open (tokenizer, graphs, variants, n-gram model)."""
        files = [self.tokenizer.file, *(g.file for g in self.graphs.values())]
        files += [f for v in self.variants.values() for f in v.graphs.values()]
        if self.ngram is not None:
            files.append(self.ngram.file)
        return files


def require(section: T | None, name: str, folder: str | Path) -> T:
    """A family's section of the manifest (`ngram`, `nnlm`, `word2vec`, `encdec`, `classifier`), which its model
    folder must have."""
    if section is None:
        raise ManifestError(f"{Path(folder) / MANIFEST_FILE}: field '{name}' is missing")
    return section


# -- reading ---------------------------------------------------------------------------------------------


def load(path: str | Path) -> Manifest:
    """Read and validate `path` (a manifest.json). Raises ManifestError naming the file and the field, and
    OSError when the file cannot be read."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path}: not a JSON manifest ({e})") from e
    return from_json(data, source=str(path))


def from_json(data: object, source: str = MANIFEST_FILE) -> Manifest:
    """Validate a parsed manifest; `source` names it in errors (the file's path)."""
    if not isinstance(data, Mapping):
        raise ManifestError(f"{source}: a manifest must be a JSON object, got {_json_type(data)}")
    version = data.get("schema_version", 1)  # absent: written before the field existed, i.e. version 1
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= SCHEMA_VERSION:
        raise ManifestError(f"{source}: field 'schema_version' must be an int from 1 to {SCHEMA_VERSION}, "
                            f"got {version!r}")
    return _read_object(Manifest, data, source, "")


def _read_object(cls: type[T], data: Mapping[str, Any], source: str, where: str) -> T:
    """Build the dataclass `cls` from `data`, checking each field against its annotation."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    names = set()
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name == "extra":
            continue
        names.add(f.name)
        path = f"{where}{f.name}"
        if f.name in data:
            values[f.name] = _read_value(hints[f.name], data[f.name], source, path)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ManifestError(f"{source}: field '{path}' is missing")
    if "extra" in hints:
        values["extra"] = {k: v for k, v in data.items() if k not in names}
    return cls(**values)


def _read_value(hint: Any, value: Any, source: str, path: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is types.UnionType:  # X | None
        if value is None:
            return None
        return _read_value(next(a for a in args if a is not type(None)), value, source, path)
    if origin is Literal:
        if value not in args:
            raise ManifestError(f"{source}: field '{path}' must be one of {', '.join(map(repr, args))}, "
                                f"got {value!r}")
        return value
    if hint is str:
        return _expect(isinstance(value, str), value, value, "a string", source, path)
    if hint is int:
        return _expect(isinstance(value, int) and not isinstance(value, bool), value, value, "an int", source, path)
    if hint is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return _expect(ok, value, float(value) if ok else 0.0, "a number", source, path)
    if origin is tuple:  # tuple[X, ...]: a JSON array
        _expect(isinstance(value, list), value, None, "a list", source, path)
        return tuple(_read_value(args[0], v, source, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is Mapping:  # Mapping[str, X]: a JSON object
        _expect(isinstance(value, dict), value, None, "an object", source, path)
        if args[1] is Any:
            return value
        return {k: _read_value(args[1], v, source, f"{path}.{k}") for k, v in value.items()}
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        _expect(isinstance(value, dict), value, None, "an object", source, path)
        return _read_object(hint, value, source, f"{path}.")
    raise TypeError(f"manifest schema: no reader for {hint!r} ({path})")  # a schema bug, not a file's


def _expect(ok: bool, value: object, result: T, what: str, source: str, path: str) -> T:
    if not ok:
        raise ManifestError(f"{source}: field '{path}' must be {what}, got {_json_type(value)}")
    return result


def _json_type(value: object) -> str:
    return {bool: "bool", int: "int", float: "float", str: "str", list: "list", dict: "object",
            type(None): "null"}.get(type(value), type(value).__name__)


# -- writing ---------------------------------------------------------------------------------------------


def dump(manifest: Manifest) -> dict[str, Any]:
    """The manifest as the JSON object `write` stores (None fields and empty sections left out)."""
    out = _dump_object(manifest)
    out["schema_version"] = SCHEMA_VERSION
    return out


def write(folder: str | Path, manifest: Manifest) -> Path:
    """Write `folder/manifest.json` (pretty, UTF-8); returns its path."""
    path = Path(folder) / MANIFEST_FILE
    path.write_text(json.dumps(dump(manifest), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def _dump_object(obj: object) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        value = getattr(obj, f.name)
        if f.name == "extra":
            out.update(value)
        elif value is not None and not (isinstance(value, Mapping) and not value
                                        and f.default_factory is not dataclasses.MISSING):  # an empty section
            out[f.name] = _dump_value(value)
    return out


def _dump_value(value: object) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _dump_object(value)
    if isinstance(value, tuple):
        return [_dump_value(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _dump_value(v) for k, v in value.items()}
    return value


__all__ = [
    "MANIFEST_FILE", "SCHEMA_VERSION", "ClassifierSpec", "ElmoSpec", "EncDecSpec", "Facts", "GraphSpec", "Manifest",
    "ManifestError", "NgramSpec", "NnlmSpec", "TokenizerSpec", "VariantSpec", "Word2VecSpec",
    "dump", "from_json", "load", "require", "write",
]
