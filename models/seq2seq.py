"""Full definition of the `encdec` family's recurrent model: seq2seq with attention (a bidirectional GRU encoder,
a GRU decoder attending over the encoder states), all of it in this file.

The notes' picture: the encoder no longer squeezes the source into one fixed vector C but keeps a vector per
token, and every output word weighs every input word by a similarity, softmax-normalised, summed over values.

Attention: multiplicative, Luong et al. (2015) "general" score, score(h_t, h_s) = h_t^T W_a h_s, read with the
decoder's *current* state h_t, then h~_t = tanh(W_c [c_t; h_t]) feeds the output layer; no input feeding. Why
Luong rather than Bahdanau's additive v^T tanh(W s_{t-1} + U h_s):

- W_a h_s depends on the source alone, so it is computed once per source, exactly as the Transformer's
  cross-attention keys are: both models of the family then have the same "keys and values computed once from
  the encoder" contract, and the score is a matmul rather than a (T, S, H) tanh;
- the GRU's input is the previous token alone, so in training the decoder GRU runs over the whole target in one
  call and the attention for all positions is one batched matmul: the comparison with the Transformer measures
  the recurrence itself, not a Python loop per target token.

Encoder: `n_layer` layers, each a forward and a backward GRU whose outputs are concatenated; the backward GRU
reads each row's real tokens reversed in place (pads stay at the end), so right padding never reaches a real
token's state, with or without packing (packed sequences do not export to ONNX). The states are projected to the
decoder's width (the attention values); the decoder starts from tanh(W [forward state at the last real token;
backward state at the first]) in every layer.

Embeddings: one matrix for source, target and output projection (the same language and tokenizer), d_model wide.
The decoder's recurrent state, (n_layer, B, d_model), is its whole cache: a step needs the last token, that
state, and the encoder's keys/values/mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from plm.models.span_corruption import EncoderDecoder, TokenIdFields, greedy
from torch import Tensor
from torch.nn import functional as F


def reverse_real(x: Tensor, lengths: Tensor) -> Tensor:
    """Reverse each row's first `lengths[b]` steps in place, leaving the pads after them: (B, S, ...) -> same.
    Its own inverse."""
    S = x.size(1)
    cols = torch.arange(S, device=x.device)[None, :]  # (1, S)
    index = torch.where(cols < lengths[:, None], lengths[:, None] - 1 - cols, cols)  # (B, S)
    return x.gather(1, index.view(*index.shape, *([1] * (x.dim() - 2))).expand_as(x))


@dataclass(frozen=True)
class Seq2SeqConfig(TokenIdFields):
    vocab_size: int = 8000
    max_position: int = 128  # the longest target generate() produces (no positions: the recurrence orders)
    n_layer: int = 1  # encoder and decoder GRU layers
    d_model: int = 256  # embedding width, each encoder direction's width and the decoder's state
    dropout: float = 0.0


class Seq2Seq(EncoderDecoder):
    config: Seq2SeqConfig

    def __init__(self, config: Seq2SeqConfig) -> None:
        super().__init__()
        self.config = config
        d = config.d_model
        self.shared = nn.Embedding(config.vocab_size, d)
        self.forward_rnns = nn.ModuleList([nn.GRU(d if i == 0 else 2 * d, d, batch_first=True)
                                           for i in range(config.n_layer)])
        self.backward_rnns = nn.ModuleList([nn.GRU(d if i == 0 else 2 * d, d, batch_first=True)
                                            for i in range(config.n_layer)])
        self.memory_proj = nn.Linear(2 * d, d)  # encoder states -> attention values h_s
        self.bridge = nn.Linear(2 * d, d)  # [last forward; first backward] -> the decoder's first state
        self.decoder_rnn = nn.GRU(d, d, num_layers=config.n_layer, batch_first=True)
        self.attn_proj = nn.Linear(d, d, bias=False)  # W_a: keys = W_a h_s
        self.combine = nn.Linear(2 * d, d)  # W_c: h~ = tanh(W_c [c; h])
        self.dropout = nn.Dropout(config.dropout)
        nn.init.normal_(self.shared.weight, mean=0.0, std=d ** -0.5)

    def encode(self, source: Tensor, source_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, S) right-padded ids and mask -> attention keys (B, S, d), values (B, S, d), and the decoder's
        first state (n_layer, B, d)."""
        lengths = source_mask.long().sum(dim=1)  # (B,)
        x = self.dropout(self.shared(source))  # (B, S, d)
        for fwd, bwd in zip(self.forward_rnns, self.backward_rnns, strict=True):
            ahead, _ = fwd(x)  # (B, S, d)
            back, _ = bwd(reverse_real(x, lengths))
            x = self.dropout(torch.cat((ahead, reverse_real(back, lengths)), dim=-1))  # (B, S, 2d)
        d = self.config.d_model
        last = (lengths - 1).clamp(min=0)
        ends = torch.cat((x[torch.arange(x.size(0)), last, :d], x[:, 0, d:]), dim=-1)  # (B, 2d)
        state = torch.tanh(self.bridge(ends))  # (B, d)
        values = self.memory_proj(x)  # (B, S, d)
        return self.attn_proj(values), values, state[None].expand(self.config.n_layer, -1, -1).contiguous()

    def decode(self, decoder_input: Tensor, keys: Tensor, values: Tensor, source_mask: Tensor,
               state: Tensor) -> tuple[Tensor, Tensor]:
        """(B, T) decoder ids from `state` (n_layer, B, d) -> ((B, T, V) logits, the state after them)."""
        h, state = self.decoder_rnn(self.dropout(self.shared(decoder_input)), state)  # (B, T, d)
        scores = h @ keys.transpose(1, 2)  # (B, T, S) h_t^T W_a h_s
        scores = scores.masked_fill(~(source_mask > 0)[:, None, :], float("-inf"))
        context = scores.softmax(dim=-1) @ values  # (B, T, d)
        attentional = torch.tanh(self.combine(torch.cat((context, h), dim=-1)))  # (B, T, d)
        return F.linear(self.dropout(attentional), self.shared.weight), state

    def teacher_forced_logits(self, source: Tensor, source_mask: Tensor, decoder_input: Tensor) -> Tensor:
        """(B, S) source, its mask, (B, T) decoder input -> (B, T, V) logits (EncoderDecoder.forward adds the loss)."""
        keys, values, state = self.encode(source, source_mask)
        return self.decode(decoder_input, keys, values, source_mask, state)[0]

    @torch.no_grad()
    def generate(self, source: Tensor, source_mask: Tensor, max_new_tokens: int, use_cache: bool = True) -> Tensor:
        """Greedy decoding from <s> (as Transformer.generate); the cache is the recurrent state."""
        keys, values, first = self.encode(source, source_mask)
        state = [first]

        def step(tokens: Tensor) -> Tensor:
            if not use_cache:
                return self.decode(tokens, keys, values, source_mask, first)[0][:, -1].log_softmax(-1)
            logits, state[0] = self.decode(tokens[:, -1:], keys, values, source_mask, state[0])
            return logits[:, -1].log_softmax(-1)

        return greedy(step, source.size(0), self.specials, min(max_new_tokens, self.config.max_position))
