"""Top-p without top-k (`nucleus`): the candidates, their running sums and the nucleus size must be those of a
stable sort over every column, on peaked and flat rows, with ties broken by id as that sort breaks them. A
selection cheaper than the sort (a growing prefix of each row's best tokens, say) must keep these."""

from __future__ import annotations

import numpy as np
import pytest
from plm.service.generation.sequence import nucleus


def _by_full_sort(xs: np.ndarray, temperature: float, top_p: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The reference: every column sorted (stable), cumulative mass over all of them, top-p's cut."""
    cand = np.argsort(-xs, axis=1, kind="stable")
    v = np.take_along_axis(xs, cand, axis=1).astype(np.float64) / temperature
    cum = np.cumsum(np.exp(v - v.max(axis=1, keepdims=True)), axis=1)
    n = np.minimum((cum < top_p * cum[:, -1:]).sum(axis=1) + 1, cum.shape[1])
    return cand, cum, n


@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("scale", [0.05, 1.0, 4.0, 12.0])  # flat (the prefix grows to every column) to peaked
@pytest.mark.parametrize("top_p", [0.3, 0.9, 0.99])
def test_top_p_nucleus_equals_a_full_sort(rows: int, scale: float, top_p: float) -> None:
    rng = np.random.default_rng(rows * 1000 + int(scale * 10) + int(top_p * 100))
    vocab = 4096
    logits = rng.standard_normal((rows, vocab)) * scale
    xs = (logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)).astype(np.float32)
    xs[:, 7] = -np.inf  # a disallowed token
    temperature = 0.8
    cand, cum, n = nucleus(xs, temperature, 0, top_p)
    ref_cand, ref_cum, ref_n = _by_full_sort(xs, temperature, top_p)
    assert cand is not None
    np.testing.assert_array_equal(n, ref_n)
    for i in range(rows):
        k = n[i]
        np.testing.assert_array_equal(cand[i, :k], ref_cand[i, :k])
        np.testing.assert_allclose(cum[i, :k], ref_cum[i, :k], rtol=1e-12)


def test_ties_in_the_nucleus_are_broken_by_id() -> None:
    xs = np.full((4, 1000), -20.0, dtype=np.float32)
    xs[:, [900, 5, 300, 42]] = -1.0  # four equal best tokens, out of id order
    cand, _, n = nucleus(xs, 1.0, 0, 0.4)  # 2 of the 4 reach 0.4 of the mass
    assert cand is not None
    assert list(n) == [2, 2, 2, 2]
    assert cand[:, :4].tolist() == [[5, 42, 300, 900]] * 4
