"""n-gram language models, serving side: score with numpy over the tables of an ARPA or counts file.

This module answers the two questions a server asks of an n-gram model: the log10 probability of each word
of a sentence (`score_words`, equal to KenLM's `full_scores`) and the distribution of the next word
(`next_log10probs`, vectorised over the vocabulary). The files themselves are read by the repository
contract (`service/contract/ngram_format.py`), which `models/ngram.py` writes them with. numpy and the
standard library only.

Storage: per order k >= 2, the n-grams as a lexicographically sorted (n_k, k) id matrix plus one dict from
context (the first k-1 ids, a tuple) to its row range; order 1 is dense over the vocabulary. A lookup is a
dict hit and a binary search in the context's rows, and a context's continuations are one slice. The
backoff model's top-k of the next word walks each context suffix's continuations best first, sorted on first
use and kept in a bounded per-suffix cache, and stops where no later word can enter the top k.
"""
from __future__ import annotations

import abc
import functools
import math
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
from plm.service.contract.ngram_format import (
    BOS,
    EOS,
    KENLM_MISSING_UNK_LOG10,
    UNK,
    FloatArray,
    IntArray,
    read_arpa,
    read_counts,
)

_WALK_MAX_K = 32  # a larger top-k is cheaper vectorised than walked word by word
_WALK_BUDGET = 256  # words a walk may look at (plus 4 per k) before the vectorised way takes over
_CONTINUATIONS_CACHED = 4096  # context suffixes whose sorted continuations are kept


class _Continuations(NamedTuple):
    """A context suffix as the top-k walk reads it."""

    backoff: float  # log10 backoff weight of the suffix itself (0 where it is not listed)
    words: list[int]  # the words listed after it, by log10 p descending, ties by lower id
    log10probs: list[float]  # their listed log10 p, in that order
    members: frozenset[int]  # the same words, for "listed at a higher order" tests


class _Order:
    """The n-grams of one order k >= 2: sorted ids, their values, and the context -> rows index."""

    def __init__(self, ids: IntArray, values: list[npt.NDArray[Any]], vocab: list[str], what: str) -> None:
        n, k = ids.shape
        rank = np.lexsort(ids.T[::-1])  # first column is the primary key
        ids = ids[rank]
        self.words = np.ascontiguousarray(ids[:, -1])  # (n,) last word of each n-gram
        self.values = [v[rank] for v in values]
        ctx = ids[:, :-1]  # (n, k-1)
        new_ctx = np.ones(n, dtype=bool)
        if n:
            new_ctx[1:] = np.any(ctx[1:] != ctx[:-1], axis=1)
            same_word = self.words[1:] == self.words[:-1]
            dup = np.flatnonzero(~new_ctx[1:] & same_word)
            if len(dup):
                gram = " ".join(vocab[i] for i in ids[dup[0] + 1].tolist())
                raise ValueError(f"{what}: duplicate {k}-gram {gram!r}")
        starts = np.flatnonzero(new_ctx)
        ends = np.append(starts[1:], n)
        keys = map(tuple, ctx[starts].tolist())
        self.index: dict[tuple[int, ...], tuple[int, int]] = dict(
            zip(keys, zip(starts.tolist(), ends.tolist(), strict=True), strict=True)
        )

    def find(self, context: tuple[int, ...], word: int) -> int:
        """Row of the n-gram (context, word), or -1."""
        span = self.index.get(context)
        if span is None:
            return -1
        start, end = span
        row = start + int(np.searchsorted(self.words[start:end], word))
        return row if row < end and self.words[row] == word else -1


class NgramModel(abc.ABC):
    """A loaded n-gram model: vocabulary, order, and scoring. Build one with `load_arpa`/`load_counts`."""

    kind = ""

    def __init__(self, vocab: list[str], order: int) -> None:
        self.vocab = vocab
        self.order = order
        self.word_to_id = {w: i for i, w in enumerate(vocab)}
        if len(self.word_to_id) != len(vocab):
            raise ValueError("the vocabulary has duplicate words")
        for special in (BOS, EOS, UNK):
            if special not in self.word_to_id:
                raise ValueError(f"the vocabulary lacks {special}")
        self.bos, self.eos = BOS, EOS
        self.bos_id = self.word_to_id[BOS]
        self.eos_id = self.word_to_id[EOS]
        self.unk_id = self.word_to_id[UNK]

    @classmethod
    def load_arpa(cls, path: str | Path) -> NgramModel:
        """Load an ARPA backoff model (ours are interpolated Kneser-Ney). Raises ValueError on a bad file."""
        t = read_arpa(path)
        return BackoffNgramModel(t.vocab, t.ids, t.log10probs, t.log10backoffs, source=str(path))

    @classmethod
    def load_counts(cls, path: str | Path) -> NgramModel:
        """Load a Laplace counts file written by `models.ngram.LaplaceLM.write_counts`."""
        t = read_counts(path)
        return LaplaceNgramModel(t.vocab, t.ids, t.counts, source=str(path))

    def ids(self, words: list[str]) -> list[int]:
        """Vocabulary ids of the words, out-of-vocabulary words as `<unk>`."""
        get, unk = self.word_to_id.get, self.unk_id
        return [get(w, unk) for w in words]

    def score_words(self, words: list[str], *, bos: bool = True, eos: bool = True) -> list[tuple[float, int]]:
        """(log10 P(w | history), n-gram length used) for each word and then `</s>` (KenLM's `full_scores`).

        The n-gram length is, for a backoff (ARPA) model, the length of the longest matching n-gram, and
        for Laplace the history length plus one (the history is shorter at the start of a sentence).
        """
        history = [self.bos_id] if bos else []
        targets = self.ids(words) + ([self.eos_id] if eos else [])
        keep = self.order - 1
        out = []
        for w in targets:
            context = tuple(history[max(0, len(history) - keep) :]) if keep else ()
            out.append(self._score(context, w))
            history.append(w)
        return out

    def score(self, words: list[str], *, bos: bool = True, eos: bool = True) -> float:
        """log10 probability of the sentence (KenLM's `score`)."""
        return sum(p for p, _ in self.score_words(words, bos=bos, eos=eos))

    def next_log10probs(self, context_words: list[str], *, bos: bool = True) -> FloatArray:
        """(V,) log10 P(w | context) for every vocabulary id; `<s>` is -inf (it is never predicted)."""
        history = ([self.bos_id] if bos else []) + self.ids(context_words)
        keep = self.order - 1
        context = tuple(history[max(0, len(history) - keep) :]) if keep else ()
        out = self._next(context)
        out[self.bos_id] = -np.inf
        return out

    def next_top(self, context_words: list[str], allowed: npt.NDArray[np.bool_], k: int, *,
                 bos: bool = True) -> tuple[IntArray, FloatArray]:
        """The k most likely allowed next words, best first (ties: lower id first): (ids, log10 P).

        The same as `next_log10probs` and a top-k over it; `<s>` is never among them."""
        return self.next_top_ids(self.ids(context_words), allowed, k, bos=bos)

    def next_top_ids(self, context_ids: list[int], allowed: npt.NDArray[np.bool_], k: int, *,
                     bos: bool = True) -> tuple[IntArray, FloatArray]:
        """`next_top` of a context given as vocabulary ids (what the served adapter holds)."""
        history = ([self.bos_id] if bos else []) + context_ids
        keep = self.order - 1
        context = tuple(history[max(0, len(history) - keep) :]) if keep else ()
        if allowed[self.bos_id]:  # the served masks already leave <s> out: no copy of the mask per call then
            allowed = allowed.copy()
            allowed[self.bos_id] = False
        return self._next_top(context, allowed, k)

    def _next_top(self, context: tuple[int, ...], allowed: npt.NDArray[np.bool_],
                  k: int) -> tuple[IntArray, FloatArray]:
        out = self._next(context)
        return _best(np.flatnonzero(allowed), out[allowed], k)

    @abc.abstractmethod
    def _score(self, context: tuple[int, ...], word: int) -> tuple[float, int]:
        """(log10 P(word | context), n-gram length); `context` is at most the last N-1 ids."""

    @abc.abstractmethod
    def _next(self, context: tuple[int, ...]) -> FloatArray:
        """(V,) log10 P(. | context) for every id; `context` is at most the last N-1 ids."""


class BackoffNgramModel(NgramModel):
    """ARPA semantics: P(w|h) = p(h w) if listed, else bo(h) P(w|h'), in log10 (as KenLM queries it)."""

    kind = "arpa"

    def __init__(
        self,
        vocab: list[str],
        ids: list[IntArray],
        log10probs: list[FloatArray],
        log10backoffs: list[FloatArray],
        *,
        source: str = "model",
    ) -> None:
        """`ids[k-1]`: (n_k, k) word ids of order k; `log10backoffs` for orders 1..N-1 (0 where absent)."""
        super().__init__(vocab, len(ids))
        vsize = len(vocab)
        self.unigram_log10 = np.full(vsize, KENLM_MISSING_UNK_LOG10)  # (V,)
        self.unigram_backoff = np.zeros(vsize)  # (V,)
        uni = ids[0][:, 0]
        self.unigram_log10[uni] = log10probs[0]
        if self.order > 1:
            self.unigram_backoff[uni] = log10backoffs[0]
        self.orders: list[_Order] = [
            _Order(
                ids[k - 1],
                [log10probs[k - 1], log10backoffs[k - 1] if k < self.order else np.zeros(len(ids[k - 1]))],
                vocab,
                source,
            )
            for k in range(2, self.order + 1)
        ]
        self._unigram_rank: IntArray = np.argsort(-self.unigram_log10, kind="stable")  # ids, best first
        self._unigram_walk = (self._unigram_rank.tolist(), self.unigram_log10[self._unigram_rank].tolist())
        # Per context suffix, its backoff and sorted continuations: bounded, and the frequent suffixes stay.
        self._continuations_cache = functools.lru_cache(maxsize=_CONTINUATIONS_CACHED)(self._continuations)

    def _table(self, k: int) -> _Order:
        return self.orders[k - 2]

    def _backoff(self, gram: tuple[int, ...]) -> float:
        if len(gram) == 1:
            return float(self.unigram_backoff[gram[0]])
        table = self._table(len(gram))
        row = table.find(gram[:-1], gram[-1])
        return float(table.values[1][row]) if row >= 0 else 0.0

    def _score(self, context: tuple[int, ...], word: int) -> tuple[float, int]:
        # Like KenLM: walk outwards from the unigram while the n-grams exist; the longest one found gives
        # the probability, and every longer context adds its backoff weight.
        size = len(context)
        prob = float(self.unigram_log10[word])
        matched = 0
        for j in range(1, size + 1):
            table = self._table(j + 1)
            row = table.find(context[size - j :], word)
            if row < 0:
                break
            prob = float(table.values[0][row])
            matched = j
        for j in range(matched + 1, size + 1):
            prob += self._backoff(context[size - j :])
        return prob, matched + 1

    def _next(self, context: tuple[int, ...]) -> FloatArray:
        out = self.unigram_log10.copy()  # (V,)
        size = len(context)
        for j in range(1, size + 1):
            sub = context[size - j :]
            out += self._backoff(sub)
            table = self._table(j + 1)
            span = table.index.get(sub)
            if span is not None:
                start, end = span
                out[table.words[start:end]] = table.values[0][start:end]
        return out


    def _next_top(self, context: tuple[int, ...], allowed: npt.NDArray[np.bool_],
                  k: int) -> tuple[IntArray, FloatArray]:
        """`_next`'s top k, bit-equal: a walk down each context suffix's continuations, best first, for a
        small k; `_next_top_wide` for a larger k or when the walk meets too many excluded words."""
        if not 0 < k <= _WALK_MAX_K:
            return self._next_top_wide(context, allowed, k)
        size = len(context)
        cached = self._continuations_cache
        suffixes = [cached(context[size - j :]) for j in range(1, size + 1)]  # j = suffix length
        backoffs = [c.backoff for c in suffixes]
        # Streams, highest order first: a word listed for suffix j takes its probability from there and the
        # backoffs of the longer suffixes; the unigrams take every backoff. (-log10 P, id) ascending is the
        # answer's order.
        found: list[tuple[float, int]] = []
        floor = -math.inf  # the k-th best value found so far: a later candidate below it cannot enter
        budget = _WALK_BUDGET + 4 * k
        for j in range(size, -1, -1):
            words, probs = (suffixes[j - 1].words, suffixes[j - 1].log10probs) if j else self._unigram_walk
            visited = _walk(words, probs, backoffs[j:], [c.members for c in suffixes[j:]], allowed, k, floor,
                            budget, found)
            if visited < 0:  # a mask that excludes most words: the vectorised way is faster
                return self._next_top_wide(context, allowed, k)
            budget -= visited
            if len(found) >= k:
                found.sort()
                floor = -found[k - 1][0]
        found.sort()
        top = found[:k]
        return (np.array([w for _, w in top], dtype=np.int64),
                np.array([-v for v, _ in top], dtype=np.float64))

    def _continuations(self, gram: tuple[int, ...]) -> _Continuations:
        """The backoff weight of `gram` and the words listed after it, best first (`_continuations_cache`)."""
        table = self._table(len(gram) + 1)
        span = table.index.get(gram)
        if span is None:
            return _Continuations(self._backoff(gram), [], [], frozenset())
        words, probs = table.words[span[0] : span[1]], table.values[0][span[0] : span[1]]
        rank = np.lexsort((words, -probs))  # probability descending, ties by lower id
        listed = words[rank].tolist()
        return _Continuations(self._backoff(gram), listed, probs[rank].tolist(), frozenset(listed))

    def _next_top_wide(self, context: tuple[int, ...], allowed: npt.NDArray[np.bool_],
                       k: int) -> tuple[IntArray, FloatArray]:
        """`_next`'s top k without the (V,) array: the listed continuations of each context suffix, and the
        best unigrams among the rest, with the same additions in the same order (bit-equal values)."""
        size = len(context)
        backoffs = [self._backoff(context[size - j :]) for j in range(1, size + 1)]  # j = context length

        def backed_off(values: FloatArray, longer_than: int) -> FloatArray:
            for b in backoffs[longer_than:]:
                values = values + b
            return values

        spans = [(j, self._table(j + 1), self._table(j + 1).index.get(context[size - j :])) for j in range(size, 0, -1)]
        listed = sum(span[1] - span[0] for _, _, span in spans if span is not None)
        if listed > len(self.vocab) // 2:  # a frequent context lists much of the vocabulary: the dense way is as fast
            return super()._next_top(context, allowed, k)
        ids: list[IntArray] = []
        values: list[FloatArray] = []
        claimed = np.zeros(len(self.vocab), dtype=bool)  # listed at a higher order: the value comes from there
        for j, table, span in spans:  # highest order first
            if span is None:
                continue
            words = table.words[span[0] : span[1]]
            keep = ~claimed[words]
            claimed[words] = True
            keep &= allowed[words]
            ids.append(words[keep])
            values.append(backed_off(table.values[0][span[0] : span[1]][keep], j))
        want = 2 * k + 16  # most listed words are frequent ones, so the head is mostly claimed: grow it as needed
        while True:  # the best unigrams that are allowed and not listed above
            head = self._unigram_rank[:want]
            head = head[allowed[head] & ~claimed[head]]
            if len(head) >= k or want >= len(self._unigram_rank):
                break
            want *= 2
        ids.append(head[:k])
        values.append(backed_off(self.unigram_log10[head[:k]], 0))
        return _best(np.concatenate(ids), np.concatenate(values), k)


def _best(ids: IntArray, values: FloatArray, k: int) -> tuple[IntArray, FloatArray]:
    """The k largest values and their ids, best first, ties by lower id."""
    if len(values) > k > 0:  # the k-th value, then everything at least that large (ties at the edge: lower id)
        kth = -np.partition(-values, k - 1)[k - 1]
        keep = values >= kth
        ids, values = ids[keep], values[keep]
    order = np.lexsort((ids, -values))[: max(k, 0)]
    return ids[order], values[order]


def _walk(words: list[int], probs: list[float], backoffs: list[float], higher: list[frozenset[int]],
          allowed: npt.NDArray[np.bool_], k: int, floor: float, budget: int, found: list[tuple[float, int]]) -> int:
    """Append (-value, id) for the words of one stream that may still enter the top k; how many it looked at,
    or -1 past `budget`.

    A word's value is its log10 p plus `backoffs`, added one by one as `_next` adds them, and rounding is
    monotone, so the values fall (or tie) along the stream: it stops below `floor` (k better ones are already
    found) or below its own k-th taken value (ties with that one are taken: the lower id may win). Words
    that are not allowed, or listed for a longer suffix (`higher`: their value comes from there), are skipped.
    """
    taken, last = 0, math.inf
    for i, w in enumerate(words):
        v = probs[i]
        for b in backoffs:
            v += b
        if v < floor or (taken >= k and v < last):
            return i
        if i >= budget:
            return -1
        if allowed[w]:
            for claimed in higher:
                if w in claimed:
                    break
            else:
                found.append((-v, w))
                taken, last = taken + 1, v
    return len(words)


class LaplaceNgramModel(NgramModel):
    """Add-one smoothing: P(w|h) = (count(h,w) + 1) / (count(h) + |V|), h = the previous N-1 tokens.

    count(h) = sum_w count(h,w); for the empty history (order 1) the number of predicted tokens, which
    leaves out `<s>`. |V| = len(vocab). See `models.ngram.LaplaceLM` for the NLTK correspondence. As in
    NLTK, `<s>` holds 1/(count(h)+|V|) of every distribution, so `next_log10probs`, which sets `<s>` to
    -inf, sums to 1 - 1/(count(h)+|V|).
    """

    kind = "laplace"

    def __init__(self, vocab: list[str], ids: list[IntArray], counts: list[IntArray], *, source: str = "model") -> None:
        super().__init__(vocab, len(ids))
        vsize = len(vocab)
        self.unigram_counts = np.zeros(vsize, dtype=np.int64)  # (V,)
        self.unigram_counts[ids[0][:, 0]] = counts[0]
        self.unigram_total = int(self.unigram_counts.sum() - self.unigram_counts[self.bos_id])
        self.orders = [_Order(ids[k - 1], [counts[k - 1]], vocab, source) for k in range(2, self.order + 1)]
        # count(h) of each context, in the order of the index's spans.
        self.context_totals: list[dict[tuple[int, ...], int]] = []
        for table in self.orders:
            cumulative = np.concatenate([[0], np.cumsum(table.values[0])]).tolist()
            self.context_totals.append(
                {ctx: cumulative[end] - cumulative[start] for ctx, (start, end) in table.index.items()}
            )

    def _score(self, context: tuple[int, ...], word: int) -> tuple[float, int]:
        vsize = len(self.vocab)
        if not context:
            count, total = int(self.unigram_counts[word]), self.unigram_total
        else:
            table = self.orders[len(context) - 1]
            row = table.find(context, word)
            count = int(table.values[0][row]) if row >= 0 else 0
            total = self.context_totals[len(context) - 1].get(context, 0)
        return math.log10((count + 1) / (total + vsize)), len(context) + 1

    def _next(self, context: tuple[int, ...]) -> FloatArray:
        vsize = len(self.vocab)
        if not context:
            return np.log10((self.unigram_counts + 1.0) / (self.unigram_total + vsize))
        table = self.orders[len(context) - 1]
        total = self.context_totals[len(context) - 1].get(context, 0)
        counts = np.zeros(vsize)  # (V,)
        span = table.index.get(context)
        if span is not None:
            start, end = span
            counts[table.words[start:end]] = table.values[0][start:end]
        return np.log10((counts + 1.0) / (total + vsize))
