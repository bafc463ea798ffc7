"""n-gram adapter: a word-level tokenizer and an ARPA (Kneser-Ney) or counts (Laplace) model, in numpy.

Scoring a sentence takes microseconds, so requests are answered inline on the event loop: a batcher would
only add a thread hop. Ids are the model's vocabulary ids; the tokenizer only normalises and splits words.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from plm.service.config import ServerConfig
from plm.service.contract.manifest import require
from plm.service.families.base import Encoded, ManifestSource, ModelAdapter, TokenScores
from plm.service.families.capabilities import NextWordPredictor, Scorer
from plm.service.families.ngram_scorer import NgramModel
from plm.service.families.words import PlainText, encode_words, join_words, word_ids
from plm.service.metrics import Metrics
from tokenizers import Tokenizer

_LN10 = math.log(10.0)


class NgramAdapter(ModelAdapter, Scorer, NextWordPredictor):
    family = "ngram"

    def __init__(self, name: str, folder: Path, manifest: ManifestSource, config: ServerConfig,
                 metrics: Metrics) -> None:
        super().__init__(name, folder, manifest)
        self.tokenizer = Tokenizer.from_file(str(folder / self.spec.tokenizer.file))
        self._plain = PlainText(self.tokenizer)
        spec = require(self.spec.ngram, "ngram", folder)
        path = folder / spec.file
        self.lm = NgramModel.load_arpa(path) if spec.format == "arpa" else NgramModel.load_counts(path)
        self.vocab_size = len(self.lm.vocab)
        self._eos = self.lm.word_to_id[self.lm.eos]
        self._never = np.zeros(self.vocab_size, dtype=bool)
        for special in (self.lm.bos, "<unk>", "<pad>"):
            if special in self.lm.word_to_id:
                self._never[self.lm.word_to_id[special]] = True
        self._all_words = np.ones(self.vocab_size, dtype=bool)
        self._skip = self._never.copy()
        self._skip[self._eos] = True  # decode: specials and the end of sentence are not text

    def encode(self, text: str) -> Encoded:
        return encode_words(self.tokenizer, self.lm.word_to_id, self.lm.unk_id, text, self._plain)

    def encode_ids(self, text: str) -> list[int]:
        return word_ids(self.tokenizer, self.lm.word_to_id, self.lm.unk_id, text, self._plain)

    def decode(self, ids: list[int]) -> str:
        return join_words(self.lm.vocab, ids, self._skip)

    def token_text(self, token_id: int) -> str:
        return self.lm.vocab[token_id]

    @property
    def eos_id(self) -> int:
        return self._eos

    def word_start_mask(self) -> np.ndarray:
        return self._all_words

    def never_generate_mask(self) -> np.ndarray:
        return self._never

    async def score(self, seqs: list[list[int]], add_eos: bool, deadline: float | None) -> list[TokenScores]:
        out = []
        for ids in seqs:
            scored = self.lm.score_words([self.lm.vocab[i] for i in ids], bos=True, eos=add_eos)
            out.append(TokenScores(
                np.array([lp * _LN10 for lp, _ in scored], dtype=np.float64), [n for _, n in scored]
            ))
        return out

    async def next_logprobs(self, contexts: list[list[int]], deadline: float | None) -> np.ndarray:
        rows = [self.lm.next_log10probs([self.lm.vocab[i] for i in c]) for c in contexts]
        return (np.stack(rows) * _LN10).astype(np.float32)  # (B, V)

    async def next_top(self, contexts: list[list[int]], allowed: tuple[np.ndarray, ...], k: int,
                       deadline: float | None) -> list[list[tuple[np.ndarray, np.ndarray]]]:
        out = []
        for c in contexts:
            tops = []
            for mask in allowed:
                ids, log10 = self.lm.next_top_ids(c, mask, k)
                logprobs = (log10 * _LN10).astype(np.float32)  # as next_logprobs gives them
                order = np.lexsort((ids, -logprobs))  # float32 may tie what float64 told apart
                tops.append((ids[order], logprobs[order]))
            out.append(tops)
        return out

    def info(self) -> dict[str, Any]:
        return {"order": self.lm.order}
