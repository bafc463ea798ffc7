"""A word-level model's `encode_ids` (the ids alone, for PredictNext's contexts) must equal `encode(text).ids`."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from plm.service.config import ServerConfig
from plm.service.metrics import Metrics
from plm.service.registry import Registry

TEXTS = ["the king is", "", "   ", "  The KING,  is dead!! ", "héllo wörld — “quoted”", "don't 'quote' it",
         "zzyzx qwertyuiop", "to be, or not to be: that is the question.", "a\tb\nc", "判断这个词的词性"]


@pytest.mark.parametrize("name", ["ngram-kn", "ngram-laplace", "nnlm", "elmo"])
def test_encode_ids_equals_the_ids_of_encode(tiny_repo: Path, name: str) -> None:
    registry = Registry(replace(ServerConfig(), repository=tiny_repo, models=(name,)), Metrics())
    registry.load_all()
    model = registry.models[name]
    for text in TEXTS:
        assert model.encode_ids(text) == model.encode(text).ids, text
