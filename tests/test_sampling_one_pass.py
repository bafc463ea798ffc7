"""`nucleus` over rows with their own temperature, top-k and top-p at once (one pass, as `choose` runs every
sampled row of a kind of candidates) gives each row what it gets alone: candidates, running sums and nucleus."""

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
    candidates,
    choose,
    nucleus,
)
from plm.service.metrics import Metrics


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


@dataclass
class _Vocab:
    size: int
    name: str = "one-pass"
    eos_id: int = 2

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(97 + i % 26) for i in ids)

    def token_bytes(self) -> list[bytes] | None:
        return [bytes([97 + i % 26]) for i in range(self.size)]


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
