"""The `classifier` family end to end: the tiny BERT fine-tuned on the downstream task (split by work), built by
`plm build --families classifier`, served over real gRPC and KServe v2.

Served probabilities equal the PyTorch head's softmax within 1e-4 (all labels, any order, and a subset) and a
label the head lacks (or a prompt it does not take) is INVALID_ARGUMENT naming it. Accuracy above the majority
class on the held-out works is benchmarks/downstream.py's check (its exit status), on the small models."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from plm.client import PlmClient
from plm.data import downstream

from tests.conftest import CACHE, ServerThread, make_config

NAME = "classifier"


@pytest.fixture(scope="module")
def repo(tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny repository's BERT, and the classifier fine-tuned from it."""
    from plm.export.build import build_repository

    folder = tmp_path_factory.mktemp("classifier-repo")
    shutil.copytree(tiny_repo / "bert", folder / "bert")
    build_repository(profile="tiny", repository=folder, families=[NAME], cache_dir=CACHE)
    return folder


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[ServerThread]:
    srv = ServerThread(make_config(repo))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server: ServerThread) -> Iterator[PlmClient]:
    with PlmClient(server.target, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def task() -> downstream.DownstreamTask:
    from plm.export.build_classifier import PROFILES

    return downstream.default_task(CACHE, PROFILES["tiny"].quotas, seed=0)


def torch_logits(repo: Path, texts: list[str]) -> tuple[np.ndarray, tuple[str, ...]]:
    """The PyTorch classifier of the folder (weights.npz), on `texts` as the builder encodes them."""
    import torch
    from plm.models import tokenization
    from plm.models.bert import Bert, BertConfig
    from plm.models.classifier import BertClassifier, encode, predict
    from plm.service.contract import manifest as contract

    spec = contract.load(repo / NAME / contract.MANIFEST_FILE)
    assert spec.classifier is not None
    config = BertConfig(**{k: v for k, v in spec.config.items() if k in BertConfig.__dataclass_fields__})
    model = BertClassifier(Bert(config), spec.classifier.labels, pooling=spec.classifier.pooling)
    with np.load(repo / NAME / "weights.npz") as weights:
        model.load_state_dict({k: torch.from_numpy(weights[k]) for k in weights.files})
    tok = tokenization.load(repo / NAME / "tokenizer.json")
    rows = encode(tok, texts, [0] * len(texts), config.max_position, tok.token_to_id("[CLS]"),
                  tok.token_to_id("[SEP]")).rows
    return predict(model, rows), spec.classifier.labels


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_listed_with_its_task_labels_and_parity(client: PlmClient) -> None:
    info = {m.name: m for m in client.list_models().models}[NAME]
    assert info.family == NAME and list(info.tasks) == ["classify"]
    assert info.details["labels"] == ",".join(downstream.LABELS)
    assert 0 <= info.parity_max_abs_diff <= 1e-4


def test_served_probabilities_equal_the_pytorch_head(repo: Path, client: PlmClient,
                                                     task: downstream.DownstreamTask) -> None:
    texts = [p.text for p in task.test[:24]]
    logits, labels = torch_logits(repo, texts)
    order = [labels[i] for i in (3, 0, 4, 2, 1)]  # any order: each probability is found by its label
    served = client.classify(NAME, texts, order).results
    want = softmax(logits.astype(np.float64))
    got = np.array([[{s.label: s.probability for s in r.scores}[lab] for lab in labels] for r in served])
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert [r.label for r in served] == [labels[i] for i in logits.argmax(1)]
    assert [s.label for s in served[0].scores] == order  # the request's order
    # A subset: the head's probabilities among those labels alone.
    pair = ["news", "comedy"]
    cols = [labels.index(lab) for lab in pair]
    sub = client.classify(NAME, texts, pair).results
    np.testing.assert_allclose([[s.probability for s in r.scores] for r in sub],
                               softmax(logits[:, cols].astype(np.float64)), atol=1e-4, rtol=0)
    assert all(s.num_tokens == 0 for r in sub for s in r.scores)


def test_no_labels_means_every_label_of_the_head(repo: Path, client: PlmClient,
                                                task: downstream.DownstreamTask) -> None:
    texts = [p.text for p in task.test[:8]]
    logits, labels = torch_logits(repo, texts)
    served = client.classify(NAME, texts, []).results
    assert all([s.label for s in r.scores] == list(labels) for r in served)  # the head's order
    np.testing.assert_allclose([[s.probability for s in r.scores] for r in served],
                               softmax(logits.astype(np.float64)), atol=1e-4, rtol=0)


@pytest.mark.parametrize(("model", "labels", "says"), [(NAME, ["tragedy"], "has 1 entry"),
                                                        ("bert", [], "has no label head")])
def test_one_label_or_none_without_a_head_is_invalid_argument(client: PlmClient, model: str, labels: list[str],
                                                              says: str) -> None:
    e = _error(lambda: client.classify(model, ["To be or not to be."], labels))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.details().startswith("labels") and says in e.details(), e.details()


def test_the_test_split_holds_works_never_trained_on(task: downstream.DownstreamTask) -> None:
    """Accuracy above the majority class is asserted by benchmarks/downstream.py on the small models (its exit
    status), where the task is large enough to measure it; the tiny fixture only checks the split."""
    assert not set(task.works["test"]) & (set(task.works["train"]) | set(task.works["valid"]))
    assert {p.label for p in task.test} == set(downstream.LABELS)


def _error(call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def test_a_label_the_head_lacks_is_invalid_argument_naming_it(client: PlmClient) -> None:
    e = _error(lambda: client.classify(NAME, ["To be or not to be."], ["tragedy", "sonnet"]))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "labels[1]" in e.details() and "'sonnet'" in e.details() and "comedy" in e.details()


@pytest.mark.parametrize("extra", [{"demonstrations": [("O woe!", "tragedy")]}, {"calibrate": True},
                                   {"instruction": "Which genre?"}])
def test_a_prompt_is_refused(client: PlmClient, extra: dict[str, Any]) -> None:
    e = _error(lambda: client.classify(NAME, ["To be or not to be."], ["tragedy", "comedy"], **extra))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert next(iter(extra)) in e.details() and "trained head" in e.details()


def test_kserve_v2_answers_as_plm_v1(server: ServerThread, client: PlmClient) -> None:
    tc = pytest.importorskip("tritonclient.grpc")
    texts, labels = ["O, I am slain!", "The minister said on Tuesday that talks would resume."], ["tragedy", "news"]
    triton = tc.InferenceServerClient(url=server.target)
    try:
        assert triton.is_model_ready(f"{NAME}:classify")
        inputs = []
        for name, values in (("TEXT", texts), ("LABELS", labels)):
            t = tc.InferInput(name, [len(values)], "BYTES")
            t.set_data_from_numpy(np.array([s.encode() for s in values], dtype=object))
            inputs.append(t)
        result = triton.infer(f"{NAME}:classify", inputs)
    finally:
        triton.close()
    want = client.classify(NAME, texts, labels).results
    assert [x.decode() for x in result.as_numpy("LABEL")] == [r.label for r in want]
    np.testing.assert_array_equal(result.as_numpy("PROB"), [[s.probability for s in r.scores] for r in want])


def test_the_build_needs_a_bert(tmp_path: Path) -> None:
    from plm.export.build import build_repository

    with pytest.raises(ValueError, match=r"has none: build it first \(plm build --families bert classifier\)"):
        build_repository(profile="tiny", repository=tmp_path, families=[NAME], cache_dir=CACHE)


def test_a_changed_bert_rebuilds_the_classifier(repo: Path, tmp_path: Path) -> None:
    """The classifier's build key covers its BERT's manifest: the same BERT leaves it up to date, a rebuilt or
    re-imported one (a new manifest) rebuilds it."""
    from plm.export.build import build_repository

    folder = tmp_path / "repo"
    shutil.copytree(repo, folder)
    before = json.loads((folder / NAME / "manifest.json").read_text())["build_key"]
    build_repository(profile="tiny", repository=folder, families=[NAME], cache_dir=CACHE)
    assert json.loads((folder / NAME / "manifest.json").read_text())["build_key"] == before  # up to date
    bert_manifest = folder / "bert" / "manifest.json"
    bert = json.loads(bert_manifest.read_text())
    bert["created_at"] = "2000-01-01T00:00:00Z"
    bert_manifest.write_text(json.dumps(bert))
    build_repository(profile="tiny", repository=folder, families=[NAME], cache_dir=CACHE)
    assert json.loads((folder / NAME / "manifest.json").read_text())["build_key"] != before


def test_families_build_in_lineage_order_whatever_the_order_asked(monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path) -> None:
    """`--families classifier bert` builds bert first: the classifier is fine-tuned from it."""
    from plm.export import build

    order: list[str] = []
    monkeypatch.setattr(build, "_timed_build", lambda spec, *a, **k: (order.append(spec) or {}, 0.0))
    build.build_repository(profile="tiny", repository=tmp_path, families=[NAME, "bert"], cache_dir=CACHE)
    assert order == [build.FAMILIES["bert"][1], build.FAMILIES[NAME][1]]
