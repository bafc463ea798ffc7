"""The `classifier` family: a pretrained BERT with a classification head, trained frozen or fine-tuned.

The notes' two ways to reuse a pretrained model A on a small task B: **frozen** — A's lower layers keep their
pretrained weights and only what sits above them learns — and **fine-tuned** — every layer keeps learning on
task B. `BertClassifier` is one model for both: `freeze(model, layers)` fixes the embeddings and the lowest
`layers` encoder blocks (0: end-to-end fine-tuning; all of them: a frozen encoder under a trained head).
`linear_probe` is the cheapest frozen use: fixed features (BERT's [CLS] or mean vector, word2vec averages)
and a softmax regression on them.

A pretrained BERT comes back from its exported folder (`bert_from_onnx`): the ONNX graph holds every weight,
so a classifier can be built from any `bert` model folder of a repository (built or imported) without a
separate weights file; the recovered model is checked against the graph before it is used.

Read: BertClassifier, freeze, the data (encode, batches), fine_tune, linear_probe, bert_from_onnx.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
from plm.models.bert import Bert, BertConfig
from plm.models.train import Batch, GetBatch, TrainConfig, TrainResult, pad_right, train
from torch import Tensor
from torch.nn import functional as F

Pooling = Literal["cls", "mean"]


class BertClassifier(nn.Module):
    """BERT, a sentence vector, dropout and a linear head over `labels`.

    `cls` pooling is BERT's own: tanh(pooler([CLS]'s final state)), the pooler pretrained by NSP; `mean` is the
    mean of the final states over the row's real tokens ([CLS] and [SEP] included)."""

    def __init__(self, bert: Bert, labels: Sequence[str], pooling: Pooling = "cls", dropout: float = 0.1) -> None:
        super().__init__()
        self.bert = bert
        self.labels = tuple(labels)
        self.pooling = pooling
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(bert.config.n_embd, len(self.labels))
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def features(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, T) right-padded `[CLS] text [SEP]` rows and their mask -> (B, C) sentence vectors."""
        hidden = self.bert.hidden_states(input_ids, attention_mask, torch.zeros_like(input_ids))  # (B, T, C)
        if self.pooling == "cls":
            return torch.tanh(self.bert.pooler(hidden[:, 0]))
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        return (hidden * mask).sum(1) / mask.sum(1)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """-> (B, L) label logits."""
        return self.head(self.drop(self.features(input_ids, attention_mask)))


def freeze(model: BertClassifier, layers: int) -> None:
    """Fix the embeddings and the lowest `layers` blocks (and, with every block fixed, the pooler too, so only
    the head learns); everything above learns. 0 fine-tunes end to end."""
    n = model.bert.config.n_layer
    if not 0 <= layers <= n:
        raise ValueError(f"layers must be in 0..{n}, got {layers}")
    bert = model.bert
    fixed: list[nn.Module] = []
    if layers > 0:
        fixed += [bert.word_embeddings, bert.position_embeddings, bert.token_type_embeddings, bert.emb_ln]
        fixed += list(bert.blocks[:layers])
    if layers == n:
        fixed.append(bert.pooler)
    for p in model.parameters():
        p.requires_grad_(True)
    for module in fixed:
        for p in module.parameters():
            p.requires_grad_(False)


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Encoded:
    """Labelled rows of one split: `[CLS] text [SEP]` ids (cut to the window) and label indices."""

    rows: list[list[int]]
    labels: np.ndarray  # (N,) int64


def encode(tokenizer: object, texts: Sequence[str], labels: Sequence[int], max_length: int, cls: int,
           sep: int) -> Encoded:
    """Rows for `texts`: the first `max_length - 2` WordPiece ids of each, between [CLS] and [SEP]."""
    encs = tokenizer.encode_batch(list(texts), add_special_tokens=False)  # type: ignore[attr-defined]
    rows = [[cls, *e.ids[: max_length - 2], sep] for e in encs]
    return Encoded(rows, np.asarray(labels, dtype=np.int64))


def batches(splits: dict[str, Encoded], batch_size: int, rng: np.random.Generator) -> GetBatch:
    """`get_batch(split)` for models.train.train: `train` draws a random batch, `valid` walks its rows in order
    (wrapping), so every validation estimate reads the same rows."""
    train_rng = rng.spawn(1)[0]
    cursor = {"valid": 0}

    def get_batch(split: str) -> Batch:
        data = splits[split]
        n = len(data.rows)
        if split == "train":
            idx = train_rng.integers(0, n, size=batch_size)
        else:
            idx = (cursor["valid"] + np.arange(min(batch_size, n))) % n
            cursor["valid"] = int(idx[-1] + 1) % n
        ids, mask = pad_right([data.rows[i] for i in idx])
        return ids, mask, torch.from_numpy(data.labels[idx])

    return get_batch


def classification_loss(model: nn.Module, batch: Batch) -> Tensor:
    ids, mask, labels = batch
    return F.cross_entropy(model(ids, mask), labels)


def fine_tune(model: BertClassifier, splits: dict[str, Encoded], cfg: TrainConfig, out_dir: Path,
              desc: str = "classifier") -> TrainResult:
    """Train the parameters `freeze` left free on `splits["train"]`, ending on the best `valid` loss
    (models.train.train: fixed steps, seeded; writes out_dir/loss_curve.png)."""
    get_batch = batches(splits, cfg.batch_size, np.random.default_rng(cfg.seed))
    return train(model, get_batch, cfg, out_dir, loss_fn=classification_loss, desc=desc)


@torch.no_grad()
def predict(model: nn.Module, rows: Sequence[Sequence[int]], batch_size: int = 64,
            features: bool = False) -> np.ndarray:
    """(N, L) float32 logits of `rows` (or, with `features`, the (N, C) sentence vectors), in eval mode."""
    model.eval()
    out = []
    for i in range(0, len(rows), batch_size):
        ids, mask = pad_right(rows[i: i + batch_size])
        assert isinstance(model, BertClassifier)
        out.append((model.features(ids, mask) if features else model(ids, mask)).numpy())
    return np.concatenate(out).astype(np.float32)


# ---------------------------------------------------------------------------------------------- linear probe


@dataclass(frozen=True)
class LinearProbe:
    """A softmax regression on fixed features, standardised by the training features' mean and scale."""

    weight: np.ndarray  # (D, L)
    bias: np.ndarray  # (L,)
    mean: np.ndarray  # (D,)
    scale: np.ndarray  # (D,)
    l2: float

    def logits(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.scale) @ self.weight + self.bias


def _fit_softmax(x: Tensor, y: Tensor, n_labels: int, l2: float, iterations: int) -> tuple[Tensor, Tensor]:
    """Full-batch L-BFGS on mean cross entropy + l2·|W|² (convex, so the optimum does not depend on the start)."""
    weight = torch.zeros((x.shape[1], n_labels), dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(n_labels, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=iterations, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + l2 * (weight**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return weight.detach(), bias.detach()


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, valid_x: np.ndarray, valid_y: np.ndarray,
                 n_labels: int, l2s: Sequence[float] = (1e-4, 1e-3, 1e-2, 1e-1), iterations: int = 200
                 ) -> LinearProbe:
    """Logistic regression (softmax) on fixed features, its L2 strength chosen by validation accuracy."""
    mean = train_x.mean(0)
    scale = train_x.std(0) + 1e-6
    x = torch.from_numpy((train_x - mean) / scale).double()
    y = torch.from_numpy(np.asarray(train_y, dtype=np.int64))
    best: LinearProbe | None = None
    best_acc = -1.0
    for l2 in l2s:
        weight, bias = _fit_softmax(x, y, n_labels, l2, iterations)
        probe = LinearProbe(weight.numpy(), bias.numpy(), mean, scale, l2)
        acc = float((probe.logits(valid_x).argmax(1) == valid_y).mean())
        if acc > best_acc:
            best, best_acc = probe, acc
    assert best is not None
    return best


# ------------------------------------------------------------------------------------------ from ONNX


def _module_path(node_name: str) -> str:
    """A TorchScript-exported node's scope as a module path: "/blocks.0/mlp/mlp.0/MatMul" -> "blocks.0.mlp.0"
    (a container's child is scoped "<container>.<index>" under the container's own scope)."""
    path: list[str] = []
    for part in node_name.strip("/").split("/")[:-1]:
        if path and part.startswith(path[-1] + "."):
            path[-1] = part
        else:
            path.append(part)
    return ".".join(path)


def bert_from_onnx(folder: Path) -> Bert:
    """The PyTorch BERT of a `bert` model folder, its weights read from `model.onnx`.

    Named initializers are parameters as they are (`model.<name>`); a Linear's weight was folded into an
    anonymous, transposed MatMul initializer, found by the scope of the node that reads it. The tied MLM
    decoder reads the token embeddings and is skipped. Raises ValueError when a parameter is not found or
    the recovered model's final states differ from the graph's by more than 1e-4."""
    import onnx
    from onnx import numpy_helper

    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    config = BertConfig(**{k: v for k, v in manifest.get("config", {}).items()
                           if k in BertConfig.__dataclass_fields__})
    graph_file = folder / manifest["graphs"]["model"]["file"]
    proto = onnx.load(str(graph_file))
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    state: dict[str, np.ndarray] = {}
    for name, value in inits.items():
        if name.startswith("model."):
            state[name[len("model."):]] = value
    for node in proto.graph.node:
        if node.op_type != "MatMul":
            continue
        for name in node.input:
            path = _module_path(node.name)
            if name in inits and name not in state and path:
                state[f"{path}.weight"] = inits[name].T
    model = Bert(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"{graph_file}: no weights found for {', '.join(missing[:5])}")
    model.load_state_dict({k: torch.from_numpy(np.array(state[k])) for k in expected})
    model.eval()
    _check_recovered(model, graph_file)
    return model


def _check_recovered(model: Bert, graph_file: Path) -> None:
    import onnxruntime as ort

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, model.config.vocab_size, (3, min(12, model.config.max_position)), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "token_type_ids": np.zeros_like(ids.numpy()),
             "mask_positions": np.zeros((3, 1), dtype=np.int64)}
    session = ort.InferenceSession(str(graph_file), providers=["CPUExecutionProvider"])
    (got,) = session.run(["hidden_states"], feeds)
    with torch.no_grad():
        want = model.hidden_states(ids, mask, torch.zeros_like(ids)).numpy()
    diff = float(np.abs(got - want)[mask.numpy() > 0].max())
    if diff > 1e-4:
        raise ValueError(f"{graph_file}: the weights read back differ from the graph by {diff:.3g}")
