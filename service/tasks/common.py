"""Checks every task makes on its inputs once they are tokenized."""

from __future__ import annotations

from service.errors import InvalidArgument
from service.families.base import Encoded, ModelAdapter


def encode_checked(model: ModelAdapter, texts: tuple[str, ...], field: str, reserve: int | None = 0,
                   allow_empty: bool = False) -> list[Encoded]:
    """Tokenize each text; refuse empty ones and ones longer than the model's window less `reserve` tokens
    (`reserve=None`: no length check, the caller decides)."""
    limit = model.context_budget - reserve if reserve is not None else float("inf")
    encoded = []
    for i, text in enumerate(texts):
        enc = model.encode(text)
        if not enc.ids and not allow_empty:
            raise InvalidArgument(f"{field}[{i}]", "has no tokens (empty or only whitespace)")
        if len(enc.ids) > limit:
            raise InvalidArgument(
                f"{field}[{i}]",
                f"is {len(enc.ids)} tokens; model {model.name!r} takes at most {limit} "
                f"(window {model.max_length}, less {model.max_length - int(limit)} for BOS/EOS/new tokens)",
            )
        encoded.append(enc)
    return encoded
