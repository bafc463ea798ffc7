"""The labelled downstream task: which kind of text a passage comes from, split by work.

Labels are real, read off the corpus: the genre of each Shakespeare work in the Folio tradition (comedy —
romances included —, tragedy, history) plus poetry for the poems, and `news` for the Lee news articles of
the gensim wheel. One five-way task holds both questions the lineage asks of a pretrained model: the genre of
a Shakespeare passage (the four Shakespeare labels among themselves) and Shakespeare against news (any
Shakespeare label against `news`); `collapse_to_source` reads the second off the first.

The split is by work (by article for news), so a test passage always comes from a work no downstream model
was trained on: within each label the works are ordered by sha256('<seed>:<name>') and the first ones go to
test, the next to valid, the rest to train. The works the corpus itself holds out of pretraining (its
valid and test documents, `corpus.split_documents` with the same seed) go to test first, so the test split
also holds text that no pretrained model has read. Passages are runs of consecutive sentences of a work,
`min_words` or more (a longer sentence is cut at `max_words`); each split takes at most a quota per label,
drawn from its works in turn, so one long work does not outweigh the others. Everything is a function of
the documents and the seed: the same inputs give the same passages in the same order.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from plm.data import corpus as corpus_mod

GENRES = {
    "comedy": "alls_well_that_ends_well as_you_like_it comedy_of_errors cymbeline loves_labours_lost "
              "measure_for_measure merchant_of_venice merry_wives_of_windsor midsummer_nights_dream "
              "much_ado_about_nothing pericles taming_of_the_shrew tempest twelfth_night two_gentlemen_of_verona "
              "winters_tale",
    "tragedy": "antony_and_cleopatra coriolanus hamlet julius_caesar lear macbeth othello romeo_and_juliet "
               "timon_of_athens tragedy_of_titus_andronicus troilus_and_cressida",
    "history": "henry_iv_part_1 henry_iv_part_2 henry_v henry_vi_part_1 henry_vi_part_2 henry_vi_part_3 henry_viii "
               "john richard_ii richard_iii",
    "poetry": "lovers_complaint passionate_pilgrim phoenix_and_the_turtle rape_of_lucrece sonnets",
}
GENRE_OF = {work: genre for genre, works in GENRES.items() for work in works.split()}
NEWS = "news"
LABELS: tuple[str, ...] = (*GENRES, NEWS)
SHAKESPEARE_LABELS: tuple[str, ...] = tuple(GENRES)
SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class Passage:
    text: str  # normalised sentences joined by a space
    label: str
    work: str  # the document it comes from


@dataclass(frozen=True)
class Quotas:
    """Most passages per label in each split, and the passage length."""

    train: int
    valid: int
    test: int
    min_words: int = 25
    max_words: int = 50


@dataclass(frozen=True)
class DownstreamTask:
    labels: tuple[str, ...]
    train: list[Passage]
    valid: list[Passage]
    test: list[Passage]
    works: dict[str, list[str]]  # split -> the works its passages come from
    never_pretrained: list[str]  # test works the corpus held out of pretraining

    def manifest(self) -> dict[str, object]:
        """What the split is, for a benchmark's JSON or a model manifest."""
        return {
            "labels": list(self.labels),
            "rule": "by work (news: by article); corpus-held-out works first in test, then sha256(seed:name) "
                    "order per label; passages of consecutive sentences, a quota per label and split",
            "passages": {s: {lab: sum(p.label == lab for p in getattr(self, s)) for lab in self.labels}
                         for s in SPLITS},
            "works": {s: len(w) for s, w in self.works.items()},
            "test_works_never_pretrained": self.never_pretrained,
        }


def label_of(doc: corpus_mod.Document) -> str | None:
    """A document's label: its genre (a known Shakespeare work), `news` (a Lee article), else None."""
    if doc.source == corpus_mod.SHAKESPEARE:
        return GENRE_OF.get(doc.name)
    return NEWS if doc.source == corpus_mod.LEE else None


def passages(doc: corpus_mod.Document, label: str, min_words: int, max_words: int) -> list[Passage]:
    """Consecutive sentences of `doc` joined until they reach `min_words` (cut at `max_words`); a last run
    shorter than `min_words` is dropped."""
    out: list[Passage] = []
    run: list[str] = []
    for sentence in corpus_mod.split_sentences(doc.text):
        words = corpus_mod.normalise(sentence).split()
        if not any(c.isalnum() for w in words for c in w):
            continue
        run.extend(words)
        if len(run) >= min_words:
            out.append(Passage(" ".join(run[:max_words]), label, doc.name))
            run = []
    return out


def _rank(seed: int, name: str) -> str:
    return hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()


def _take(groups: Sequence[list[Passage]], n: int, rng: random.Random) -> list[Passage]:
    """Up to `n` passages, one from each group in turn (each group shuffled by `rng`)."""
    queues = [rng.sample(g, len(g)) for g in groups]
    out: list[Passage] = []
    depth = 0
    while len(out) < n and any(depth < len(q) for q in queues):
        out.extend(q[depth] for q in queues if depth < len(q))
        depth += 1
    return out[:n]


def build_task(docs: Sequence[corpus_mod.Document], quotas: Quotas, seed: int = 0, test_frac: float = 0.25,
               valid_frac: float = 0.15) -> DownstreamTask:
    """The split of `docs` (see the module docstring); documents without a label are left out."""
    labelled = sorted(((d, lab) for d in docs if (lab := label_of(d)) is not None), key=lambda x: x[0].name)
    labels = tuple(lab for lab in LABELS if any(lab == x for _, x in labelled))
    _, held_valid, held_test = corpus_mod.split_documents(docs, seed=seed) if len(docs) >= 3 else ([], [], [])
    held = {d.name for d in held_valid + held_test}
    split_of: dict[str, str] = {}
    for lab in labels:
        ranked = sorted((d.name for d, x in labelled if x == lab), key=lambda n: (n not in held, _rank(seed, n), n))
        n_test = max(1, round(test_frac * len(ranked)), sum(n in held for n in ranked))
        n_valid = max(1, round(valid_frac * len(ranked))) if len(ranked) - n_test >= 2 else 0
        for i, name in enumerate(ranked):
            split_of[name] = "test" if i < n_test else "valid" if i < n_test + n_valid else "train"
    rng = random.Random(seed)
    chosen: dict[str, list[Passage]] = {}
    for split in SPLITS:
        quota = getattr(quotas, split)
        chosen[split] = []
        for lab in labels:
            groups = [passages(d, lab, quotas.min_words, quotas.max_words)
                      for d, x in labelled if x == lab and split_of[d.name] == split]
            chosen[split] += _take(groups, quota, rng)
        rng.shuffle(chosen[split])
    works = {s: sorted({p.work for p in chosen[s]}) for s in SPLITS}
    return DownstreamTask(labels, chosen["train"], chosen["valid"], chosen["test"], works,
                          sorted(w for w in works["test"] if w in held))


def default_task(cache_dir: Path, quotas: Quotas, seed: int = 0) -> DownstreamTask:
    """The task over the default corpus (fetched into `cache_dir` as `plm build` fetches it)."""
    return build_task(corpus_mod.load_documents(corpus_mod.fetch_default_sources(cache_dir)), quotas, seed)


def collapse_to_source(label: str) -> str:
    """Shakespeare against news: any genre is `shakespeare`."""
    return label if label == NEWS else corpus_mod.SHAKESPEARE


def accuracy_and_macro_f1(truth: Sequence[str], predicted: Sequence[str],
                          labels: Sequence[str]) -> tuple[float, float]:
    """(accuracy, the unweighted mean over `labels` of each label's F1; a label never predicted nor true
    counts 0)."""
    if len(truth) != len(predicted) or not truth:
        raise ValueError(f"need equal, non-empty lists, got {len(truth)} and {len(predicted)}")
    correct = sum(t == p for t, p in zip(truth, predicted, strict=True))
    f1s = []
    for lab in labels:
        tp = sum(t == lab and p == lab for t, p in zip(truth, predicted, strict=True))
        fp = sum(t != lab and p == lab for t, p in zip(truth, predicted, strict=True))
        fn = sum(t == lab and p != lab for t, p in zip(truth, predicted, strict=True))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return correct / len(truth), sum(f1s) / len(f1s)
