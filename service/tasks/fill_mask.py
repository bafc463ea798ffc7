"""FillMask: candidates for each [MASK] blank, with the fields of the Hugging Face fill-mask pipeline.

The text is split at the literal "[MASK]" and each piece tokenized on its own, so every family (WordPiece,
word-level) sees the blank as its `mask_id`. Targets restrict the candidates; a target that is several
tokens long widens its blank to that many masks and sums the pieces' log-probabilities.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from plm.service.errors import InvalidArgument
from plm.service.families.base import MASK, ModelAdapter
from plm.service.families.capabilities import MaskFiller, SpanFiller


@dataclass(frozen=True)
class FillMaskParams:
    texts: tuple[str, ...]
    top_k: int = 5
    targets: tuple[str, ...] = ()


class FillCandidate(NamedTuple):  # a tuple: made top_k times per blank, and a frozen dataclass's init is slow
    token_ids: tuple[int, ...]
    token_str: str
    log_prob: float
    sequence: str


@dataclass(frozen=True)
class FillResult:
    text: str
    masks: tuple[tuple[FillCandidate, ...], ...]  # per blank, best first
    completed: str = ""  # span infilling: the text with every blank filled by its best span


def _with_blanks(model: ModelAdapter, mask_id: int, text: str, at: str) -> tuple[list[int], list[int]]:
    """Token ids of the text with `mask_id` at each blank, and the blanks' positions."""
    pieces = text.split(MASK)
    if len(pieces) < 2:
        raise InvalidArgument("texts", f"has no {MASK} blank to fill", at=at)
    ids: list[int] = []
    positions: list[int] = []
    for k, piece in enumerate(pieces):
        ids.extend(model.encode_ids(piece) if piece.strip() else [])
        if k < len(pieces) - 1:
            positions.append(len(ids))
            ids.append(mask_id)
    if len(ids) > model.context_budget:
        raise InvalidArgument("texts", f"is {len(ids)} tokens; model {model.name!r} takes at most "
                                       f"{model.context_budget}", at=at)
    return ids, positions


_ALLOWED: weakref.WeakKeyDictionary[ModelAdapter, np.ndarray] = weakref.WeakKeyDictionary()


def _allowed(model: ModelAdapter) -> np.ndarray:
    """The (V,) bool tokens a blank may be filled with, built once per model: one array for every call, which
    the batch's top-k recognises as the same by identity (families/bert.py)."""
    allowed = _ALLOWED.get(model)
    if allowed is None:
        allowed = _ALLOWED[model] = ~model.never_generate_mask()
    return allowed


def _spelling(model: ModelAdapter, ids: tuple[int, ...]) -> str:
    """The candidate as it reads in the text (one token: its text, decoded once per model)."""
    return (model.token_text(ids[0]) if len(ids) == 1 else model.decode(list(ids))).strip()


def _glue(text: str, spans: list[str | None]) -> str:
    """`text` with blank b replaced by spans[b] where given (else left as [MASK]), glued to the word before it:
    a span carries its own leading space, as the model wrote it."""
    pieces = text.split(MASK)
    out = []
    for b, piece in enumerate(pieces[:-1]):
        span = spans[b]
        out.append(piece if span is None else piece.rstrip())
        out.append(MASK if span is None else span)
    return "".join(out) + pieces[-1]


async def _fill_spans(model: ModelAdapter, filler: SpanFiller, params: FillMaskParams,
                      deadline: float | None) -> list[FillResult]:
    """An encoder-decoder's top-k spans per blank (its beam search), each with the text it completes."""
    if params.targets:
        raise InvalidArgument("targets", f"restricts single-token candidates; model {model.name!r} fills each "
                                         "blank with a span of any length and takes none")
    found = await filler.fill_spans(list(params.texts), params.top_k, deadline)
    results = []
    for text, blanks in zip(params.texts, found, strict=True):
        best: list[str | None] = [model.decode(list(spans[0][0])) if spans else None for spans in blanks]
        masks = []
        for b, spans in enumerate(blanks):
            cands = []
            for ids, lp in spans:
                span = model.decode(list(ids))
                only: list[str | None] = [None] * len(blanks)
                only[b] = span
                cands.append(FillCandidate(ids, span.strip(), lp, _glue(text, only)))
            masks.append(tuple(cands))
        results.append(FillResult(text, tuple(masks), _glue(text, best)))
    return results


async def fill_mask(model: ModelAdapter, params: FillMaskParams, deadline: float | None) -> list[FillResult]:
    if isinstance(model, SpanFiller):
        return await _fill_spans(model, SpanFiller.of(model), params, deadline)
    filler = MaskFiller.of(model)
    rows = [_with_blanks(model, filler.mask_id, t, f"[{i}]") for i, t in enumerate(params.texts)]
    targets = [(t, model.encode_ids(t)) for t in params.targets]
    for i, (t, ids) in enumerate(targets):
        if not ids or model.never_generate_mask()[ids].any():
            raise InvalidArgument("targets", f"{t!r} is not a word the model can predict (out of vocabulary?)",
                                  at=f"[{i}]")
    seqs, blanks = [ids for ids, _ in rows], [pos for _, pos in rows]
    if targets:  # each target's own log-prob: the whole (M, V) rows
        dists: list[Any] = await filler.mask_logprobs(seqs, blanks, deadline)
    else:  # the top k of each blank, taken where the model ran
        dists = await filler.mask_top(seqs, blanks, _allowed(model), params.top_k, deadline)
    # Several-token targets: one extra row per (text, blank, target) with the blank widened.
    wide_rows: list[list[int]] = []
    wide_pos: list[list[int]] = []
    wide_key: list[tuple[int, int, int]] = []
    for r, (ids, positions) in enumerate(rows):
        for b, p in enumerate(positions):
            for ti, (_, tids) in enumerate(targets):
                if len(tids) > 1:
                    wide_rows.append(ids[:p] + [filler.mask_id] * len(tids) + ids[p + 1:])
                    wide_pos.append(list(range(p, p + len(tids))))
                    wide_key.append((r, b, ti))
    wide = await filler.mask_logprobs(wide_rows, wide_pos, deadline) if wide_rows else []
    wide_lp = {key: float(sum(d[j, t] for j, t in enumerate(targets[key[2]][1])))
               for key, d in zip(wide_key, wide, strict=True)}

    results = []
    token_text, top_k = model.token_text, params.top_k
    for r, (text, dist) in enumerate(zip(params.texts, dists, strict=True)):
        pieces = text.split(MASK)
        masks = []
        for b, row in enumerate(dist):
            before, after = MASK.join(pieces[: b + 1]), MASK.join(pieces[b + 1:])  # the text around blank b
            if targets:
                cands = [(tuple(tids), t, float(row[tids[0]]) if len(tids) == 1 else wide_lp[(r, b, ti)])
                         for ti, (t, tids) in enumerate(targets)]
                cands.sort(key=lambda c: -c[2])
                masks.append(tuple(FillCandidate(ids, word, lp, before + (_spelling(model, ids) or word) + after)
                                   for ids, word, lp in cands[:top_k] if math.isfinite(lp)))
            else:  # one token each, best first already (top_of's order): its text is its spelling
                top_ids, top_lps = row
                masks.append(tuple(
                    FillCandidate((t,), word, lp, before + (word.strip() or word) + after)
                    for t, lp in zip(top_ids.tolist(), top_lps.tolist(), strict=True)
                    if math.isfinite(lp) for word in (token_text(t),)
                ))
        results.append(FillResult(text, tuple(masks)))
    return results
