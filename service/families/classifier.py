"""Classifier adapter: a fine-tuned BERT's label head, one ONNX graph behind the model's dynamic batcher.

Graph contract (export/build_classifier.py): inputs `input_ids`, `attention_mask` int64 (B, T), right-padded
`[CLS] text [SEP]` rows; output `logits` (B, L), one column per label of the manifest's `classifier.labels`,
in that order. A row's logits do not depend on what it is batched with (pads are masked keys, positions are
columns). It serves Classify without a prompt: the labels are its head's.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from plm.service.batcher import DynamicBatcher
from plm.service.config import ServerConfig
from plm.service.contract import manifest as contract
from plm.service.errors import InvalidArgument
from plm.service.families.base import ManifestSource, ModelAdapter
from plm.service.families.capabilities import LabelClassifier
from plm.service.families.wordpiece import WordPieceText
from plm.service.metrics import Metrics
from plm.service.runtime import open_graph, pad_right


class ClassifierAdapter(WordPieceText, ModelAdapter, LabelClassifier):
    """A text classifier: the logits of its head's labels for each text."""

    family = "classifier"

    def __init__(self, name: str, folder: Path, manifest: ManifestSource, config: ServerConfig, metrics: Metrics):
        super().__init__(name, folder, manifest)
        section = contract.require(self.spec.classifier, "classifier", folder)
        if len(section.labels) < 2 or len(set(section.labels)) != len(section.labels):
            raise contract.ManifestError(f"{folder / contract.MANIFEST_FILE}: field 'classifier.labels' must hold "
                                         f"two or more distinct labels, got {list(section.labels)}")
        self._labels = section.labels
        self._init_wordpiece(folder)
        self.session = open_graph(folder, self.spec, "model", config.runtime_for(name), name, metrics)
        self.served_by(self.session)
        self._batcher: DynamicBatcher[tuple[int, ...], np.ndarray] = DynamicBatcher(
            name, self._run, config.batching_for(name, self.spec.batching), metrics
        )

    @property
    def labels(self) -> tuple[str, ...]:
        return self._labels

    async def label_logits(self, seqs: list[list[int]], deadline: float | None) -> np.ndarray:
        rows = []
        for i, seq in enumerate(seqs):
            if len(seq) > self.context_budget:
                raise InvalidArgument("queries", f"is {len(seq)} tokens; model {self.name!r} takes at most "
                                                 f"{self.context_budget} (window {self.max_length}, less [CLS] and "
                                                 "[SEP])", at=f"[{i}]")
            rows.append((self._cls, *seq, self._sep))
        outs = await self._batcher.submit(rows, [len(r) for r in rows], deadline)
        return np.stack(outs) if outs else np.zeros((0, len(self._labels)), dtype=np.float32)

    def _run(self, rows: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
        """One padded ONNX run over a batch (on the batcher's thread): each row's (L,) logits."""
        input_ids, mask = pad_right(list(rows), self._pad)  # (B, T), right-padded
        logits = self.session.run(["logits"], {"input_ids": input_ids, "attention_mask": mask})["logits"]  # (B, L)
        return [logits[i].copy() for i in range(len(rows))]

    def info(self) -> dict[str, Any]:
        return {"providers": self.providers, "labels": list(self._labels)}
