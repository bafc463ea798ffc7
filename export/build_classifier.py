"""`plm build --families classifier`: a repository's BERT fine-tuned on the downstream task, exported, checked.

The classifier starts from the `bert` model folder of the same repository (built earlier in the same build,
or before, or imported): its weights are read back from its ONNX graph (`models.classifier.bert_from_onnx`).
The task is `plm.data.downstream`'s — genre of a passage (comedy / tragedy / history / poetry) or news —
over the documents of the build's corpus files, split by work. The folder `classifier` holds the WordPiece
tokenizer (BERT's), `model.onnx`, `weights.npz` (the PyTorch weights, for oracles; the server never reads
it), the loss curve and a manifest whose `classifier` section names the head's labels.

Graph contract (inputs int64 (B, T), right-padded `[CLS] text [SEP]` rows):
  input_ids, attention_mask  ->  logits (B, L) float32, one column per label of the manifest, in its order.

Profiles: `tiny` builds in seconds from a tiny repository (the tests); `small` is the recipe
benchmarks/downstream.py found best on the default models (lower layers frozen or not: see its table).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from plm.data import corpus as corpus_mod
from plm.data import downstream
from plm.export.build import BuildData
from plm.export.repository import staging, write_manifest
from plm.models import tokenization
from plm.service.contract import manifest as contract

if TYPE_CHECKING:  # torch is imported only when a build runs
    from plm.models.classifier import BertClassifier, Encoded

log = logging.getLogger("plm.build")

NAME = "classifier"
BASE = "bert"
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAMES = ("logits",)
# (batch, sequence): unlike the export dummy (2, 8); batch 1 and 7 included.
PARITY_SHAPES = ((1, 3), (1, 9), (3, 12), (7, 10), (5, 17))


@dataclass(frozen=True)
class ClassifierProfile:
    quotas: downstream.Quotas
    pooling: str  # "cls" | "mean"
    frozen_layers: int  # the lowest blocks (and the embeddings) that keep their pretrained weights; 0: none
    max_steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    eval_interval: int
    eval_batches: int
    max_seconds: float | None  # a safety cap that warns when it cuts training short
    num_threads: int
    dropout: float = 0.1


PROFILES = {
    # Seconds on a tiny repository: short passages (the tiny BERT's window is 64 WordPiece tokens of a 1,000-token
    # vocabulary, a few per word), a few dozen per label.
    "tiny": ClassifierProfile(downstream.Quotas(train=40, valid=10, test=20, min_words=8, max_words=16),
                              pooling="cls", frozen_layers=0, max_steps=80, batch_size=16, lr=2e-3, warmup_steps=8,
                              eval_interval=20, eval_batches=2, max_seconds=None, num_threads=1, dropout=0.0),
    "small": ClassifierProfile(downstream.Quotas(train=300, valid=60, test=100), pooling="cls", frozen_layers=0,
                               max_steps=120, batch_size=32, lr=5e-4, warmup_steps=12, eval_interval=40,
                               eval_batches=4, max_seconds=600.0, num_threads=2),
}
PROFILES["full"] = PROFILES["small"]  # the task is small: the full profile's longer BERT needs no other recipe


def train_config(p: ClassifierProfile, seed: int, device: str = "cpu") -> Any:
    from plm.models.train import TrainConfig

    return TrainConfig(max_steps=p.max_steps, batch_size=p.batch_size, lr=p.lr, min_lr=p.lr / 10,
                       warmup_steps=p.warmup_steps, eval_interval=p.eval_interval, eval_batches=p.eval_batches,
                       patience=None, max_seconds=p.max_seconds, seed=seed, num_threads=p.num_threads,
                       device=device)


def encode_task(task: downstream.DownstreamTask, tokenizer: Any, max_length: int) -> dict[str, Encoded]:
    """Each split of `task` as `[CLS] text [SEP]` rows for a BERT of window `max_length`."""
    from plm.models.classifier import encode

    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    index = {label: i for i, label in enumerate(task.labels)}
    return {split: encode(tokenizer, [p.text for p in getattr(task, split)],
                          [index[p.label] for p in getattr(task, split)], max_length, cls, sep)
            for split in downstream.SPLITS}


def evaluate(task: downstream.DownstreamTask, predicted: list[str]) -> dict[str, Any]:
    """Held-out figures of one set of test predictions: 5-way, genre (Shakespeare passages), source."""
    truth = [p.label for p in task.test]
    accuracy, macro_f1 = downstream.accuracy_and_macro_f1(truth, predicted, task.labels)
    majority = max(truth.count(lab) for lab in task.labels) / len(truth)
    shakespeare = [i for i, t in enumerate(truth) if t != downstream.NEWS]
    genre = sum(truth[i] == predicted[i] for i in shakespeare) / max(1, len(shakespeare))
    source = [downstream.collapse_to_source(x) for x in truth]
    source_pred = [downstream.collapse_to_source(x) for x in predicted]
    return {"test_accuracy": round(accuracy, 4), "test_macro_f1": round(macro_f1, 4),
            "test_majority_baseline": round(majority, 4), "test_genre_accuracy": round(genre, 4),
            "test_source_accuracy": round(sum(a == b for a, b in zip(source, source_pred, strict=True))
                                          / len(truth), 4),
            "test_passages": len(truth)}


def export_classifier(model: BertClassifier, path: Path, opset: int = 17) -> dict[str, Any]:
    """Export the head's logits graph, check it (onnx.checker, parity with PyTorch on padded batches of
    PARITY_SHAPES) and return its manifest entry; RuntimeError when parity fails."""
    import onnxruntime as ort
    import torch
    from plm.export.bert_export import random_batch
    from plm.export.parity import PARITY_TOLERANCE, export_module, output_diff, require_parity

    model.eval()
    cfg = model.bert.config
    seq = {0: "batch", 1: "sequence"}
    dummy = random_batch(cfg.vocab_size, 2, 8, 1, torch.Generator().manual_seed(0))[:2]
    export_module(model, dummy, path, INPUT_NAMES, OUTPUT_NAMES,
                  {"input_ids": seq, "attention_mask": seq, "logits": {0: "batch"}}, opset)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(1)
    worst = 0.0
    checked = []
    for batch, length in PARITY_SHAPES:
        length = min(length, cfg.max_position)
        ids, mask = random_batch(cfg.vocab_size, batch, length, 1, generator)[:2]
        with torch.no_grad():
            expected = model(ids, mask).numpy()
        (got,) = session.run(list(OUTPUT_NAMES), {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        worst = max(worst, output_diff(OUTPUT_NAMES, [expected], [got], mask.numpy() > 0))
        checked.append([batch, length])
    parity = {"max_abs_diff": worst, "tolerance": PARITY_TOLERANCE, "checked_shapes": checked}
    require_parity(parity, path.name)
    return {"file": path.name, "opset": opset,
            "inputs": [{"name": n, "dtype": "int64", "shape": ["batch", "sequence"]} for n in INPUT_NAMES],
            "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", len(model.labels)]}],
            "parity": parity, "onnx_checker": "passed"}


def corpus_documents(data: BuildData) -> list[corpus_mod.Document]:
    """The documents of the build's corpus files (all of them: the labelled task is not the LM corpus's
    selection)."""
    return corpus_mod.load_documents([Path(f["path"]) for f in data.corpus.manifest.get("files", [])])


def build(data: BuildData, profile: str, repository: Path, key: str, seed: int) -> dict[str, dict[str, Any]]:
    """Fine-tune `repository/bert` on the downstream task and write the `classifier` folder."""
    import copy

    import torch
    from plm.models.classifier import BertClassifier, bert_from_onnx, fine_tune, freeze, predict, trainable_parameters

    p = PROFILES[profile]
    started = time.perf_counter()
    base = repository / BASE
    if not (base / "manifest.json").is_file():
        raise ValueError(f"the classifier fine-tunes a trained BERT, and {base} has none: build it first "
                         f"(plm build --families bert {NAME})")
    bert = bert_from_onnx(base)
    tok = tokenization.load(base / "tokenizer.json")
    task = downstream.build_task(corpus_documents(data), p.quotas, seed)
    if len(task.labels) < 2 or not task.valid or not task.test:
        raise ValueError(f"the downstream task needs the default corpus (Shakespeare works and news); the corpus "
                         f"files give labels {list(task.labels)}")
    splits = encode_task(task, tok, bert.config.max_position)
    torch.manual_seed(seed)
    model = BertClassifier(copy.deepcopy(bert), task.labels, pooling=p.pooling, dropout=p.dropout)  # type: ignore[arg-type]
    freeze(model, p.frozen_layers)
    with staging(repository, NAME) as folder:
        result = fine_tune(model, splits, train_config(p, seed, data.device), folder, desc=NAME)
        logits = predict(model, splits["test"].rows)
        evaluation = evaluate(task, [task.labels[i] for i in logits.argmax(1)])
        graph = export_classifier(model, folder / "model.onnx")
        np.savez(folder / "weights.npz", **{k: v.numpy() for k, v in model.state_dict().items()})
        tokenization.save(tok, folder / "tokenizer.json")
        base_version = contract.load(base / contract.MANIFEST_FILE).version
        manifest = write_manifest(folder, {
            "name": NAME, "family": "classifier", "tasks": ["classify"],
            "description": f"{BASE} fine-tuned on genre/news ({p.frozen_layers} lower layers frozen, "
                           f"{p.pooling} pooling), {len(task.labels)} labels",
            "max_length": bert.config.max_position, "vocab_size": bert.config.vocab_size,
            "tokenizer": {"file": "tokenizer.json", "kind": "wordpiece", "cls": "[CLS]", "sep": "[SEP]",
                          "mask": "[MASK]", "pad": "[PAD]", "unk": "[UNK]"},
            "classifier": {"labels": list(task.labels), "pooling": p.pooling, "frozen_layers": p.frozen_layers,
                           "base_model": BASE, "base_version": base_version},
            "graphs": {"model": graph},
            "weights": "weights.npz",
            "parity": graph["parity"],
            "config": {**asdict(bert.config), "pooling": p.pooling, "labels": list(task.labels)},
            "training": result.manifest(trainable_parameters(model), frozen_layers=p.frozen_layers,
                                        task=task.manifest()),
            "evaluation": evaluation,
            "build_key": key, "corpus_sha256": data.corpus.manifest.get("corpus_sha256", ""),
        })
    log.info("classifier: test accuracy %s (majority %s), macro-F1 %s (%.1fs in all)", evaluation["test_accuracy"],
             evaluation["test_majority_baseline"], evaluation["test_macro_f1"], time.perf_counter() - started)
    return {NAME: manifest}
