"""Classify: few-shot in-context classification with a causal LM (the GPT-3 idea of the notes).

The prompt is the instruction, then every demonstration written with the template, then the query written
up to its label; each candidate label is scored as the continuation (lm-evaluation-harness's
`loglikelihood(context, " " + label)`). The demonstrations are a prefix shared by every query and label:
with a model that scores from a cached prefix (its PrefixScorer capability: a KV-cache engine) their keys
and values are computed once (and cached across requests, LRU) and every (query, label) pair — and the
content-free ones for calibration — runs from them in one batched pass; without one, the pairs' whole
sequences go to the model in one batched call.

A model with a trained head (its LabelClassifier capability: the `classifier` family) needs no prompt: each
query's label probabilities are the softmax of the head's logits over the requested labels, which must be
labels of the head (none requested, or all of them: the head's own probabilities). It takes no demonstrations,
instruction or calibration; the template and scoring do not apply.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from plm.service.errors import InvalidArgument
from plm.service.families.base import ModelAdapter
from plm.service.families.capabilities import LabelClassifier, PrefixScorer, Scorer

DEFAULT_TEMPLATE = "Text: {text}\nLabel: {label}\n\n"
SCORING_SUM, SCORING_TOKEN_MEAN, SCORING_PER_CHAR = "sum", "token_mean", "per_char"


@dataclass(frozen=True)
class ClassifyParams:
    queries: tuple[str, ...]
    labels: tuple[str, ...]
    demonstrations: tuple[tuple[str, str], ...] = ()
    instruction: str = ""
    template: str = DEFAULT_TEMPLATE
    scoring: str = SCORING_SUM
    calibrate: bool = False
    content_free: str = "N/A"


@dataclass(frozen=True)
class LabelResult:
    label: str
    probability: float
    log_likelihood: float
    score: float
    num_tokens: int


@dataclass(frozen=True)
class ClassifyResult:
    query: str
    label: str
    scores: tuple[LabelResult, ...]


def split_template(template: str) -> tuple[str, str]:
    """(the part before {label}, the rest). The template must hold {text} before {label}."""
    if "{text}" not in template or "{label}" not in template or template.index("{text}") > template.index("{label}"):
        raise InvalidArgument("template", "must contain {text} and then {label}")
    head, tail = template.split("{label}", 1)
    return head, tail


def build_prefix(p: ClassifyParams) -> str:
    """The instruction and every demonstration: the prompt part that every query shares."""
    head, tail = split_template(p.template)
    prefix = p.instruction.strip() + "\n\n" if p.instruction.strip() else ""
    for text, label in p.demonstrations:
        prefix += head.replace("{text}", text) + label + tail
    return prefix


async def classify(model: ModelAdapter, p: ClassifyParams, deadline: float | None) -> tuple[list[ClassifyResult], int]:
    if isinstance(model, LabelClassifier) and LabelClassifier.task in model.tasks:
        return await classify_by_head(model, p, deadline), 0
    if not p.labels:
        raise InvalidArgument("labels", f"is empty; model {model.name!r} has no label head, so give at least 2 "
                                        "candidate labels")
    scorer = Scorer.of(model)
    if scorer.score_method != "causal":
        raise InvalidArgument("model", f"in-context classification needs a causal LM; {model.name!r} scores by "
                                       f"{scorer.score_method}")
    head, _ = split_template(p.template)
    prefix = build_prefix(p)
    # The query is written up to the label; whitespace before {label} belongs to the label (" comedy").
    stripped = head.rstrip()
    gap = head[len(stripped):]
    queries = list(p.queries) + ([p.content_free] if p.calibrate else [])
    # Whole strings are tokenized (tokenizers normalise whitespace, so pieces tokenized alone would lose the
    # label's leading space); the label's tokens are those after the context's, where the two agree.
    prefix_ids = model.encode_ids(prefix) if prefix else []
    seqs: list[list[int]] = []
    label_lens: list[int] = []
    shared = len(prefix_ids)
    for qi, query in enumerate(queries):
        context = prefix + stripped.replace("{text}", query)
        ctx_ids = model.encode_ids(context)
        for li, label in enumerate(p.labels):
            full = model.encode_ids(context + gap + label)
            shared = min(shared, _common(prefix_ids, full))
            n = len(full) - _common(ctx_ids, full)
            if n == 0:
                raise InvalidArgument("labels", "has no tokens", at=f"[{li}]")
            if len(full) > model.context_budget:
                field, at = ("queries", f"[{qi}]") if qi < len(p.queries) else ("content_free", "")
                raise InvalidArgument(
                    field, f"with its prompt ({len(prefix_ids)} tokens of instruction and demonstrations) and "
                    f"labels[{li}] is {len(full)} tokens; model {model.name!r} takes at most "
                    f"{model.context_budget}: use fewer or shorter demonstrations", at=at)
            seqs.append(full)
            label_lens.append(n)
    if isinstance(model, PrefixScorer) and model.reuses_prefix:
        # The shared prefix's keys and values are computed once (and cached across requests); every row
        # then runs from them.
        rows = [(seq[shared:len(seq) - n], seq[len(seq) - n:]) for seq, n in zip(seqs, label_lens, strict=True)]
        per_row = await model.score_continuations(prefix_ids[:shared], rows, deadline)
        lls = np.array([float(x.sum()) for x in per_row])
    else:
        scored = await scorer.score(seqs, False, deadline)
        lls = np.array([float(s.log_probs[-n:].sum()) for s, n in zip(scored, label_lens, strict=True)])
    n_labels = len(p.labels)
    lls = lls.reshape(len(queries), n_labels)  # (Q, L): Σ log P(label tokens | prompt)
    lens = np.array(label_lens, dtype=np.float64).reshape(len(queries), n_labels)
    norm: np.ndarray = np.ones(n_labels)
    if p.scoring == SCORING_TOKEN_MEAN:
        norm = lens
    elif p.scoring == SCORING_PER_CHAR:
        norm = np.array([len(label) for label in p.labels], dtype=np.float64)
    scores = lls / norm
    if p.calibrate:  # divide out P(label | content-free input): subtract in log space
        scores = scores[:-1] - scores[-1]
        lls, lens = lls[:-1], lens[:-1]
    results = []
    for query, row_ll, row, row_len in zip(p.queries, lls, scores, lens, strict=True):
        probs = np.exp(row - row.max())
        probs /= probs.sum()
        best = int(np.argmax(row))
        results.append(ClassifyResult(query, p.labels[best], tuple(
            LabelResult(label, float(pr), float(ll), float(sc), int(n))
            for label, pr, ll, sc, n in zip(p.labels, probs, row_ll, row, row_len, strict=True)
        )))
    return results, shared


async def classify_by_head(model: LabelClassifier, p: ClassifyParams, deadline: float | None) -> list[ClassifyResult]:
    """Each query's requested labels scored by the head: softmax of their logits (log_likelihood is the log of
    that probability, score the logit, num_tokens 0)."""
    assert isinstance(model, ModelAdapter)
    for field, given in (("demonstrations", bool(p.demonstrations)), ("instruction", bool(p.instruction.strip())),
                         ("calibrate", p.calibrate)):
        if given:
            raise InvalidArgument(field, f"does not apply: model {model.name!r} classifies with its trained head, "
                                         "without a prompt")
    index = {label: i for i, label in enumerate(model.labels)}
    labels = p.labels or model.labels  # none requested: all of the head's, in its order
    for i, label in enumerate(p.labels):
        if label not in index:
            raise InvalidArgument("labels", f"has {label!r}, which is not a label of model {model.name!r}; its "
                                            f"labels are {', '.join(model.labels)}", at=f"[{i}]")
    model.refuse_if_full(len(p.queries))
    logits = await model.label_logits([model.encode_ids(q) for q in p.queries], deadline)  # (Q, L) float32
    chosen = logits[:, [index[label] for label in labels]].astype(np.float64)  # (Q, requested)
    logprobs = chosen - chosen.max(axis=1, keepdims=True)
    logprobs -= np.log(np.exp(logprobs).sum(axis=1, keepdims=True))
    return [ClassifyResult(query, labels[int(np.argmax(row))], tuple(
        LabelResult(label, float(np.exp(lp)), float(lp), float(score), 0)
        for label, lp, score in zip(labels, row, scores, strict=True)))
        for query, row, scores in zip(p.queries, logprobs, chosen, strict=True)]


def _common(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two id lists."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
