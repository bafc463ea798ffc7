"""Tests for models/tokenization.py: word-level and byte-level BPE tokenizers and their tokenizer.json."""

from __future__ import annotations

from pathlib import Path

import pytest
from plm.models.tokenization import (
    BOS,
    ENDOFTEXT,
    EOS,
    PAD,
    UNK,
    load,
    save,
    text_normalizer,
    train_bpe_tokenizer,
    train_word_tokenizer,
    word_starts,
    words,
)
from tokenizers import Tokenizer

SENTENCES = [
    "The cat sat on the mat.",
    "The dog sat on the log!",
    "Who's there? The cat, the dog and the bird.",
    "A bird sang once.",
    "判断这个词的词性。这个词很好。",
]
# Text no tokenizer may choke on: CJK, emoji (with ZWJ), accents, controls, odd whitespace, nothing.
AWKWARD = [
    "",
    "   ",
    "判断这个词的词性",
    "héllo wörld Ångström naïve",
    "emoji 😀 family 👨\u200d👩\u200d👧 flag 🇫🇷",
    "nul\x00 bell\x07 tab\tnewline\nCR\r\nnbsp\u00a0ideographic\u3000space",
    "“curly” ‘quotes’ — dashes – and … ellipsis",
    "ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ！",
    "<s> </s> <unk> <pad> <|endoftext|>",
    "\U0010ffff\ufeff\u200b",
]


@pytest.fixture(scope="module")
def word_tok() -> Tokenizer:
    return train_word_tokenizer(SENTENCES, min_count=2)


@pytest.fixture(scope="module")
def bpe_tok() -> Tokenizer:
    texts = [*SENTENCES, *AWKWARD, "Hello world, hello again. Hello, world!"] * 20
    return train_bpe_tokenizer(texts, vocab_size=400, min_frequency=2)


# ------------------------------------------------------------------------------------------- word level


def test_word_specials_have_fixed_ids(word_tok: Tokenizer) -> None:
    assert [word_tok.token_to_id(t) for t in (UNK, BOS, EOS, PAD)] == [0, 1, 2, 3]


def test_word_vocab_is_min_count_filtered_and_ordered_by_count(word_tok: Tokenizer) -> None:
    vocab = word_tok.get_vocab()
    # "the" 7 times, "." 3 times, "sat" twice; "mat" and "sang" once.
    assert vocab["the"] == 4
    assert vocab["."] < vocab["sat"]
    assert "sat" in vocab and "词" in vocab and "这" in vocab
    assert "mat" not in vocab and "sang" not in vocab
    assert word_tok.encode("the mat").ids == [4, 0]


def test_word_vocab_is_deterministic_and_capped() -> None:
    first = train_word_tokenizer(SENTENCES, min_count=1)
    again = train_word_tokenizer(list(SENTENCES), min_count=1)
    assert first.to_str() == again.to_str()
    capped = train_word_tokenizer(SENTENCES, min_count=1, max_vocab=7)
    assert capped.get_vocab_size() == 7
    # The cap keeps the most frequent words: those are the first ids of the uncapped vocabulary.
    assert capped.get_vocab() == {t: i for t, i in first.get_vocab().items() if i < 7}
    with pytest.raises(ValueError, match="max_vocab"):
        train_word_tokenizer(SENTENCES, max_vocab=3)
    with pytest.raises(ValueError, match="min_count"):
        train_word_tokenizer(SENTENCES, min_count=0)


def test_words_lowercase_split_punctuation_keep_apostrophes(word_tok: Tokenizer) -> None:
    assert words(word_tok, "Don’t STOP—now!  Who's there?") == [
        "don't", "stop", "-", "-", "now", "!", "who's", "there", "?",
    ]  # fmt: skip
    assert words(word_tok, "'Tis o'er, 'quoted'") == ["'", "tis", "o'er", ",", "'", "quoted", "'"]


def test_each_cjk_ideograph_is_a_word(word_tok: Tokenizer) -> None:
    assert words(word_tok, "判断这个词的词性") == list("判断这个词的词性")
    assert words(word_tok, "GPT模型，很好！") == ["gpt", "模", "型", ",", "很", "好", "!"]


def test_words_are_what_encode_sees(word_tok: Tokenizer) -> None:
    for text in [*SENTENCES, *AWKWARD]:
        vocab = word_tok.get_vocab()
        expected = [w if w in vocab else UNK for w in words(word_tok, text)]
        assert word_tok.encode(text).tokens == expected, text
    # Specials are vocabulary entries only: typed text "<s>" is not BOS.
    assert BOS not in word_tok.encode("<s>").tokens


def test_word_tokenizer_never_fails(word_tok: Tokenizer) -> None:
    size = word_tok.get_vocab_size()
    for text in AWKWARD:
        ids = word_tok.encode(text).ids
        assert all(0 <= i < size for i in ids)
    assert word_tok.encode("").ids == []
    assert word_tok.encode("\x00\x07").ids == []  # controls are dropped, not unknown words
    assert word_tok.encode("zebra 😀").ids == [0, 0]


def test_word_tokenizer_json_round_trip(word_tok: Tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "m" / "tokenizer.json"
    save(word_tok, path)
    loaded = load(path)
    for text in [*SENTENCES, *AWKWARD]:
        assert words(loaded, text) == words(word_tok, text)
        assert loaded.encode(text).ids == word_tok.encode(text).ids


def test_text_normalizer_is_cased_idempotent_and_ascii() -> None:
    norm = text_normalizer()
    out = norm.normalize_str("  “Ｈｅｌｌｏ”\t\n wörld — it’s\x00 ok… ")
    assert out == '"Hello" wörld -- it\'s ok...'
    for text in AWKWARD:
        once = norm.normalize_str(text)
        assert norm.normalize_str(once) == once
        assert once == " ".join(once.split())  # whitespace collapsed exactly as str.split sees it


# ------------------------------------------------------------------------------------------------- BPE


def test_bpe_special_and_alphabet(bpe_tok: Tokenizer) -> None:
    assert bpe_tok.token_to_id(ENDOFTEXT) == 0
    assert bpe_tok.get_vocab_size() <= 400
    vocab = bpe_tok.get_vocab()
    from tokenizers.pre_tokenizers import ByteLevel

    assert set(ByteLevel.alphabet()) <= set(vocab)  # no byte is ever unknown
    assert bpe_tok.encode("<|endoftext|>Hi<|endoftext|>").ids[0] == 0


@pytest.mark.parametrize(
    "text",
    [
        "判断这个词的词性",
        "emoji 😀 family 👨\u200d👩\u200d👧 flag 🇫🇷",
        "héllo wörld Ångström naïve Straße",
        "Hello world, hello again.",
        "tabs\tand\nnewlines  and   spaces ",
        "",
        "“curly” — ＦＵＬＬ",
        "\U0010ffff \x00 \x7f",
    ],
)
def test_bpe_round_trips_after_normalisation(bpe_tok: Tokenizer, text: str) -> None:
    normal = text_normalizer().normalize_str(text)
    ids = bpe_tok.encode(text).ids
    assert bpe_tok.decode(ids) == normal
    assert 0 not in ids  # nothing unknown, no special token invented


def test_bpe_round_trips_exactly_on_normal_text(bpe_tok: Tokenizer, tmp_path: Path) -> None:
    save(bpe_tok, tmp_path / "tokenizer.json")
    loaded = load(tmp_path / "tokenizer.json")
    for text in ["判断 这个词的词性。", "naïve café 😀 ok", "a - b -- c ... d 'e' \"f\""]:
        assert loaded.decode(loaded.encode(text).ids) == text
        assert loaded.encode(text).ids == bpe_tok.encode(text).ids


def test_bpe_is_deterministic() -> None:
    texts = [*SENTENCES, "Hello world, hello again."] * 10
    assert train_bpe_tokenizer(texts, vocab_size=300).to_str() == train_bpe_tokenizer(texts, vocab_size=300).to_str()
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe_tokenizer(texts, vocab_size=100)


@pytest.mark.parametrize(
    "text",
    [
        "Hello world, hello again.",
        "The cat sat on the mat.",
        "判断这个词的词性 and 😀👍 emoji",
        "naïve  café,  Ångström!",
        "x",
    ],
)
def test_word_starts_group_tokens_into_whitespace_words(bpe_tok: Tokenizer, text: str) -> None:
    encoding = bpe_tok.encode(text)
    starts = word_starts(bpe_tok, encoding)
    assert len(starts) == len(encoding.ids) and starts[0]
    groups: list[list[int]] = []
    for token_id, start in zip(encoding.ids, starts, strict=True):
        if start:
            groups.append([])
        groups[-1].append(token_id)
    assert [bpe_tok.decode(g).strip() for g in groups] == text_normalizer().normalize_str(text).split()


def test_word_starts_around_special_tokens(bpe_tok: Tokenizer) -> None:
    encoding = bpe_tok.encode("<|endoftext|>Hello world<|endoftext|>")
    assert encoding.tokens[0] == ENDOFTEXT and encoding.tokens[-1] == ENDOFTEXT
    starts = word_starts(bpe_tok, encoding)
    assert starts[0] and starts[1] and starts[-1]
    assert sum(starts) == 4  # <|endoftext|>, Hello, world, <|endoftext|>
    assert word_starts(bpe_tok, bpe_tok.encode("")) == []


@pytest.mark.parametrize("name", ["gpt", "bert"])  # the families with an encode_ids of their own
def test_ids_only_encoding_and_cached_token_texts_match_the_full_path(tiny_repo: Path, name: str) -> None:
    """`encode_ids` (the fast path of calls that need no token texts) gives `encode(...).ids`, and the token
    texts decoded once at load are what the tokenizer decodes for each id."""
    from plm.service.config import ServerConfig
    from plm.service.metrics import Metrics
    from plm.service.registry import load_model

    model = load_model(tiny_repo / name, ServerConfig(), Metrics())
    texts = ["The king is dead.", "  whitespace\tand\nnewlines  ", "naïve café — “quotes” 東京 😀", "", "x" * 50]
    for text in texts:
        assert model.encode_ids(text) == model.encode(text).ids
    for i in range(0, model.vocab_size, 97):
        assert model.token_text(i) == model.tokenizer.decode([i], skip_special_tokens=False)
