"""The text side of the byte-level BPE families (gpt, encdec): words from tokens, each token's text and bytes.

Byte-level BPE marks a word's leading space in its first token, so words are runs of tokens from one word start to
the next, and a token's bytes are read off GPT-2's byte alphabet: decoding a word is joining its tokens' bytes,
with no call into the tokenizer.
"""

from __future__ import annotations

import json
import unicodedata

import numpy as np
from plm.service.families.base import Encoded
from plm.service.families.textnorm import PlainTextEncoder
from tokenizers import Tokenizer


def is_word_start(token: str) -> bool:
    """Byte-level BPE marks a leading space as 'Ġ' (newline 'Ċ', tab 'ĉ'); punctuation is a word of its own."""
    if not token:
        return False
    first = token[0]
    if first in "ĠĊĉ":
        return True
    return not unicodedata.category(first).startswith(("L", "N", "M"))


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet (tokenizers' ByteLevel): the printable character that stands for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shown = dict(zip(printable, printable, strict=True))
    for b in range(256):
        if b not in shown:
            shown[b] = 256 + len(shown) - len(printable)
    return {chr(c): b for b, c in shown.items()}


def token_bytes_table(tokenizer: Tokenizer, vocab_size: int) -> list[bytes] | None:
    """Each token's bytes when the tokenizer decodes byte-level tokens and nothing else (else None)."""
    spec = json.loads(tokenizer.to_str())
    if (spec.get("decoder") or {}).get("type") != "ByteLevel":
        return None
    special = {a["id"] for a in spec.get("added_tokens", []) if a.get("special")}
    if any(not a.get("special") for a in spec.get("added_tokens", [])):
        return None  # a plain added token is decoded as its own text, not as byte-level characters
    alphabet = _byte_level_alphabet()
    table = []
    for i in range(vocab_size):
        token = tokenizer.id_to_token(i) or ""
        if i in special:
            table.append(b"")  # decode(skip_special_tokens=True) leaves them out
        elif all(ch in alphabet for ch in token):
            table.append(bytes(alphabet[ch] for ch in token))
        else:
            return None
    return table


class ByteLevelText:
    """The text methods of a `ModelAdapter` whose tokenizer is byte-level BPE; `set_up_text` after the tokenizer."""

    tokenizer: Tokenizer
    vocab_size: int
    _never: np.ndarray  # (V,) tokens never generated; a family adds its own

    def set_up_text(self) -> None:
        # Plain text skips the normalizer, which would leave it unchanged (service/families/textnorm.py).
        self._encoder = PlainTextEncoder(self.tokenizer)
        vocab = [self.tokenizer.id_to_token(i) or "" for i in range(self.vocab_size)]
        self._word_start = np.array([is_word_start(t) for t in vocab], dtype=bool)
        # Each token's own text and bytes, decoded once here rather than per call.
        self._token_texts = [self.tokenizer.decode([i], skip_special_tokens=False) for i in range(self.vocab_size)]
        self._token_bytes = token_bytes_table(self.tokenizer, self.vocab_size)
        self._never = np.zeros(self.vocab_size, dtype=bool)

    def encode(self, text: str) -> Encoded:
        ids = self.encode_ids(text)
        word_index: list[int] = []
        groups: list[list[int]] = []
        for k, i in enumerate(ids):
            if k == 0 or self._word_start[i]:
                groups.append([])
            groups[-1].append(i)
            word_index.append(len(groups) - 1)
        return Encoded(ids, [self._token_texts[i] for i in ids], word_index, [self._word_text(g) for g in groups],
                       [False] * len(ids))

    def _word_text(self, ids: list[int]) -> str:
        """`decode(ids).strip()`: from the tokens' bytes when decoding is just joining them (byte-level BPE), which
        saves a call into the tokenizer per word of every scored text."""
        table = self._token_bytes
        if table is None:
            return self.tokenizer.decode(ids).strip()
        return b"".join([table[i] for i in ids]).decode("utf-8", errors="replace").strip()

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def encode_ids(self, text: str) -> list[int]:
        return list(self._encoder.encode(text).ids)

    def token_text(self, token_id: int) -> str:
        return self._token_texts[token_id]

    def token_bytes(self) -> list[bytes] | None:
        return self._token_bytes

    def word_start_mask(self) -> np.ndarray:
        return self._word_start

    def never_generate_mask(self) -> np.ndarray:
        return self._never
