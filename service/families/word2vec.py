"""word2vec adapter: static word vectors (embed, nearest words, analogies) and the CBOW cloze (fill_mask).

Files (export/build_word2vec.py): vocab.json, the served vocabulary as a JSON list (id = index; id 0
`<unk>`, id 1 `[MASK]`); tokenizer.json, used only for its normalizer and pre-tokenizer, so words are split
exactly as in training; vectors.onnx and cloze.onnx (contracts in export/word2vec_export.py).

Choices:
* a word outside the word2vec vocabulary encodes as `<unk>` (id 0), flagged OOV, with a zero vector;
* there is no end of sentence in word2vec: `eos_id` is the `<unk>` id, which is never predicted;
* `mask_id` is the `[MASK]` row of the vocabulary, which has no vector and is never predicted;
* a blank's distribution comes from the words within ±window positions of it, the context CBOW was
  trained with; other blanks and OOV words are not context (they have no vector, and counting them in the
  mean would shrink it); a blank with no context word gets the uniform distribution;
* score and next-word prediction are not word2vec's tasks: they raise FAILED_PRECONDITION.

At load the whole vocabulary goes through vectors.onnx once: `word_vectors()` and `embed` read that (V, D)
matrix, so embedding needs no ONNX run per request (a static vector does not depend on its context).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from plm.service.batcher import DynamicBatcher
from plm.service.config import ServerConfig
from plm.service.contract.manifest import require
from plm.service.errors import FailedPrecondition
from plm.service.families.base import Encoded, ManifestSource, ModelAdapter, TokenScores, TokenVectors
from plm.service.families.capabilities import Embedder, MaskFiller
from plm.service.families.words import PlainText, encode_words, join_words
from plm.service.metrics import Metrics
from plm.service.runtime import open_graph, pad_right
from tokenizers import Tokenizer


@dataclass(frozen=True)
class _ClozeRow:
    context: tuple[int, ...]  # real context word ids around one blank (may be empty)


class Word2VecAdapter(ModelAdapter, MaskFiller, Embedder):
    family = "word2vec"

    def __init__(self, name: str, folder: Path, manifest: ManifestSource, config: ServerConfig,
                 metrics: Metrics) -> None:
        super().__init__(name, folder, manifest)
        spec = require(self.spec.word2vec, "word2vec", folder)
        self.tokenizer = Tokenizer.from_file(str(folder / self.spec.tokenizer.file))
        self._plain = PlainText(self.tokenizer)
        vocab = json.loads((folder / spec.vocab_file).read_text(encoding="utf-8"))
        if not isinstance(vocab, list) or len(vocab) != self.vocab_size:
            raise ValueError(f"{folder.name}: {spec.vocab_file} must list {self.vocab_size} words")
        self.vocab: list[str] = [str(w) for w in vocab]
        self.word_to_id = {w: i for i, w in enumerate(self.vocab)}
        self._unk = spec.unk_id
        self._mask = spec.mask_id
        self.window = spec.window
        self._never = np.zeros(self.vocab_size, dtype=bool)
        self._never[[self._unk, self._mask]] = True
        self._all_words = np.ones(self.vocab_size, dtype=bool)
        # No metrics for this one load-time run: they describe requests.
        vectors = open_graph(folder, self.spec, "vectors", config.runtime_for(name), name, None)
        all_ids = np.arange(self.vocab_size, dtype=np.int64)
        self._matrix: np.ndarray = vectors.run(["vectors"], {"input_ids": all_ids})["vectors"]  # (V, D)
        self._matrix.setflags(write=False)
        self.cloze = open_graph(folder, self.spec, "cloze", config.runtime_for(name), name, metrics)
        self.served_by(self.cloze)
        self._batcher: DynamicBatcher[_ClozeRow, np.ndarray] = DynamicBatcher(
            name, self._run_cloze, config.batching_for(name, self.spec.batching), metrics
        )

    # -- text ---------------------------------------------------------------------------------------------
    def encode(self, text: str) -> Encoded:
        return encode_words(self.tokenizer, self.word_to_id, self._unk, text, self._plain)

    def decode(self, ids: list[int]) -> str:
        return join_words(self.vocab, ids, self._never)

    def token_text(self, token_id: int) -> str:
        return self.vocab[token_id]

    @property
    def eos_id(self) -> int:
        return self._unk  # word2vec has no end of sentence; <unk> is never predicted

    @property
    def mask_id(self) -> int:
        return self._mask

    def word_start_mask(self) -> np.ndarray:
        return self._all_words

    def never_generate_mask(self) -> np.ndarray:
        return self._never

    # -- not word2vec's tasks: no capability, and a direct call refuses ------------------------------------
    async def score(self, seqs: list[list[int]], add_eos: bool, deadline: float | None) -> list[TokenScores]:
        raise FailedPrecondition(f"model {self.name!r} (word2vec) does not score sentences; it serves embed, "
                                 "fill_mask")

    async def next_logprobs(self, contexts: list[list[int]], deadline: float | None) -> np.ndarray:
        raise FailedPrecondition(f"model {self.name!r} (word2vec) does not predict the next word; it serves "
                                 "embed, fill_mask")

    # -- fill_mask ----------------------------------------------------------------------------------------
    def _context(self, seq: list[int], position: int) -> tuple[int, ...]:
        lo, hi = max(0, position - self.window), min(len(seq), position + self.window + 1)
        return tuple(seq[j] for j in range(lo, hi) if j != position and not self._never[seq[j]])

    async def mask_logprobs(self, seqs: list[list[int]], positions: list[list[int]],
                            deadline: float | None) -> list[np.ndarray]:
        rows = [_ClozeRow(self._context(s, p)) for s, ps in zip(seqs, positions, strict=True) for p in ps]
        outs = await self._batcher.submit(rows, [max(1, len(r.context)) for r in rows], deadline) if rows else []
        result, k = [], 0
        for ps in positions:
            result.append(np.stack(outs[k: k + len(ps)]) if ps else np.zeros((0, self.vocab_size), np.float32))
            k += len(ps)
        return result

    def _run_cloze(self, rows: Sequence[_ClozeRow]) -> list[np.ndarray]:
        """One padded run of cloze.onnx over a batch (on the batcher's thread)."""
        ids, mask = pad_right([r.context or (self._unk,) for r in rows], self._unk)  # (B, C)
        for i, r in enumerate(rows):
            if not r.context:
                mask[i] = 0  # no context at all: the graph gives the uniform distribution
        out = self.cloze.run(["logprobs"], {"context_ids": ids, "context_mask": mask})["logprobs"]  # (B, V)
        return [out[i].copy() for i in range(len(rows))]

    # -- embed --------------------------------------------------------------------------------------------
    async def embed(self, seqs: list[list[int]], layer_weights: tuple[float, ...] | None,
                    deadline: float | None) -> list[TokenVectors]:
        # A static vector: the same word has the same vector in every context. <unk> and [MASK] are zero rows.
        return [TokenVectors(tokens=self._matrix[np.asarray(s, dtype=np.int64).reshape(-1)], cls=None)
                for s in seqs]  # fancy indexing copies: callers may modify the rows

    def word_vectors(self) -> np.ndarray:
        return self._matrix

    def info(self) -> dict[str, Any]:
        spec = require(self.spec.word2vec, "word2vec", self.folder)
        return {"providers": self.providers, "architecture": spec.architecture, "window": self.window,
                "dimension": int(self._matrix.shape[1])}
