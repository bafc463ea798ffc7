"""Full definition of the `nnlm` family: Bengio et al.'s (2003) feed-forward neural language model.

An order-n model reads the previous n−1 words, looks each up in a shared embedding table C (the "Q matrix"
of the notes: one-hot × C = the word's vector), concatenates them into x, and predicts the next word:

    y = b + W x + U tanh(d + H x),    P(w_t | w_{t-n+1} … w_{t-1}) = softmax(y)

`W x` are Bengio's optional *direct connections* from the embeddings to the output (on by default here: they
cost one (n−1)·m × V matrix and speed up early training). At a sentence's start the history is padded with
`<s>`, so every word of `<s> w1 … wn </s>` (and `</s>`) gets exactly n−1 words of context.

Also here: turning sentences into (history, next word) windows, and the batch sampler `train()` reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from plm.models.train import Batch, GetBatch
from torch import Tensor
from torch.nn import functional as F


@dataclass(frozen=True)
class NNLMConfig:
    vocab_size: int = 8000
    order: int = 4  # n: the model reads n−1 = 3 previous words, Bengio's best setting on Brown was n = 5
    n_embd: int = 64  # m, the word vector size; the notes' point is that m ≪ V
    n_hidden: int = 128  # h, tanh units
    direct: bool = True  # Bengio's direct connections W x from the concatenated embeddings to the output
    dropout: float = 0.0  # on the hidden layer; the small profile's corpus is small enough to overfit


class NNLM(nn.Module):
    def __init__(self, config: NNLMConfig) -> None:
        super().__init__()
        if config.order < 2:
            raise ValueError(f"order must be >= 2 (at least one word of history), got {config.order}")
        self.config = config
        context = (config.order - 1) * config.n_embd  # width of x, the concatenated history
        self.embedding = nn.Embedding(config.vocab_size, config.n_embd)  # C
        self.hidden = nn.Linear(context, config.n_hidden)  # H, d
        self.drop = nn.Dropout(config.dropout)
        self.output = nn.Linear(config.n_hidden, config.vocab_size)  # U, b
        self.direct = nn.Linear(context, config.vocab_size, bias=False) if config.direct else None  # W
        nn.init.normal_(self.embedding.weight, std=0.1)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, context_ids: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """(B, n−1) int64 histories (oldest first) -> (logits (B, V), mean cross entropy or None).

        `targets` (B,) holds each window's next word.
        """
        B = context_ids.size(0)
        x = self.embedding(context_ids).reshape(B, -1)  # (B, (n−1)·m): the concatenation of the n−1 vectors
        logits = self.output(self.drop(torch.tanh(self.hidden(x))))  # (B, V)
        if self.direct is not None:
            logits = logits + self.direct(x)
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits, targets)


def windows(sentences: list[list[int]], order: int, bos: int, eos: int) -> tuple[np.ndarray, np.ndarray]:
    """Every (history, next word) pair of `<s> w1 … wn </s>` for each id sentence: n+1 pairs a sentence.

    Returns contexts (N, order−1) int64 (history padded on the left with `bos`) and targets (N,) int64.
    """
    k = order - 1
    contexts: list[list[int]] = []
    targets: list[int] = []
    for sent in sentences:
        padded = [bos] * k + list(sent) + [eos]
        for t in range(k, len(padded)):
            contexts.append(padded[t - k : t])
            targets.append(padded[t])
    return np.asarray(contexts, dtype=np.int64).reshape(-1, k), np.asarray(targets, dtype=np.int64)


def window_batches(pairs: dict[str, tuple[np.ndarray, np.ndarray]], batch_size: int,
                   rng: np.random.Generator) -> GetBatch:
    """Random (contexts (B, n−1), targets (B,)) batches of each split's windows, one generator per split."""
    rngs = dict(zip(("train", "valid"), rng.spawn(2), strict=True))

    def get_batch(split: str) -> Batch:
        contexts, targets = pairs[split]
        rows = rngs[split].integers(0, len(targets), size=batch_size)
        return torch.from_numpy(contexts[rows]), torch.from_numpy(targets[rows])

    return get_batch


@torch.no_grad()
def sentence_logprob_sum(model: NNLM, sentences: list[list[int]], bos: int, eos: int) -> tuple[float, int]:
    """(Σ ln P over every word and `</s>` of the id sentences, number of scored tokens)."""
    contexts, targets = windows(sentences, model.config.order, bos, eos)
    model.eval()
    total = 0.0
    with torch.no_grad():  # evaluation only: no autograd graph over 4096 × V log-probs
        for i in range(0, len(targets), 4096):
            logits, _ = model(torch.from_numpy(contexts[i : i + 4096]))
            lp = torch.log_softmax(logits, dim=-1)  # (b, V); float32, summed in float64 below
            total += float(lp.gather(1, torch.from_numpy(targets[i : i + 4096])[:, None]).double().sum())
    return total, len(targets)
