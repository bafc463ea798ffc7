"""The narrow model contract (service/families/capabilities.py): a task gets a capability or FAILED_PRECONDITION,
and a manifest that lists a task its family cannot serve is refused when the model loads."""

from __future__ import annotations

import asyncio
import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from plm.service.config import ServerConfig
from plm.service.contract import manifest as contract
from plm.service.errors import FailedPrecondition
from plm.service.families.base import Encoded, ModelAdapter, TokenScores
from plm.service.families.capabilities import (
    TASK_CAPABILITIES,
    Embedder,
    Generator,
    MaskFiller,
    NextSentencePredictor,
    NextWordPredictor,
    PrefixScorer,
    Scorer,
    check_tasks,
    served_tasks,
)
from plm.service.metrics import Metrics
from plm.service.registry import FAMILIES, Registry, load_model
from plm.service.tasks.embed import EmbedParams, embed
from plm.service.tasks.score import ScoreParams, score


class _Scoring(ModelAdapter, Scorer):
    """A family that only scores (every token log P = -1), built from a manifest dict without files."""

    family = "scoring"

    def encode(self, text: str) -> Encoded:
        words = text.split()
        return Encoded(list(range(len(words))), words, list(range(len(words))), words, [False] * len(words))

    def decode(self, ids: list[int]) -> str:
        return " ".join(map(str, ids))

    def token_text(self, token_id: int) -> str:
        return str(token_id)

    @property
    def eos_id(self) -> int:
        return 0

    def word_start_mask(self) -> np.ndarray:
        return np.ones(self.vocab_size, dtype=bool)

    def never_generate_mask(self) -> np.ndarray:
        return np.zeros(self.vocab_size, dtype=bool)

    async def score(self, seqs: list[list[int]], add_eos: bool, deadline: float | None) -> list[TokenScores]:
        return [TokenScores(-np.ones(len(s) + add_eos)) for s in seqs]


def _scoring(tasks: list[str]) -> _Scoring:
    manifest = {"name": "s", "family": "scoring", "tasks": tasks, "max_length": 16, "vocab_size": 8,
                "tokenizer": {"file": "tokenizer.json", "kind": "word"}}
    return _Scoring("s", Path("/nonexistent/s"), manifest)  # a dict goes through the contract's loader


def test_a_capability_the_family_lacks_is_failed_precondition_with_the_served_tasks() -> None:
    model = _scoring(["score"])
    assert Scorer.of(model) is model
    result = asyncio.run(score(model, ScoreParams(("a b c",)), None))
    assert result.method == "causal" and result.sentences[0].log_prob == pytest.approx(-4.0)  # 3 words + EOS
    for cap, task in ((Embedder, "embed"), (Generator, "generate"), (MaskFiller, "fill_mask"),
                      (NextWordPredictor, "predict_next"), (NextSentencePredictor, "next_sentence")):
        with pytest.raises(FailedPrecondition) as err:
            cap.of(model)
        assert err.value.code == "FAILED_PRECONDITION"
        assert err.value.message == f"model 's' (scoring) does not serve {task!r}; it serves: score"
    with pytest.raises(FailedPrecondition, match="does not serve 'embed'; it serves: score"):
        asyncio.run(embed(model, EmbedParams(("a",)), None))  # the task refuses through the same check


def test_a_capability_the_manifest_leaves_out_is_failed_precondition() -> None:
    """The family could score, but this folder's manifest does not offer it (an imported encoder without its
    head): the manifest's list decides."""
    model = _scoring([])
    with pytest.raises(FailedPrecondition, match=r"model 's' \(scoring\) does not serve 'score'; it serves: $"):
        Scorer.of(model)


def test_every_task_has_one_capability_and_every_family_declares_its_own() -> None:
    assert set(TASK_CAPABILITIES) == {"score", "predict_next", "generate", "fill_mask", "embed", "next_sentence",
                                      "classify"}
    assert {f: served_tasks(cls) for f, cls in FAMILIES.items()} == {
        "ngram": ["predict_next", "score"],
        "gpt": ["embed", "generate", "predict_next", "score"],
        "nnlm": ["predict_next", "score"],
        "word2vec": ["embed", "fill_mask"],
        "elmo": ["embed", "score"],
        "bert": ["embed", "fill_mask", "next_sentence", "score"],
        "encdec": ["fill_mask", "generate", "score"],
        "classifier": ["classify"],
    }
    assert issubclass(FAMILIES["gpt"], PrefixScorer)  # type: ignore[arg-type]
    assert served_tasks(lambda: None) == []  # a factory that is not an adapter class serves nothing


def test_built_manifests_agree_with_their_families(tiny_repo: Path) -> None:
    for folder in sorted(p for p in tiny_repo.iterdir() if (p / contract.MANIFEST_FILE).is_file()):
        m = contract.load(folder / contract.MANIFEST_FILE)
        check_tasks(FAMILIES[m.family], m.family, m.tasks, str(folder))  # raises on disagreement


def _claiming(tiny_repo: Path, tmp_path: Path, name: str, extra_tasks: list[str]) -> Path:
    folder = tmp_path / name
    shutil.copytree(tiny_repo / name, folder)
    path = folder / contract.MANIFEST_FILE
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    data["tasks"] = [*data["tasks"], *extra_tasks]
    path.write_text(json.dumps(data), encoding="utf-8")
    return folder


@pytest.mark.parametrize("task", ["generate", "translate"])
def test_a_manifest_claiming_a_task_its_family_cannot_serve_is_refused_at_load(
        tiny_repo: Path, tmp_path: Path, task: str) -> None:
    folder = _claiming(tiny_repo, tmp_path, "ngram-kn", [task])
    config = replace(ServerConfig(), repository=tmp_path)
    with pytest.raises(contract.ManifestError) as err:
        load_model(folder, config, Metrics())
    assert str(err.value) == (f"{folder / contract.MANIFEST_FILE}: field 'tasks[2]' is {task!r}, which family "
                              "'ngram' cannot serve (it serves: predict_next, score)")
    registry = Registry(config, Metrics())  # the repository loads without it, and says why
    registry.load_all()
    assert "ngram-kn" not in registry.models and "cannot serve" in registry.failed["ngram-kn"]
