"""Word-level text handling shared by the word-level families (ngram, nnlm, word2vec, elmo).

Their tokenizer.json does the normalisation and word split the model was trained with; a word's id comes
from the model's own vocabulary, and a word outside it is scored as <unk> and flagged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from plm.service.contract.manifest import TokenizerSpec
from plm.service.families.base import Encoded, ModelAdapter
from plm.service.families.textnorm import plain_text_shortcut, plain_text_splitter
from tokenizers import Tokenizer


class PlainText:
    """A word tokenizer's shortcuts for plain text: its normalised form (`plain_text_shortcut`) and its words
    (`plain_text_splitter`), each None where the tokenizer's steps cannot be reproduced."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.normalize = plain_text_shortcut(tokenizer)
        self.split = plain_text_splitter(tokenizer) if self.normalize is not None else None


def split_words(tokenizer: Tokenizer, text: str, plain: PlainText | None = None) -> list[str]:
    """The normalised words of a text, exactly as the model was trained on them; through `plain`'s shortcuts
    where the text is plain (no call into the normalizer or pre-tokenizer)."""
    normalizer, pre = tokenizer.normalizer, tokenizer.pre_tokenizer
    norm = plain.normalize(text) if plain is not None and plain.normalize is not None else None
    if norm is None:
        norm = normalizer.normalize_str(text) if normalizer is not None else text
    elif plain is not None and plain.split is not None:
        return plain.split(norm)
    return [w for w, _ in pre.pre_tokenize_str(norm)] if pre is not None else norm.split()


def word_ids(tokenizer: Tokenizer, word_to_id: Mapping[str, int], unk_id: int, text: str,
             plain: PlainText | None = None) -> list[int]:
    """`encode_words(...).ids` alone, for calls that need no token texts or words (a context's ids)."""
    return [word_to_id.get(w, unk_id) for w in split_words(tokenizer, text, plain)]


def encode_words(tokenizer: Tokenizer, word_to_id: Mapping[str, int], unk_id: int, text: str,
                 plain: PlainText | None = None) -> Encoded:
    """Each word is one token: its id, or `unk_id` (flagged out of vocabulary)."""
    words = split_words(tokenizer, text, plain)
    ids = [word_to_id.get(w, unk_id) for w in words]
    oov = [w not in word_to_id for w in words]
    return Encoded(ids, words, list(range(len(words))), words, oov)


def join_words(vocab: Sequence[str], ids: list[int], skip: np.ndarray) -> str:
    """Generated word ids as a continuation: each word after a space, the `skip` (V,) bool ids left out."""
    return "".join(" " + vocab[i] for i in ids if not skip[i])


class WordVocabulary:
    """The word tokenizer of a word-level model folder: normalised words, ids, specials (shared with ELMo)."""

    def __init__(self, folder: Path, tok: TokenizerSpec) -> None:
        self.tokenizer = Tokenizer.from_file(str(folder / tok.file))
        self.plain = PlainText(self.tokenizer)
        vocab: dict[str, int] = self.tokenizer.get_vocab()
        self.word_to_id = vocab
        self.id_to_word = [""] * len(vocab)
        for w, i in vocab.items():
            self.id_to_word[i] = w
        self.bos = vocab[tok.special("bos", "<s>")]
        self.eos = vocab[tok.special("eos", "</s>")]
        self.unk = vocab[tok.special("unk", "<unk>")]
        self.pad = vocab.get(tok.special("pad", "<pad>"), self.eos)
        self.never = np.zeros(len(vocab), dtype=bool)
        for special in (self.bos, self.unk, self.pad):
            self.never[special] = True
        self.all_words = np.ones(len(vocab), dtype=bool)
        self.skip = self.never.copy()
        self.skip[self.eos] = True  # decode: specials and the end of sentence are not text

    def __len__(self) -> int:
        return len(self.id_to_word)

    def encode(self, text: str) -> Encoded:
        return encode_words(self.tokenizer, self.word_to_id, self.unk, text, self.plain)

    def encode_ids(self, text: str) -> list[int]:
        return word_ids(self.tokenizer, self.word_to_id, self.unk, text, self.plain)

    def decode(self, ids: list[int]) -> str:
        return join_words(self.id_to_word, ids, self.skip)


class WordModel(ModelAdapter):
    """An adapter whose tokens are the words of a `WordVocabulary` (`self.vocab`, set by the subclass)."""

    vocab: WordVocabulary

    def encode(self, text: str) -> Encoded:
        return self.vocab.encode(text)

    def encode_ids(self, text: str) -> list[int]:
        return self.vocab.encode_ids(text)

    def decode(self, ids: list[int]) -> str:
        return self.vocab.decode(ids)

    def token_text(self, token_id: int) -> str:
        return self.vocab.id_to_word[token_id]

    @property
    def eos_id(self) -> int:
        return self.vocab.eos

    def word_start_mask(self) -> np.ndarray:
        return self.vocab.all_words

    def never_generate_mask(self) -> np.ndarray:
        return self.vocab.never
