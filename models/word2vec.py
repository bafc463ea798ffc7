"""word2vec (Mikolov et al. 2013) in one file: vocabulary, subsampling, CBOW and skip-gram with negative
sampling, trained with plain SGD as word2vec.c and gensim do, and the word-similarity / analogy evaluation.

What follows gensim 4 (`gensim/models/word2vec.py`, `word2vec_inner.pyx`), so the two can be compared:

* vocabulary: words seen at least `min_count` times, most frequent first (ties by the word itself);
* subsampling: a word of count c is kept with probability min(1, (sqrt(c / t) + 1) · t / c), where
  t = sample × (retained words); the dropped words are removed *before* windows are formed;
* dynamic window: each centre word draws its own reduced window b uniformly from 1..window;
* negative sampling: `negative` draws per positive from the unigram^0.75 distribution; a draw equal to the
  positive word is skipped, and a pair whose score is outside ±MAX_EXP gets no update (word2vec.c's table);
* skip-gram: the *context* word's input vector predicts the centre word (gensim's order of arguments);
* CBOW (`cbow_mean=1`): the mean of the context input vectors predicts the centre word, and the whole error
  vector is added to every context word (word2vec.c's choice, not divided by the count);
* learning rate: linear from `alpha` to `min_alpha` over all epochs, by the share of raw words processed.

What differs, for speed on a CPU without a C extension: updates are applied to batches of (centre,
context) pairs at once (8192 skip-gram pairs or 2048 CBOW centre words; gathers, `bmm`, `index_add_`), not
one pair at a time. Within a batch the pairs see the vectors as they were at its start, and a row's updates
are summed, so the batch is capped by the vocabulary size (a 16-word corpus would otherwise overshoot).
Negatives are drawn from word2vec.c's unigram table rather than gensim's bisection of a cumulative table
(the same distribution). benchmarks/word2vec_vs_gensim.py measures the result against gensim (3 seeds, the
default corpus; docs/benchmarks.md has the current figures): slower than gensim's C loop, with scores on the
word-pair and analogy sets close to gensim's.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

MAX_EXP = 6.0  # word2vec.c's sigmoid table covers [-6, 6]; outside it gensim skips the update


@dataclass(frozen=True)
class Word2VecConfig:
    """Hyper-parameters; the defaults are gensim 4's, except the last two, which are ours."""

    sg: bool = False  # False: CBOW, True: skip-gram
    vector_size: int = 100
    window: int = 5
    min_count: int = 5
    sample: float = 1e-3
    negative: int = 5
    ns_exponent: float = 0.75
    alpha: float = 0.025
    min_alpha: float = 1e-4
    epochs: int = 5
    seed: int = 1
    # Pairs per SGD step: small enough that a frequent word rarely gets many summed updates in one step,
    # large enough that PyTorch's per-call overhead is amortised (one call per batch instead of per pair).
    batch_pairs: int = 8192
    # PyTorch threads while training. One: the steps are many small ops, and on a shared machine each op's
    # thread barrier waits for a descheduled sibling (a second thread made epochs slower, not faster, on 2 busy cores).
    threads: int = 1


@dataclass
class TrainStats:
    seconds: float = 0.0
    epochs: int = 0
    raw_words: int = 0  # words of the corpus × epochs, in vocabulary
    kept_words: int = 0  # after subsampling
    pairs: int = 0  # (centre, context) pairs trained, both architectures
    rows: int = 0  # SGD rows: pairs (skip-gram) or centre words with a context (CBOW)
    pairs_per_second: float = 0.0
    loss_per_epoch: list[float] = field(default_factory=list)  # mean negative-sampling loss per pair


# ------------------------------------------------------------------------------------------- vocabulary


def build_vocab(sentences: Sequence[Sequence[str]], min_count: int) -> tuple[list[str], np.ndarray]:
    """Words seen at least `min_count` times, most frequent first (ties by word), and their counts (V,)."""
    counts: Counter[str] = Counter()
    for s in sentences:
        counts.update(s)
    ranked = sorted((wc for wc in counts.items() if wc[1] >= min_count), key=lambda wc: (-wc[1], wc[0]))
    return [w for w, _ in ranked], np.array([c for _, c in ranked], dtype=np.int64)


def keep_probabilities(counts: np.ndarray, sample: float) -> np.ndarray:
    """(V,) probability of keeping each occurrence of a word: gensim's `sample_int / 2**32`."""
    if sample <= 0:
        return np.ones(len(counts))
    threshold = sample * float(counts.sum())  # gensim: sample * retain_total (sample < 1)
    c = counts.astype(np.float64)
    return np.minimum(1.0, (np.sqrt(c / threshold) + 1.0) * (threshold / c))


def noise_distribution(counts: np.ndarray, exponent: float = 0.75) -> np.ndarray:
    """(V,) the negative-sampling distribution, counts^exponent normalised (gensim's `cum_table` in floats)."""
    p = counts.astype(np.float64) ** exponent
    return p / p.sum()


def negative_table(p: np.ndarray, slots_per_word: int = 200) -> torch.Tensor:
    """word2vec.c's unigram table: word i fills ~p_i of the slots, so a uniform slot is a draw from p.

    A gather from a table is much cheaper than a binary search of the cumulative table per draw. With 200
    slots per word on average the rounding error is below 1/(2·200·V·p_i) relative, far below sampling noise.
    """
    size = max(1_000_000, slots_per_word * len(p))
    bounds = np.round(np.cumsum(p) * size).astype(np.int64)  # word i owns slots [bounds[i-1], bounds[i])
    return torch.from_numpy(np.searchsorted(bounds, np.arange(size), side="right").astype(np.int64))


# ------------------------------------------------------------------------------------------- the model


class Word2Vec:
    """Two matrices: `wv` (V, D) input vectors, the word vectors; `syn1neg` (V, D) output vectors."""

    def __init__(self, vocab: list[str], counts: np.ndarray, config: Word2VecConfig) -> None:
        self.vocab = vocab
        self.counts = counts
        self.config = config
        self.index = {w: i for i, w in enumerate(vocab)}
        g = torch.Generator().manual_seed(config.seed)
        V, D = len(vocab), config.vector_size
        # gensim 4's initialisation: input uniform in ±1/D, output zero.
        self.wv = (torch.rand(V, D, generator=g) * 2 - 1) / D
        self.syn1neg = torch.zeros(V, D)
        self.stats = TrainStats()

    @classmethod
    def train_on(cls, sentences: Sequence[Sequence[str]], config: Word2VecConfig,
                 progress: bool = False) -> Word2Vec:
        vocab, counts = build_vocab(sentences, config.min_count)
        if not vocab:
            raise ValueError(f"no word occurs {config.min_count} times; lower min_count")
        model = cls(vocab, counts, config)
        model.train(sentences, progress=progress)
        return model

    def normalized(self) -> np.ndarray:
        """(V, D) float32 unit-length input vectors (zero rows stay zero)."""
        wv = self.wv.numpy()
        return (wv / np.maximum(np.linalg.norm(wv, axis=1, keepdims=True), 1e-12)).astype(np.float32)

    # -- training -----------------------------------------------------------------------------------------
    def _encode(self, sentences: Sequence[Sequence[str]]) -> tuple[np.ndarray, np.ndarray]:
        """The corpus as one id stream (N,) and each token's sentence number (N,), out-of-vocabulary dropped."""
        ids: list[int] = []
        sent: list[int] = []
        for k, s in enumerate(sentences):
            row = [self.index[w] for w in s if w in self.index]
            ids.extend(row)
            sent.extend([k] * len(row))
        return np.asarray(ids, dtype=np.int64), np.asarray(sent, dtype=np.int64)

    def _pairs(self, ids: np.ndarray, sent: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        """One epoch's subsampled stream and its windows.

        Returns (centre (P,), context (P,), raw position of the centre (P,), kept words): every pair
        (i, j) with 0 < |i - j| <= b_i in the same sentence, in corpus order of the centre.
        """
        keep = rng.random(len(ids)) < self._keep[ids]
        raw_pos = np.flatnonzero(keep)
        toks, sids = ids[keep], sent[keep]
        n, w = len(toks), self.config.window
        b = rng.integers(1, w + 1, size=n)  # reduced window per centre: gensim's window - randint(0, window)
        centres, contexts = [], []
        for off in [*range(-w, 0), *range(1, w + 1)]:
            i = np.arange(max(0, -off), min(n, n - off))
            j = i + off
            ok = (abs(off) <= b[i]) & (sids[i] == sids[j])
            centres.append(i[ok])
            contexts.append(j[ok])
        ci = np.concatenate(centres)
        cj = np.concatenate(contexts)
        order = np.argsort(ci, kind="stable")  # corpus order, so the learning rate decays along the text
        ci, cj = ci[order], cj[order]
        return toks[ci], toks[cj], raw_pos[ci], np.asarray(n)

    def train(self, sentences: Sequence[Sequence[str]], progress: bool = False) -> TrainStats:
        threads = torch.get_num_threads()
        torch.set_num_threads(self.config.threads)
        try:
            return self._train(sentences, progress)
        finally:
            torch.set_num_threads(threads)

    def _train(self, sentences: Sequence[Sequence[str]], progress: bool) -> TrainStats:
        cfg = self.config
        rng = np.random.default_rng(cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)
        self._keep = keep_probabilities(self.counts, cfg.sample)
        table = negative_table(noise_distribution(self.counts, cfg.ns_exponent))
        ids, sent = self._encode(sentences)
        total = max(1, len(ids) * cfg.epochs)
        stats = TrainStats(epochs=cfg.epochs, raw_words=total)
        started = time.perf_counter()
        for epoch in range(cfg.epochs):
            centre, context, pos, kept = self._pairs(ids, sent, rng)
            stats.kept_words += int(kept)
            if cfg.sg:
                inputs = torch.from_numpy(context)[:, None]  # (P, 1): the context word predicts the centre
                outputs = torch.from_numpy(centre)
                where = torch.from_numpy(pos)
            else:
                inputs, outputs, where = _cbow_rows(centre, context, pos, 2 * cfg.window)
            loss_sum, rows = 0.0, len(outputs)
            # CBOW rows hold ~6 contexts. A small vocabulary caps the batch: the updates of one row within a
            # step are summed, and hundreds of them (16 words, 8192 pairs) make SGD overshoot. The caps (16·V
            # skip-gram pairs, V CBOW rows, each touching ~12 rows) were measured on a 16-word corpus.
            V = len(self.vocab)
            step = min(cfg.batch_pairs, 16 * V) if cfg.sg else min(max(1, cfg.batch_pairs // 4), V)
            for a in range(0, rows, step):
                progress_done = (epoch * len(ids) + float(where[a])) / total
                alpha = max(cfg.min_alpha, cfg.alpha - (cfg.alpha - cfg.min_alpha) * progress_done)
                loss_sum += self._step(inputs[a: a + step], outputs[a: a + step], table, gen, alpha)
            stats.pairs += len(centre)
            stats.rows += rows
            stats.loss_per_epoch.append(loss_sum / max(1, rows))  # per row: a pair, or a CBOW centre word
            if progress:
                print(f"word2vec {'sg' if cfg.sg else 'cbow'} epoch {epoch + 1}/{cfg.epochs}: "
                      f"{rows:,} rows, loss {stats.loss_per_epoch[-1]:.3f}, "
                      f"{time.perf_counter() - started:.1f}s", flush=True)
        stats.seconds = time.perf_counter() - started
        stats.pairs_per_second = stats.pairs / max(stats.seconds, 1e-9)
        self.stats = stats
        return stats

    def _step(self, inputs: torch.Tensor, outputs: torch.Tensor, table: torch.Tensor, gen: torch.Generator,
              alpha: float) -> float:
        """One SGD step on B rows. `inputs` (B, C) context ids, -1 = none (skip-gram: C = 1); `outputs` (B,).

        Returns the summed negative-sampling loss of the rows (before the update), for monitoring.
        """
        B, K = len(outputs), self.config.negative
        real = inputs >= 0  # (B, C)
        safe = inputs.clamp(min=0)
        if inputs.shape[1] == 1:  # skip-gram: one input word, no mean (the masked sum costs more than the gather)
            h = self.wv[safe[:, 0]]  # (B, D)
        else:
            h = (self.wv[safe] * real[..., None]).sum(1) / real.sum(1, keepdim=True)  # (B, D): context mean
        negs = table[torch.randint(len(table), (B, K), generator=gen)]  # (B, K)
        targets = torch.cat([outputs[:, None], negs], 1)  # (B, 1+K)
        u = self.syn1neg[targets]  # (B, 1+K, D)
        f = torch.bmm(u, h[:, :, None])[..., 0]  # (B, 1+K)
        label = torch.zeros_like(f)
        label[:, 0] = 1.0
        # gensim skips a negative equal to the positive, and any pair outside the sigmoid table.
        live = (f.abs() < MAX_EXP) & torch.cat([torch.ones(B, 1, dtype=torch.bool), negs != outputs[:, None]], 1)
        sig = torch.sigmoid(f)
        g = (label - sig) * alpha * live  # (B, 1+K)
        loss = -(torch.log(torch.where(label > 0, sig, 1 - sig).clamp(min=1e-7)) * live).sum()
        neu1e = torch.bmm(g[:, None, :], u)[:, 0]  # (B, D): the error for the input side
        self.syn1neg.index_add_(0, targets.reshape(-1), (g[..., None] * h[:, None, :]).reshape(-1, h.shape[1]))
        # CBOW with cbow_mean: every context word receives the whole error (word2vec.c, gensim).
        flat = real.reshape(-1)
        self.wv.index_add_(0, safe.reshape(-1)[flat], neu1e.repeat_interleave(real.sum(1), 0))
        return float(loss)

    # -- evaluation ---------------------------------------------------------------------------------------
    def evaluate(self, eval_sets: dict[str, Path]) -> dict[str, float]:
        return evaluate_all(self.normalized(), self.vocab, eval_sets)


def _cbow_rows(centre: np.ndarray, context: np.ndarray, pos: np.ndarray,
               width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group pairs (sorted by centre position) into CBOW rows: (R, width) context ids (-1 pad), (R,) centre,
    (R,) raw position."""
    starts = np.flatnonzero(np.r_[True, pos[1:] != pos[:-1]])  # first pair of each centre occurrence
    lengths = np.diff(np.r_[starts, len(pos)])
    rows = np.full((len(starts), width), -1, dtype=np.int64)
    slot = np.arange(len(pos)) - np.repeat(starts, lengths)  # the pair's column within its row
    rows[np.repeat(np.arange(len(starts)), lengths), slot] = context
    return torch.from_numpy(rows), torch.from_numpy(centre[starts]), torch.from_numpy(pos[starts])


# ------------------------------------------------------------------------------------------- evaluation
# One implementation for every model (ours and gensim's), written to give gensim's own numbers:
# `KeyedVectors.evaluate_word_pairs` and `evaluate_word_analogies` with their defaults (case-insensitive,
# restrict_vocab=300000, no dummy4unknown).


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (scipy.stats.rankdata's default)."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    first = np.r_[True, xs[1:] != xs[:-1]]
    group = np.cumsum(first) - 1
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], len(x)]
    avg = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    out = np.empty(len(x))
    out[order] = avg[group]
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = _ranks(np.asarray(a, dtype=np.float64)), _ranks(np.asarray(b, dtype=np.float64))
    ra -= ra.mean()
    rb -= rb.mean()
    denom = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def _lookup(vocab: Sequence[str], restrict_vocab: int) -> dict[str, int]:
    # gensim upper-cases both sides; iterating in reverse makes the most frequent spelling win.
    return {w.upper(): i for i, w in reversed(list(enumerate(vocab[:restrict_vocab])))}


def evaluate_word_pairs(unit: np.ndarray, vocab: Sequence[str], path: Path,
                        restrict_vocab: int = 300000) -> dict[str, float]:
    """Spearman between gold similarities and cosines; pairs with an unknown word are skipped and counted."""
    index = _lookup(vocab, restrict_vocab)
    gold, model = [], []
    oov = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        a, b, sim = line.split("\t")[:3]
        ia, ib = index.get(a.upper()), index.get(b.upper())
        if ia is None or ib is None:
            oov += 1
            continue
        gold.append(float(sim))
        model.append(float(unit[ia] @ unit[ib]))
    total = len(gold) + oov
    return {"spearman": spearman(np.array(gold), np.array(model)) if gold else float("nan"),
            "coverage": len(gold) / total if total else 0.0, "pairs": float(len(gold))}


def evaluate_word_analogies(unit: np.ndarray, vocab: Sequence[str], path: Path,
                            restrict_vocab: int = 300000) -> dict[str, float]:
    """3CosAdd accuracy: the answer is the nearest word to b − a + c other than a, b and c (gensim)."""
    index = _lookup(vocab, restrict_vocab)
    quads: list[tuple[int, int, int, int]] = []
    total = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith(":") or not line.strip():
            continue
        total += 1
        got = [index.get(w.upper()) for w in line.split()]
        if len(got) == 4 and all(g is not None for g in got):
            quads.append(tuple(got))  # type: ignore[arg-type]
    if not quads:
        return {"accuracy": float("nan"), "coverage": 0.0, "questions": 0.0}
    q = np.array(quads)
    mat = unit[:restrict_vocab]
    correct = 0
    for s in range(0, len(q), 1024):
        chunk = q[s: s + 1024]
        query = mat[chunk[:, 1]] - mat[chunk[:, 0]] + mat[chunk[:, 2]]  # b - a + c; norm does not change argmax
        sims = query @ mat.T  # (Q, V)
        rows = np.arange(len(chunk))
        for col in range(3):
            sims[rows, chunk[:, col]] = -np.inf
        correct += int((sims.argmax(1) == chunk[:, 3]).sum())
    return {"accuracy": correct / len(q), "coverage": len(q) / total, "questions": float(len(q))}


def evaluate_all(unit: np.ndarray, vocab: Sequence[str], eval_sets: dict[str, Path]) -> dict[str, float]:
    """WordSim-353 and SimLex-999 (Spearman, coverage) and Google analogies (accuracy, coverage), flat."""
    out: dict[str, float] = {}
    for name in ("wordsim353", "simlex999"):
        r = evaluate_word_pairs(unit, vocab, eval_sets[name])
        out[f"{name}_spearman"], out[f"{name}_coverage"] = r["spearman"], r["coverage"]
    r = evaluate_word_analogies(unit, vocab, eval_sets["questions-words"])
    out["analogy_accuracy"], out["analogy_coverage"] = r["accuracy"], r["coverage"]
    return out
