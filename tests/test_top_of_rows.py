"""`top_of_rows` (one partition over a batch's blanks) must answer exactly what `top_of` answers row by row."""

from __future__ import annotations

import numpy as np
import pytest
from plm.service.families.base import top_of, top_of_rows


def _rows(rng: np.random.Generator, n: int, v: int) -> np.ndarray:
    """(n, v) float32 log-prob-like rows with the awkward cases planted: ties at and around the k-th value,
    whole tied rows, -inf entries, a row with fewer finite entries than k, a NaN."""
    rows = rng.normal(-8.0, 2.0, (n, v)).astype(np.float32)
    rows[1] = np.round(rows[1])  # many ties everywhere
    rows[2] = -3.0  # one value
    rows[3, : v - 3] = -np.inf  # three finite entries
    rows[4, rng.integers(0, v, 5)] = np.nan
    best = np.sort(rows[5])[::-1]
    rows[5, rng.integers(0, v, 3)] = best[4]  # ties with the 5th best
    rows[6, :] = -np.inf
    return rows


@pytest.mark.parametrize("v", [97, 1000])
@pytest.mark.parametrize("k", [1, 3, 5, 8, 50, 200])
def test_top_of_rows_equals_top_of_each_row(k: int, v: int) -> None:
    rng = np.random.default_rng(k)
    rows = _rows(rng, 12, v)
    for allowed in (np.ones(v, dtype=bool), rng.random(v) > 0.3, np.arange(v) < 4, np.zeros(v, dtype=bool)):
        got = top_of_rows(rows, allowed, k)
        assert len(got) == len(rows)
        for row, (ids, lps) in zip(rows, got, strict=True):
            want_ids, want_lps = top_of(row, allowed, k)
            assert ids.tolist() == want_ids.tolist()
            assert np.array_equal(lps, want_lps, equal_nan=True) and lps.dtype == want_lps.dtype


def test_top_of_rows_breaks_ties_by_the_lower_id() -> None:
    rows = np.array([[-1.0, -2.0, -1.0, -2.0, -1.0, -5.0]], dtype=np.float32)
    (ids, lps), = top_of_rows(rows, np.ones(6, dtype=bool), 2)
    assert ids.tolist() == [0, 2] and lps.tolist() == [-1.0, -1.0]
    (ids, _), = top_of_rows(rows, np.ones(6, dtype=bool), 4)
    assert ids.tolist() == [0, 2, 4, 1]


def test_top_of_rows_of_no_rows() -> None:
    assert top_of_rows(np.zeros((0, 5), dtype=np.float32), np.ones(5, dtype=bool), 3) == []


def test_a_batchs_blanks_are_grouped_by_their_own_mask_and_k() -> None:
    """BERT's batch worker groups blanks by allowed mask (the same array, or an equal copy) and k: each row must
    still get `top_of` of its own rows under its own mask and k."""
    from plm.service.families.bert import _batch_tops, _Row

    rng = np.random.default_rng(3)
    v = 200
    mlp = rng.normal(-5.0, 2.0, (5, 2, v)).astype(np.float32)  # (B, M, V)
    shared = rng.random(v) > 0.2
    other = shared.copy()
    other[np.argsort(-mlp[3, 0])[:4]] = False  # a different mask: drops row 3's four best
    tops = [(shared, 5), (shared.copy(), 5), (other, 5), (other, 5), (shared, 3)]  # the same, equal, other, k
    rows = [_Row((1, 2, 3), (0, 0, 0), (1, 2), False, False, top) for top in tops]
    got = _batch_tops(rows, mlp)
    for i, (allowed, k) in enumerate(tops):
        assert len(got[i]) == 2
        for b, (ids, lps) in enumerate(got[i]):
            want_ids, want_lps = top_of(mlp[i, b], allowed, k)
            assert ids.tolist() == want_ids.tolist() and np.array_equal(lps, want_lps), (i, b)
