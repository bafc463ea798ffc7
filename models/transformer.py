"""Full definition of the `encdec` family's Transformer: the encoder-decoder of "Attention Is All You Need", at toy
scale, all of it in this file.

As the paper (and the study notes) describe it:

- sinusoidal positional encoding, interleaved: PE[pos, 2i] = sin(pos / 10000^(2i/d)), PE[pos, 2i+1] = cos(same),
  added to the token embedding scaled by sqrt(d_model); a fixed buffer, not a parameter;
- encoder layers: multi-head self-attention over the whole source (pads masked), then a position-wise FFN;
- decoder layers: masked (causal) self-attention, then cross-attention whose queries come from the decoder and
  whose keys and values are projections of the encoder's last layer, then the FFN;
- each sub-layer is wrapped as LayerNorm(x + Sublayer(x)): post-LN ("Add & Norm"), as in the paper and the notes.
  At this depth (3 + 3 layers) with warm-up, post-LN trains stably, and it is the layout MarianMT keeps, which
  makes `transformers`' MarianMTModel an exact oracle (tests/test_encdec.py);
- ReLU in the FFN (d_ff = 4 d_model), as the paper; the notes discuss GELU for BERT/GPT;
- one embedding matrix shared by encoder input, decoder input and the output projection (the paper's §3.4):
  the span-corruption source and target are the same language and the same tokenizer.

Attention is written out (q/k/v projections + F.scaled_dot_product_attention) so the ONNX export keeps batch and
lengths dynamic. Parameter names follow MarianMT's (self_attn.q_proj, encoder_attn, fc1, final_layer_norm ...).

Masks and padding: sources are right-padded (their positions are columns, from `position_ids_from_mask`); a pad
query may attend to itself only, so no softmax row is all masked. Decoder self-attention takes the same mask
rules as GPT (models/gpt.py `attention_bias`): causal, no pad keys, positions from the mask, so a serving batch
may left-pad decoders that joined at different steps. KV cache: per decoder layer the self-attention (key,
value), (B, n_head, P, head_dim), grows by one column per step; the cross-attention (key, value),
(B, n_head, S, head_dim), is computed once from the encoder output (`cross_kv`) and read at every step.

Read bottom-up: sinusoidal_table, Attention, EncoderLayer, DecoderLayer, TransformerConfig, Transformer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from plm.models.gpt import attention_bias, position_ids_from_mask
from plm.models.span_corruption import EncoderDecoder, TokenIdFields, greedy
from torch import Tensor
from torch.nn import functional as F

KV = tuple[Tensor, Tensor]  # (key, value), each (B, n_head, S, head_dim)


def sinusoidal_table(positions: int, dim: int) -> Tensor:
    """(positions, dim) float32: PE[pos, 2i] = sin(pos / 10000^(2i/dim)), PE[pos, 2i+1] = cos(pos / 10000^(2i/dim))."""
    pos = torch.arange(positions, dtype=torch.float64)[:, None]  # (P, 1)
    freq = torch.pow(10000.0, -torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (dim/2,) 1/10000^(2i/dim)
    table = torch.zeros(positions, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return table.float()


def encoder_bias(source_mask: Tensor) -> Tensor:
    """Boolean (B, 1, S, S): every real key, and a pad query's own column (a row is never all False)."""
    S = source_mask.size(1)
    cols = torch.arange(S, device=source_mask.device)
    diagonal = cols[None, :] == cols[:, None]  # (S, S); not torch.eye, whose bool EyeLike ONNX Runtime lacks
    return (source_mask > 0)[:, None, None, :] | diagonal[None, None]


def cross_bias(source_mask: Tensor) -> Tensor:
    """Boolean (B, 1, 1, S): the real source columns (a source always has one: its </s>)."""
    return (source_mask > 0)[:, None, None, :]


class Attention(nn.Module):
    """Multi-head scaled dot-product attention, softmax(q k^T / sqrt(head_dim)) v, heads side by side."""

    def __init__(self, d_model: int, n_head: int, dropout: float) -> None:
        super().__init__()
        assert d_model % n_head == 0, f"d_model={d_model} not divisible by n_head={n_head}"
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.n_head = n_head
        self.dropout = dropout

    def split(self, x: Tensor) -> Tensor:
        """(B, T, C) -> (B, n_head, T, head_dim)."""
        B, T, C = x.size()
        return x.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)

    def keys_values(self, x: Tensor) -> KV:
        """(B, S, C) -> the heads' keys and values, (B, n_head, S, head_dim) each."""
        return self.split(self.k_proj(x)), self.split(self.v_proj(x))

    def forward(self, x: Tensor, key: Tensor, value: Tensor, mask: Tensor) -> Tensor:
        """Queries from x (B, T, C) over keys/values (B, nh, S, hs), boolean mask (B, 1, T, S) -> (B, T, C)."""
        B, T, C = x.size()
        y = F.scaled_dot_product_attention(self.split(self.q_proj(x)), key, value, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)  # (B, nh, T, hs)
        return self.out_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class FeedForward(nn.Module):
    """Position-wise FFN: fc2(relu(fc1(x)))."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.d_model, config.d_ff)
        self.fc2 = nn.Linear(config.d_ff, config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.fc2(F.relu(self.fc1(x))))


class EncoderLayer(nn.Module):
    """x = LN(x + SelfAttention(x)); x = LN(x + FFN(x))."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.self_attn = Attention(config.d_model, config.n_head, config.dropout)
        self.self_attn_layer_norm = nn.LayerNorm(config.d_model)
        self.ffn = FeedForward(config)
        self.final_layer_norm = nn.LayerNorm(config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = self.self_attn_layer_norm(x + self.dropout(self.self_attn(x, *self.self_attn.keys_values(x), mask)))
        return self.final_layer_norm(x + self.ffn(x))  # (B, S, C)


class DecoderLayer(nn.Module):
    """x = LN(x + MaskedSelfAttention(x)); x = LN(x + CrossAttention(x, encoder)); x = LN(x + FFN(x))."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.self_attn = Attention(config.d_model, config.n_head, config.dropout)
        self.self_attn_layer_norm = nn.LayerNorm(config.d_model)
        self.encoder_attn = Attention(config.d_model, config.n_head, config.dropout)
        self.encoder_attn_layer_norm = nn.LayerNorm(config.d_model)
        self.ffn = FeedForward(config)
        self.final_layer_norm = nn.LayerNorm(config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, self_mask: Tensor, past: KV | None, cross: KV,
                cross_mask: Tensor) -> tuple[Tensor, KV]:
        """x (B, T, C), self_mask (B, 1, T, P + T), past (B, nh, P, hs) x2 or None, cross (B, nh, S, hs) x2,
        cross_mask (B, 1, 1, S) -> (B, T, C) and the present self keys/values (B, nh, P + T, hs)."""
        k, v = self.self_attn.keys_values(x)
        if past is not None:
            k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
        x = self.self_attn_layer_norm(x + self.dropout(self.self_attn(x, k, v, self_mask)))
        x = self.encoder_attn_layer_norm(x + self.dropout(self.encoder_attn(x, cross[0], cross[1], cross_mask)))
        return self.final_layer_norm(x + self.ffn(x)), (k, v)


@dataclass(frozen=True)
class TransformerConfig(TokenIdFields):
    vocab_size: int = 8000
    max_position: int = 128  # rows of the sinusoid table: the longest source or target
    n_encoder_layer: int = 3
    n_decoder_layer: int = 3
    n_head: int = 4
    d_model: int = 128
    d_ff: int = 512  # 4 d_model, as the paper
    dropout: float = 0.0


class Transformer(EncoderDecoder):
    config: TransformerConfig
    positions: Tensor  # (max_position, d_model) the sinusoid table, a buffer

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)  # encoder, decoder and output projection
        self.register_buffer("positions", sinusoidal_table(config.max_position, config.d_model), persistent=False)
        self.embed_scale = math.sqrt(config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        self.encoder_layers = nn.ModuleList([EncoderLayer(config) for _ in range(config.n_encoder_layer)])
        self.decoder_layers = nn.ModuleList([DecoderLayer(config) for _ in range(config.n_decoder_layer)])
        self.apply(self._init_weights)
        # Embeddings ~ N(0, d^-1/2): times sqrt(d) on the way in, unit scale; as the output projection, logits ~ 1.
        nn.init.normal_(self.shared.weight, mean=0.0, std=config.d_model ** -0.5)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)  # the paper's reference code (tensor2tensor) default
            nn.init.zeros_(module.bias)

    def embed(self, ids: Tensor, position_ids: Tensor) -> Tensor:
        """(B, T) ids and positions -> (B, T, C): token embedding * sqrt(d) + sinusoid."""
        return self.dropout(self.shared(ids) * self.embed_scale + self.positions[position_ids])

    def encode(self, source: Tensor, source_mask: Tensor) -> Tensor:
        """(B, S) right-padded ids and mask -> (B, S, C) the encoder's last layer."""
        x = self.embed(source, position_ids_from_mask(source_mask))
        mask = encoder_bias(source_mask)  # (B, 1, S, S)
        for layer in self.encoder_layers:
            x = layer(x, mask)
        return x

    def cross_kv(self, memory: Tensor) -> list[KV]:
        """(B, S, C) encoder output -> per decoder layer its cross-attention (key, value), (B, nh, S, hs) each:
        computed once per source, read at every decoding step."""
        layers: list[DecoderLayer] = list(self.decoder_layers)  # type: ignore[arg-type]
        return [layer.encoder_attn.keys_values(memory) for layer in layers]

    def decode(self, decoder_input: Tensor, cross: list[KV], source_mask: Tensor,
               attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
               past: list[KV] | None = None) -> tuple[Tensor, list[KV]]:
        """(B, T) new decoder ids after P cached ones -> ((B, T, V) logits, per-layer present self keys/values).

        `attention_mask` (B, P + T) covers the cached and new decoder columns (default all ones);
        `position_ids` (B, T) default to `position_ids_from_mask(attention_mask)[:, -T:]`.
        """
        B, T = decoder_input.size()
        P = 0 if past is None else past[0][0].size(2)
        if attention_mask is None:
            attention_mask = torch.ones(B, P + T, dtype=torch.long, device=decoder_input.device)
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)[:, -T:]
        x = self.embed(decoder_input, position_ids)
        self_mask = attention_bias(attention_mask, T)  # (B, 1, T, P + T)
        mask = cross_bias(source_mask)  # (B, 1, 1, S)
        presents: list[KV] = []
        for i, layer in enumerate(self.decoder_layers):
            x, present = layer(x, self_mask, None if past is None else past[i], cross[i], mask)
            presents.append(present)
        return F.linear(x, self.shared.weight), presents  # (B, T, V), tied output projection

    def teacher_forced_logits(self, source: Tensor, source_mask: Tensor, decoder_input: Tensor) -> Tensor:
        """(B, S) source, its mask, (B, T) decoder input -> (B, T, V) logits (EncoderDecoder.forward adds the loss)."""
        return self.decode(decoder_input, self.cross_kv(self.encode(source, source_mask)), source_mask)[0]

    @torch.no_grad()
    def generate(self, source: Tensor, source_mask: Tensor, max_new_tokens: int, use_cache: bool = True) -> Tensor:
        """Greedy decoding from <s>: (B, S) sources -> (B, n) tokens, </s> included, pad after it.

        Without the cache each step runs the decoder over every token so far; with it, over the newest one,
        after the cached self keys/values. The encoder and the cross keys/values run once either way."""
        cross = self.cross_kv(self.encode(source, source_mask))
        cache: list[list[KV]] = []

        def step(tokens: Tensor) -> Tensor:
            if not use_cache:
                return self.decode(tokens, cross, source_mask)[0][:, -1].log_softmax(-1)
            logits, presents = self.decode(tokens[:, -1:], cross, source_mask, past=cache[0] if cache else None)
            cache[:] = [presents]
            return logits[:, -1].log_softmax(-1)

        return greedy(step, source.size(0), self.specials, min(max_new_tokens, self.config.max_position))
