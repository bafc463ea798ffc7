"""Sampling against an outside oracle: `choose`'s processed distribution equals Hugging Face's logits processors.

The generation module documents Hugging Face's order (repetition penalty, min_new_tokens, temperature, top-k,
top-p). Here `transformers`' own `RepetitionPenaltyLogitsProcessor`, `MinNewTokensLengthLogitsProcessor`,
`TemperatureLogitsWarper`, `TopKLogitsWarper` and `TopPLogitsWarper` process the same random log-probabilities,
and the distribution `choose` draws from (`penalised` then `nucleus`, the pure steps it runs) must have the same
support and probabilities within 1e-6. Then a seeded chi-square test checks that the tokens `choose` actually
draws follow that distribution.

Ties are kept out on purpose (continuous random scores): on a tie at the k-th place HF keeps every tied token
while `choose` keeps exactly k, and a top-p boundary that falls within rounding of a cumulative sum is skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from plm.service.generation.sequence import SamplingParams, Sequence, choose, nucleus, penalised
from plm.service.metrics import Metrics

hypothesis = pytest.importorskip("hypothesis")
st = pytest.importorskip("hypothesis.strategies")
torch = pytest.importorskip("torch")
generation = pytest.importorskip("transformers.generation.logits_process")
stats = pytest.importorskip("scipy.stats")

EOS = 0
# A token whose probability is below this is outside the support: `choose` draws from a running sum, where a
# probability under the sum's rounding (about 1e-16 of it) adds nothing and can never be drawn, while a softmax
# still shows it.
SUPPORT_FLOOR = 1e-12


@dataclass
class _Vocab:
    """A vocabulary of one-letter tokens; id 0 ends the text."""

    size: int
    name: str = "oracle"
    eos_id: int = EOS

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(97 + i % 26) for i in ids)

    def token_bytes(self) -> list[bytes] | None:
        return [bytes([97 + i % 26]) for i in range(self.size)]


def _sequence(p: SamplingParams, prompt: list[int], generated: list[int], vocab: _Vocab, seed: int = 0) -> Sequence:
    seq = Sequence(0, prompt, p, seed, vocab, Metrics(), 0.0)
    for t in generated:  # through the real path, so `seen` and `generated` are what a step loop leaves
        seq.advance(t)
    return seq


def ours(logprobs: np.ndarray, seq: Sequence) -> np.ndarray:
    """(V,) the probabilities `choose` draws the next token of `seq` from."""
    x = penalised(logprobs[None, :], np.ones(len(logprobs), dtype=bool), [seq])
    cand, cum, n = nucleus(x, seq.p.temperature, seq.p.top_k, seq.p.top_p)
    steps = np.diff(cum[0, :n[0]], prepend=0.0) / cum[0, n[0] - 1]
    probs = np.zeros(len(logprobs))
    probs[np.arange(n[0]) if cand is None else cand[0, :n[0]]] = steps
    return probs


def theirs(logprobs: np.ndarray, seq: Sequence) -> np.ndarray:
    """(V,) the same distribution through transformers' processors, in generate's order."""
    p = seq.p
    ids = torch.tensor([seq.prompt_ids + seq.generated], dtype=torch.long)
    scores = torch.tensor(logprobs[None, :], dtype=torch.float64)
    steps: list[object] = []
    if p.repetition_penalty != 1.0:
        steps.append(generation.RepetitionPenaltyLogitsProcessor(p.repetition_penalty))
    if p.min_new_tokens:
        steps.append(generation.MinNewTokensLengthLogitsProcessor(len(seq.prompt_ids), p.min_new_tokens, EOS))
    steps.append(generation.TemperatureLogitsWarper(p.temperature))
    if p.top_k:
        steps.append(generation.TopKLogitsWarper(p.top_k))
    if p.top_p < 1.0:
        steps.append(generation.TopPLogitsWarper(p.top_p))
    for step in steps:
        scores = step(ids, scores)  # type: ignore[operator]
    return torch.softmax(scores, dim=-1)[0].numpy()


def _random_logprobs(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    logits = rng.standard_normal(size) * scale
    return logits - np.logaddexp.reduce(logits)


def _near_top_p_boundary(logprobs: np.ndarray, seq: Sequence) -> bool:
    """Whether top_p lies within rounding of a cumulative sum of the tempered, top-k'd distribution."""
    p = seq.p
    if p.top_p >= 1.0:
        return False
    x = penalised(logprobs[None, :], np.ones(len(logprobs), dtype=bool), [seq])[0]
    x = np.sort(x)[::-1][:p.top_k or None] / p.temperature
    w = np.exp(x - x.max())
    return bool(np.abs(np.cumsum(w / w.sum()) - p.top_p).min() < 1e-9)


def test_the_processed_distribution_equals_transformers_processors() -> None:
    @hypothesis.settings(max_examples=300, deadline=None)
    @hypothesis.given(seed=st.integers(0, 2**32 - 1), size=st.integers(2, 80),
                      scale=st.floats(0.1, 6.0), temperature=st.floats(0.05, 5.0),
                      top_k=st.integers(0, 90), top_p=st.one_of(st.just(1.0), st.floats(0.01, 0.999)),
                      penalty=st.one_of(st.just(1.0), st.floats(1.01, 4.0)),
                      prompt_len=st.integers(1, 6), n_generated=st.integers(0, 5), min_new=st.integers(0, 6))
    def check(seed: int, size: int, scale: float, temperature: float, top_k: int, top_p: float, penalty: float,
              prompt_len: int, n_generated: int, min_new: int) -> None:
        rng = np.random.default_rng(seed)
        vocab = _Vocab(size)
        logprobs = _random_logprobs(rng, size, scale)
        p = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=penalty,
                           min_new_tokens=min_new, max_new_tokens=100)
        prompt = rng.integers(0, size, prompt_len).tolist()
        generated = rng.integers(1, size, n_generated).tolist() if size > 1 else []  # never the end token
        seq = _sequence(p, prompt, generated, vocab)
        hypothesis.assume(not _near_top_p_boundary(logprobs, seq))
        a, b = ours(logprobs, seq), theirs(logprobs, seq)
        support_a, support_b = a > SUPPORT_FLOOR, b > SUPPORT_FLOOR
        assert np.array_equal(support_a, support_b), \
            f"support differs: ours {np.flatnonzero(support_a)}, HF {np.flatnonzero(support_b)}"
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)

    check()


SETTINGS = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=6),
    SamplingParams(temperature=1.3, top_p=0.8, repetition_penalty=1.8),
    SamplingParams(temperature=0.9, top_k=10, top_p=0.9, repetition_penalty=1.3, min_new_tokens=4),
]


@pytest.mark.parametrize("p", SETTINGS, ids=["plain", "top-k", "top-p+penalty", "all"])
def test_sampled_tokens_follow_the_distribution(p: SamplingParams) -> None:
    """20 000 draws of `choose` against HF's distribution: a chi-square goodness of fit (bins with fewer than 5
    expected draws pooled), seeded so the verdict is the same every run; no draw outside the support."""
    size, draws = 16, 20_000
    rng = np.random.default_rng(18)
    vocab = _Vocab(size)
    logprobs = _random_logprobs(rng, size, 1.5)
    seq = _sequence(p, [3, 5, 7], [2, 5], vocab, seed=1234)
    expected = theirs(logprobs, seq)
    allowed = np.ones(size, dtype=bool)
    counts = np.bincount([choose(logprobs[None, :], allowed, [seq])[0] for _ in range(draws)], minlength=size)
    assert counts[expected == 0].sum() == 0, f"drawn outside the support: {np.flatnonzero(counts * (expected == 0))}"
    big = expected * draws >= 5
    observed = np.append(counts[big], counts[~big & (expected > 0)].sum())
    wanted = np.append(expected[big], expected[~big & (expected > 0)].sum()) * draws
    keep = wanted > 0
    result = stats.chisquare(observed[keep], wanted[keep] * observed[keep].sum() / wanted[keep].sum())
    print(f"{p}: chi2={result.statistic:.2f} over {keep.sum() - 1} dof, p={result.pvalue:.3f}")
    assert result.pvalue > 1e-3, f"sampled tokens do not follow the distribution: chi2={result.statistic:.1f}"
