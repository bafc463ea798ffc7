"""Checks every task makes on its inputs once they are tokenized."""

from __future__ import annotations

from plm.service.errors import InvalidArgument
from plm.service.families.base import Encoded, ModelAdapter


def encode_checked(model: ModelAdapter, texts: tuple[str, ...], field: str, reserve: int | None = 0,
                   allow_empty: bool = False) -> list[Encoded]:
    """Tokenize each text; refuse empty ones and ones longer than the model's window less `reserve` tokens
    (`reserve=None`: no length check, the caller decides)."""
    encoded = [model.encode(text) for text in texts]
    _check(model, [e.ids for e in encoded], field, reserve, allow_empty)
    return encoded


def ids_checked(model: ModelAdapter, texts: tuple[str, ...], field: str, reserve: int | None = 0,
                allow_empty: bool = False) -> list[list[int]]:
    """`encode_checked`'s ids alone: for calls that need no token texts or words."""
    ids = [model.encode_ids(text) for text in texts]
    _check(model, ids, field, reserve, allow_empty)
    return ids


def _check(model: ModelAdapter, seqs: list[list[int]], field: str, reserve: int | None, allow_empty: bool) -> None:
    limit = model.context_budget - reserve if reserve is not None else float("inf")
    for i, ids in enumerate(seqs):
        if not ids and not allow_empty:
            raise InvalidArgument(field, "has no tokens (empty or only whitespace)", at=f"[{i}]")
        if len(ids) > limit:
            raise InvalidArgument(
                field,
                f"is {len(ids)} tokens; model {model.name!r} takes at most {limit} "
                f"(window {model.max_length}, less {model.max_length - int(limit)} for BOS/EOS/new tokens)",
                at=f"[{i}]",
            )
