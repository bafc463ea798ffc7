"""Full definition of the `gpt` family: a decoder-only Transformer language model, all of it in this file.

GPT-2's architecture at toy scale (after karpathy/nanoGPT's `model.py`): token + learned position
embeddings, pre-LayerNorm blocks (causal self-attention, then a 4x GELU MLP, each on a residual branch),
a final LayerNorm, and an LM head tied to the token embedding.

Unlike nanoGPT, every forward pass takes an `attention_mask` (1 real token, 0 pad) because the server
batches sentences of different lengths. Two rules make padding invisible to real tokens:

- real queries never attend to pad keys (the mask), and
- positions come from the mask (`position_ids_from_mask`), not from the column index, so a sentence gets
  the same positions whether it is left-padded, right-padded or alone.

A pad query (e.g. the leading columns of a left-padded row) may attend only to itself: a query row with
every key masked is 0/0 = NaN in a plain softmax (recent PyTorch SDPA and its ONNX export patch that to 0,
but a fused or hand-written kernel may not). Its output is meaningless but finite.

Read bottom-up: CausalSelfAttention, MLP, Block, GPTConfig, GPT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor
from torch.nn import functional as F

IGNORE_INDEX = -100  # targets equal to this (padding) do not count in the loss; F.cross_entropy's default


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions counted over real tokens only: `cumsum(mask) - 1`, and 0 at pad positions.

    (B, T) int64 -> (B, T) int64. Left padding [0 0 1 1 1] -> [0 0 0 1 2]; right padding [1 1 1 0 0] ->
    [0 1 2 0 0]. The server computes the same thing in numpy for the ONNX graph's `position_ids` input.
    """
    mask = attention_mask.long()
    return torch.where(mask > 0, mask.cumsum(dim=-1) - 1, torch.zeros_like(mask))


def attention_bias(attention_mask: Tensor) -> Tensor:
    """Boolean (B, 1, T, T) mask, True where query i may attend key j: causal, and no pad keys.

    Query i sees key j when j <= i and (key j is real or j == i). The diagonal term keeps a pad query's row
    from being all-False (NaN in a plain softmax); a real query's diagonal is itself real, so real
    tokens are unaffected.
    """
    T = attention_mask.size(1)
    pos = torch.arange(T, device=attention_mask.device)
    causal = pos[None, :] <= pos[:, None]  # (T, T) key index <= query index
    diagonal = pos[None, :] == pos[:, None]  # (T, T)
    key_is_real = (attention_mask > 0)[:, None, None, :]  # (B, 1, 1, T)
    return causal[None, None] & (key_is_real | diagonal[None, None])  # (B, 1, T, T)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention written out, so the ONNX graph keeps batch and sequence dynamic
    (nn.MultiheadAttention exports with a fixed batch shape)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        assert config.n_embd % config.n_head == 0, f"n_embd={config.n_embd} not divisible by n_head"
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout

    def forward(self, x: Tensor, attn_mask: Tensor) -> Tensor:
        B, T, C = x.size()  # batch, sequence length, embedding dim (n_embd)
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C) heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()  # exact (erf) GELU; GPT-2's tanh approximation differs by < 1e-3
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))  # (B, T, C)


class Block(nn.Module):
    """Pre-LN Transformer block as in GPT-2: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, attn_mask: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask)
        x = x + self.mlp(self.ln_2(x))
        return x  # (B, T, C)


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 8000  # the word-level/BPE tokenizers we train are this size; tied weights keep it cheap
    block_size: int = 128  # max positions: sentences are short, and attention cost grows with T^2
    n_layer: int = 4  # a toy GPT that trains in minutes on 2 CPU cores
    n_head: int = 4  # head size n_embd / n_head = 32, as small as is still useful
    n_embd: int = 128
    dropout: float = 0.0  # nanoGPT: 0 for pretraining; a few minutes of training rarely overfits
    bias: bool = True  # biases in Linear and LayerNorm, as GPT-2 (so imported GPT-2 checkpoints fit)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        # Parameter names as Hugging Face's GPT2Model (wte, wpe, h.{i}.attn.c_attn, ln_f), minus Conv1D.
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # token embeddings
        self.wpe = nn.Embedding(config.block_size, config.n_embd)  # learned position embeddings
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying (Press & Wolf 2017): the output projection is the input embedding.
        self.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # GPT-2: scale residual projections by 1/sqrt(2 * n_layer), one per residual branch.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (the tied embedding counted once); `non_embedding` leaves out positions and
        tokens, the convention of the scaling-law papers."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wpe.weight.numel() + self.wte.weight.numel()
        return n

    def hidden_states(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None
    ) -> Tensor:
        """(B, T) ids -> (B, T, C) final-LayerNorm outputs: what the LM head reads, and the embeddings."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        tok_emb = self.wte(input_ids)  # (B, T, C)
        pos_emb = self.wpe(position_ids)  # (B, T, C)
        x = self.drop(tok_emb + pos_emb)
        mask = attention_bias(attention_mask)  # (B, 1, T, T), built once for all layers
        for block in self.h:
            x = block(x, mask)
        return self.ln_f(x)  # (B, T, C)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        targets: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """(B, T) int64 ids, mask (1 real / 0 pad), positions -> (logits (B, T, V), loss or None).

        Without `position_ids` they are derived from the mask, so left or right padding never changes a
        real token's logits. `targets` (B, T) holds the next token at each position and IGNORE_INDEX (-100)
        where there is none (padding); the loss is the mean cross entropy over the others.
        """
        T = input_ids.size(1)
        if not torch.jit.is_tracing() and self.config.block_size < T:
            raise ValueError(f"sequence of length {T} exceeds block_size {self.config.block_size}")
        logits = self.lm_head(self.hidden_states(input_ids, attention_mask, position_ids))  # (B, T, V)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        return logits, loss

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int,
        attention_mask: Tensor | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Reference decoding without a KV cache: (B, T) prompts -> (B, T + max_new_tokens).

        `temperature == 0` is greedy (argmax); otherwise sample from softmax(logits / temperature), keeping
        the `top_k` most likely tokens when given. Prompts may be left- or right-padded (`attention_mask`):
        each row continues after its last real token, read from the same forward pass the server uses, and
        the new tokens are appended as real columns (so right-padded rows keep their pads inside).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        ids, mask = input_ids, attention_mask
        for _ in range(max_new_tokens):
            ids_cond, mask_cond = ids[:, -self.config.block_size :], mask[:, -self.config.block_size :]
            logits, _ = self(ids_cond, mask_cond)  # (B, T, V)
            T = mask_cond.size(1)
            last = (mask_cond * torch.arange(1, T + 1, device=mask.device)).argmax(dim=1)  # (B,)
            logits = logits[torch.arange(logits.size(0), device=ids.device), last]  # (B, V)
            if temperature == 0.0:
                next_id = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits = logits.masked_fill(logits < v[:, [-1]], -float("inf"))
                probs = F.softmax(logits, dim=-1)
                next_id = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
            ids = torch.cat((ids, next_id), dim=1)
            mask = torch.cat((mask, torch.ones_like(next_id)), dim=1)
        return ids
