"""Full definition of the `elmo` family: a two-layer bidirectional LSTM language model (Peters et al. 2018).

Choices (at toy scale, word input rather than ELMo's character CNN):

- input: a word embedding of size H (the tokenizer's word-level vocabulary);
- a forward LM (predicts the next word) and a backward LM (predicts the previous word), each a stack of two
  single-layer `nn.LSTM`s of H units (separate stacks, so each layer's states can be read; each exports to
  one ONNX `LSTM` node), with ELMo's residual connection around the second layer;
- one softmax shared by both directions and *tied* to the input embedding (H = embedding size), so the
  two LMs share every parameter except their LSTMs, as in the paper (which shares embedding and softmax).

Contextual vectors: layer 0 = the token embedding duplicated to [e; e] (2H), layer j ∈ {1, 2} =
[forward_h_j; backward_h_j] (2H), and ELMo's mix γ · Σ_j softmax(s)_j · layer_j (`mix_layers`).

Padding: every row is first *compacted* — its real tokens moved to the front, in order, with gathers built
from the attention mask — so the forward LSTM reads real tokens before any pad, and the backward LSTM reads
each row's real tokens reversed *within its real length* (never the padded tensor reversed). The results
are gathered back to the row's original columns, so left padding, right padding and no padding give the
same numbers at real tokens. All of this is index arithmetic on the mask, which exports to ONNX as is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from plm.models.train import Batch, GetBatch
from torch import Tensor
from torch.nn import functional as F

IGNORE_INDEX = -100


@dataclass(frozen=True)
class ELMoConfig:
    vocab_size: int = 8000
    n_embd: int = 128  # H: embedding size = LSTM units per direction (tying the softmax needs them equal)
    dropout: float = 0.1  # on embeddings and LSTM outputs during training (the paper uses 0.1)


def mix_layers(layers: Tensor, weights: Tensor, gamma: float = 1.0) -> Tensor:
    """ELMo's task vector: γ · Σ_j softmax(s)_j · layers_j. layers (..., 3, T, D), weights (3,) -> (..., T, D)."""
    s = torch.softmax(weights.to(layers.dtype), dim=0)  # (3,)
    return gamma * (s[:, None, None] * layers).sum(dim=-3)


def _take(x: Tensor, index: Tensor) -> Tensor:
    """Per-row gather along time: x (B, T, D), index (B, T) -> (B, T, D) with out[b, t] = x[b, index[b, t]]."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.size(-1)))


def padding_indices(attention_mask: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Index maps for one batch whose rows hold one contiguous run of real tokens (left or right padded).

    attention_mask (B, T) -> (compact, reverse, restore, lengths):
      compact (B, T): column j of the compacted row is original column (start + j) mod T — real tokens
                      first, in order, then the pads;
      reverse (B, T): in compact space, L−1−j for j < L (the real tokens reversed), j for the pads; it is
                      its own inverse;
      restore (B, T): original column p comes from compact column (p − start) mod T;
      lengths (B,):   L, real tokens per row.
    """
    mask = attention_mask.long()
    T = mask.size(1)
    lengths = mask.sum(dim=1)  # (B,)
    start = (mask.cumsum(dim=1) == 0).long().sum(dim=1)  # (B,) leading pads: 0 for right padding
    cols = torch.arange(T, device=mask.device)[None, :]  # (1, T)
    compact = start[:, None] + cols
    compact = torch.where(compact < T, compact, compact - T)  # (B, T), mod T without Mod
    rev = lengths[:, None] - 1 - cols
    reverse = torch.where(cols < lengths[:, None], rev, cols.expand_as(rev))  # (B, T)
    restore = cols - start[:, None]
    restore = torch.where(restore >= 0, restore, restore + T)  # (B, T)
    return compact, reverse, restore, lengths


class ELMo(nn.Module):
    def __init__(self, config: ELMoConfig) -> None:
        super().__init__()
        self.config = config
        H = config.n_embd
        self.embedding = nn.Embedding(config.vocab_size, H)
        self.drop = nn.Dropout(config.dropout)
        self.forward_lstm = nn.ModuleList([nn.LSTM(H, H, batch_first=True) for _ in range(2)])
        self.backward_lstm = nn.ModuleList([nn.LSTM(H, H, batch_first=True) for _ in range(2)])
        self.softmax_bias = nn.Parameter(torch.zeros(config.vocab_size))  # the weight is the embedding (tied)
        nn.init.normal_(self.embedding.weight, std=1.0 / math.sqrt(H))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _stack(self, lstms: nn.ModuleList, x: Tensor) -> tuple[Tensor, Tensor]:
        """Two LSTM layers with a residual connection around the second: (B, T, H) -> two (B, T, H)."""
        h1, _ = lstms[0](x)
        h1 = self.drop(h1)
        h2, _ = lstms[1](h1)
        h2 = self.drop(h2) + h1
        return h1, h2

    def logits(self, h: Tensor) -> Tensor:
        """The shared softmax's logits: (..., H) -> (..., V)."""
        return F.linear(h, self.embedding.weight, self.softmax_bias)

    def encode(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, ...]:
        """(B, T) ids and mask -> states in *compact* space (real tokens first; see `padding_indices`):

        embeddings (B, T, H); forward (B, 2, T, H) layers 1, 2 of the forward LM; backward (B, 2, T, H) the
        backward LM's layers, already un-reversed (column j is token j's state); then the compacted ids
        (B, T), `restore` (B, T) and `lengths` (B,).
        """
        compact, reverse, restore, lengths = padding_indices(attention_mask)
        ids = input_ids.gather(1, compact)  # (B, T) real tokens first
        emb = self.drop(self.embedding(ids))  # (B, T, H)
        f1, f2 = self._stack(self.forward_lstm, emb)  # (B, T, H) each; pads trail, so they never reach reals
        b1, b2 = self._stack(self.backward_lstm, _take(emb, reverse))  # reads the real tokens last to first
        b1, b2 = _take(b1, reverse), _take(b2, reverse)  # back to compact order (reverse is an involution)
        return emb, torch.stack((f1, f2), dim=1), torch.stack((b1, b2), dim=1), ids, restore, lengths

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """(B, T) ids and mask (1 real, 0 pad; left or right padding) -> (layers, token_logprobs).

        layers (B, 3, T, 2H): [e; e], [f1; b1], [f2; b2] at each original column, zeros at pads.
        token_logprobs (B, T): forward LM log P(x_t | x_<t); 0.0 at each row's first real token and at pads.
        """
        emb, fwd, bwd, ids, restore, lengths = self.encode(input_ids, attention_mask)
        B, T, H = emb.shape
        layer0 = torch.cat((emb, emb), dim=-1)[:, None]  # (B, 1, T, 2H)
        layers = torch.cat((layer0, torch.cat((fwd, bwd), dim=-1)), dim=1)  # (B, 3, T, 2H) compact order
        layers = layers.gather(2, restore[:, None, :, None].expand(B, 3, T, 2 * H))  # original columns
        real = attention_mask > 0  # (B, T)
        layers = layers * real[:, None, :, None].to(layers.dtype)
        # Forward LM: the state at compact column j−1 scores the token at j (for 1 <= j < L).
        logprobs = F.log_softmax(self.logits(fwd[:, 1, :-1]), dim=-1)  # (B, T−1, V)
        scored = logprobs.gather(-1, ids[:, 1:].unsqueeze(-1))[..., 0]  # (B, T−1)
        cols = torch.arange(1, T, device=input_ids.device)[None, :]  # (1, T−1)
        scored = torch.where(cols < lengths[:, None], scored, torch.zeros_like(scored))
        first = torch.zeros_like(input_ids[:, :1], dtype=scored.dtype)  # (B, 1); scored is empty when T = 1
        compact_lp = torch.cat((first, scored), dim=1)  # (B, T), 0 at j = 0 and at pads
        token_logprobs = compact_lp.gather(1, restore)  # (B, T) original columns
        return layers, token_logprobs

    def lm_loss(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Mean of the forward and backward LMs' cross entropies over real next/previous tokens."""
        _, fwd, bwd, ids, _, lengths = self.encode(input_ids, attention_mask)  # ids (B, T) compact
        T = ids.size(1)
        cols = torch.arange(T, device=ids.device)[None, :]
        real = cols < lengths[:, None]  # (B, T) compact real columns
        nxt = torch.where(real[:, 1:], ids[:, 1:], torch.full_like(ids[:, 1:], IGNORE_INDEX))  # (B, T−1)
        forward_loss = F.cross_entropy(self.logits(fwd[:, 1, :-1]).flatten(0, 1), nxt.flatten(),
                                       ignore_index=IGNORE_INDEX)
        # The backward LM's state at column j (having read tokens j..L−1) predicts token j−1.
        prev = torch.where(real[:, :-1] & real[:, 1:], ids[:, :-1], torch.full_like(ids[:, :-1], IGNORE_INDEX))
        backward_loss = F.cross_entropy(self.logits(bwd[:, 1, 1:]).flatten(0, 1), prev.flatten(),
                                        ignore_index=IGNORE_INDEX)
        return (forward_loss + backward_loss) / 2


def elmo_loss(model: nn.Module, batch: Batch) -> Tensor:
    """`train()`'s loss_fn: batch = (input_ids, attention_mask, next-token targets); the targets are only
    counted (tokens seen), the model derives both directions' targets from the ids itself."""
    input_ids, attention_mask, _ = batch
    assert isinstance(model, ELMo)
    return model.lm_loss(input_ids, attention_mask)


def pad_batch(rows: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-pad id rows into (B, T) int64 ids and mask."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def sentence_batches(sentences: dict[str, list[list[int]]], batch_size: int, max_len: int, pad_id: int,
                     rng: np.random.Generator) -> GetBatch:
    """Random batches of whole sentences (`<s> … </s>` id lists, cut to `max_len`), right-padded:
    (input_ids (B, T), attention_mask (B, T), next-token targets (B, T) with −100 where there is none)."""
    rngs = dict(zip(("train", "valid"), rng.spawn(2), strict=True))

    def get_batch(split: str) -> Batch:
        pool = sentences[split]
        rows = [pool[i][:max_len] for i in rngs[split].integers(0, len(pool), size=batch_size)]
        ids, mask = pad_batch(rows, pad_id)
        targets = torch.where(mask[:, 1:] > 0, ids[:, 1:], torch.full_like(ids[:, 1:], IGNORE_INDEX))
        return ids, mask, torch.cat((targets, torch.full_like(ids[:, :1], IGNORE_INDEX)), dim=1)

    return get_batch


@torch.no_grad()
def forward_logprob_sum(model: ELMo, sentences: list[list[int]], pad_id: int, batch: int = 64) -> float:
    """Σ over sentences (`<s> … </s>` id lists) of the forward LM's ln P of every token after `<s>`."""
    model.eval()
    total = 0.0
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))  # similar lengths, less padding
    for k in range(0, len(order), batch):
        ids, mask = pad_batch([sentences[i] for i in order[k : k + batch]], pad_id)
        _, token_logprobs = model(ids, mask)
        total += float(token_logprobs.double().sum())
    return total
