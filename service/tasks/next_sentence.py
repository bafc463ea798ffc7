"""PredictNextSentence: P(B follows A) from a model's next-sentence-prediction head (BERT)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from plm.service.errors import InvalidArgument
from plm.service.families.base import ModelAdapter
from plm.service.families.capabilities import NextSentencePredictor


@dataclass(frozen=True)
class NspParams:
    pairs: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class NspResult:
    a: str
    b: str
    log_prob: float

    @property
    def prob(self) -> float:
        return math.exp(self.log_prob)


async def next_sentence(model: ModelAdapter, params: NspParams, deadline: float | None) -> list[NspResult]:
    nsp = NextSentencePredictor.of(model)
    pairs = []
    for i, (a, b) in enumerate(params.pairs):
        ia, ib = model.encode_ids(a), model.encode_ids(b)
        for at, ids in ((f"[{i}].a", ia), (f"[{i}].b", ib)):
            if not ids:
                raise InvalidArgument("pairs", "has no tokens (empty or only whitespace)", at=at)
        if len(ia) + len(ib) > model.context_budget - 1:  # [CLS] A [SEP] B [SEP]: one more [SEP] than one text
            raise InvalidArgument(
                "pairs", f"is {len(ia) + len(ib)} tokens together; model {model.name!r} takes at most "
                f"{model.context_budget - 1} for a pair", at=f"[{i}]"
            )
        pairs.append((ia, ib))
    lps = await nsp.next_sentence_logprobs(pairs, deadline)
    return [NspResult(a, b, float(lp)) for (a, b), lp in zip(params.pairs, lps, strict=True)]
