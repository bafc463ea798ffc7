"""The alternatives behind `logprobs: k` (k > 0) of /v1/completions: at each reported position, the k most likely
next tokens of the model's distribution there, with their log-probabilities.

The generation engine reports the tokens it chose, not the distributions it chose them from, so these come from
the model's next-token capability (`NextWordPredictor.next_logprobs`: log P(next | BOS, context) from the scoring
graph, through the model's batcher) over the token-id prefixes of each position, in the same data-plane call
(its lease, deadline and metrics). A position costs one scoring row of its prefix's length. A model without a
causal next-token distribution (a masked LM, an encoder-decoder, word vectors) cannot answer; `logprobs: 0`
(the chosen tokens alone, from Score) still works there.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from plm.service.dataplane.plane import Call
from plm.service.errors import InvalidArgument
from plm.service.families.base import ModelAdapter, top_of
from plm.service.families.capabilities import NextWordPredictor, Scorer

MAX_LOGPROBS = 5  # OpenAI's own limit for the legacy completions endpoint
_CHUNK = 64  # contexts per next_logprobs call: bounds the (B, V) arrays held at once


class Position:
    """One reported token: its log-probability where the model's distribution gave it, and the top tokens."""

    __slots__ = ("log_prob", "top")

    def __init__(self, log_prob: float, top: dict[str, float]) -> None:
        self.log_prob = log_prob
        self.top = top


def predictor(call: Call, model: str, k: int) -> tuple[ModelAdapter, NextWordPredictor]:
    """The call's model and its next-token capability; a model without one refuses `logprobs` by name."""
    held = call.model(model)
    causal = not isinstance(held, Scorer) or held.score_method == "causal"
    if not isinstance(held, NextWordPredictor) or not causal or "predict_next" not in held.tasks:
        raise InvalidArgument("logprobs", f"is {k}; model {held.name!r} has no next-token distribution to draw "
                                          "alternatives from (it serves " + ", ".join(held.tasks) + "); use "
                                          "logprobs 0 for the chosen tokens' log-probabilities")
    return held, held


async def positions(call: Call, model: str, contexts: Sequence[Sequence[int]], chosen: Sequence[int],
                    k: int) -> list[Position]:
    """For each context (token ids, BOS excluded) and the token chosen after it: log P(chosen | BOS, context) and
    the k most likely next tokens as {token text: log-prob}, best first (the wire adds the chosen token when it
    is not among them: OpenAI's shape, up to k + 1 entries)."""
    held, next_token = predictor(call, model, k)
    allowed = ~held.never_generate_mask()

    async def part(lo: int) -> list[Position]:
        rows = await next_token.next_logprobs([list(c) for c in contexts[lo:lo + _CHUNK]], call.deadline)  # (B, V)
        out = []
        for row, token in zip(rows, chosen[lo:lo + _CHUNK], strict=True):
            ids, lps = top_of(row, allowed, k)
            top: dict[str, float] = {}
            for t, lp in zip(ids.tolist(), lps.tolist(), strict=True):
                top.setdefault(held.token_text(t), lp)  # two ids of one text: the likelier one
            out.append(Position(float(row[token]), top))
        return out

    parts = await asyncio.gather(*(part(lo) for lo in range(0, len(contexts), _CHUNK)))
    return [p for ps in parts for p in ps]
