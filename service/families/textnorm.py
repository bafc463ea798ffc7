"""Skipping a tokenizer's normalizer for text it provably leaves unchanged.

Our tokenizers normalise with NFKC, a few regex replacements (control characters, curly quotes, dashes,
whitespace runs), Strip and, for word models, Lowercase: a third or more of the time `encode` takes on a short
line (`python benchmarks/tokenizing.py`), paid on the event loop for every text of every call, although most
served text is plain ASCII that none of those steps changes but Lowercase and Strip. `plain_text_shortcut`
reads the tokenizer's normalizer and, when every step is one whose effect on "plain" text (printable ASCII,
single spaces, no space at either end once Strip took the spaces off its ends) is nothing or, for Lowercase,
`str.lower` (the same as Unicode lowercasing on ASCII), returns a function that gives the normalised text of
plain text (and None for other text); the caller then tokenizes that with a copy of the tokenizer that has no
normalizer (`without_normalizer`), or uses it instead of `normalize_str`. Any step it does not understand turns
the shortcut off for that tokenizer (None): a user's tokenizer.json is never second-guessed. Text that holds
one of the tokenizer's added tokens always goes the long way.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from tokenizers import Encoding, Tokenizer

_PRINTABLE_ASCII = [chr(c) for c in range(0x20, 0x7F)]
_UNICODE_FORMS = {"NFC", "NFD", "NFKC", "NFKD"}  # every ASCII character is its own normal form
_CLASS = re.compile(r"^\[(?P<body>(?:[^\[\]\\]|\\.)*)\](?P<plus>\+?)$")  # one character class, maybe repeated


def _plain(text: str) -> bool:
    """Printable ASCII, single spaces, no space at either end."""
    return text.isascii() and text.isprintable() and "  " not in text and text[:1] != " " and text[-1:] != " "


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


def plain_text_shortcut(tokenizer: Tokenizer) -> Callable[[str], str | None] | None:
    """The normalised text of plain text (None for other text), or None when the normalizer cannot be told."""
    full = json.loads(tokenizer.to_str())
    spec = full.get("normalizer")
    if spec is None:
        return None  # nothing to skip
    steps = spec.get("normalizers", []) if spec.get("type") == "Sequence" else [spec]
    lowercase = strip = False
    for step in steps:
        kind = step.get("type")
        if kind in _UNICODE_FORMS or kind == "StripAccents" or (kind == "Replace" and _replace_is_identity(step)):
            continue
        if kind == "Strip":  # plain text has no space at either end; with both ends stripped, its spaces go first
            strip = strip or (step.get("strip_left", True) and step.get("strip_right", True))
        elif kind == "Lowercase":
            lowercase = True
        elif kind == "BertNormalizer":  # control characters out, each whitespace → " ", CJK spaced, accents
            lowercase = lowercase or bool(step.get("lowercase", True))
        else:
            return None
    # The tokenizer finds its added tokens ([MASK], <|endoftext|>...) in the text first and normalises each piece
    # between them on its own (Strip then trims the piece's spaces): a text holding one takes the long way.
    added = [a["content"].lower() for a in full.get("added_tokens", []) if a.get("content")]

    def shortcut(text: str) -> str | None:
        # Every other step leaves plain text (capitals included) alone, so the order of the steps does not matter;
        # spaces at the ends, which only the steps on whitespace touch (runs to one space), end up stripped.
        if strip:
            text = text.strip(" ")
        if not _plain(text):
            return None
        low = text.lower()
        if any(a in low for a in added):
            return None
        return low if lowercase else text

    return shortcut


# The word tokenizers' punctuation split (models/tokenization.py, `_PUNCTUATION_SPLIT`): each non-word character
# is a word of its own, but an apostrophe between word characters stays inside ("don't"). On ASCII, Python's `re`
# and the tokenizers' Oniguruma agree on it (`\w` is [A-Za-z0-9_] for both; tests/test_textnorm.py checks).
_KNOWN_SPLITS = {r"[^\w']|(?<!\w)'|'(?!\w)"}


def plain_text_splitter(tokenizer: Tokenizer) -> Callable[[str], list[str]] | None:
    """The pre-tokenizer's words of plain text (what `plain_text_shortcut` returns) without a call into it, or None
    when a step is not one it can reproduce exactly: WhitespaceSplit (single spaces on plain text), an isolating
    Split whose character class matches no printable ASCII (the CJK one: nothing to do), or an isolating Split by a
    known pattern. The pre-tokenizer costs as much as the rest of a word model's PredictNext on the event loop."""
    spec = json.loads(tokenizer.to_str()).get("pre_tokenizer")
    if spec is None:
        return None
    steps = spec.get("pretokenizers", []) if spec.get("type") == "Sequence" else [spec]
    splits: list[re.Pattern[str] | None] = []  # None: split on the single spaces
    for step in steps:
        kind, pattern = step.get("type"), (step.get("pattern") or {}).get("Regex")
        if kind == "WhitespaceSplit":
            splits.append(None)
        elif kind == "Split" and step.get("behavior") == "Isolated" and not step.get("invert") and pattern:
            m = _CLASS.match(pattern)
            if m is not None and not m["plus"] and not any(re.fullmatch(pattern, c) for c in _PRINTABLE_ASCII):
                continue  # it matches nothing in plain text
            if pattern not in _KNOWN_SPLITS:
                return None
            splits.append(re.compile(f"({pattern})"))  # a group: re.split keeps what matched, as "isolated" does
        else:
            return None

    def split(text: str) -> list[str]:
        pieces = [text]
        for rule in splits:
            if rule is None:
                pieces = [p for piece in pieces for p in piece.split(" ") if p]
            else:
                pieces = [p for piece in pieces for p in rule.split(piece) if p]
        return pieces

    return split


def without_normalizer(tokenizer: Tokenizer) -> Tokenizer:
    """The same tokenizer with its normalizer removed (for the text `plain_text_shortcut` gives)."""
    spec = json.loads(tokenizer.to_str())
    spec["normalizer"] = None
    return Tokenizer.from_str(json.dumps(spec))


class PlainTextEncoder:
    """`tokenizer.encode(text, add_special_tokens=False)`, through the shortcut where it applies."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.shortcut = plain_text_shortcut(tokenizer)
        self._bare = without_normalizer(tokenizer) if self.shortcut is not None else tokenizer

    def encode(self, text: str) -> Encoding:
        normal = self.shortcut(text) if self.shortcut is not None else None
        if normal is not None:  # what the normalizer would give: tokenized without it
            return self._bare.encode(normal, add_special_tokens=False)
        return self.tokenizer.encode(text, add_special_tokens=False)
