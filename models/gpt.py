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

KV cache (for generation): `forward(..., past_key_values=..., use_cache=True)` takes and returns each
layer's keys and values, `[B, n_head, S, head_dim]` (the ONNX decoder's `past_key_values.{i}.key|value`).
With a past of length P and T new tokens, `attention_mask` covers all P + T columns and `position_ids` the
T new ones. Batches are LEFT padded: the new tokens of every row are appended at the right, so pads stay
in the past, masked out, forever.

Read bottom-up: CausalSelfAttention, MLP, Block, GPTConfig, GPT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, overload

import torch
import torch.nn as nn
from torch import Tensor
from torch.nn import functional as F

IGNORE_INDEX = -100  # targets equal to this (padding) do not count in the loss; F.cross_entropy's default

KVCache = list[tuple[Tensor, Tensor]]  # per layer (key, value), each (B, n_head, S, head_dim)


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions counted over real tokens only: `cumsum(mask) - 1`, and 0 at pad positions.

    (B, T) int64 -> (B, T) int64. Left padding [0 0 1 1 1] -> [0 0 0 1 2]; right padding [1 1 1 0 0] ->
    [0 1 2 0 0]. The server computes the same thing in numpy for the ONNX graph's `position_ids` input.
    """
    mask = attention_mask.long()
    return torch.where(mask > 0, mask.cumsum(dim=-1) - 1, torch.zeros_like(mask))


def attention_bias(attention_mask: Tensor, query_length: int | None = None) -> Tensor:
    """Boolean (B, 1, T, S) mask, True where query i may attend key j: causal, and no pad keys.

    `attention_mask` (B, S) covers every key: the P = S - T cached ones, then the T queries' own columns
    (`query_length` T, default S: no cache). Query i sits at column P + i and sees key j when j <= P + i and
    (key j is real or j == P + i): every real past key and the current keys up to itself. The diagonal term
    keeps a pad query's row from being all-False (NaN in a plain softmax); a real query's diagonal is
    itself real, so real tokens are unaffected.
    """
    S = attention_mask.size(1)
    T = S if query_length is None else query_length
    key_pos = torch.arange(S, device=attention_mask.device)  # (S,)
    query_pos = torch.arange(T, device=attention_mask.device) + (S - T)  # (T,) columns of the queries
    causal = key_pos[None, :] <= query_pos[:, None]  # (T, S) key column <= query column
    diagonal = key_pos[None, :] == query_pos[:, None]  # (T, S)
    key_is_real = (attention_mask > 0)[:, None, None, :]  # (B, 1, 1, S)
    return causal[None, None] & (key_is_real | diagonal[None, None])  # (B, 1, T, S)


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

    def forward(
        self, x: Tensor, attn_mask: Tensor, layer_past: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x (B, T, C), mask (B, 1, T, P + T), past keys/values (B, nh, P, hs) each or None
        -> (output (B, T, C), present keys/values (B, nh, P + T, hs) each)."""
        B, T, C = x.size()  # batch, sequence length, embedding dim (n_embd)
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if layer_past is not None:
            k = torch.cat((layer_past[0], k), dim=2)  # (B, nh, P + T, hs)
            v = torch.cat((layer_past[1], v), dim=2)  # (B, nh, P + T, hs)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C) heads side by side again
        return self.resid_dropout(self.c_proj(y)), (k, v)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        # Exact (erf) GELU for our models; an imported GPT-2 checkpoint needs its tanh approximation ("gelu_tanh").
        self.gelu = nn.GELU(approximate="tanh" if config.activation == "gelu_tanh" else "none")
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

    def forward(
        self, x: Tensor, attn_mask: Tensor, layer_past: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """-> (B, T, C) output, and this layer's present keys/values (see CausalSelfAttention)."""
        a, present = self.attn(self.ln_1(x), attn_mask, layer_past)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, present  # (B, T, C), ((B, nh, P + T, hs), (B, nh, P + T, hs))


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 8000  # the word-level/BPE tokenizers we train are this size; tied weights keep it cheap
    block_size: int = 128  # max positions: sentences are short, and attention cost grows with T^2
    n_layer: int = 4  # a toy GPT that trains in minutes on 2 CPU cores
    n_head: int = 4  # head size n_embd / n_head = 32, as small as is still useful
    n_embd: int = 128
    dropout: float = 0.0  # nanoGPT: 0 for pretraining; a few minutes of training rarely overfits
    bias: bool = True  # biases in Linear and LayerNorm, as GPT-2 (so imported GPT-2 checkpoints fit)
    activation: str = "gelu"  # the MLP's: "gelu" (exact, erf) or "gelu_tanh" (GPT-2's gelu_new)


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
        return self.hidden_states_with_cache(input_ids, attention_mask, position_ids)[0]

    def hidden_states_with_cache(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        past_key_values: KVCache | None = None,
    ) -> tuple[Tensor, KVCache]:
        """(B, T) new ids after a cache of P positions -> ((B, T, C) hidden states, per-layer presents).

        `attention_mask` is (B, P + T) over past and new columns (default all ones); `position_ids` (B, T)
        default to `position_ids_from_mask(attention_mask)[:, -T:]`. Presents are (B, nh, P + T, hs).
        """
        B, T = input_ids.size()
        P = 0 if past_key_values is None else past_key_values[0][0].size(2)
        if attention_mask is None:
            attention_mask = torch.ones(B, P + T, dtype=input_ids.dtype, device=input_ids.device)
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)[:, -T:]
        tok_emb = self.wte(input_ids)  # (B, T, C)
        pos_emb = self.wpe(position_ids)  # (B, T, C)
        x = self.drop(tok_emb + pos_emb)
        mask = attention_bias(attention_mask, T)  # (B, 1, T, P + T), built once for all layers
        presents: KVCache = []
        for i, block in enumerate(self.h):
            x, present = block(x, mask, None if past_key_values is None else past_key_values[i])
            presents.append(present)
        return self.ln_f(x), presents  # (B, T, C)

    @overload
    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = ...,
        position_ids: Tensor | None = ...,
        targets: Tensor | None = ...,
        past_key_values: KVCache | None = ...,
        use_cache: Literal[False] = ...,
    ) -> tuple[Tensor, Tensor | None]: ...

    @overload
    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = ...,
        position_ids: Tensor | None = ...,
        targets: Tensor | None = ...,
        past_key_values: KVCache | None = ...,
        *,
        use_cache: Literal[True],
    ) -> tuple[Tensor, Tensor | None, KVCache]: ...

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        targets: Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
    ) -> tuple[Tensor, Tensor | None] | tuple[Tensor, Tensor | None, KVCache]:
        """(B, T) int64 ids, mask (1 real / 0 pad), positions -> (logits (B, T, V), loss or None).

        Without `position_ids` they are derived from the mask, so left or right padding never changes a
        real token's logits. `targets` (B, T) holds the next token at each position and IGNORE_INDEX (-100)
        where there is none (padding); the loss is the mean cross entropy over the others.

        KV cache: `past_key_values` holds each layer's (key, value) for P earlier positions, (B, nh, P, hs);
        `attention_mask` then covers all P + T columns and `position_ids` the T new tokens (default: from
        the mask). With `use_cache=True` the result gets a third item, the presents (B, nh, P + T, hs).
        """
        T = input_ids.size(1)
        P = 0 if past_key_values is None else past_key_values[0][0].size(2)
        if not torch.jit.is_tracing() and self.config.block_size < P + T:
            raise ValueError(f"sequence of length {P + T} exceeds block_size {self.config.block_size}")
        hidden, presents = self.hidden_states_with_cache(input_ids, attention_mask, position_ids, past_key_values)
        logits = self.lm_head(hidden)  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        if use_cache:
            return logits, loss, presents
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
        use_cache: bool = False,
    ) -> Tensor:
        """Reference decoding without a KV cache: (B, T) prompts -> (B, T + max_new_tokens).

        `temperature == 0` is greedy (argmax); otherwise sample from softmax(logits / temperature), keeping
        the `top_k` most likely tokens when given. Prompts may be left- or right-padded (`attention_mask`):
        each row continues after its last real token, read from the same forward pass the server uses, and
        the new tokens are appended as real columns (so right-padded rows keep their pads inside).

        `use_cache=True` gives the same tokens with a KV cache: one pass over the prompt, then one position
        per step. Once the sequence outgrows `block_size` each step re-reads the last `block_size` columns
        (positions shift, so the cache cannot be reused), exactly as without the cache.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        ids, mask = input_ids, attention_mask
        past: KVCache | None = None
        for _ in range(max_new_tokens):
            if past is not None and past[0][0].size(2) < self.config.block_size:
                logits, _, past = self(ids[:, -1:], mask, past_key_values=past, use_cache=True)  # (B, 1, V)
                logits = logits[:, -1]  # (B, V)
            else:
                ids_cond, mask_cond = ids[:, -self.config.block_size :], mask[:, -self.config.block_size :]
                logits, _, past = self(ids_cond, mask_cond, use_cache=True)  # (B, T, V)
                if not use_cache:
                    past = None
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
