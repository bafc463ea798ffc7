"""The text side of the WordPiece families (bert, classifier): the tokenizer, its specials, words from pieces.

WordPiece marks a piece that continues the word before it with `##`, so a word is a run of pieces from one
without the mark to the next. Rows are `[CLS] text [SEP]`; [PAD], [CLS], [SEP], [MASK] and [UNK] are never
predicted.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from plm.service.contract import manifest as contract
from plm.service.families.base import Encoded
from plm.service.families.textnorm import PlainTextEncoder
from tokenizers import Tokenizer

CONTINUATION = "##"  # WordPiece's prefix of a piece that continues the word before it


class WordPieceText:
    """The text methods of a `ModelAdapter` whose tokenizer is WordPiece; `_init_wordpiece` loads the tokenizer
    the manifest names and finds its specials."""

    name: str
    folder: Path
    spec: contract.Manifest
    vocab_size: int
    max_length: int
    tokenizer: Tokenizer

    if TYPE_CHECKING:  # ModelAdapter's, which the class this is mixed into has
        def special_id(self, tokenizer: Tokenizer, token: str) -> int: ...

    def _init_wordpiece(self, folder: Path) -> None:
        tok = self.spec.tokenizer
        self.tokenizer = Tokenizer.from_file(str(folder / tok.file))
        # Plain text skips the normalizer, which would leave it unchanged (service/families/textnorm.py).
        self._encoder = PlainTextEncoder(self.tokenizer)
        self._cls = self.special_id(self.tokenizer, tok.special("cls", "[CLS]"))
        self._sep = self.special_id(self.tokenizer, tok.special("sep", "[SEP]"))
        self._mask = self.special_id(self.tokenizer, tok.special("mask", "[MASK]"))
        self._pad = self.special_id(self.tokenizer, tok.special("pad", "[PAD]"))
        self._unk = self.special_id(self.tokenizer, tok.special("unk", "[UNK]"))
        vocab = [self.tokenizer.id_to_token(i) or "" for i in range(self.vocab_size)]
        self._word_start = np.array([not t.startswith(CONTINUATION) for t in vocab], dtype=bool)
        # Each token's own text, decoded once here rather than per call.
        self._token_texts = [self.tokenizer.decode([i], skip_special_tokens=False) for i in range(self.vocab_size)]
        self._never = np.zeros(self.vocab_size, dtype=bool)
        self._never[[self._pad, self._cls, self._sep, self._mask, self._unk]] = True

    def encode(self, text: str) -> Encoded:
        enc = self._encoder.encode(text)
        ids = list(enc.ids)
        word_index: list[int] = []
        groups: list[list[int]] = []
        for k, token in enumerate(enc.tokens):
            if k == 0 or not token.startswith(CONTINUATION):
                groups.append([])
            groups[-1].append(ids[k])
            word_index.append(len(groups) - 1)
        words = [self.tokenizer.decode(g, skip_special_tokens=False) for g in groups]
        return Encoded(ids, list(enc.tokens), word_index, words, [i == self._unk for i in ids])

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def encode_ids(self, text: str) -> list[int]:
        return list(self._encoder.encode(text).ids)

    def token_text(self, token_id: int) -> str:
        return self._token_texts[token_id]

    @property
    def eos_id(self) -> int:
        return self._sep

    @property
    def context_budget(self) -> int:
        """Text tokens a single-sentence row holds: the window less [CLS] and [SEP]."""
        return self.max_length - 2

    def word_start_mask(self) -> np.ndarray:
        return self._word_start

    def never_generate_mask(self) -> np.ndarray:
        return self._never
