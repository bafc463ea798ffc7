"""Skipping a tokenizer's normalizer for text it provably leaves unchanged.

Our tokenizers normalise with NFKC, a few regex replacements (control characters, curly quotes, dashes,
whitespace runs), Strip and, for word models, Lowercase. On a short text that is ~10 µs of the ~24 µs a GPT
`encode` takes, paid on the event loop for every text of every call, although most served text is plain
ASCII that none of those steps changes. `plain_text_predicate` reads the tokenizer's normalizer and, when every
step is one whose effect on "plain" text (printable ASCII, single spaces, no space at either end, and no
capital letters when a step lowercases) is nothing, returns that test; the caller then tokenizes plain text
with a copy of the tokenizer that has no normalizer (`without_normalizer`), or skips `normalize_str`. Any step
it does not understand turns the shortcut off for that tokenizer (None): a user's tokenizer.json is never
second-guessed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from tokenizers import Tokenizer

_PRINTABLE_ASCII = [chr(c) for c in range(0x20, 0x7F)]
_UNICODE_FORMS = {"NFC", "NFD", "NFKC", "NFKD"}  # every ASCII character is its own normal form
_CLASS = re.compile(r"^\[(?P<body>(?:[^\[\]\\]|\\.)*)\](?P<plus>\+?)$")  # one character class, maybe repeated


def _plain(text: str) -> bool:
    return text.isascii() and text.isprintable() and "  " not in text and text[:1] != " " and text[-1:] != " "


def _plain_lower(text: str) -> bool:
    return _plain(text) and text == text.lower()


def _replace_is_identity(step: dict[str, Any]) -> bool:
    """A Replace step leaves plain text alone: its pattern never matches it, or matches only single spaces
    (a class with `+`) that it replaces by a single space."""
    pattern, content = step.get("pattern") or {}, step.get("content")
    if "String" in pattern:  # a literal: harmless only if plain text cannot contain it
        literal = pattern["String"]
        return "  " in literal or any(c not in _PRINTABLE_ASCII for c in literal)
    m = _CLASS.match(pattern.get("Regex", ""))
    if m is None:
        return False
    try:
        char_class = re.compile(f"[{m['body']}]")
    except re.error:
        return False
    matched = {c for c in _PRINTABLE_ASCII if char_class.fullmatch(c)}
    return not matched or (matched == {" "} and content == " " and m["plus"] == "+")


def plain_text_predicate(tokenizer: Tokenizer) -> Callable[[str], bool] | None:
    """The test for text the tokenizer's normalizer leaves unchanged, or None when it cannot be told."""
    spec = json.loads(tokenizer.to_str()).get("normalizer")
    if spec is None:
        return None  # nothing to skip
    steps = spec.get("normalizers", []) if spec.get("type") == "Sequence" else [spec]
    lowercase = False
    for step in steps:
        kind = step.get("type")
        if kind in _UNICODE_FORMS or kind == "StripAccents":
            continue
        if kind == "Strip" or (kind == "Replace" and _replace_is_identity(step)):
            continue  # plain text has no whitespace at either end
        if kind == "Lowercase":
            lowercase = True
        elif kind == "BertNormalizer":  # control characters out, each whitespace → " ", CJK spaced, accents
            lowercase = lowercase or bool(step.get("lowercase", True))
        else:
            return None
    return _plain_lower if lowercase else _plain


def without_normalizer(tokenizer: Tokenizer) -> Tokenizer:
    """The same tokenizer with its normalizer removed (for text `plain_text_predicate` passed)."""
    spec = json.loads(tokenizer.to_str())
    spec["normalizer"] = None
    return Tokenizer.from_str(json.dumps(spec))
