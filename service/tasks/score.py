"""Score: sentence probability by the chain rule, per token and per word, and the ranking of candidates."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from plm.service.errors import InvalidArgument
from plm.service.families.base import Encoded, ModelAdapter, TokenScores
from plm.service.families.capabilities import ConditionalScorer, Scorer, SourceReader
from plm.service.tasks.common import encode_checked


@dataclass(frozen=True)
class ScoreParams:
    texts: tuple[str, ...]
    add_eos: bool = True
    per_token: bool = True
    sources: tuple[str, ...] = ()  # an encoder-decoder's: one for every text, or one per text


class TokenResult(NamedTuple):  # one per token of every scored text: a frozen dataclass's init is slow
    id: int
    token: str
    log_prob: float
    ngram_length: int
    oov: bool


@dataclass(frozen=True)
class SentenceResult:
    text: str
    log_prob: float
    num_tokens: int
    num_words: int
    num_oov: int
    tokens: tuple[TokenResult, ...]
    words: tuple[tuple[str, float], ...]

    @property
    def log10_prob(self) -> float:
        return self.log_prob / math.log(10.0)

    @property
    def perplexity(self) -> float:
        return math.exp(-self.log_prob / max(self.num_tokens, 1))

    def word_perplexity(self, add_eos: bool) -> float:
        return math.exp(-self.log_prob / max(self.num_words + (1 if add_eos else 0), 1))


@dataclass(frozen=True)
class ScoreResult:
    method: str
    sentences: tuple[SentenceResult, ...]
    ranking: tuple[int, ...]
    add_eos: bool  # whether the end of sentence was scored (never for pseudo-log-likelihood)


async def score(model: ModelAdapter, params: ScoreParams, deadline: float | None) -> ScoreResult:
    if params.sources or isinstance(model, ConditionalScorer):
        return await _score_given(model, params, deadline)
    scorer = Scorer.of(model)
    add_eos = params.add_eos and scorer.score_method == "causal"  # a masked LM predicts no end of sentence
    encoded = encode_checked(model, params.texts, "texts", reserve=1 if add_eos else 0)
    scored = await scorer.score([e.ids for e in encoded], add_eos, deadline)
    return _result(model, params, scorer.score_method, add_eos, encoded, scored)


async def _score_given(model: ModelAdapter, params: ScoreParams, deadline: float | None) -> ScoreResult:
    """An encoder-decoder's log P(text | source) for each text and its source."""
    if not isinstance(model, ConditionalScorer) or not isinstance(model, SourceReader):
        raise InvalidArgument("sources", f"scores a text given a source, which only an encoder-decoder does; "
                                         f"model {model.name!r} is {model.family!r}")
    ConditionalScorer.of(model)
    if not params.sources:
        raise InvalidArgument("sources", f"is empty; model {model.name!r} is an encoder-decoder and scores each "
                                         "text given a source (one for every text, or one per text)")
    sources = [model.source_ids(s, "sources", f"[{i}]") for i, s in enumerate(params.sources)]
    encoded = encode_checked(model, params.texts, "texts", reserve=1 if params.add_eos else 0)
    pairs = [(sources[i if len(sources) > 1 else 0], e.ids) for i, e in enumerate(encoded)]
    scored = await model.score_given(pairs, params.add_eos, deadline)
    return _result(model, params, "conditional", params.add_eos, encoded, scored)


def _result(model: ModelAdapter, params: ScoreParams, method: str, add_eos: bool, encoded: list[Encoded],
            scored: list[TokenScores]) -> ScoreResult:
    sentences = []
    for text, enc, sc in zip(params.texts, encoded, scored, strict=True):
        lps = np.asarray(sc.log_probs, dtype=np.float64).tolist()  # Python floats in one C call, not per token
        ids, names, oov = list(enc.ids), list(enc.tokens), list(enc.oov)
        if add_eos:
            ids.append(model.eos_id)
            names.append(model.token_text(model.eos_id))
            oov.append(False)
        lengths = sc.ngram_lengths or [0] * len(lps)
        if not len(ids) == len(names) == len(lps) == len(lengths) == len(oov):
            raise ValueError(f"{len(lps)} scores for {len(ids)} tokens")
        # map calls the NamedTuple per token with no generator frame between; only when the tokens are asked for
        tokens = tuple(map(TokenResult, ids, names, lps, lengths, oov)) if params.per_token else ()
        word_lps = [0.0] * len(enc.words)
        for k, w in enumerate(enc.word_index):
            word_lps[w] += lps[k]
        sentences.append(SentenceResult(
            text=text, log_prob=sum(lps), num_tokens=len(lps), num_words=len(enc.words), num_oov=sum(enc.oov),
            tokens=tokens,
            words=tuple(zip(enc.words, word_lps, strict=True)) if params.per_token else (),
        ))
    ranking = tuple(sorted(range(len(sentences)), key=lambda i: -sentences[i].log_prob))
    return ScoreResult(method, tuple(sentences), ranking, add_eos)
