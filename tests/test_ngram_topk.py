"""The backoff n-gram top-k (`BackoffNgramModel.next_top_ids`) against a brute-force top of the whole vocabulary.

The brute force scores every vocabulary word after the context with `score_words` (KenLM's query walk, which
the oracle tests hold to KenLM) and sorts: the top-k must give the same ids, bit-equal log10 probabilities,
ties by lower id, `<s>` never, only allowed words, and every allowed word when k exceeds them.
"""

from __future__ import annotations

from pathlib import Path

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest
from plm.models.ngram import KneserNeyLM
from plm.service.families.ngram_scorer import BackoffNgramModel, NgramModel

from tests.test_ngram import TRAIN, VOCAB


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[int, NgramModel]:
    folder, out = tmp_path_factory.mktemp("topk"), {}
    for order in (1, 2, 3, 4):
        path = folder / f"kn{order}.arpa"
        KneserNeyLM.train(TRAIN, VOCAB, order=order).write_arpa(path)
        out[order] = NgramModel.load_arpa(path)
    return out


def _brute_force(model: NgramModel, context: list[int], allowed: np.ndarray, k: int) -> tuple[list[int], list[float]]:
    words = [model.vocab[i] for i in context]
    scored = [(model.score_words([*words, w], eos=False)[-1][0], i) for i, w in enumerate(model.vocab)
              if allowed[i] and i != model.bos_id]
    best = sorted(scored, key=lambda s: (-s[0], s[1]))[:k]
    return [i for _, i in best], [v for v, _ in best]


_V = len(VOCAB)
# Histories mix frequent words (listed continuations), rare ones, <unk>, </s> and <s>.
_CONTEXT = st.lists(st.one_of(st.integers(0, 12), st.integers(0, _V - 1)), max_size=5)


def _only(ids: list[int]) -> np.ndarray:
    mask = np.zeros(_V, dtype=bool)
    mask[ids] = True
    return mask


_MASK = st.one_of(
    st.just(np.ones(_V, dtype=bool)),
    st.lists(st.booleans(), min_size=_V, max_size=_V).map(lambda m: np.array(m, dtype=bool)),
    st.lists(st.integers(0, _V - 1), max_size=6).map(_only),  # a few allowed words: the walk gives up early
)


@hypothesis.settings(max_examples=400, deadline=None,
                     suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])
@hypothesis.given(order=st.integers(1, 4), context=_CONTEXT, mask=_MASK,
                  k=st.one_of(st.integers(1, 12), st.integers(13, 40), st.integers(_V - 3, _V + 5)))
def test_top_k_equals_the_brute_force_top(models: dict[int, NgramModel], order: int, context: list[int],
                                          mask: np.ndarray, k: int) -> None:
    model = models[order]
    allowed, before = mask.copy(), mask.copy()
    ids, log10 = model.next_top_ids(context, allowed, k)
    want_ids, want_log10 = _brute_force(model, context, allowed, k)
    assert ids.tolist() == want_ids
    assert log10.tolist() == want_log10  # bit-equal, not approximately
    assert ids.dtype == np.int64 and log10.dtype == np.float64
    assert (allowed == before).all()  # the caller's mask is left alone


def test_repeated_context_gives_the_same_answer(models: dict[int, NgramModel]) -> None:
    """The second call reads the cached continuations of the first."""
    model = models[3]
    allowed = np.ones(_V, dtype=bool)
    context = model.ids(["the", "nbaba"])
    first = model.next_top_ids(context, allowed, 5)
    second = model.next_top_ids(context, allowed, 5)
    assert first[0].tolist() == second[0].tolist() and first[1].tolist() == second[1].tolist()
    assert first[0].tolist() == _brute_force(model, context, allowed, 5)[0]


# `a` is a hair less likely than `b` alone, but after the backoff of `c` both round to the same value: the tie
# goes to the lower id, `a`, although `b` comes first in the walk. After `d`, `b` is listed with exactly the
# value that `a` gets from its unigram and the backoff: a tie between two streams, again `a`'s.
TIE_ARPA = """\\data\\
ngram 1=7
ngram 2=2

\\1-grams:
-1.0\t<unk>\t0
-99\t<s>\t0
-2.0\t</s>
-0.5000000000000001\ta\t0
-0.5\tb\t0
-2.0\tc\t-3.0
-2.0\td\t-3.0

\\2-grams:
-0.1\t<s> c
-3.5\td b

\\end\\
"""


def test_a_tie_made_by_rounding_goes_to_the_lower_id(tmp_path: Path) -> None:
    path = tmp_path / "tie.arpa"
    path.write_text(TIE_ARPA)
    model = NgramModel.load_arpa(path)
    assert isinstance(model, BackoffNgramModel)
    a, b = model.word_to_id["a"], model.word_to_id["b"]
    assert a < b and model.unigram_log10[a] < model.unigram_log10[b]
    allowed = np.ones(len(model.vocab), dtype=bool)
    for context in (["c"], ["d"]):
        ids, log10 = model.next_top_ids(model.ids(context), allowed, 1)
        assert ids.tolist() == [a] and log10.tolist() == [-3.5], context
        assert ids.tolist() == _brute_force(model, model.ids(context), allowed, 1)[0]


@pytest.mark.parametrize("repository", ["tiny", "default"])
def test_a_built_models_top_equals_the_dense_top(repository: str, request: pytest.FixtureRequest) -> None:
    """A built `ngram-kn` (the tests' tiny repository, always; the default `repository/` where it was built): a few
    served contexts against the dense distribution over its whole vocabulary."""
    folder = (request.getfixturevalue("tiny_repo") if repository == "tiny"
              else Path(__file__).resolve().parents[1] / "repository")
    path = folder / "ngram-kn" / "model.arpa"
    if not path.exists():
        pytest.skip("no default repository built here (`make serve` builds it)")
    model = NgramModel.load_arpa(path)
    allowed = np.ones(len(model.vocab), dtype=bool)
    for special in ("<s>", "<unk>", "</s>"):
        allowed[model.word_to_id[special]] = False
    for text in ("the king is", "to be or not to", "what light through yonder", ""):
        context = model.ids(text.split())
        ids, log10 = model.next_top_ids(context, allowed, 10)
        dense = np.where(allowed, model.next_log10probs(text.split()), -np.inf)
        best = np.lexsort((np.arange(len(dense)), -dense))[:10]
        assert ids.tolist() == best.tolist() and log10.tolist() == dense[best].tolist()
