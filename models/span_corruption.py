"""The encoder-decoder pretraining objective with no parallel data: T5-style span corruption, its batches, greedy
decoding, and the held-out infilling figures both encoder-decoder models (seq2seq.py, transformer.py) report.

Span corruption (Raffel et al. 2020, §3.1.4): about `noise_density` of a sentence's tokens, in spans of mean
length `mean_span`, are dropped; the source keeps the rest with each dropped span replaced by one sentinel
(``<extra_id_0>``, ``<extra_id_1>``, ... in order), and the target lists each sentinel followed by the span it
stands for. Both end with ``</s>``::

    sentence  The cat sat on the mat by the door
    source    The <extra_id_0> on the mat by <extra_id_1> door </s>
    target    <extra_id_0> cat sat <extra_id_1> the </s>

So the model learns to fill gaps of unknown length from the context on both sides. The decoder reads
``<s>`` + target[:-1] (teacher forcing) and predicts the target. Everything is drawn from numpy generators
spawned from one seed: one seed gives the same batches on every machine.

Batches are right-padded (pad id 0): a source's positions are its columns, and the decoder's rows all start
at column 0 with ``<s>``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor
from torch.nn import functional as F

IGNORE_INDEX = -100  # targets at pads; F.cross_entropy's default ignore_index
Example = tuple[list[int], list[int]]  # (source ids, target ids), both ending with </s>
Batch = tuple[Tensor, Tensor, Tensor, Tensor]  # source (B, S), source mask (B, S), decoder input (B, T), targets (B, T)


@dataclass(frozen=True)
class SpecialTokens:
    """The ids the objective writes (models/tokenization.py's encoder-decoder tokenizer)."""

    pad: int
    bos: int  # the decoder's start token
    eos: int
    first_sentinel: int  # <extra_id_0>; sentinel k is first_sentinel + k
    sentinels: int  # how many there are: a sentence gets at most this many spans


@dataclass(frozen=True)
class TokenIdFields:
    """The special-token ids every encoder-decoder config carries (TransformerConfig, Seq2SeqConfig inherit them);
    the defaults are models/tokenization.py's encoder-decoder tokenizer's."""

    pad_id: int = 0
    bos_id: int = 1  # the decoder's start token
    eos_id: int = 2
    first_sentinel: int = 3
    sentinels: int = 32


class EncoderDecoder(nn.Module):
    """What both encoder-decoder models share: their special ids, the parameter count, and a teacher-forced forward
    over `teacher_forced_logits`, which each model defines."""

    config: TokenIdFields

    @property
    def specials(self) -> SpecialTokens:
        c = self.config
        return SpecialTokens(c.pad_id, c.bos_id, c.eos_id, c.first_sentinel, c.sentinels)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def teacher_forced_logits(self, source: Tensor, source_mask: Tensor, decoder_input: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, source: Tensor, source_mask: Tensor, decoder_input: Tensor,
                targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Teacher forcing: (B, S) right-padded source, its mask, (B, T) decoder input (<s> + target[:-1]) ->
        ((B, T, V) logits, mean cross entropy over targets != IGNORE_INDEX, or None without targets)."""
        logits = self.teacher_forced_logits(source, source_mask, decoder_input)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        return logits, loss


def noise_mask(length: int, rng: np.random.Generator, density: float = 0.15, mean_span: float = 3.0,
               max_spans: int | None = None) -> np.ndarray:
    """T5's `random_spans_noise_mask`: a (length,) bool array, True at the dropped tokens.

    round(length * density) tokens (at least 1, at most length - 1) are dropped, in round(noise / mean_span)
    spans (at least 1, at most `max_spans`); noise and kept tokens are each cut into that many non-empty runs
    at random, and the runs alternate, kept first, so a span never starts the sentence.
    """
    if length < 2:
        raise ValueError(f"span corruption needs at least 2 tokens, got {length}")
    noise = min(max(round(length * density), 1), length - 1)
    spans = max(1, round(noise / mean_span))
    spans = min(spans, noise, length - noise, max_spans or spans)

    def segments(n: int) -> np.ndarray:  # n items cut into `spans` non-empty runs at random
        cuts = np.sort(rng.choice(np.arange(1, n), size=spans - 1, replace=False)) if spans > 1 else np.array([])
        return np.diff(np.concatenate(([0], cuts, [n]))).astype(np.int64)

    kept, dropped = segments(length - noise), segments(noise)
    mask = np.zeros(length, dtype=bool)
    at = 0
    for k, d in zip(kept, dropped, strict=True):
        at += int(k)
        mask[at: at + int(d)] = True
        at += int(d)
    return mask


def corrupt(ids: Sequence[int], rng: np.random.Generator, specials: SpecialTokens, density: float = 0.15,
            mean_span: float = 3.0) -> Example:
    """One sentence's (source, target) pair (see the module docstring)."""
    mask = noise_mask(len(ids), rng, density, mean_span, specials.sentinels)
    source: list[int] = []
    target: list[int] = []
    span = -1
    for i, token in enumerate(ids):
        if mask[i]:
            if i == 0 or not mask[i - 1]:  # a span starts: one sentinel in both
                span += 1
                source.append(specials.first_sentinel + span)
                target.append(specials.first_sentinel + span)
            target.append(int(token))
        else:
            source.append(int(token))
    return [*source, specials.eos], [*target, specials.eos]


def collate(examples: Sequence[Example], specials: SpecialTokens) -> Batch:
    """Right-padded int64 tensors: source (B, S) and its mask; decoder input <s> + target[:-1] (B, T) and the
    targets (B, T), IGNORE_INDEX at pads."""
    B = len(examples)
    S = max(len(s) for s, _ in examples)
    T = max(len(t) for _, t in examples)
    source = np.full((B, S), specials.pad, dtype=np.int64)
    mask = np.zeros((B, S), dtype=np.int64)
    decoder_input = np.full((B, T), specials.pad, dtype=np.int64)
    targets = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
    for row, (s, t) in enumerate(examples):
        source[row, : len(s)] = s
        mask[row, : len(s)] = 1
        decoder_input[row, : len(t)] = [specials.bos, *t[:-1]]
        targets[row, : len(t)] = t
    return (torch.from_numpy(source), torch.from_numpy(mask), torch.from_numpy(decoder_input),
            torch.from_numpy(targets))


def usable(sentences: Sequence[Sequence[int]], max_tokens: int) -> list[list[int]]:
    """Sentences of at least 2 tokens, cut to `max_tokens` (the source is never longer than its sentence + 1)."""
    return [list(s[:max_tokens]) for s in sentences if len(s) >= 2]


def span_batches(sentences: Mapping[str, Sequence[Sequence[int]]], batch_size: int, rng: np.random.Generator,
                 specials: SpecialTokens, max_tokens: int) -> Callable[[str], Batch]:
    """`get_batch(split)` for models.train.train: `batch_size` random sentences of the split, each corrupted
    afresh (new spans at every draw). Each split has its own generator spawned from `rng`."""
    pools = {split: usable(sentences[split], max_tokens) for split in ("train", "valid")}
    for split, pool in pools.items():
        if not pool:
            raise ValueError(f"{split}: no sentence of 2 tokens or more")
    rngs = dict(zip(("train", "valid"), rng.spawn(2), strict=True))

    def get_batch(split: str) -> Batch:
        pool, r = pools[split], rngs[split]
        rows = r.integers(0, len(pool), size=batch_size)
        return collate([corrupt(pool[i], r, specials) for i in rows], specials)

    return get_batch


def held_out(sentences: Sequence[Sequence[int]], specials: SpecialTokens, max_tokens: int, seed: int,
             limit: int | None = None) -> list[Example]:
    """A fixed corrupted set for evaluation: the first `limit` usable sentences, corrupted once with `seed`."""
    rng = np.random.default_rng(seed)
    return [corrupt(s, rng, specials) for s in usable(sentences, max_tokens)[:limit]]


class EncDecModel(Protocol):
    """What the figures need of an encoder-decoder model."""

    def __call__(self, source: Tensor, source_mask: Tensor, decoder_input: Tensor,
                 targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]: ...

    def generate(self, source: Tensor, source_mask: Tensor, max_new_tokens: int,
                 use_cache: bool = True) -> Tensor: ...

    def eval(self) -> object: ...


def greedy(step: Callable[[Tensor], Tensor], batch: int, specials: SpecialTokens, max_new_tokens: int) -> Tensor:
    """Greedy decoding from <s>: `step(tokens (B, t))` -> log-probabilities (B, V) of the next token. Returns
    (B, n <= max_new_tokens) tokens, </s> included, pad after a row's </s>; stops when every row has ended."""
    tokens = torch.full((batch, 1), specials.bos, dtype=torch.long)
    done = torch.zeros(batch, dtype=torch.bool)
    for _ in range(max_new_tokens):
        nxt = step(tokens).argmax(dim=-1)  # (B,)
        nxt = torch.where(done, torch.full_like(nxt, specials.pad), nxt)
        tokens = torch.cat((tokens, nxt[:, None]), dim=1)
        done |= nxt == specials.eos
        if bool(done.all()):
            break
    return tokens[:, 1:]


@torch.no_grad()
def infilling_figures(model: EncDecModel, examples: Sequence[Example], specials: SpecialTokens,
                      batch_size: int = 64) -> dict[str, float | int]:
    """Held-out span infilling: exact match (the greedy output, up to its </s>, equals the target), token
    accuracy (teacher-forced argmax equals the target token) and per-token loss (teacher-forced, nats)."""
    model.eval()
    exact = right = tokens = 0
    loss_sum = 0.0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i: i + batch_size]
        source, mask, decoder_input, targets = collate(chunk, specials)
        logits, _ = model(source, mask, decoder_input)
        real = targets != IGNORE_INDEX
        logprobs = torch.log_softmax(logits.double(), dim=-1)
        picked = logprobs.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
        loss_sum -= float(picked[real].sum())
        right += int(((logits.argmax(-1) == targets) & real).sum())
        tokens += int(real.sum())
        longest = max(len(t) for _, t in chunk)
        out = model.generate(source, mask, max_new_tokens=longest + 1).tolist()
        for row, (_, target) in enumerate(chunk):
            got = out[row]
            got = got[: got.index(specials.eos) + 1] if specials.eos in got else got
            exact += got == target
    n = max(1, len(examples))
    return {"exact_match": round(exact / n, 4), "token_accuracy": round(right / max(1, tokens), 4),
            "loss_per_token": round(loss_sum / max(1, tokens), 4),
            "perplexity": round(math.exp(min(loss_sum / max(1, tokens), 50.0)), 3),
            "examples": len(examples), "target_tokens": tokens}
