"""NNLM adapter: a word-level tokenizer and one ONNX graph that maps n−1 previous words to the next word's
log-probabilities, run through the model's dynamic batcher.

Graph contract (export/rnn_export.py): input `context_ids` int64 (B, n−1), oldest word first; output
`next_logprobs` float32 (B, V). A batch row is one *window* (a history), not a sentence: scoring a sentence of
n words submits its n (+1 for `</s>`) windows at once, so the windows of every sequence of a request — and of
concurrent requests — share ONNX runs. Histories at a sentence start are padded with `<s>`, as in training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from plm.service.batcher import DynamicBatcher
from plm.service.config import ServerConfig
from plm.service.contract.manifest import require
from plm.service.families.base import ManifestSource, TokenScores, top_of
from plm.service.families.capabilities import NextWordPredictor, Scorer
from plm.service.families.words import WordModel, WordVocabulary
from plm.service.metrics import Metrics
from plm.service.runtime import open_graph


@dataclass(frozen=True)
class _Window:
    context: tuple[int, ...]  # the n−1 previous ids
    target: int | None  # the id to score, or None for the whole next-word distribution (or its top)
    top: tuple[tuple[np.ndarray, ...], int] | None = None  # (allowed masks, k): only the top k of each


class NnlmAdapter(WordModel, Scorer, NextWordPredictor):
    family = "nnlm"

    def __init__(self, name: str, folder: Path, manifest: ManifestSource, config: ServerConfig,
                 metrics: Metrics) -> None:
        super().__init__(name, folder, manifest)
        self.vocab = WordVocabulary(folder, self.spec.tokenizer)
        self.order = require(self.spec.nnlm, "nnlm", folder).order
        self.session = open_graph(folder, self.spec, "model", config.runtime_for(name), name, metrics)
        self.served_by(self.session)
        self._batcher: DynamicBatcher[_Window, Any] = DynamicBatcher(
            name, self._run, config.batching_for(name, self.spec.batching), metrics
        )

    # -- log-probabilities --------------------------------------------------------------------------------
    def _history(self, ids: Sequence[int]) -> tuple[int, ...]:
        """The last n−1 ids of `<s>`-padded `ids`: the history the model was trained with."""
        k = self.order - 1
        padded = (self.vocab.bos,) * k + tuple(ids)
        return padded[len(padded) - k :]

    async def score(self, seqs: list[list[int]], add_eos: bool, deadline: float | None) -> list[TokenScores]:
        windows: list[_Window] = []
        for seq in seqs:
            targets = [*seq, self.vocab.eos] if add_eos else list(seq)
            windows.extend(_Window(self._history(seq[:t]), target) for t, target in enumerate(targets))
        outs = await self._batcher.submit(windows, [self.order - 1] * len(windows), deadline)
        scores: list[TokenScores] = []
        at = 0
        for seq in seqs:
            n = len(seq) + (1 if add_eos else 0)
            scores.append(TokenScores(np.asarray(outs[at : at + n], dtype=np.float64)))
            at += n
        return scores

    async def next_logprobs(self, contexts: list[list[int]], deadline: float | None) -> np.ndarray:
        windows = [_Window(self._history(c), None) for c in contexts]
        outs = await self._batcher.submit(windows, [self.order - 1] * len(windows), deadline)
        return np.stack(outs).astype(np.float32)  # (B, V)

    async def next_top(self, contexts: list[list[int]], allowed: tuple[np.ndarray, ...], k: int,
                       deadline: float | None) -> list[list[tuple[np.ndarray, np.ndarray]]]:
        windows = [_Window(self._history(c), None, (allowed, k)) for c in contexts]
        return await self._batcher.submit(windows, [self.order - 1] * len(windows), deadline)

    def _run(self, windows: Sequence[_Window]) -> list[Any]:
        """One ONNX run over a batch of windows (on the batcher's thread): a float per scored window (its
        target's log-probability), the top k per mask, or a (V,) row — (B, V) never reaches the event loop
        when the call needs less."""
        context_ids = np.asarray([w.context for w in windows], dtype=np.int64)  # (B, n−1)
        logprobs = self.session.run(["next_logprobs"], {"context_ids": context_ids})["next_logprobs"]  # (B, V)
        out: list[Any] = []
        for row, w in zip(logprobs, windows, strict=True):
            if w.target is not None:
                out.append(float(row[w.target]))
            elif w.top is not None:
                masks, k = w.top
                out.append([top_of(row, mask, k) for mask in masks])
            else:
                out.append(row.copy())
        return out

    def info(self) -> dict[str, Any]:
        return {"order": self.order, "providers": self.providers}
