"""Skipping the normalizer for plain text: only where it provably changes nothing, and never a different token."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Regex, Tokenizer, normalizers

from models.tokenization import text_normalizer
from service.families.textnorm import plain_text_predicate, without_normalizer

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
def test_plain_text_skips_only_what_the_normalizer_leaves_alone(tiny_repo: Path, model: str) -> None:
    tok = _tokenizer(tiny_repo, model)
    plain = plain_text_predicate(tok)
    assert plain is not None, "our own normalizers are understood, so the shortcut is on"
    bare = without_normalizer(tok)
    assert tok.normalizer is not None
    normalize = tok.normalizer.normalize_str
    assert plain("to be or not to be, that is the question.")
    assert not plain("two  spaces") and not plain(" lead") and not plain("tab\there") and not plain("café")

    seen = {"plain": 0, "other": 0}

    @hypothesis.settings(max_examples=400, deadline=None)
    @hypothesis.given(text=TEXTS | TEXTS.map(str.lower).map(" ".join).map(str.strip))
    def check(text: str) -> None:
        seen["plain" if plain(text) else "other"] += 1
        if plain(text):
            assert normalize(text) == text
            full = tok.encode(text, add_special_tokens=False)
            assert bare.encode(text, add_special_tokens=False).ids == full.ids

    check()
    assert seen["plain"] >= 50 and seen["other"] >= 50, seen  # both kinds were tried


def test_models_own_normalizers_are_understood() -> None:
    plain = plain_text_predicate(_with(text_normalizer()))
    assert plain is not None and plain("The King") and not plain("The  King")
    lower = plain_text_predicate(_with(normalizers.Sequence([text_normalizer(), normalizers.Lowercase()])))
    assert lower is not None and lower("the king") and not lower("The King")


@pytest.mark.parametrize("step", [
    normalizers.Replace("--", "\u2014"),  # a literal plain text may contain
    normalizers.Replace(Regex("[a-c]"), "x"),  # a class that matches letters
    normalizers.Replace(Regex("a+"), "a"),  # not a character class
    normalizers.Replace(Regex("[\\s]+"), "_"),  # spaces, but not to a space
    normalizers.Replace(Regex("[\\s]"), " "),  # spaces one by one (harmless, but not what it recognises)
    normalizers.Prepend("\u2581"),
])
def test_a_step_it_cannot_vouch_for_turns_the_shortcut_off(step: normalizers.Normalizer) -> None:
    assert plain_text_predicate(_with(normalizers.Sequence([text_normalizer(), step]))) is None


def test_harmless_literals_and_classes_keep_it_on() -> None:
    steps = [normalizers.Replace("\u2019", "'"), normalizers.Replace(Regex("[\u2010-\u2015]"), "-"),
             normalizers.Replace("  ", " ")]
    assert plain_text_predicate(_with(normalizers.Sequence([text_normalizer(), *steps]))) is not None


def _with(normalizer: normalizers.Normalizer) -> Tokenizer:
    from tokenizers import models as tok_models

    tok = Tokenizer(tok_models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tok.normalizer = normalizer
    return tok
