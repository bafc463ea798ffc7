"""PredictNext: the most likely next words (and tokens) after a context.

For word-level models a token is a word and the answer is the top of one distribution. For sub-word models
a word is a path of tokens: a beam search extends word-initial tokens with continuation tokens and closes a
word when the model's next token would start a new word (or end the text):

    P(word | ctx) = P(t1 | ctx) · P(t2 | ctx, t1) · … · P(tn | ctx, t1..tn-1) · P(boundary | ctx, t1..tn)

where P(boundary) sums the probability of every word-initial token and EOS. Spellings of the same word that
the beam finds are summed. Every search step is one batched forward over all beams of all contexts.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from plm.service.families.base import ModelAdapter, top_allowed, top_of
from plm.service.families.capabilities import NextWordPredictor
from plm.service.tasks.common import ids_checked


@dataclass(frozen=True)
class NextParams:
    contexts: tuple[str, ...]
    top_k: int = 5
    include_tokens: bool = False
    beam_width: int = 0  # 0 = max(top_k, 4)
    max_word_tokens: int = 4


class CandidateResult(NamedTuple):  # a tuple: made 5-10 times per call, and a frozen dataclass's init is slow
    text: str
    log_prob: float
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class NextResult:
    context: str
    words: tuple[CandidateResult, ...]
    tokens: tuple[CandidateResult, ...]


_MASKS: weakref.WeakKeyDictionary[ModelAdapter, tuple[bool, np.ndarray, np.ndarray]] = weakref.WeakKeyDictionary()


def _masks(model: ModelAdapter) -> tuple[bool, np.ndarray, np.ndarray]:
    """(every token starts a word, tokens that may start a predicted word, tokens that may be predicted), built
    once per model: they never change, and each is a vocabulary-sized array operation on every call otherwise."""
    cached = _MASKS.get(model)
    if cached is None:
        starts, never = model.word_start_mask(), model.never_generate_mask()
        word_initial = starts & ~never
        word_initial[model.eos_id] = False
        cached = _MASKS[model] = (bool(starts.all()), word_initial, ~never)
    return cached


async def predict_next(model: ModelAdapter, params: NextParams, deadline: float | None) -> list[NextResult]:
    predictor = NextWordPredictor.of(model)
    contexts = ids_checked(model, params.contexts, "contexts", allow_empty=True)
    word_level, word_initial, token_ok = _masks(model)

    def cands(ids: np.ndarray, logprobs: np.ndarray) -> tuple[CandidateResult, ...]:
        return tuple(CandidateResult(model.token_text(t), lp, (t,))
                     for t, lp in zip(ids.tolist(), logprobs.tolist(), strict=True))

    tokens: list[tuple[CandidateResult, ...]] = [() for _ in contexts]
    if word_level:  # word-level model: the top of one distribution answers it (the family may skip building it)
        masks = (word_initial, token_ok) if params.include_tokens else (word_initial,)
        tops = await predictor.next_top(contexts, masks, params.top_k, deadline)
        words = [cands(*top[0]) for top in tops]
        if params.include_tokens:
            tokens = [cands(*top[1]) for top in tops]
    else:
        first = await predictor.next_logprobs(contexts, deadline)  # (B, V)
        words = [tuple(w) for w in await _complete_words(model, predictor, contexts, first, params, deadline)]
        if params.include_tokens:
            tokens = [cands(*top_of(row, token_ok, params.top_k)) for row in first]
    return [NextResult(ctx, w, t) for ctx, w, t in zip(params.contexts, words, tokens, strict=True)]


async def _complete_words(
    model: ModelAdapter, predictor: NextWordPredictor, contexts: list[list[int]], first: np.ndarray,
    params: NextParams, deadline: float | None
) -> list[list[CandidateResult]]:
    starts, never, eos = model.word_start_mask(), model.never_generate_mask(), model.eos_id
    boundary = starts.copy()
    boundary[eos] = True  # ending the text also ends the word
    _, initial, _ = _masks(model)
    continuation = ~starts & ~never
    beam = params.beam_width or max(params.top_k, 4)
    # Per context: open paths (token ids, log-prob) and finished words {text: (log-prob, ids)}.
    beams: list[list[tuple[tuple[int, ...], float]]] = [
        [((int(t),), float(row[t])) for t in top_allowed(row, initial, beam)] for row in first
    ]
    done: list[dict[str, tuple[float, tuple[int, ...]]]] = [{} for _ in contexts]
    for _ in range(params.max_word_tokens):
        flat = [(c, path, lp) for c, paths in enumerate(beams) for path, lp in paths
                if len(contexts[c]) + len(path) < model.context_budget]
        if not flat:
            break
        out = await predictor.next_logprobs([contexts[c] + list(path) for c, path, _ in flat], deadline)
        new_beams: list[list[tuple[tuple[int, ...], float]]] = [[] for _ in contexts]
        for (c, path, lp), row in zip(flat, out, strict=True):
            end = float(np.logaddexp.reduce(row[boundary].astype(np.float64)))
            word = model.decode(list(path)).strip()
            if word:
                old = done[c].get(word)
                total = lp + end if old is None else float(np.logaddexp(old[0], lp + end))
                done[c][word] = (total, old[1] if old is not None and old[0] > lp + end else path)
            for t in top_allowed(row, continuation, beam):
                new_beams[c].append(((*path, int(t)), lp + float(row[t])))
        for c in range(len(contexts)):
            # A path's probability only shrinks as it grows: drop paths that can no longer reach the top k.
            best = sorted((v[0] for v in done[c].values()), reverse=True)
            floor = best[params.top_k - 1] if len(best) >= params.top_k else -np.inf
            beams[c] = sorted((p for p in new_beams[c] if p[1] > floor), key=lambda p: -p[1])[:beam]
    return [
        [CandidateResult(w, lp, ids) for w, (lp, ids) in sorted(d.items(), key=lambda kv: -kv[1][0])[: params.top_k]]
        for d in done
    ]
