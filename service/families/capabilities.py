"""The capabilities a model family may serve, one small interface each, and how a task asks for one.

`ModelAdapter` (base.py) holds what every family has: name, folder, typed manifest, tokenizer, lifecycle.
What a model can *do* is a capability here; a family class subclasses each one it serves, and the manifest's
`tasks` list says which of those one model folder offers (an encoder imported without its MLM head serves
`embed` but not `fill_mask`). The registry refuses a manifest that lists a task its family has no capability
for (`check_tasks`), and a task asks for its capability with `Scorer.of(model)`, which raises
FAILED_PRECONDITION when the model does not serve it.

Capabilities are abstract base classes, not structural protocols: a family declares them by name, so a
method that exists only to refuse a call (ELMo's `next_logprobs`) does not make a capability, and a family
that declares one but misses a method fails when it is built rather than when a request arrives.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Iterable
from typing import ClassVar, TypeVar

import numpy as np
from plm.service.contract.manifest import ManifestError
from plm.service.errors import FailedPrecondition
from plm.service.families.base import ModelAdapter, TokenScores, TokenVectors, top_of
from plm.service.generation.sequence import Sequence, StepEvent, choose

# The task names a manifest may list; each is served by one capability below.
TASK_SCORE = "score"
TASK_PREDICT_NEXT = "predict_next"
TASK_GENERATE = "generate"
TASK_FILL_MASK = "fill_mask"
TASK_EMBED = "embed"
TASK_NSP = "next_sentence"
TASK_CLASSIFY = "classify"  # by a trained head (a causal LM classifies in context through its Scorer instead)


class Capability(abc.ABC):  # noqa: B024 (a marker base: each capability below names its own abstract methods)
    """Something a family serves. `task` is the manifest task that offers it ("" = none of its own: it only
    makes a task faster or richer, and the task checks for it itself)."""

    task: ClassVar[str] = ""

    @classmethod
    def of(cls: type[C], model: ModelAdapter) -> C:
        """`model` as this capability, when its manifest lists the capability's task and its family serves it;
        FAILED_PRECONDITION otherwise."""
        if (cls.task and cls.task not in model.tasks) or not isinstance(model, cls):
            raise FailedPrecondition(f"model {model.name!r} ({model.family}) does not serve {cls.task!r}; "
                                     f"it serves: {', '.join(model.tasks)}")
        return model


C = TypeVar("C", bound=Capability)


class Scorer(Capability):
    """score (and classify, when causal): log-probabilities of given token sequences."""

    task = TASK_SCORE
    score_method: ClassVar[str] = "causal"  # how `score` computes: "causal" | "pseudo_log_likelihood"

    @abc.abstractmethod
    async def score(self, seqs: list[list[int]], add_eos: bool, deadline: float | None) -> list[TokenScores]:
        """For each id sequence: log P(token_i | BOS, tokens_<i) for every token (and EOS when add_eos)."""


class NextWordPredictor(Capability):
    """predict_next: the distribution of the token after a context."""

    task = TASK_PREDICT_NEXT

    @abc.abstractmethod
    async def next_logprobs(self, contexts: list[list[int]], deadline: float | None) -> np.ndarray:
        """(B, V) float32: log P(next token | BOS, context) for each context."""

    async def next_top(self, contexts: list[list[int]], allowed: tuple[np.ndarray, ...], k: int,
                       deadline: float | None) -> list[list[tuple[np.ndarray, np.ndarray]]]:
        """For each context and each (V,) bool mask of `allowed`, the k most likely allowed next tokens, best
        first: (ids, float32 log-probs).

        The same numbers as `next_logprobs` followed by `top_allowed`; a family may answer without building
        the whole (V,) distribution (the n-gram models do)."""
        rows = await self.next_logprobs(contexts, deadline)
        return [[top_of(row, mask, k) for mask in allowed] for row in rows]


class MaskFiller(Capability):
    """fill_mask: the distribution of the token at each blank of a sequence."""

    task = TASK_FILL_MASK

    @property
    @abc.abstractmethod
    def mask_id(self) -> int:
        """The id that stands for a blank in `mask_logprobs` sequences."""

    @abc.abstractmethod
    async def mask_logprobs(self, seqs: list[list[int]], positions: list[list[int]],
                            deadline: float | None) -> list[np.ndarray]:
        """For each sequence (text token ids, `mask_id` at the blanks) and its blank positions (indices into
        the sequence), the (M, V) float32 log-probabilities of each blank's token."""

    async def mask_top(self, seqs: list[list[int]], positions: list[list[int]], allowed: np.ndarray, k: int,
                       deadline: float | None) -> list[list[tuple[np.ndarray, np.ndarray]]]:
        """`mask_logprobs` then `top_of` each blank's row: per sequence, per blank, the k most likely allowed
        tokens and their log-probs, best first. A family may compute it where the rows are (off the event loop)."""
        dists = await self.mask_logprobs(seqs, positions, deadline)
        return [[top_of(row, allowed, k) for row in dist] for dist in dists]


class Embedder(Capability):
    """embed: per-token vectors of a sequence (and, for static vectors, the whole vocabulary's)."""

    task = TASK_EMBED

    @abc.abstractmethod
    async def embed(self, seqs: list[list[int]], layer_weights: tuple[float, ...] | None,
                    deadline: float | None) -> list[TokenVectors]:
        """Per-token vectors of each sequence (ELMo mixes its layers with `layer_weights`, or the manifest
        default when None; other families ignore it)."""

    def word_vectors(self) -> np.ndarray | None:
        """(V, D) L2-normalised static vectors of the vocabulary (word2vec), for nearest words and analogies."""
        return None


class NextSentencePredictor(Capability):
    """next_sentence: P(B follows A) from a next-sentence-prediction head."""

    task = TASK_NSP

    @abc.abstractmethod
    async def next_sentence_logprobs(self, pairs: list[tuple[list[int], list[int]]],
                                     deadline: float | None) -> np.ndarray:
        """(B,) log P(B follows A) for each (A ids, B ids) pair."""


class Generator(Capability):
    """generate: continue prompts token by token, yielding each sequence's events as they come."""

    task = TASK_GENERATE

    @abc.abstractmethod
    def generate(self, seqs: list[Sequence], deadline: float | None) -> AsyncIterator[StepEvent]:
        """Run every sequence to its end; each ends with an event carrying its finish reason."""


class PrefixScorer(Capability):
    """classify's shared-prefix path: continuations scored after one prefix whose state is computed once
    (and cached across calls). A causal Scorer without it scores every whole sequence instead."""

    @property
    @abc.abstractmethod
    def reuses_prefix(self) -> bool:
        """Whether `score_continuations` may be used now (a KV-cache engine runs and prefix reuse is on)."""

    @abc.abstractmethod
    async def score_continuations(self, prefix: list[int], rows: list[tuple[list[int], list[int]]],
                                  deadline: float | None) -> list[np.ndarray]:
        """log P of each target token of each (context ids, target ids) row, after BOS + `prefix` + the row's
        context: per row, (n_targets,)."""


class SourceReader(Capability):
    """An encoder-decoder's source side: generate's prompts (and score's sources, fill_mask's texts) are its
    encoder's input, with a window of their own, and the decoder's output has its own window."""

    @property
    @abc.abstractmethod
    def max_new_tokens(self) -> int:
        """Most tokens the decoder may produce (its window less the start token)."""

    @abc.abstractmethod
    def source_ids(self, text: str, field: str, at: str, truncate: bool = False) -> list[int]:
        """A source's token ids (the encoder's </s> is added where it runs); INVALID_ARGUMENT naming `field` + `at`
        for an empty source, one over the encoder's window (unless `truncate`: its first tokens are kept), a
        [MASK] or a sentinel written literally."""


class ConditionalScorer(Capability):
    """score with `sources`: log P(target | source) of an encoder-decoder, token by token (teacher forcing)."""

    task = TASK_SCORE

    @abc.abstractmethod
    async def score_given(self, pairs: list[tuple[list[int], list[int]]], add_eos: bool,
                          deadline: float | None) -> list[TokenScores]:
        """For each (source ids, target ids): log P(target_i | source, target_<i) for every target token (and
        </s> when add_eos)."""


class SpanFiller(Capability):
    """fill_mask by an encoder-decoder: each blank filled with a span of any length (sentinel infilling)."""

    task = TASK_FILL_MASK

    @abc.abstractmethod
    async def fill_spans(self, texts: list[str], k: int, deadline: float | None
                         ) -> list[list[list[tuple[tuple[int, ...], float]]]]:
        """Per text (blanks marked [MASK]), per blank, its k most likely spans (ids, log P) best first."""


class LabelClassifier(Capability):
    """classify by a trained head: a fixed set of labels and one logit per label for each text, no prompt."""

    task = TASK_CLASSIFY

    @property
    @abc.abstractmethod
    def labels(self) -> tuple[str, ...]:
        """The head's labels, in the order of its logits."""

    @abc.abstractmethod
    async def label_logits(self, seqs: list[list[int]], deadline: float | None) -> np.ndarray:
        """(B, L) float32: the head's logit of each label for each text's token ids."""


# The manifest task → the capability that serves it.
TASK_CAPABILITIES: dict[str, type[Capability]] = {
    cap.task: cap for cap in (Scorer, NextWordPredictor, MaskFiller, Embedder, NextSentencePredictor, Generator,
                              LabelClassifier)
}
# Capabilities that serve a task in another family's way (an encoder-decoder's score and fill_mask).
ALSO_SERVING: tuple[type[Capability], ...] = (ConditionalScorer, SpanFiller)


def served_tasks(family: object) -> list[str]:
    """The manifest tasks an adapter class can serve, sorted (none for anything but a class)."""
    if not isinstance(family, type):
        return []
    caps = (*TASK_CAPABILITIES.values(), *ALSO_SERVING)
    return sorted({cap.task for cap in caps if issubclass(family, cap)})


def check_tasks(family: object, family_name: str, tasks: Iterable[str], source: str) -> None:
    """Refuse a manifest (`source` names its file) whose `tasks` list one its family's class cannot serve."""
    can = served_tasks(family)
    for i, task in enumerate(tasks):
        if task not in can:
            raise ManifestError(f"{source}: field 'tasks[{i}]' is {task!r}, which family {family_name!r} cannot "
                                f"serve (it serves: {', '.join(can)})")


async def generate_by_recompute(model: ModelAdapter, predictor: NextWordPredictor, seqs: list[Sequence],
                                deadline: float | None) -> AsyncIterator[StepEvent]:
    """Generation without a KV cache: every step re-reads each running sequence whole (one batched
    `next_logprobs` over all of them) and samples its next token."""
    allowed = ~model.never_generate_mask()
    active = seqs
    while active:
        rows = await predictor.next_logprobs([s.prompt_ids + s.generated for s in active], deadline)
        for seq, tok in zip(active, choose(rows, allowed, active), strict=True):
            for ev in seq.advance(tok):
                yield ev
        active = [s for s in active if not s.finished]
