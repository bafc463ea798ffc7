"""ELMo adapter: a word-level tokenizer and one ONNX biLSTM graph, run through the model's dynamic batcher.

Graph contract (export/rnn_export.py): inputs `input_ids`, `attention_mask` int64 (B, T); outputs `layers`
(B, 3, T, 2H) — the token embedding [e; e] and the two biLSTM layers [fwd; bwd] — and `token_logprobs` (B, T),
the forward LM's log P(x_t | x_<t). Rows are right-padded with `<pad>`; the graph compacts and reverses each
row within its real length, so a row's numbers do not depend on what it is batched with.

Every sequence runs as `<s> words </s>` for `embed` (both LMs see the sentence boundaries they were trained
with) and as `<s> words [</s>]` for `score`. The task vector is ELMo's γ · Σ_j softmax(s)_j · layer_j, with
s and γ from the request or the manifest's `elmo` entry.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from plm.service.batcher import DynamicBatcher
from plm.service.config import ServerConfig
from plm.service.contract.manifest import ElmoSpec
from plm.service.errors import FailedPrecondition, InvalidArgument
from plm.service.families.base import ManifestSource, TokenScores, TokenVectors
from plm.service.families.capabilities import Embedder, Scorer
from plm.service.families.words import WordModel, WordVocabulary
from plm.service.metrics import Metrics
from plm.service.runtime import open_graph, pad_right


@dataclass(frozen=True)
class _Row:
    ids: tuple[int, ...]  # <s> + words (+ </s>)
    want_layers: bool
    want_tokens: bool


@dataclass(frozen=True)
class _RowOut:
    layers: np.ndarray | None  # (3, n, 2H)
    token_logprobs: np.ndarray | None  # (n,)


def mix_weights(layer_weights: Sequence[float], gamma: float) -> np.ndarray:
    """γ · softmax(s): (3,) float64 weights of the three layers. Raises InvalidArgument on a bad `s`."""
    s = np.asarray(list(layer_weights), dtype=np.float64)
    if s.shape != (3,):
        raise InvalidArgument("layer_weights", f"ELMo has 3 layers; got {s.size} weights")
    if not np.all(np.isfinite(s)):
        raise InvalidArgument("layer_weights", "every weight must be a finite number")
    e = np.exp(s - s.max())  # stable softmax
    return float(gamma) * e / e.sum()


class ElmoAdapter(WordModel, Scorer, Embedder):
    """Contextual word vectors (a mix of three layers) and the forward LM's sentence scores. The graph exports
    no next-word distribution, so it does not predict the next word (`next_logprobs` only refuses)."""

    family = "elmo"

    def __init__(self, name: str, folder: Path, manifest: ManifestSource, config: ServerConfig,
                 metrics: Metrics) -> None:
        super().__init__(name, folder, manifest)
        self.vocab = WordVocabulary(folder, self.spec.tokenizer)
        spec = self.spec.elmo or ElmoSpec()
        self.default_weights = spec.layer_weights
        self.gamma = spec.gamma
        if len(self.default_weights) != 3 or not all(math.isfinite(w) for w in self.default_weights):
            raise ValueError(f"{folder.name}: manifest elmo.layer_weights must be 3 finite numbers")
        self.session = open_graph(folder, self.spec, "model", config.runtime_for(name), name, metrics)
        self.served_by(self.session)
        self._batcher: DynamicBatcher[_Row, _RowOut] = DynamicBatcher(
            name, self._run, config.batching_for(name, self.spec.batching), metrics
        )

    @property
    def context_budget(self) -> int:
        return self.max_length - 2  # embed adds both <s> and </s>

    # -- embeddings and log-probabilities -----------------------------------------------------------------
    async def embed(self, seqs: list[list[int]], layer_weights: tuple[float, ...] | None,
                    deadline: float | None) -> list[TokenVectors]:
        w = mix_weights(self.default_weights if layer_weights is None else layer_weights, self.gamma)  # (3,)
        rows = [_Row((self.vocab.bos, *s, self.vocab.eos), True, False) for s in seqs]
        outs = await self._batcher.submit(rows, [len(r.ids) for r in rows], deadline)
        vectors: list[TokenVectors] = []
        for seq, out in zip(seqs, outs, strict=True):
            assert out.layers is not None
            layers = out.layers[:, 1 : len(seq) + 1]  # (3, N, 2H): the text's words, not <s>/</s>
            vectors.append(TokenVectors(np.tensordot(w, layers, axes=1).astype(np.float32), None))
        return vectors

    async def score(self, seqs: list[list[int]], add_eos: bool, deadline: float | None) -> list[TokenScores]:
        rows = [_Row((self.vocab.bos, *s, *((self.vocab.eos,) if add_eos else ())), False, True) for s in seqs]
        outs = await self._batcher.submit(rows, [len(r.ids) for r in rows], deadline)
        # Position t scores ids[t]; position 0 is the <s>, which is given, not scored.
        return [TokenScores(o.token_logprobs[1:].astype(np.float64)) for o in outs if o.token_logprobs is not None]

    async def next_logprobs(self, contexts: list[list[int]], deadline: float | None) -> np.ndarray:
        raise FailedPrecondition(
            f"model {self.name!r} (elmo) does not export a next-word distribution; it serves: {', '.join(self.tasks)}"
        )

    def _run(self, rows: Sequence[_Row]) -> list[_RowOut]:
        """One padded ONNX run over a batch (on the batcher's thread)."""
        input_ids, mask = pad_right([r.ids for r in rows], self.vocab.pad)  # (B, T), right-padded
        names = [n for n, want in (("layers", any(r.want_layers for r in rows)),
                                   ("token_logprobs", any(r.want_tokens for r in rows))) if want]
        results = self.session.run(names, {"input_ids": input_ids, "attention_mask": mask})
        layers, tok = results.get("layers"), results.get("token_logprobs")  # (B, 3, T, 2H), (B, T)
        return [
            _RowOut(
                layers[i, :, : len(r.ids)].copy() if (layers is not None and r.want_layers) else None,
                tok[i, : len(r.ids)].copy() if (tok is not None and r.want_tokens) else None,
            )
            for i, r in enumerate(rows)
        ]

    def info(self) -> dict[str, Any]:
        return {"layer_weights": list(self.default_weights), "gamma": self.gamma, "providers": self.providers}
