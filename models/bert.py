"""Full definition of the `bert` family: a bidirectional Transformer encoder pre-trained with MLM + NSP.

BERT's architecture at toy scale (Devlin et al. 2018; parameter roles as Hugging Face's BertModel):

- embeddings: token + segment (token_type, 0 for sentence A, 1 for B) + learned position, then LayerNorm;
- **post-LN** encoder blocks, as the original: x = LN(x + attention(x)), then x = LN(x + MLP(x)), GELU;
- bidirectional self-attention: every token sees every real token of its row; pad keys are masked out;
- heads: masked LM (dense + GELU + LayerNorm, then a decoder tied to the token embeddings plus a bias) and
  next-sentence prediction (the pooler, tanh(dense([CLS])), then a 2-way classifier; class 0 = IsNext).

Positions are column indices, so rows must be **right**-padded (what the server does): a row's real tokens
then get the same positions, and see the same keys, whatever it is batched with.

Pre-training data (`mlm_nsp_batches`) follows the paper: pairs `[CLS] A [SEP] B [SEP]` where B is the true
next sentence half of the time and a random sentence from another document otherwise; 15% of the
non-special tokens are chosen for prediction, of which 80% become [MASK], 10% a random token and 10% stay
as they are (so the model cannot learn that only [MASK] positions matter). The loss is the MLM cross
entropy on the chosen positions plus the NSP cross entropy.

Read bottom-up: SelfAttention, Block, BertConfig, Bert, then the data and loss functions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from plm.models.train import Batch, GetBatch
from torch import Tensor
from torch.nn import functional as F

IGNORE_INDEX = -100  # MLM targets at positions not chosen for prediction; F.cross_entropy's default
IS_NEXT, NOT_NEXT = 0, 1  # NSP classes, as in the paper's and Hugging Face's heads


class SelfAttention(nn.Module):
    """Multi-head bidirectional self-attention, written out (q/k/v + SDPA) so ONNX keeps B and T dynamic."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        assert config.n_embd % config.n_head == 0, f"n_embd={config.n_embd} not divisible by n_head"
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v in one matmul
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout

    def forward(self, x: Tensor, attn_mask: Tensor) -> Tensor:
        B, T, C = x.size()
        q, k, v = self.qkv(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.proj(y))


class Block(nn.Module):
    """Post-LN encoder block (original BERT): LN(x + attn(x)), then LN(x + mlp(x))."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.attn = SelfAttention(config)
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=1e-12)  # BERT's epsilon
        self.mlp = nn.Sequential(
            nn.Linear(config.n_embd, 4 * config.n_embd),
            nn.GELU(),  # exact (erf) GELU, as BERT
            nn.Linear(4 * config.n_embd, config.n_embd),
            nn.Dropout(config.dropout),
        )
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=1e-12)

    def forward(self, x: Tensor, attn_mask: Tensor) -> Tensor:
        x = self.ln_1(x + self.attn(x, attn_mask))
        x = self.ln_2(x + self.mlp(x))
        return x  # (B, T, C)


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 8000  # the WordPiece vocabulary we train; tied decoder weights keep it cheap
    max_position: int = 128  # [CLS] A [SEP] B [SEP] of two short sentences; attention cost grows with T^2
    n_layer: int = 4  # a toy BERT that trains in ~2 minutes on 2 CPU cores
    n_head: int = 4  # head size 32
    n_embd: int = 128
    type_vocab_size: int = 2  # segments A and B
    dropout: float = 0.1  # BERT's value; 0 for fixtures that must memorise


class Bert(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        C = config.n_embd
        self.word_embeddings = nn.Embedding(config.vocab_size, C)
        self.position_embeddings = nn.Embedding(config.max_position, C)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, C)
        self.emb_ln = nn.LayerNorm(C, eps=1e-12)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        # MLM head: transform, then a decoder whose weight is the token embedding (tied) plus its own bias.
        self.mlm_dense = nn.Linear(C, C)
        self.mlm_ln = nn.LayerNorm(C, eps=1e-12)
        self.mlm_bias = nn.Parameter(torch.zeros(config.vocab_size))
        # NSP head: the pooler reads [CLS]'s final vector; the classifier says IsNext (0) or NotNext (1).
        self.pooler = nn.Linear(C, C)
        self.nsp = nn.Linear(C, 2)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)  # BERT's initializer_range
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def hidden_states(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None
    ) -> Tensor:
        """(B, T) ids, mask (1 real / 0 pad, right padding), segments -> (B, T, C) final-layer states."""
        T = input_ids.size(1)
        if not torch.jit.is_tracing() and self.config.max_position < T:
            raise ValueError(f"sequence of length {T} exceeds max_position {self.config.max_position}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        positions = torch.arange(T, device=input_ids.device)[None, :]  # (1, T): column index (right padding)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        x = self.drop(self.emb_ln(x + self.position_embeddings(positions)))  # (B, T, C)
        # Every query may attend every real key. A pad query sees the real keys too, so no softmax row is
        # empty (NaN) as long as each row has one real token; its output is ignored.
        attn_mask = (attention_mask > 0)[:, None, None, :]  # (B, 1, 1, T), broadcast over heads and queries
        for block in self.blocks:
            x = block(x, attn_mask)
        return x  # (B, T, C)

    def mlm_logits(self, hidden: Tensor) -> Tensor:
        """(..., C) final states -> (..., V) token logits."""
        h = self.mlm_ln(F.gelu(self.mlm_dense(hidden)))
        return F.linear(h, self.word_embeddings.weight, self.mlm_bias)  # tied decoder

    def nsp_logits(self, hidden: Tensor) -> Tensor:
        """(B, T, C) final states -> (B, 2) NSP logits from the [CLS] column."""
        return self.nsp(torch.tanh(self.pooler(hidden[:, 0])))

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """-> (MLM logits (B, T, V), NSP logits (B, 2))."""
        hidden = self.hidden_states(input_ids, attention_mask, token_type_ids)
        return self.mlm_logits(hidden), self.nsp_logits(hidden)


# ----------------------------------------------------------------------------------------- pre-training


@dataclass(frozen=True)
class SpecialIds:
    """Token ids of the WordPiece specials (models.tokenization.WORDPIECE_SPECIALS gives 0..4)."""

    pad: int = 0
    unk: int = 1
    cls: int = 2
    sep: int = 3
    mask: int = 4

    @property
    def first_regular(self) -> int:
        """Random replacement tokens are drawn from [first_regular, vocab): never a special."""
        return max(self.pad, self.unk, self.cls, self.sep, self.mask) + 1


Documents = Sequence[Sequence[Sequence[int]]]  # documents -> sentences -> token ids (no specials)


def sample_pairs(documents: Documents, n: int, rng: np.random.Generator) -> list[tuple[list[int], list[int], int]]:
    """`n` NSP examples (A, B, label): B is A's next sentence (IS_NEXT) or, with probability 1/2, a random
    sentence of another document (NOT_NEXT). With a single document, a random sentence that is neither A
    nor its successor stands in for "another document"."""
    starts = [(d, i) for d, doc in enumerate(documents) for i in range(len(doc) - 1)]  # A's with a successor
    if not starts:
        raise ValueError("NSP needs a document with at least two sentences")
    total = sum(len(doc) for doc in documents)
    if len(documents) == 1 and total < 3:
        raise ValueError("NSP with one document needs at least three sentences")
    pairs: list[tuple[list[int], list[int], int]] = []
    for _ in range(n):
        d, i = starts[int(rng.integers(len(starts)))]
        a = list(documents[d][i])
        if rng.random() < 0.5:
            pairs.append((a, list(documents[d][i + 1]), IS_NEXT))
            continue
        while True:  # rejection sampling: few draws, as most sentences are elsewhere
            e = int(rng.integers(len(documents)))
            j = int(rng.integers(len(documents[e])))
            if (e != d or len(documents) == 1) and not (e == d and j in (i, i + 1)):
                break
        pairs.append((a, list(documents[e][j]), NOT_NEXT))
    return pairs


def truncate_pair(a: list[int], b: list[int], max_tokens: int) -> tuple[list[int], list[int]]:
    """Drop tokens from the end of the longer sentence until len(a) + len(b) <= max_tokens (BERT's rule)."""
    a, b = list(a), list(b)
    while len(a) + len(b) > max_tokens:
        (a if len(a) >= len(b) else b).pop()
    return a, b


def mask_tokens(
    ids: np.ndarray,
    maskable: np.ndarray,
    rng: np.random.Generator,
    *,
    mask_id: int,
    vocab_size: int,
    first_regular: int,
    mask_prob: float = 0.15,
    replace_with_mask: float = 0.8,
    replace_with_random: float = 0.1,
) -> tuple[np.ndarray, np.ndarray]:
    """BERT's corruption of one batch: (inputs, labels), both (B, T) int64.

    In each row, max(1, round(mask_prob * n)) of its n maskable tokens are chosen (the original's exact
    count rather than a coin per token); each chosen token becomes [MASK] with probability 0.8, a random
    regular token with 0.1, and stays itself with the remaining 0.1. `labels` holds the original token at
    the chosen positions and IGNORE_INDEX elsewhere.
    """
    inputs = ids.astype(np.int64).copy()
    labels = np.full_like(inputs, IGNORE_INDEX)
    for r in range(ids.shape[0]):
        candidates = np.flatnonzero(maskable[r])
        if len(candidates) == 0:
            continue
        k = max(1, round(mask_prob * len(candidates)))
        chosen = rng.choice(candidates, size=k, replace=False)
        labels[r, chosen] = inputs[r, chosen]
        u = rng.random(k)
        to_mask = chosen[u < replace_with_mask]
        to_random = chosen[(u >= replace_with_mask) & (u < replace_with_mask + replace_with_random)]
        inputs[r, to_mask] = mask_id
        inputs[r, to_random] = rng.integers(first_regular, vocab_size, size=len(to_random))
    return inputs, labels


def collate_pairs(
    pairs: Sequence[tuple[list[int], list[int], int]], max_length: int, specials: SpecialIds
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`[CLS] A [SEP] B [SEP]` rows, right-padded: (ids, attention_mask, token_type_ids, maskable) (B, T)
    and NSP labels (B,). `maskable` marks the tokens of A and B (not the specials, not padding)."""
    rows = []
    for a, b, _ in pairs:
        a, b = truncate_pair(a, b, max_length - 3)
        rows.append(([specials.cls, *a, specials.sep, *b, specials.sep], len(a), len(b)))
    T = max(len(ids) for ids, _, _ in rows)
    B = len(rows)
    ids = np.full((B, T), specials.pad, dtype=np.int64)
    mask = np.zeros((B, T), dtype=np.int64)
    types = np.zeros((B, T), dtype=np.int64)
    maskable = np.zeros((B, T), dtype=bool)
    for r, (row, na, nb) in enumerate(rows):
        ids[r, : len(row)] = row
        mask[r, : len(row)] = 1
        types[r, na + 2 : len(row)] = 1  # B and its [SEP]
        maskable[r, 1 : 1 + na] = True
        maskable[r, na + 2 : na + 2 + nb] = True
    labels = np.array([label for _, _, label in pairs], dtype=np.int64)
    return ids, mask, types, maskable, labels


def mlm_nsp_batches(
    documents: Mapping[str, Documents],
    *,
    max_length: int,
    batch_size: int,
    vocab_size: int,
    rng: np.random.Generator,
    specials: SpecialIds = SpecialIds(),
    mask_prob: float = 0.15,
) -> GetBatch:
    """`get_batch(split)` for `models.train.train`: fresh NSP pairs, masked, as
    `(input_ids, attention_mask, token_type_ids, nsp_labels, mlm_labels)` int64 tensors — (B, T) except
    nsp_labels (B,). mlm_labels is last, the targets, so train() counts predicted tokens."""
    rngs = dict(zip(("train", "valid"), rng.spawn(2), strict=True))

    def get_batch(split: str) -> Batch:
        g = rngs[split]
        ids, mask, types, maskable, nsp = collate_pairs(sample_pairs(documents[split], batch_size, g), max_length,
                                                        specials)
        inputs, labels = mask_tokens(ids, maskable, g, mask_id=specials.mask, vocab_size=vocab_size,
                                     first_regular=specials.first_regular, mask_prob=mask_prob)
        return tuple(torch.from_numpy(t) for t in (inputs, mask, types, nsp, labels))

    return get_batch


def mlm_nsp_loss(model: nn.Module, batch: Batch) -> Tensor:
    """MLM cross entropy over the chosen positions + NSP cross entropy (`loss_fn` for models.train.train).

    The MLM head runs only at the chosen positions, (N, C) -> (N, V), never over the whole (B, T, V)."""
    input_ids, attention_mask, token_type_ids, nsp_labels, mlm_labels = batch
    assert isinstance(model, Bert)
    hidden = model.hidden_states(input_ids, attention_mask, token_type_ids)  # (B, T, C)
    chosen = mlm_labels != IGNORE_INDEX  # (B, T)
    mlm = F.cross_entropy(model.mlm_logits(hidden[chosen]), mlm_labels[chosen])  # hidden[chosen]: (N, C)
    nsp = F.cross_entropy(model.nsp_logits(hidden), nsp_labels)
    return mlm + nsp
