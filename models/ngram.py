"""n-gram language models, training side: counting, interpolated modified Kneser-Ney, Laplace.

This module owns turning word-tokenised sentences into an n-gram model file:

- `count_ngrams` counts every n-gram of orders 1..N (numpy, sort-based; 1M words in one or two seconds);
- `KneserNeyLM` estimates interpolated modified Kneser-Ney with the formulas of KenLM's `lmplz` and writes
  it as an ARPA file that KenLM loads and scores identically to the served `NgramModel`;
- `LaplaceLM` is add-one smoothing as in the study notes (and as `nltk.lm.Laplace`), saved as a plain-text
  counts file;
- `perplexity` evaluates either on held-out sentences.

Conventions shared by both models. Each sentence is padded as `<s> w1 ... wn </s>`: one `<s>`, like KenLM
and SRILM, so an n-gram never starts before `<s>`; `<s>` is only ever a context, never predicted. Words
outside the vocabulary are mapped to `<unk>` before counting, so `<unk>` is an ordinary word of the model.
The file formats are the repository contract's (`service/contract/ngram_format.py`, which reads and writes
them); scoring is the serving side's job (`service/families/ngram_scorer.py`, numpy only), which this module
reuses for evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt
from plm.service.contract import ngram_format
from plm.service.contract.ngram_format import BOS, EOS, UNK
from plm.service.families.ngram_scorer import BackoffNgramModel, LaplaceNgramModel, NgramModel

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]

# lmplz's --discount_fallback default: used for an order whose count-of-counts cannot give discounts
# (tiny or artificial data), instead of failing or producing NaN.
FALLBACK_DISCOUNTS = (0.5, 1.0, 1.5)
# log10 of an impossible event, as lmplz writes for <s> (ARPA has no portable spelling of -inf).
LOG10_ZERO = -99.0


@dataclass(frozen=True, eq=False)
class NgramCounts:
    """Raw counts of all n-grams of orders 1..N, stored as a trie of sorted arrays.

    Order k (index k-1 of every tuple) has n_k distinct n-grams, sorted lexicographically by word ids; an
    n-gram is identified by its row. Order 1 has one row per vocabulary word (row = word id), including
    words never seen (count 0); the count of `<s>` is the number of sentences (SRILM's convention).
    """

    order: int
    vocab: tuple[str, ...]
    num_sentences: int
    prefix: tuple[IntArray, ...]  # (n_k,) row of the first k-1 words in order k-1 (-1 for k = 1)
    word: tuple[IntArray, ...]  # (n_k,) id of the last word
    count: tuple[IntArray, ...]  # (n_k,) raw count
    suffix: tuple[IntArray, ...]  # (n_k,) row of the last k-1 words in order k-1 (-1 for k = 1)

    @property
    def bos_id(self) -> int:
        return self.vocab.index(BOS)

    @property
    def eos_id(self) -> int:
        return self.vocab.index(EOS)

    @property
    def unk_id(self) -> int:
        return self.vocab.index(UNK)

    def num_ngrams(self, k: int) -> int:
        return len(self.word[k - 1])

    def ngram_ids(self, k: int) -> IntArray:
        """(n_k, k) word ids of every n-gram of order k, in row order (lexicographically sorted)."""
        ids = self.word[0][:, None]
        for j in range(1, k):
            ids = np.concatenate([ids[self.prefix[j]], self.word[j][:, None]], axis=1)
        return ids

    def first_word(self, k: int) -> IntArray:
        """(n_k,) id of the first word of every n-gram of order k."""
        first = self.word[0]
        for j in range(1, k):
            first = first[self.prefix[j]]
        return first

    def ngram_strings(self, k: int) -> list[str]:
        """The n-grams of order k as space-joined words, in row order."""
        strings = [self.vocab[i] for i in self.word[0].tolist()]
        for j in range(1, k):
            strings = [
                strings[p] + " " + self.vocab[w]
                for p, w in zip(self.prefix[j].tolist(), self.word[j].tolist(), strict=True)
            ]
        return strings


def _check_vocab(vocab: Sequence[str]) -> tuple[str, ...]:
    words = tuple(vocab)
    missing = [s for s in (UNK, BOS, EOS) if s not in words]
    if missing:
        raise ValueError(f"the vocabulary lacks the special word(s) {missing}")
    if len(set(words)) != len(words):
        raise ValueError("the vocabulary has duplicate words")
    # The counts and ARPA files separate words by whitespace, so a word cannot contain any.
    bad = [w for w in words if not w or len(w.split()) != 1]
    if bad:
        raise ValueError(f"vocabulary words must be non-empty and contain no whitespace: {bad[:5]!r}")
    return words


def count_ngrams(sentences: Iterable[Sequence[str]], vocab: Sequence[str], order: int = 3) -> NgramCounts:
    """Count every n-gram of orders 1..`order` of the padded sentences `<s> w1 ... wn </s>`.

    Words not in `vocab` are counted as `<unk>`. A sentence may be empty (it contributes `<s> </s>`), but
    may not contain `<s>` or `</s>` itself (lmplz refuses those too: they would break the padding).
    """
    if order < 1:
        raise ValueError(f"order must be >= 1, got {order}")
    words = _check_vocab(vocab)
    w2id = {w: i for i, w in enumerate(words)}
    vsize = len(words)
    bos, eos, unk = w2id[BOS], w2id[EOS], w2id[UNK]

    tokens: list[int] = []
    lengths: list[int] = []
    for n, sentence in enumerate(sentences):
        ids = [w2id.get(w, unk) for w in sentence]
        if bos in ids or eos in ids:
            raise ValueError(f"sentence {n} contains {BOS} or {EOS}; they are only padding")
        tokens.append(bos)
        tokens.extend(ids)
        tokens.append(eos)
        lengths.append(len(ids) + 2)
    toks = np.asarray(tokens, dtype=np.int64)  # (T,)
    lens = np.asarray(lengths, dtype=np.int64)  # (S,)
    # end[i]: one past the last token of the sentence holding token i; a window of k tokens starting at
    # i stays inside its sentence iff i + k <= end[i].
    end = np.repeat(np.cumsum(lens), lens)
    pos = np.arange(len(toks), dtype=np.int64)

    unigram = np.bincount(toks, minlength=vsize).astype(np.int64)
    prefixes = [np.full(vsize, -1, dtype=np.int64)]
    last = [np.arange(vsize, dtype=np.int64)]
    counts = [unigram]
    suffixes = [np.full(vsize, -1, dtype=np.int64)]
    # window_row[i]: row (in the current order) of the window starting at token i; -1 where none fits.
    window_row = toks.copy()
    for k in range(2, order + 1):
        starts = np.flatnonzero(pos + k <= end)
        # An n-gram is (row of its first k-1 words, last word); the packed key sorts like the n-gram.
        keys = window_row[starts] * vsize + toks[starts + k - 1]
        uniq, inverse, cnt = np.unique(keys, return_inverse=True, return_counts=True)
        prefix, word = uniq // vsize, uniq % vsize
        if k == 2:
            suffix = word.copy()  # a unigram's row is its word id
        else:
            # The suffix of (prefix, w) is (suffix of prefix, w): look it up among order k-1's keys.
            lower_keys = prefixes[-1] * vsize + last[-1]
            wanted = suffixes[-1][prefix] * vsize + word
            suffix = np.searchsorted(lower_keys, wanted)
            # Every n-gram's suffix occurs in the text, so the lookup cannot miss.
            assert np.array_equal(lower_keys[suffix], wanted), "n-gram suffix missing from lower order"
        window_row = np.full(len(toks), -1, dtype=np.int64)
        window_row[starts] = inverse.reshape(-1)
        prefixes.append(prefix)
        last.append(word)
        counts.append(cnt.astype(np.int64))
        suffixes.append(suffix)
    return NgramCounts(
        order=order,
        vocab=words,
        num_sentences=len(lengths),
        prefix=tuple(prefixes),
        word=tuple(last),
        count=tuple(counts),
        suffix=tuple(suffixes),
    )


def kn_discounts(adjusted: IntArray) -> tuple[tuple[int, int, int, int], tuple[float, float, float], bool]:
    """Count-of-counts n1..n4 of one order's adjusted counts and the discounts D1, D2, D3+ from them.

    Chen & Goodman eq. 26, as lmplz: `Y = n1 / (n1 + 2 n2)`, `D_k = k - (k + 1) Y n_{k+1} / n_k`. Like
    lmplz, an order with n1, n2 or n3 = 0, or a discount outside [0, k], gets `FALLBACK_DISCOUNTS` (the
    returned flag says so) rather than a division by zero.
    """
    small = adjusted[(adjusted >= 1) & (adjusted <= 4)]
    n = np.bincount(small, minlength=5)
    n1, n2, n3, n4 = (int(x) for x in n[1:5])
    if min(n1, n2, n3) == 0:
        return (n1, n2, n3, n4), FALLBACK_DISCOUNTS, True
    y = n1 / (n1 + 2.0 * n2)
    d = (1 - 2 * y * n2 / n1, 2 - 3 * y * n3 / n2, 3 - 4 * y * n4 / n3)
    if any(not 0.0 <= dk <= k for k, dk in enumerate(d, start=1)):
        return (n1, n2, n3, n4), FALLBACK_DISCOUNTS, True
    return (n1, n2, n3, n4), d, False


def _log10(p: FloatArray) -> FloatArray:
    with np.errstate(divide="ignore"):
        return np.maximum(np.log10(p), LOG10_ZERO)


class KneserNeyLM:
    """Interpolated modified Kneser-Ney (Chen & Goodman 1998), the estimator of KenLM's `lmplz`.

    Adjusted counts a(.): raw counts at the highest order; at lower orders the number of distinct words
    seen before the n-gram (continuation counts), except for n-grams starting with `<s>`, which cannot be
    extended to the left and keep their raw count (lmplz does the same). `<s>` itself has a = 0.

    Order k, context h (k-1 words), h' = h without its first word, word w, and D(c) = D1, D2, D3+ of
    order k for c = 1, 2, >= 3 (D(0) = 0):
        p_k(w|h) = (a(hw) - D(a(hw))) / sum_v a(hv) + gamma(h) p_{k-1}(w|h')
        gamma(h) = (D1 N1(h.) + D2 N2(h.) + D3+ N3+(h.)) / sum_v a(hv)
        p_1(w)   = (a(w) - D(a(w))) / sum_v a(v) + gamma() / |V \\ {<s>}|      (lmplz's interpolate_unigrams)
    so the uniform distribution covers the vocabulary without `<s>` (lmplz: "includes <unk> but excludes
    <s>"). `<unk>` gets its continuation count (from the training words mapped to it) plus its uniform share
    gamma()/|V|; when no training word was mapped to it, that share is exactly lmplz's p(<unk>). Vocabulary
    words never seen in training get only the uniform share.

    In the ARPA file a seen n-gram stores the full interpolated p_k(w|h) and a context stores log10 gamma(h)
    as its backoff, so the ordinary backoff query (KenLM's) gives the interpolated model exactly. `<s>` is
    written with log10 prob -99, as lmplz does.
    """

    def __init__(self, counts: NgramCounts) -> None:
        self.counts = counts
        order, vsize = counts.order, len(counts.vocab)
        bos = counts.bos_id
        if counts.num_sentences == 0:
            raise ValueError("cannot estimate a language model from no sentences")

        adjusted: list[IntArray] = [np.zeros(0, dtype=np.int64)] * order
        adjusted[order - 1] = counts.count[order - 1].copy()
        for k in range(order - 1, 0, -1):  # k = order of the n-grams whose counts are adjusted
            unique_left = np.bincount(counts.suffix[k], minlength=counts.num_ngrams(k)).astype(np.int64)
            from_bos = counts.first_word(k) == bos
            unique_left[from_bos] = counts.count[k - 1][from_bos]
            adjusted[k - 1] = unique_left
        adjusted[0][bos] = 0  # never predicted
        self.adjusted: tuple[IntArray, ...] = tuple(adjusted)

        stats = [kn_discounts(a) for a in adjusted]
        self.count_of_counts = tuple(s[0] for s in stats)
        self.discounts = tuple(s[1] for s in stats)
        self.fallback_orders = tuple(k + 1 for k, s in enumerate(stats) if s[2])

        probs: list[FloatArray] = []
        backoffs: list[FloatArray] = []
        for k in range(1, order + 1):
            a = adjusted[k - 1].astype(np.float64)
            table = np.array((0.0, *self.discounts[k - 1]))
            discount = table[np.minimum(adjusted[k - 1], 3)]  # (n_k,) D(a)
            if k == 1:
                total = a.sum()
                gamma = discount.sum() / total
                p = (a - discount) / total + gamma / (vsize - 1)
                p[bos] = 0.0
            else:
                ctx = counts.prefix[k - 1]
                n_ctx = counts.num_ngrams(k - 1)
                total_ctx = np.bincount(ctx, weights=a, minlength=n_ctx)  # (n_{k-1},) sum_v a(hv)
                mass_ctx = np.bincount(ctx, weights=discount, minlength=n_ctx)
                is_ctx = total_ctx > 0
                gamma_ctx = np.divide(mass_ctx, total_ctx, out=np.ones(n_ctx), where=is_ctx)
                p = (a - discount) / total_ctx[ctx] + gamma_ctx[ctx] * probs[-1][counts.suffix[k - 1]]
                # A (k-1)-gram never followed by anything (ends in </s>, unseen word) keeps backoff 1.
                backoffs.append(np.where(is_ctx, _log10(gamma_ctx), 0.0))
            probs.append(p)
        self.probs: tuple[FloatArray, ...] = tuple(probs)  # (n_k,) natural-space p_k(w|h)
        self.log10_backoffs: tuple[FloatArray, ...] = tuple(backoffs)  # (n_k,) for k < order

    @classmethod
    def train(cls, sentences: Iterable[Sequence[str]], vocab: Sequence[str], order: int = 3) -> KneserNeyLM:
        return cls(count_ngrams(sentences, vocab, order))

    def log10_probs(self, k: int) -> FloatArray:
        """(n_k,) log10 p_k of the n-grams of order k as the ARPA file stores them (`<s>`: -99)."""
        return _log10(self.probs[k - 1])

    def write_arpa(self, path: str | Path) -> None:
        """Write the model as an ARPA file (every vocabulary word is a unigram, in vocabulary order)."""
        ks = range(1, self.counts.order + 1)
        ngram_format.write_arpa(path, [self.counts.ngram_strings(k) for k in ks], [self.log10_probs(k) for k in ks],
                                list(self.log10_backoffs))

    def to_model(self) -> NgramModel:
        """The serving model, built in memory (full float64 precision, no file round-trip)."""
        c = self.counts
        ks = range(1, c.order + 1)
        return BackoffNgramModel(
            list(c.vocab),
            [c.ngram_ids(k) for k in ks],
            [self.log10_probs(k) for k in ks],
            list(self.log10_backoffs),
        )


class LaplaceLM:
    """Add-one smoothing over the previous N-1 words: `P(w|h) = (count(h,w) + 1) / (count(h) + |V|)`.

    h is the previous N-1 tokens of the padded sentence, shorter at the start where it includes `<s>`
    (trigram: h = `<s>` for w1, `<s> w1` for w2). count(h, w) is the raw count of the n-gram h w, and
    count(h) = sum_w count(h, w), the number of times h is followed by a token (for an empty h, order 1:
    the number of predicted tokens, i.e. words and `</s>`, not `<s>`). |V| = len(vocab): every vocabulary
    word, `<s>`, `</s>` and `<unk>` included.

    This is exactly `nltk.lm.Laplace(order)` (`(c + 1) / (counts[h].N() + len(vocab))`) when NLTK's
    `Vocabulary` holds the same words (`unk_label="<unk>"`, `<unk>` not passed as a word so it is counted
    once) and it is fit on the everygrams (orders 1..N) of the same padding `<s> w1 ... wn </s>` minus the
    unigram `("<s>",)`, with the context `tokens[max(0, i-N+1):i]` (tests/test_ngram.py checks this).
    Like NLTK, `<s>` keeps its 1/(count(h)+|V|) share although it is never predicted.
    """

    def __init__(self, counts: NgramCounts) -> None:
        self.counts = counts

    @classmethod
    def train(cls, sentences: Iterable[Sequence[str]], vocab: Sequence[str], order: int = 3) -> LaplaceLM:
        return cls(count_ngrams(sentences, vocab, order))

    def write_counts(self, path: str | Path) -> None:
        """Write SRILM-style `w1 w2 w3<TAB>count` lines for orders 1..N after one header line.

        The unigram lines list every vocabulary word in id order (count 0 included), so the file alone
        defines the vocabulary; `<s>` carries the number of sentences.
        """
        c = self.counts
        ngram_format.write_counts(path, [c.ngram_strings(k) for k in range(1, c.order + 1)], list(c.count))

    def to_model(self) -> NgramModel:
        """The serving model, built in memory."""
        c = self.counts
        return LaplaceNgramModel(list(c.vocab), [c.ngram_ids(k) for k in range(1, c.order + 1)], list(c.count))


class SentenceScorer(Protocol):
    def score_words(self, words: list[str], *, bos: bool = True, eos: bool = True) -> list[tuple[float, int]]: ...


def log10_likelihood(model: SentenceScorer, sentences: Iterable[Sequence[str]]) -> tuple[float, int]:
    """Total log10 probability of the sentences (each word and `</s>`) and the number of predictions."""
    total, n = 0.0, 0
    for sentence in sentences:
        scores = model.score_words(list(sentence))
        total += sum(p for p, _ in scores)
        n += len(scores)
    return total, n


def perplexity(model: SentenceScorer, sentences: Iterable[Sequence[str]]) -> float:
    """Per-word perplexity `exp(-sum ln P(w_i|h) / (words + sentences))`: `</s>` counts as a token (KenLM)."""
    total, n = log10_likelihood(model, sentences)
    if n == 0:
        raise ValueError("perplexity of no sentences")
    return math.exp(-total * math.log(10.0) / n)
