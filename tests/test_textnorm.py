"""Skipping the normalizer for plain text: only where it provably changes nothing, and never a different token."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from plm.models.tokenization import text_normalizer
from plm.service.families.textnorm import plain_text_shortcut, plain_text_splitter, without_normalizer
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers

hypothesis = pytest.importorskip("hypothesis")
st = pytest.importorskip("hypothesis.strategies")

FAMILIES = ["gpt", "bert", "ngram-kn", "nnlm", "word2vec-cbow", "elmo"]
# Mostly plain ASCII, with what the normalizers do change: runs and ends of whitespace, tabs, capitals, curly
# quotes and dashes, accents, control characters, compatibility forms (ﬁ, full-width letters), CJK.
_ALPHABET = st.one_of(st.characters(min_codepoint=0x20, max_codepoint=0x7E),
                      st.sampled_from(list(" \t\n\r\x0b\x0c\x1c\u00a0\u2019\u201c\u2013\u2014é\u0301ﬁＡ\x07\u200b漢")))
TEXTS = st.text(alphabet=_ALPHABET, max_size=40)


def _tokenizer(repo: Path, model: str) -> Tokenizer:
    manifest = json.loads((repo / model / "manifest.json").read_text())
    return Tokenizer.from_file(str(repo / model / manifest["tokenizer"]["file"]))


@pytest.mark.parametrize("model", FAMILIES)
def test_plain_texts_shortcut_is_the_normalizers_output_and_the_same_tokens(tiny_repo: Path, model: str) -> None:
    tok = _tokenizer(tiny_repo, model)
    shortcut = plain_text_shortcut(tok)
    assert shortcut is not None, "our own normalizers are understood, so the shortcut is on"
    bare = without_normalizer(tok)
    assert tok.normalizer is not None
    normalize = tok.normalizer.normalize_str
    assert shortcut("To be or not to be, that is the question.") is not None
    for other in ("two  spaces", "tab\there", "café", "line\nbreak", "end\t"):
        assert shortcut(other) is None
    for text in (" lead", "trail ", "  both  "):  # Strip takes these off first
        assert shortcut(text) == normalize(text)
    for text in ("The cat sat on the [MASK].", "[CLS] a [SEP] b", "<|endoftext|>Hello", "A [mask] and [UNK]"):
        normal = shortcut(text)  # texts holding the tokenizer's added tokens, as typed: the same tokens either way
        assert normal is None or bare.encode(normal, add_special_tokens=False).ids == \
            tok.encode(text, add_special_tokens=False).ids, text
    seen = {"plain": 0, "other": 0}

    specials = st.sampled_from(["[MASK]", "[CLS]", "[SEP]", "[mask]", "<|endoftext|>", "<s>", "</s>", "<unk>"])
    with_specials = st.tuples(TEXTS, specials, TEXTS).map(" ".join).map(str.strip)

    @hypothesis.settings(max_examples=400, deadline=None)
    @hypothesis.given(text=TEXTS | TEXTS.map(" ".join).map(str.strip) | with_specials)
    def check(text: str) -> None:
        normal = shortcut(text)
        seen["other" if normal is None else "plain"] += 1
        if normal is not None:
            assert normal == normalize(text)
            full = tok.encode(text, add_special_tokens=False)
            assert bare.encode(normal, add_special_tokens=False).ids == full.ids

    check()
    assert seen["plain"] >= 50 and seen["other"] >= 50, seen  # both kinds were tried


def test_models_own_normalizers_are_understood() -> None:
    as_is = plain_text_shortcut(_with(text_normalizer()))
    assert as_is is not None and as_is("The King") == "The King" and as_is("The  King") is None
    lower = plain_text_shortcut(_with(normalizers.Sequence([text_normalizer(), normalizers.Lowercase()])))
    assert lower is not None and lower("The King") == "the king" and lower("The\tKing") is None


@pytest.mark.parametrize("step", [
    normalizers.Replace("--", "\u2014"),  # a literal plain text may contain
    normalizers.Replace(Regex("[a-c]"), "x"),  # a class that matches letters
    normalizers.Replace(Regex("a+"), "a"),  # not a character class
    normalizers.Replace(Regex("[\\s]+"), "_"),  # spaces, but not to a space
    normalizers.Replace(Regex("[\\s]"), " "),  # spaces one by one (harmless, but not what it recognises)
    normalizers.Prepend("\u2581"),
])
def test_a_step_it_cannot_vouch_for_turns_the_shortcut_off(step: normalizers.Normalizer) -> None:
    assert plain_text_shortcut(_with(normalizers.Sequence([text_normalizer(), step]))) is None


def test_harmless_literals_and_classes_keep_it_on() -> None:
    steps = [normalizers.Replace("\u2019", "'"), normalizers.Replace(Regex("[\u2010-\u2015]"), "-"),
             normalizers.Replace("  ", " ")]
    assert plain_text_shortcut(_with(normalizers.Sequence([text_normalizer(), *steps]))) is not None


def _with(normalizer: normalizers.Normalizer) -> Tokenizer:
    from tokenizers import models as tok_models

    tok = Tokenizer(tok_models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tok.normalizer = normalizer
    return tok


WORD_FAMILIES = ["ngram-kn", "nnlm", "word2vec-cbow", "elmo"]
# Plain text as a word model sees it after the shortcut: lower-case ASCII with what the punctuation split is about
# (apostrophes inside, before and after words, underscores, digits, runs of punctuation), single spaces.
_PLAIN_WORDS = st.lists(st.text(alphabet=st.sampled_from(list("abz09_'-.,!?;:\"()[]&#$%*+/<=>@\\^`{|}~")), min_size=1,
                                max_size=9), min_size=1, max_size=8).map(" ".join)


@pytest.mark.parametrize("model", WORD_FAMILIES)
def test_plain_texts_words_are_the_pre_tokenizers(tiny_repo: Path, model: str) -> None:
    """The plain-text splitter gives the pre-tokenizer's words, word for word; and split_words through both
    shortcuts gives what the whole tokenizer gives, for any text."""
    from plm.service.families.words import PlainText, split_words

    tok = _tokenizer(tiny_repo, model)
    split = plain_text_splitter(tok)
    assert split is not None, "our word models' pre-tokenizer is understood"
    assert tok.pre_tokenizer is not None
    pre = tok.pre_tokenizer.pre_tokenize_str
    assert split("don't 'tis o'er the king's ''quoted'' x_y 3.5") == [w for w, _ in pre(
        "don't 'tis o'er the king's ''quoted'' x_y 3.5")]
    plain = PlainText(tok)

    @hypothesis.settings(max_examples=400, deadline=None)
    @hypothesis.given(text=_PLAIN_WORDS, other=TEXTS)
    def check(text: str, other: str) -> None:
        assert split(text) == [w for w, _ in pre(text)]
        for t in (text, other):
            assert split_words(tok, t, plain) == split_words(tok, t)

    check()


def test_punctuation_split_it_knows_is_the_word_tokenizers() -> None:
    from plm.models.tokenization import _PUNCTUATION_SPLIT
    from plm.service.families.textnorm import _KNOWN_SPLITS

    assert {_PUNCTUATION_SPLIT} == _KNOWN_SPLITS


@pytest.mark.parametrize("pre", [
    pre_tokenizers.Split(Regex("[a-c]"), behavior="isolated"),  # a class that matches plain text, unknown
    pre_tokenizers.Split(Regex("[^\\w']|(?<!\\w)'|'(?!\\w)"), behavior="removed"),  # known pattern, other behaviour
    pre_tokenizers.Whitespace(),
    pre_tokenizers.Punctuation(),
])
def test_a_pre_tokenizer_step_it_cannot_reproduce_turns_the_splitter_off(pre: pre_tokenizers.PreTokenizer) -> None:
    tok = _with(text_normalizer())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre])
    assert plain_text_splitter(tok) is None
