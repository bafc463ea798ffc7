"""Tokenizers for every family, built with Hugging Face `tokenizers` and saved as one tokenizer.json.

This module owns the text contract between training and serving. The server only has tokenizer.json, so
every normalisation and word split a model was trained with lives inside that file (normalizer +
pre-tokenizer); nothing here may depend on code the server does not have. It imports only `tokenizers`,
so the server may import it too.

Two kinds:

* word level (`ngram`, `nnlm`, `word2vec`, `elmo`): lowercased words; punctuation marks are words of their
  own; every CJK ideograph is a word of its own (as BERT does); apostrophes inside a word stay in it
  (``don't``, ``o'er``). Specials ``<unk>`` = 0, ``<s>`` = 1, ``</s>`` = 2, ``<pad>`` = 3 are plain
  vocabulary entries, not added tokens: the text ``<s>`` is read as the words ``<``, ``s``, ``>``, so
  `words` and `Tokenizer.encode` always agree; callers add BOS/EOS/pad by id.
* byte-level BPE (`gpt`): GPT-2 style, cased; ``<|endoftext|>`` = 0 is BOS, EOS and pad (GPT-2's
  convention) and is an added special token, so that text in a prompt is read as the special token.

Both share `text_normalizer`: NFKC, control characters dropped, curly quotes and dashes to ASCII, runs of
whitespace to one space, ends stripped. `plm.data.corpus.normalise` is this same normalizer, so corpus text,
training and serving all see one normal form.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Encoding, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import trainers as hf_trainers

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
WORD_SPECIALS: tuple[str, ...] = (UNK, BOS, EOS, PAD)  # ids 0, 1, 2, 3 in this order
ENDOFTEXT = "<|endoftext|>"  # BPE: id 0; BOS, EOS and pad at once, as in GPT-2

# Typographic punctuation → ASCII, so that "don’t" and "don't" are one word. Em dashes become "--", the
# convention of the Gutenberg texts in the default corpus.
ASCII_PUNCTUATION: dict[str, str] = {
    "[\u2018\u2019\u201a\u201b]": "'",
    "[\u201c\u201d\u201e\u201f]": '"',
    "[\u2010\u2011\u2012\u2013\u2212]": "-",
    "[\u2014\u2015]": "--",
}
# C0/C1 control characters that are not whitespace, the zero-width space and the byte-order mark: invisible,
# so they are dropped. The control characters Python counts as whitespace become a space with the rest.
_CONTROL = "[\x00-\x08\x0e-\x1b\x7f-\x84\x86-\x9f\u200b\ufeff]"
_WHITESPACE = r"[\s\x1c-\x1f]+"  # Oniguruma's \s lacks the four separators U+001C..U+001F
# CJK Unified Ideographs (+ extension A, compatibility ideographs, extensions B-F): BERT's ranges.
CJK_IDEOGRAPH = (
    "[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002a6df\U0002a700-\U0002ebef\U0002f800-\U0002fa1f]"
)
# Everything that is not a word character becomes its own word, except an apostrophe between two word
# characters, which stays inside the word ("don't", "o'er"); a leading "'tis" gives "'", "tis".
_PUNCTUATION_SPLIT = r"[^\w']|(?<!\w)'|'(?!\w)"


def text_normalizer() -> normalizers.Normalizer:
    """The cased normal form shared by corpus text and both tokenizers; deterministic and idempotent."""
    steps: list[normalizers.Normalizer] = [normalizers.NFKC(), normalizers.Replace(Regex(_CONTROL), "")]
    steps += [normalizers.Replace(Regex(pattern), ascii_) for pattern, ascii_ in ASCII_PUNCTUATION.items()]
    steps += [normalizers.Replace(Regex(_WHITESPACE), " "), normalizers.Strip()]
    return normalizers.Sequence(steps)


def word_normalizer_and_pretokenizer() -> tuple[normalizers.Normalizer, pre_tokenizers.PreTokenizer]:
    """The word tokenizer's normalizer (`text_normalizer` + lowercase) and pre-tokenizer.

    Pre-tokenization: split on whitespace; then every CJK ideograph is isolated (so 判断这个词的词性 is 8
    words); then every other non-word character is isolated, keeping word-internal apostrophes.
    """
    normalizer = normalizers.Sequence([text_normalizer(), normalizers.Lowercase()])
    pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Split(Regex(CJK_IDEOGRAPH), behavior="isolated"),
            pre_tokenizers.Split(Regex(_PUNCTUATION_SPLIT), behavior="isolated"),
        ]
    )
    return normalizer, pre_tokenizer


def words(tokenizer: Tokenizer, text: str) -> list[str]:
    """The normalised, pre-tokenised words of `text`: exactly the units a word-level model sees."""
    if tokenizer.normalizer is not None:
        text = tokenizer.normalizer.normalize_str(text)
    if tokenizer.pre_tokenizer is None:
        return text.split()
    return [piece for piece, _ in tokenizer.pre_tokenizer.pre_tokenize_str(text)]


def train_word_tokenizer(sentences: Iterable[str], *, min_count: int = 2, max_vocab: int | None = None) -> Tokenizer:
    """A WordLevel tokenizer over the words of `sentences` seen at least `min_count` times.

    `max_vocab` caps the whole vocabulary, the 4 specials included (it is the embedding matrix's row count).
    Ids are deterministic: specials first, then by descending count, ties by the word itself. Any other
    word, and any character never seen, encodes as ``<unk>``.
    """
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    if max_vocab is not None and max_vocab < len(WORD_SPECIALS):
        raise ValueError(f"max_vocab must be >= {len(WORD_SPECIALS)} (the specials), got {max_vocab}")
    normalizer, pre_tokenizer = word_normalizer_and_pretokenizer()
    # The vocabulary is counted here rather than by WordLevelTrainer, whose order of equal counts is not
    # guaranteed; ids must not change between two runs on the same corpus.
    counts: Counter[str] = Counter()
    for sentence in sentences:
        counts.update(piece for piece, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(sentence)))
    for special in WORD_SPECIALS:
        counts.pop(special, None)
    ranked = sorted((item for item in counts.items() if item[1] >= min_count), key=lambda wc: (-wc[1], wc[0]))
    if max_vocab is not None:
        ranked = ranked[: max_vocab - len(WORD_SPECIALS)]
    vocab = {token: i for i, token in enumerate([*WORD_SPECIALS, *(word for word, _ in ranked)])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    return tokenizer


def train_bpe_tokenizer(texts: Iterable[str], *, vocab_size: int = 8000, min_frequency: int = 2,
                        specials: tuple[str | AddedToken, ...] = (ENDOFTEXT,)) -> Tokenizer:
    """A GPT-2 style byte-level BPE tokenizer; ``<|endoftext|>`` is id 0, the 256 byte symbols follow.

    `specials` are added special tokens with the first ids, in order (GPT's is ``<|endoftext|>`` alone; the
    encoder-decoder tokenizer passes its own, `train_encdec_tokenizer`).

    Choice: ``add_prefix_space=False`` (GPT-2's default). A sentence's first word is then tokenized
    without the leading 'Ġ', in training as in serving (every corpus sentence starts unspaced), and
    ``decode(encode(x)) == text_normalizer().normalize_str(x)`` exactly for any text, Chinese and emoji
    included, with no ambiguity about a leading space. Every byte is in the initial alphabet, so no input
    is ever unknown. Not lowercased.
    """
    if vocab_size < 256 + len(specials):
        raise ValueError(f"vocab_size must be >= {256 + len(specials)} (256 bytes + {len(specials)} specials), "
                         f"got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = text_normalizer()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = hf_trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


# Encoder-decoder models (`encdec`): their own byte-level BPE, so no id of an existing model's tokenizer moves.
# ``<pad>`` = 0, ``<s>`` = 1 (the decoder's start token), ``</s>`` = 2 (end of source and of target), then the
# span-corruption sentinels ``<extra_id_0>`` ... (T5's spelling) at ids 3, 4, ...; all added special tokens,
# so a sentinel written in a text is read as the sentinel. They are matched on the normalised text (normalized=True),
# so the piece after a sentinel keeps its leading space: "The<extra_id_0> sat" is [The, <extra_id_0>, Ġsat],
# exactly what span corruption of "The cat sat" puts in the encoder (a space before a sentinel is a token 'Ġ').
ENCDEC_PAD, ENCDEC_BOS, ENCDEC_EOS = "<pad>", "<s>", "</s>"
ENCDEC_SPECIALS: tuple[str, ...] = (ENCDEC_PAD, ENCDEC_BOS, ENCDEC_EOS)


def sentinel(i: int) -> str:
    """The i-th span-corruption sentinel token, ``<extra_id_{i}>``."""
    return f"<extra_id_{i}>"


def train_encdec_tokenizer(texts: Iterable[str], *, vocab_size: int = 8000, sentinels: int = 32,
                           min_frequency: int = 2) -> Tokenizer:
    """The encoder-decoder models' byte-level BPE (as `train_bpe_tokenizer`, cased): ``<pad>`` = 0, ``<s>`` = 1,
    ``</s>`` = 2, then `sentinels` sentinels ``<extra_id_0>`` = 3, ``<extra_id_1>`` = 4, ..."""
    names = (*ENCDEC_SPECIALS, *(sentinel(i) for i in range(sentinels)))
    return train_bpe_tokenizer(texts, vocab_size=vocab_size, min_frequency=min_frequency,
                               specials=tuple(AddedToken(n, special=True, normalized=True) for n in names))


def word_starts(tokenizer: Tokenizer, encoding: Encoding) -> list[bool]:
    """For each token of a byte-level BPE `encoding`, whether it begins a new whitespace-delimited word.

    Rule: a token starts a word if it is the first token, if its first symbol is a byte-level whitespace
    ('Ġ' space, 'Ċ' newline, 'ĉ' tab), if it is a special token, or if it follows a special token.
    Punctuation glued to a word ("world," → 'Ġworld', ',') continues that word, so per-word log-probs
    are sums over whitespace-delimited words, the units `str.split` gives on the normalised text.
    """
    special_ids = {i for i, added in tokenizer.get_added_tokens_decoder().items() if added.special}
    starts: list[bool] = []
    previous_special = True  # the first token starts a word
    for token_id, token in zip(encoding.ids, encoding.tokens, strict=True):
        special = token_id in special_ids
        starts.append(previous_special or special or token[:1] in ("Ġ", "Ċ", "ĉ"))
        previous_special = special
    return starts


def save(tokenizer: Tokenizer, path: Path) -> None:
    """Write `tokenizer` as tokenizer.json (parents created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))


def load(path: Path) -> Tokenizer:
    """Read a tokenizer.json."""
    return Tokenizer.from_file(str(path))


# WordPiece (`bert`): BERT's five specials, ids 0..4 in this order; added special tokens, so "[MASK]" in a
# text is read as the mask token (matched on the raw text, before lowercasing).
WORDPIECE_SPECIALS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def train_wordpiece_tokenizer(texts: Iterable[str], *, vocab_size: int = 8000, min_frequency: int = 2) -> Tokenizer:
    """A BERT-style (uncased) WordPiece tokenizer: ``[PAD]`` = 0, ``[UNK]`` = 1, ``[CLS]`` = 2, ``[SEP]`` = 3,
    ``[MASK]`` = 4, then the pieces; continuations carry the ``##`` prefix.

    Normalisation is `text_normalizer` + lowercase; pre-tokenization is BERT's: whitespace, then every CJK
    ideograph and every punctuation character is a word of its own. The post-processor adds
    ``[CLS] A [SEP]`` / ``[CLS] A [SEP] B [SEP]`` (segments 0/1) when asked; the server adds them by id.
    """
    if vocab_size < len(WORDPIECE_SPECIALS) + 1:
        raise ValueError(f"vocab_size must be > {len(WORDPIECE_SPECIALS)} (the specials), got {vocab_size}")
    _, unk, cls, sep, _ = WORDPIECE_SPECIALS
    tokenizer = Tokenizer(models.WordPiece(unk_token=unk, continuing_subword_prefix="##"))
    tokenizer.normalizer = normalizers.Sequence([text_normalizer(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Split(Regex(CJK_IDEOGRAPH), behavior="isolated"),
            pre_tokenizers.Punctuation(behavior="isolated"),
        ]
    )
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    trainer = hf_trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(WORDPIECE_SPECIALS),
        continuing_subword_prefix="##",
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    cls_id, sep_id = tokenizer.token_to_id(cls), tokenizer.token_to_id(sep)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}",
        pair=f"{cls} $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls, cls_id), (sep, sep_id)],
    )
    return tokenizer
