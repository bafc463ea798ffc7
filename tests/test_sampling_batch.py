"""`choose` over a batch as the engine runs it: rows with their own temperature, top-k and top-p in one pass per
kind of candidates (`nucleus`) get what each gets alone; an array the caller hands over (`owned`, the engine's
decode output) gives the tokens a borrowed one gives and a borrowed one is left as it was; `_top_k`'s scores are
its ids' scores, and its ids a full stable sort's first k."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from plm.service.generation.sequence import (
    EVERY,
    SORTED,
    TOP_K,
    SamplingParams,
    Sequence,
    _top_k,
    candidates,
    choose,
    nucleus,
    penalised,
)
from plm.service.metrics import Metrics


@dataclass
class _Vocab:
    """A vocabulary of one-letter tokens; id 2 ends the text."""

    size: int
    name: str = "batch"
    eos_id: int = 2

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(97 + i % 26) for i in ids)

    def token_bytes(self) -> list[bytes] | None:
        return [bytes([97 + i % 26]) for i in range(self.size)]


def _rows(seed: int, rows: int, vocab: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((rows, vocab)) * rng.choice([0.3, 3.0, 8.0], size=(rows, 1))
    xs = (logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)).astype(np.float32)
    xs[:, 3] = -np.inf  # a disallowed token
    return xs


@pytest.mark.parametrize("kind", [TOP_K, SORTED, EVERY])
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_rows_with_their_own_settings_get_what_they_get_alone(kind: str, rows: int) -> None:
    vocab = 2000
    for seed in range(5):
        rng = np.random.default_rng(100 + seed)
        xs = _rows(seed, rows, vocab)
        temperature = rng.choice([0.5, 0.7, 1.0, 1.3], size=rows)
        top_k = rng.choice([5, 40, 50, 300], size=rows) if kind == TOP_K else np.zeros(rows, dtype=np.int64)
        top_p = rng.choice([0.5, 0.9, 1.0], size=rows) if kind != EVERY else np.ones(rows)
        if kind == SORTED:
            top_p = np.minimum(top_p, 0.95)
        assert {candidates(int(k), float(p), vocab) for k, p in zip(top_k, top_p, strict=True)} == {kind}
        cand, cum, n = nucleus(xs, temperature, top_k, top_p)
        for i in range(rows):
            alone_cand, alone_cum, alone_n = nucleus(xs[i:i + 1], float(temperature[i]), int(top_k[i]),
                                                     float(top_p[i]))
            assert n[i] == alone_n[0]
            k = int(n[i])
            np.testing.assert_array_equal(cum[i, :k], alone_cum[0, :k])  # bit-equal: the same sums in order
            if kind == EVERY:
                assert cand is None and alone_cand is None
            else:
                assert cand is not None and alone_cand is not None
                np.testing.assert_array_equal(cand[i, :k], alone_cand[0, :k])


@pytest.mark.parametrize("rows", [2, 5, 16])
def test_interleaved_settings_of_one_kind_choose_what_each_row_chooses_alone(rows: int) -> None:
    """Every row sampled from its top k, settings interleaved (so one pass takes the rows out of their order)."""
    settings = [SamplingParams(temperature=1.0, top_k=50), SamplingParams(temperature=0.8, top_k=30, top_p=0.9),
                SamplingParams(temperature=1.3, top_k=8)]
    vocab = _Vocab(3000)
    xs = _rows(11, rows, vocab.size)
    allowed = np.ones(vocab.size, dtype=bool)

    def seqs() -> list[Sequence]:
        return [Sequence(i, [5], settings[(i * 2) % 3], 4, vocab, Metrics(), 0.0) for i in range(rows)]

    for _ in range(3):
        together = choose(xs, allowed, seqs())
        alone = [choose(xs[i:i + 1], allowed, [s])[0] for i, s in enumerate(seqs())]
        assert together == alone
        xs = np.roll(xs, 7, axis=1)


SETTINGS = [SamplingParams(temperature=1.0, top_k=50, max_new_tokens=40),
            SamplingParams(temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.3, max_new_tokens=40),
            SamplingParams(temperature=1.1, top_p=0.8, min_new_tokens=5, max_new_tokens=40),
            SamplingParams(temperature=0.0, repetition_penalty=1.2, max_new_tokens=40)]


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


@pytest.mark.parametrize("rows", [4, 16])
@pytest.mark.parametrize("case", ["distinct", "ties above the k-th", "two of a row's best in one group"])
def test_top_k_is_a_full_stable_sorts_first_k(rows: int, case: str) -> None:
    """Ids and scores as the first k of a stable sort of each whole row (equal scores in id order), both where
    exactly k columns reach the threshold (each row's best in k different strided groups: every row's own block)
    and where a row has more (two of its best in one group: padded)."""
    rng = np.random.default_rng(11)
    xs = _rows(11, rows, 8000)
    groups = 8000 // 8  # column c is in strided group c % groups
    for r in range(rows):  # the row's 50 best in 50 different groups, above every other score
        cols = rng.choice(groups, size=50, replace=False) + groups * rng.integers(0, 8, size=50)
        xs[r, cols] = xs[r].max() + 1.0 + rng.random(50).astype(np.float32)
        if case == "ties above the k-th":  # three of them equal, the best among them: id order decides
            xs[r, cols[:3]] = xs[r, cols].max()
    if case == "two of a row's best in one group":
        best = int(np.argmax(xs[0]))
        xs[0, (best + groups) % 8000] = xs[0, best] - 1e-3
    ids, scores = _top_k(xs, 50)
    want = np.argsort(-xs, axis=1, kind="stable")[:, :50]
    np.testing.assert_array_equal(ids, want)
    np.testing.assert_array_equal(scores, np.take_along_axis(xs, want, axis=1))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_penalties_over_the_batch_are_each_rows_own_bit_for_bit(dtype: type) -> None:
    """One pass over every row's seen tokens (repetition penalty) and early ends (min_new_tokens) leaves each row
    exactly as penalising it alone does, in the scores' own precision."""
    words = _Vocab(3000)
    rng = np.random.default_rng(5)
    logprobs = (rng.standard_normal((12, words.size)) * 3 - 9).astype(dtype)
    allowed = np.ones(words.size, dtype=bool)
    seqs = []
    for i in range(12):
        p = SamplingParams(temperature=1.0, repetition_penalty=[1.0, 1.1, 1.3, 2.0][i % 4],
                           min_new_tokens=5 if i % 6 == 0 else 0, max_new_tokens=50)
        seq = Sequence(i, [int(t) for t in rng.integers(3, words.size, 6)], p, 1, words, Metrics(), 0.0)
        for t in rng.integers(3, words.size, i % 5):
            seq.advance(int(t))
        seqs.append(seq)
    together = penalised(logprobs, allowed, seqs)
    for i, seq in enumerate(seqs):
        alone = penalised(logprobs[i:i + 1], allowed, [seq])
        assert together.dtype == alone.dtype
        np.testing.assert_array_equal(together[i].view(np.uint8), alone[0].view(np.uint8))
        if seq.p.repetition_penalty != 1.0:
            seen = sorted(seq.seen)
            np.testing.assert_array_equal(together[i, seen], logprobs[i, seen] * dtype(seq.p.repetition_penalty))
