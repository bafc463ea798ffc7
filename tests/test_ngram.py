"""n-gram models: KenLM and NLTK as outside oracles, normalisation, file round-trips and bad files.

The corpus is generated here (a tiny Zipfian grammar), so the tests do not depend on the corpus module.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from nltk.lm import Laplace, Vocabulary
from nltk.util import everygrams
from plm.models.ngram import FALLBACK_DISCOUNTS, KneserNeyLM, LaplaceLM, count_ngrams, perplexity
from plm.service.families.ngram_scorer import LaplaceNgramModel, NgramModel

SYLLABLES = ["ba", "ko", "mi", "ta", "ru", "se", "lo", "ne", "pi", "da"]


def _words(prefix: str, n: int) -> list[str]:
    return [prefix + SYLLABLES[i % 10] + SYLLABLES[i // 10 % 10] for i in range(n)]


NOUNS, VERBS, ADJS = _words("n", 80), _words("v", 40), _words("j", 30)
DETS = ["the", "a", "this", "that", "every", "some"]
PREPS = ["with", "near", "under", "for"]


def _sentences(n: int, seed: int) -> list[list[str]]:
    """A tiny grammar with Zipf-weighted word choice: repeated heads and a long tail of rare words."""
    rng = random.Random(seed)

    def pick(words: list[str]) -> str:
        return rng.choices(words, weights=[1.0 / (i + 1) for i in range(len(words))])[0]

    out = []
    for _ in range(n):
        s = [pick(DETS)]
        if rng.random() < 0.5:
            s.append(pick(ADJS))
        s += [pick(NOUNS), pick(VERBS)]
        if rng.random() < 0.8:
            s += [pick(DETS), pick(NOUNS)]
        if rng.random() < 0.3:
            s += [pick(PREPS), pick(DETS), pick(NOUNS)]
        out.append(s)
    return out


TRAIN = _sentences(600, seed=1)
# Held-out text: same grammar, new seed, plus words no model has seen (mapped to <unk>).
HELD_OUT = [*_sentences(60, seed=2), ["the", "zebra", "vbaba", "qwerty", "the", "nbaba"], [], ["zebra"]]
_freq = Counter(w for s in TRAIN for w in s)
# Rare training words are left out (they train <unk>); one vocabulary word never occurs in training.
VOCAB = ["<unk>", "<s>", "</s>", *sorted(w for w, c in _freq.items() if c >= 2), "neverseen"]
CONTEXTS = [
    [],
    ["the"],
    ["the", NOUNS[0]],
    [DETS[1], NOUNS[2], VERBS[0]],
    ["zebra"],
    ["neverseen"],
    ["qq", "zz"],
]


@pytest.fixture(scope="module")
def kenlm() -> ModuleType:
    """KenLM's Python module (compiled at install time; the KenLM oracle tests skip without it)."""
    return pytest.importorskip("kenlm")


@pytest.fixture(scope="module")
def kn3() -> KneserNeyLM:
    return KneserNeyLM.train(TRAIN, VOCAB, order=3)


def _arpa(tmp_path: Path, lm: KneserNeyLM) -> Path:
    path = tmp_path / f"kn{lm.counts.order}.arpa"
    lm.write_arpa(path)
    return path


def test_corpus_exercises_modified_kneser_ney(kn3: KneserNeyLM) -> None:
    # Every order has n1..n4 > 0, so its discounts are estimated rather than the fallback ones.
    assert all(min(n) > 0 for n in kn3.count_of_counts), kn3.count_of_counts
    assert kn3.fallback_orders == ()
    for d1, d2, d3 in kn3.discounts:
        assert 0 < d1 <= 1 < d2 <= 2 and 0 < d3 <= 3


def test_counts_of_a_known_sentence() -> None:
    counts = count_ngrams([["a", "b", "a"], ["a", "x"]], ["<unk>", "<s>", "</s>", "a", "b"], order=3)
    grams = {k: dict(zip(counts.ngram_strings(k), counts.count[k - 1].tolist(), strict=True)) for k in (1, 2, 3)}
    assert grams[1] == {"<unk>": 1, "<s>": 2, "</s>": 2, "a": 3, "b": 1}
    assert grams[2] == {"<s> a": 2, "a b": 1, "b a": 1, "a </s>": 1, "a <unk>": 1, "<unk> </s>": 1}
    assert grams[3] == {"<s> a b": 1, "a b a": 1, "b a </s>": 1, "<s> a <unk>": 1, "a <unk> </s>": 1}


@pytest.mark.parametrize("order", [2, 3, 4])
def test_kenlm_scores_our_arpa_like_we_do(tmp_path: Path, order: int, kenlm: ModuleType) -> None:
    lm = KneserNeyLM.train(TRAIN, VOCAB, order=order)
    path = _arpa(tmp_path, lm)
    ours = NgramModel.load_arpa(path)
    ref = kenlm.Model(str(path))
    assert ref.order == ours.order == order
    for sentence in HELD_OUT:
        text = " ".join(sentence)
        expected = list(ref.full_scores(text))
        got = ours.score_words(sentence)
        assert len(got) == len(expected) == len(sentence) + 1
        for (p_ref, n_ref, _oov), (p, n) in zip(expected, got, strict=True):
            assert p == pytest.approx(p_ref, abs=1e-4)
            assert n == n_ref
        assert ref.score(text) == pytest.approx(sum(p for p, _ in got), abs=1e-4)
        # Without sentence boundaries too.
        no_bounds = list(ref.full_scores(text, bos=False, eos=False))
        got = ours.score_words(sentence, bos=False, eos=False)
        assert [n for _, n, _ in no_bounds] == [n for _, n in got]
        assert [p for p, _, _ in no_bounds] == pytest.approx([p for p, _ in got], abs=1e-4)


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_kneser_ney_sums_to_one(tmp_path: Path, order: int) -> None:
    lm = KneserNeyLM.train(TRAIN, VOCAB, order=order)
    in_memory, from_file = lm.to_model(), NgramModel.load_arpa(_arpa(tmp_path, lm))
    for context in CONTEXTS:
        for model, tol in ((in_memory, 1e-9), (from_file, 1e-6)):
            log10p = model.next_log10probs(context)
            assert log10p.shape == (len(VOCAB),)
            assert log10p[model.word_to_id["<s>"]] == -np.inf
            assert np.power(10.0, log10p).sum() == pytest.approx(1.0, abs=tol)


def test_next_log10probs_agrees_with_score_words(kn3: KneserNeyLM, tmp_path: Path) -> None:
    laplace = LaplaceLM.train(TRAIN, VOCAB, order=3).to_model()
    for model in (kn3.to_model(), NgramModel.load_arpa(_arpa(tmp_path, kn3)), laplace):
        for sentence in HELD_OUT[:10] + HELD_OUT[-3:]:
            scores = model.score_words(sentence)
            for i, word in enumerate([*sentence, "</s>"]):
                dist = model.next_log10probs(sentence[:i])
                wid = model.word_to_id.get(word, model.unk_id)
                assert dist[wid] == pytest.approx(scores[i][0], abs=1e-12)


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_next_top_is_the_top_of_the_whole_distribution(tmp_path: Path, order: int) -> None:
    """The backoff model's top-k without building the (V,) distribution (service/families/ngram_scorer.py)
    gives the same ids and bit-equal log-probs as sorting `next_log10probs`, for seen, unseen and unknown
    histories and any mask."""
    kn = KneserNeyLM.train(TRAIN, VOCAB, order=order)
    models = [NgramModel.load_arpa(_arpa(tmp_path, kn)), LaplaceLM.train(TRAIN, VOCAB, order=order).to_model()]
    rng = random.Random(order)
    for model in models:
        size = len(model.vocab)
        for trial in range(150):
            history = HELD_OUT[trial % len(HELD_OUT)][: rng.randint(0, 5)] + (["zzunseen"] if trial % 7 == 0 else [])
            allowed = np.ones(size, dtype=bool) if trial % 2 else np.array([rng.random() < 0.7 for _ in range(size)])
            k = rng.choice([1, 5, 30, size])
            ids, log10 = model.next_top(history, allowed, k)
            dense = np.where(allowed, model.next_log10probs(history), -np.inf)
            best = np.lexsort((np.arange(size), -dense))[: min(k, int(np.isfinite(dense).sum()))]
            assert log10.tolist() == dense[best].tolist()
            assert ids.tolist() == best.tolist()
            assert model.bos_id not in ids.tolist()


def test_unk_and_unseen_words_get_the_uniform_share(kn3: KneserNeyLM) -> None:
    model = kn3.to_model()
    unigram = 10 ** model.next_log10probs([], bos=False)
    (d1, d2, d3), a = kn3.discounts[0], kn3.adjusted[0]
    gamma = (d1 * (a == 1).sum() + d2 * (a == 2).sum() + d3 * (a >= 3).sum()) / a.sum()
    uniform = gamma / (len(VOCAB) - 1)  # the vocabulary without <s>
    assert unigram[model.word_to_id["neverseen"]] == pytest.approx(uniform, rel=1e-12)
    assert unigram[model.unk_id] > uniform  # rare training words were mapped to <unk>


def test_degenerate_counts_fall_back_without_nan(tmp_path: Path, kenlm: ModuleType) -> None:
    lm = KneserNeyLM.train([["a", "b"], ["a", "c"]], ["<unk>", "<s>", "</s>", "a", "b", "c"], order=3)
    assert lm.fallback_orders == (1, 2, 3)
    assert lm.discounts == (FALLBACK_DISCOUNTS,) * 3
    assert all(np.isfinite(p).all() for p in lm.probs)
    path = _arpa(tmp_path, lm)
    model, ref = NgramModel.load_arpa(path), kenlm.Model(str(path))
    for context in ([], ["a"], ["a", "b"], ["x"]):
        assert np.power(10.0, model.next_log10probs(context)).sum() == pytest.approx(1.0, abs=1e-6)
    for sentence in (["a", "b"], ["a", "x", "c"], ["c", "a"]):
        expected = [p for p, _, _ in ref.full_scores(" ".join(sentence))]
        assert [p for p, _ in model.score_words(sentence)] == pytest.approx(expected, abs=1e-4)


def _nltk_laplace(order: int) -> Laplace:
    """nltk.lm.Laplace configured with our vocabulary and our padding (see LaplaceLM's docstring)."""
    # <unk> is NLTK's own unk_label: passing it as a word too would count it twice in len(vocab).
    vocab = Vocabulary([w for w in VOCAB if w != "<unk>"], unk_cutoff=1, unk_label="<unk>")
    assert len(vocab) == len(VOCAB)
    lm = Laplace(order, vocabulary=vocab)
    lm.fit([g for g in everygrams(["<s>", *s, "</s>"], max_len=order) if g != ("<s>",)] for s in TRAIN)
    return lm


@pytest.mark.parametrize("order", [1, 2, 3])
def test_laplace_equals_nltk(tmp_path: Path, order: int) -> None:
    lm = LaplaceLM.train(TRAIN, VOCAB, order=order)
    path = tmp_path / "laplace.counts"
    lm.write_counts(path)
    loaded, in_memory = NgramModel.load_counts(path), lm.to_model()
    ref = _nltk_laplace(order)
    log2_10 = math.log2(10.0)
    for sentence in HELD_OUT:
        tokens = ["<s>", *sentence, "</s>"]
        expected = [ref.logscore(tokens[i], tokens[max(0, i - order + 1) : i]) for i in range(1, len(tokens))]
        for model in (loaded, in_memory):
            scored = model.score_words(sentence)
            assert [p * log2_10 for p, _ in scored] == pytest.approx(expected, abs=1e-9)
            assert [n for _, n in scored] == [min(i, order - 1) + 1 for i in range(1, len(tokens))]


def test_counts_round_trip(tmp_path: Path) -> None:
    lm = LaplaceLM.train(TRAIN, VOCAB, order=3)
    path = tmp_path / "laplace.counts"
    lm.write_counts(path)
    loaded, in_memory = NgramModel.load_counts(path), lm.to_model()
    assert loaded.vocab == VOCAB and loaded.order == 3 and loaded.kind == "laplace"
    for context in CONTEXTS:
        np.testing.assert_array_equal(loaded.next_log10probs(context), in_memory.next_log10probs(context))
    # Every count survives the trip, not just the ones these contexts reach.
    assert isinstance(loaded, LaplaceNgramModel) and isinstance(in_memory, LaplaceNgramModel)
    np.testing.assert_array_equal(loaded.unigram_counts, in_memory.unigram_counts)
    for a, b in zip(loaded.orders, in_memory.orders, strict=True):
        assert a.index == b.index
        np.testing.assert_array_equal(a.words, b.words)
        np.testing.assert_array_equal(a.values[0], b.values[0])


def test_kneser_ney_beats_laplace_on_held_out(kn3: KneserNeyLM) -> None:
    held_out = HELD_OUT[:60]
    kn = perplexity(kn3.to_model(), held_out)
    add_one = perplexity(LaplaceLM.train(TRAIN, VOCAB, order=3).to_model(), held_out)
    assert 1.0 < kn < add_one


def test_perplexity_matches_kenlm(kn3: KneserNeyLM, tmp_path: Path, kenlm: ModuleType) -> None:
    ref = kenlm.Model(str(_arpa(tmp_path, kn3)))
    sentence = HELD_OUT[0]
    assert perplexity(kn3.to_model(), [sentence]) == pytest.approx(ref.perplexity(" ".join(sentence)), rel=1e-4)


GOOD_ARPA = """\\data\\
ngram 1=4
ngram 2=2

\\1-grams:
-1.0\t<unk>\t0
-99\t<s>\t-0.5
-0.5\t</s>
-0.3\ta\t-0.2

\\2-grams:
-0.2\t<s> a
-0.1\ta </s>

\\end\\
"""


def test_small_handwritten_arpa_loads(tmp_path: Path) -> None:
    path = tmp_path / "ok.arpa"
    path.write_text(GOOD_ARPA)
    model = NgramModel.load_arpa(path)
    assert model.vocab == ["<unk>", "<s>", "</s>", "a"] and model.order == 2
    assert model.score_words(["a"]) == [(-0.2, 2), (-0.1, 2)]
    assert model.score_words(["b"])[0] == pytest.approx((-1.5, 1))  # bo(<s>) + p(<unk>)


@pytest.mark.parametrize(
    ("mutate", "line", "message"),
    [
        (lambda t: t.replace("\\end\\\n", ""), 14, "end of file"),
        (lambda t: t[: t.index("-0.1\ta </s>")], 12, "fewer lines"),
        (lambda t: t.replace("ngram 2=2", "ngram 2=3"), 14, "fewer lines"),
        (lambda t: t.replace("ngram 1=4", "ngram 1=3"), 9, "more 1-grams"),
        (lambda t: t.replace("-0.3\ta", "minus\ta"), 9, "not a number"),
        (lambda t: t.replace("-0.2\t<s> a", "-0.2\t<s> b"), 12, "not a unigram"),
        (lambda t: t.replace("-0.2\t<s> a", "-0.2\t<s>"), 12, "needs 2 words"),
        (lambda t: t.replace("\\data\\", "data"), 1, "expected \\data\\"),
        (lambda t: t.replace("\\2-grams:", "\\3-grams:"), 11, "expected \\2-grams:"),
    ],
)
def test_corrupt_arpa_names_file_and_line(tmp_path: Path, mutate: object, line: int, message: str) -> None:
    path = tmp_path / "bad.arpa"
    path.write_text(mutate(GOOD_ARPA))  # type: ignore[operator]
    with pytest.raises(ValueError, match=rf"bad\.arpa:{line}: .*{re.escape(message)}"):
        NgramModel.load_arpa(path)


def test_corrupt_counts_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.counts"
    LaplaceLM.train(TRAIN[:5], VOCAB, order=2).write_counts(path)
    lines = path.read_text().split("\n")
    lines[3] = lines[3].split("\t")[0] + "\tmany"
    path.write_text("\n".join(lines))
    with pytest.raises(ValueError, match=r"bad\.counts:4: .*not a non-negative integer"):
        NgramModel.load_counts(path)
    path.write_text("hello\n")
    with pytest.raises(ValueError, match=r"bad\.counts:1: .*not a plm n-gram counts file"):
        NgramModel.load_counts(path)
