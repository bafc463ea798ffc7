"""One commit and seed give the same models on one machine: a second tiny build's ONNX files are byte-identical.

Training runs a fixed number of steps (models/train.py), so nothing but the seed decides the weights; the
session's tiny repository (conftest) is the first build and this test makes the second. When the files
differ, the message names the initializers that differ, which tells a weight difference from an export one.
The session's build trains the NNLM in a child process beside ELMo (export/build.py's SIDE_BY_SIDE) and this
one trains it alone, so the test also shows that building side by side does not change the weights.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tests.conftest import CACHE

# The cheapest families that cover each way of training: train()'s loop (NNLM, and GPT, whose BERT and ELMo
# share it and cost several times as much to build again) and word2vec's SGD epochs. N-grams are counts.
FAMILIES = ("nnlm", "word2vec", "gpt")


def _onnx_files(repo: Path, families: tuple[str, ...]) -> dict[str, str]:
    """{folder/file.onnx: sha256} for the model folders the families write (variants excluded)."""
    from plm.export.build import FAMILIES as FOLDERS

    out = {}
    for family in families:
        for folder in FOLDERS[family][0]:
            for path in sorted((repo / folder).glob("*.onnx")):
                out[f"{folder}/{path.name}"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _differing_initializers(a: Path, b: Path) -> list[str]:
    wa = {t.name: numpy_helper.to_array(t) for t in onnx.load(a).graph.initializer}
    wb = {t.name: numpy_helper.to_array(t) for t in onnx.load(b).graph.initializer}
    return sorted(n for n in wa.keys() | wb.keys()
                  if n not in wa or n not in wb or not np.array_equal(wa[n], wb[n]))


@pytest.fixture(scope="module")
def first_build(tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's tiny repository, unless PLM_TEST_REPOSITORY points at one another commit may have built."""
    if not os.environ.get("PLM_TEST_REPOSITORY"):
        return tiny_repo
    from plm.export.build import build_repository

    repo = tmp_path_factory.mktemp("first")
    build_repository(profile="tiny", repository=repo, cache_dir=CACHE, families=FAMILIES)
    return repo


def test_two_tiny_builds_give_byte_identical_onnx(first_build: Path, tmp_path: Path) -> None:
    from plm.export.build import build_repository

    build_repository(profile="tiny", repository=tmp_path, cache_dir=CACHE, families=FAMILIES)
    first, second = _onnx_files(first_build, FAMILIES), _onnx_files(tmp_path, FAMILIES)
    assert first.keys() == second.keys() and len(first) >= len(FAMILIES)
    differ = {name: _differing_initializers(first_build / name, tmp_path / name)
              for name in first if first[name] != second[name]}
    assert not differ, f"ONNX files differ between two builds (initializers that differ): {differ}"
