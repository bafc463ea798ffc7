"""`choose` on an array the caller hands over (`owned`, the engine's decode output) picks exactly the tokens it picks
on a borrowed one, and leaves a borrowed one as it was; `_top_k`'s scores are its ids' scores."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from plm.service.generation.sequence import SamplingParams, Sequence, _top_k, choose
from plm.service.metrics import Metrics

SETTINGS = [SamplingParams(temperature=1.0, top_k=50, max_new_tokens=40),
            SamplingParams(temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.3, max_new_tokens=40),
            SamplingParams(temperature=1.1, top_p=0.8, min_new_tokens=5, max_new_tokens=40),
            SamplingParams(temperature=0.0, repetition_penalty=1.2, max_new_tokens=40)]


@dataclass
class _Vocab:
    size: int
    name: str = "owned"
    eos_id: int = 2

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(97 + i % 26) for i in ids)

    def token_bytes(self) -> list[bytes] | None:
        return [bytes([97 + i % 26]) for i in range(self.size)]


def _batch(seed: int, vocab: int, rows: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((rows, vocab)) * 3
    logprobs = (logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)).astype(np.float32)
    allowed = np.ones(vocab, dtype=bool)
    allowed[rng.integers(3, vocab, 4)] = False
    return logprobs, allowed, [int(k) for k in rng.integers(0, len(SETTINGS), rows)]


def _sequences(kinds: list[int], vocab: _Vocab, seed: int) -> list[Sequence]:
    seqs = [Sequence(i, [5, 6, 7], SETTINGS[k], seed, vocab, Metrics(), 0.0) for i, k in enumerate(kinds)]
    for s in seqs:
        s.advance(9)  # a token seen, for the repetition penalty; min_new_tokens still holds EOS off
    return seqs


@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("vocab", [300, 8000])
def test_an_owned_array_gives_the_tokens_a_borrowed_one_gives(rows: int, vocab: int) -> None:
    words = _Vocab(vocab)
    for seed in range(6):
        logprobs, allowed, kinds = _batch(seed, vocab, rows)
        before = logprobs.copy()
        borrowed_seqs, owned_seqs = _sequences(kinds, words, seed), _sequences(kinds, words, seed)
        for _ in range(4):  # a few steps: the generators move on alike
            borrowed = choose(logprobs, allowed, borrowed_seqs)
            np.testing.assert_array_equal(logprobs, before)  # a borrowed array is never written
            owned = choose(logprobs.copy(), allowed, owned_seqs, owned=True)
            assert owned == borrowed
            for s, t in zip(borrowed_seqs, borrowed, strict=True):
                s.advance(t)
            for s, t in zip(owned_seqs, owned, strict=True):
                s.advance(t)
            assert all(allowed[t] for t in owned)


@pytest.mark.parametrize("rows", [2, 16])
def test_top_k_scores_are_those_of_its_ids_best_first(rows: int) -> None:
    logprobs, _, _ = _batch(7, 8000, rows)
    logprobs[:, 100:130] = logprobs[:, 5:6]  # ties
    ids, scores = _top_k(logprobs, 50)
    np.testing.assert_array_equal(scores, np.take_along_axis(logprobs, ids, axis=1))
    assert (np.diff(scores, axis=1) <= 0).all()
    kth = np.sort(logprobs, axis=1)[:, -50]
    assert (scores[:, -1] == kth).all()
