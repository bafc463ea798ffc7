"""What every model family's adapter has, so the tasks (service/tasks/) stay family-agnostic.

An adapter knows its model's files, typed manifest and tokenizer: how to turn text into token ids and back,
and how to start and close what runs the model. What it can compute (scores, next-token distributions,
blanks, vectors, generations) are its capabilities (capabilities.py), which each family class declares; what a
log-probability *means* for a request (a sentence score, the next word) is the tasks' business.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from plm.service.batcher import DynamicBatcher
from plm.service.contract import manifest as contract
from tokenizers import Tokenizer

# What an adapter is built from: the typed manifest, or its JSON (validated as manifest.json would be).
ManifestSource = contract.Manifest | Mapping[str, Any]

def top_allowed(logprobs: np.ndarray, allowed: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest allowed finite entries of a (V,) row, best first (ties: lower id first)."""
    masked = np.where(allowed, logprobs, -np.inf)
    k = min(k, int(np.count_nonzero(allowed)))  # not allowed.sum(): a bool sum casts every entry to int first
    if k <= 0:
        return np.array([], dtype=np.int64)
    kth = -np.partition(-masked, k - 1)[k - 1]  # the k-th value; all ties with it compete, lower id first
    idx = np.flatnonzero((masked >= kth) & np.isfinite(masked))
    return idx[np.lexsort((idx, -masked[idx]))][:k]


def top_of(logprobs: np.ndarray, allowed: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """`top_allowed`'s ids and their log-probs: (ids, logprobs[ids])."""
    idx = top_allowed(logprobs, allowed, k)
    return idx, logprobs[idx]


_FOLD = 8  # `top_of_rows` folds each row this many entries into one, twice


def top_of_rows(rows: np.ndarray, allowed: np.ndarray, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """`top_of` of every row of `rows` (N, V) at once: the same answers, ties included, for a batch of rows.

    Each row is split into groups (strided, so that numpy's max runs along whole rows), and the k-th largest
    group maximum, t, has at least k allowed entries at or above it: every entry `top_of` may pick is >= t. Those
    few candidates of all rows are sorted together (row, value descending, id ascending) and each row keeps its
    first k. A row whose t is not finite, or with a NaN or +inf, is answered by `top_of` itself."""
    n, v = rows.shape
    if n < 2:  # one row: top_of's own partition costs less than the set-up
        return [top_of(row, allowed, k) for row in rows]
    k = min(k, int(np.count_nonzero(allowed)))
    width = -(-v // _FOLD**2) * _FOLD**2  # V padded for two folds
    if k <= 0 or k > width // _FOLD:
        return [top_of(row, allowed, k) for row in rows]
    masked = np.empty((n, width), dtype=rows.dtype)  # (N, width): -inf where not allowed or padding
    masked[:, :v] = rows
    masked[:, v:] = -np.inf
    masked[:, np.flatnonzero(~allowed)] = -np.inf
    maxima = masked.reshape(n, _FOLD, width // _FOLD).max(axis=1)  # (N, width/8): groups {j, j + width/8, …}
    if k <= width // _FOLD**2:
        maxima = maxima.reshape(n, _FOLD, width // _FOLD**2).max(axis=1)  # (N, width/64)
    groups = maxima.shape[1]
    t = np.partition(maxima, groups - k, axis=1)[:, groups - k]  # (N,): the k-th largest group maximum
    odd = ~(np.isfinite(t) & (maxima < np.inf).all(axis=1))  # (N,): t not finite, or a NaN or +inf in the row
    pick = masked >= t[:, None]  # (N, width): every entry top_of may pick, and a few more
    pick[odd] = False
    flat = np.flatnonzero(pick)  # (C,) candidates, row by row, ids ascending
    vals = masked.ravel()[flat]
    at, ids = np.divmod(flat, width)  # (C,) each: row, id
    order = np.lexsort((-vals, at))  # stable: equal values stay in id order, as flatnonzero gave them
    at, ids, vals = at[order], ids[order], vals[order]
    starts = np.searchsorted(at, np.arange(n))  # (N,): where each row's candidates begin
    return [top_of(rows[i], allowed, k) if odd[i] else (ids[starts[i]:starts[i] + k], vals[starts[i]:starts[i] + k])
            for i in range(n)]


MASK = "[MASK]"  # the literal a FillMask text marks its blanks with, for every family


@dataclass(frozen=True)
class Encoded:
    """One text, tokenized by the model's tokenizer (no BOS/EOS)."""

    ids: list[int]
    tokens: list[str]  # readable text of each token
    word_index: list[int]  # for each token, the index of the word it belongs to
    words: list[str]
    oov: list[bool]  # the token is out of vocabulary (scored as <unk>)


@dataclass(frozen=True)
class TokenVectors:
    """Vectors of one sequence: one per text token, plus the [CLS] vector for models that have one."""

    tokens: np.ndarray  # (N, D) float32, one row per token of the text (no BOS/CLS/SEP)
    cls: np.ndarray | None = None  # (D,) float32
    # (D,) float32: the mean over every column of the row, specials included (sentence-transformers' mean pooling)
    mean_all: np.ndarray | None = None


@dataclass(frozen=True)
class TokenScores:
    """Natural-log probabilities of each scored token of one sequence (the text's tokens, then EOS)."""

    log_probs: np.ndarray  # (N,) float64
    ngram_lengths: list[int] | None = None  # n-gram models only: KenLM's ngram_length per token


class ModelAdapter(abc.ABC):
    """A loaded model. Subclasses are built by the registry from a model folder."""

    family: str = ""

    def __init__(self, name: str, folder: Path, manifest: ManifestSource) -> None:
        """`manifest` is the folder's typed manifest; a JSON mapping is validated as the file would be."""
        self.name = name
        self.folder = folder
        if not isinstance(manifest, contract.Manifest):
            manifest = contract.from_json(manifest, source=str(folder / contract.MANIFEST_FILE))
        self.spec = manifest  # the typed manifest (service/contract/manifest.py)
        self.version = manifest.version
        self.tasks: tuple[str, ...] = manifest.tasks
        self.max_length = manifest.max_length
        self.vocab_size = manifest.vocab_size
        self.tokenizer_kind = manifest.tokenizer.kind
        self.providers: list[str] = []  # the execution providers of the model's sessions, first = preferred
        self.variant = ""  # the optimised graph variant served ("" = the exported graph)

    def served_by(self, session: Any) -> None:
        """Record which execution providers and graph variant serve the model (for GetModel and the logs)."""
        self.providers = list(session.providers)
        self.variant = session.variant

    # -- lifecycle ----------------------------------------------------------------------------------------
    _batcher: DynamicBatcher[Any, Any] | None = None  # set by adapters whose model runs batched

    @property
    def batcher(self) -> DynamicBatcher[Any, Any]:
        assert self._batcher is not None, f"{self.family} adapters run unbatched"
        return self._batcher

    def refuse_if_full(self, rows: int, generate: bool = False) -> None:
        """RESOURCE_EXHAUSTED at once when `rows` (a lower bound of what the call will queue) do not fit in
        the queue the call will use (a family that generates elsewhere checks that queue for `generate`): a
        refusal under overload costs no tokenizing. The exact check happens when the rows are queued."""
        if self._batcher is not None:
            self._batcher.refuse_if_full(rows)

    async def start(self) -> None:
        """Called inside the server's event loop once loaded: starts the batch worker, if any."""
        if self._batcher is not None:
            self._batcher.start()

    async def close(self) -> None:
        """Release the model's resources; queued work fails with UNAVAILABLE."""
        if self._batcher is not None:
            await self._batcher.close()

    def special_id(self, tokenizer: Tokenizer, token: str) -> int:
        """The id of a special token the manifest names; a tokenizer without it is a broken model folder."""
        token_id = tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{self.folder.name}: the tokenizer has no {token!r} token named by the manifest")
        return int(token_id)

    # -- text ---------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def encode(self, text: str) -> Encoded: ...

    def encode_ids(self, text: str) -> list[int]:
        """`encode(text).ids`, for calls that need no token texts or words (a family may skip making them)."""
        return self.encode(text).ids

    @abc.abstractmethod
    def decode(self, ids: list[int]) -> str:
        """Text of generated ids, as a continuation (word models join with spaces)."""

    @abc.abstractmethod
    def token_text(self, token_id: int) -> str: ...

    def token_bytes(self) -> list[bytes] | None:
        """The UTF-8 bytes each token id adds to `decode`'s text (special tokens: none), when that text is the
        lossy UTF-8 decoding of the tokens' bytes joined (byte-level BPE): generation then decodes one token
        per step instead of the whole text. None (the default) when it is not (word models join with spaces)."""
        return None

    @property
    @abc.abstractmethod
    def eos_id(self) -> int: ...

    @property
    def context_budget(self) -> int:
        """Most text tokens a sequence may hold (the window minus the BOS the adapter adds)."""
        return self.max_length - 1

    @abc.abstractmethod
    def word_start_mask(self) -> np.ndarray:
        """(V,) bool: the token begins a new word (the rest continue the word before them)."""

    @abc.abstractmethod
    def never_generate_mask(self) -> np.ndarray:
        """(V,) bool: tokens that must never be predicted or sampled (BOS, padding, <unk>)."""

    def info(self) -> dict[str, Any]:
        """Facts for ListModels/GetModel beyond the common ones."""
        return {}


def read_json(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data
