"""An encoder-decoder's jobs beside generation, run on the engine's thread between two steps: a target's
conditional log-probability given its source (teacher forcing), and sentinel infilling by beam search; and the
next-token step of generation without a cache (`recompute_next`), which the batcher runs.

The first two run the runner's encoder once per call and its decoder step by step on a self-attention cache of
their own (host memory), never touching the running batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from plm.service.generation.runner import Runner
from plm.service.runtime import pad_right


@dataclass(frozen=True)
class Infill:
    """What sentinel infilling needs of the model: the ids its targets are written with, and its window."""

    first_sentinel: int  # blank b of a source is first_sentinel + b, and the target lists them in order
    eos_id: int  # ends the last span (and the target)
    span_tokens: np.ndarray  # (V,) bool: tokens a span may hold (no special token)
    max_target_length: int  # the decoder's window, its start token included
    max_span_tokens: int  # longest span considered


def _empty(runner: Runner, b: int) -> list[np.ndarray]:
    return [np.zeros((b, runner.n_head, 0, runner.head_dim), dtype=np.float32)] * len(runner.past_names)


def score_targets(runner: Runner, pairs: list[tuple[list[int], list[int]]]) -> list[np.ndarray]:
    """log P(target_j | source, target_<j) of each (source, target) pair: per pair, (len(target),) float64.

    The targets are teacher-forced one token per step, all pairs batched (a finished row feeds a pad that no one
    reads); the decoder graph answers the next token's distribution only, so a target of n tokens takes n steps.
    """
    assert runner.encoder is not None
    cross = runner.encoder.run([src for src, _ in pairs], runner.pad_id, runner.n_layer)
    b, n = len(pairs), max(len(t) for _, t in pairs)
    out = [np.zeros(len(t), dtype=np.float64) for _, t in pairs]
    ids = np.full((b, 1), runner.bos_id, dtype=np.int64)
    pasts = _empty(runner, b)
    for j in range(n):
        mask = np.ones((b, j + 1), dtype=np.int64)
        logprobs, pasts = runner.run(ids, mask, np.full((b, 1), j, dtype=np.int64), pasts, "score",
                                     on_device=False, cross=cross)
        for i, (_, target) in enumerate(pairs):
            if j < len(target):
                out[i][j] = logprobs[i, target[j]]
        ids = np.array([[t[j] if j < len(t) else runner.pad_id] for _, t in pairs], dtype=np.int64)
    return out


def recompute_next(runner: Runner, rows: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[np.ndarray]:
    """Generation without a cache, one step: each (source, tokens generated so far) row re-read whole, the encoder
    over the sources and the decoder over <s> + the tokens with empty pasts, both right-padded (the decoder graph
    reads each row's last real column, and causal attention keeps the pads after it out of every real token's
    view). Returns each row's next-token log-probabilities (V,)."""
    assert runner.encoder is not None
    cross = runner.encoder.run([src for src, _ in rows], runner.pad_id, runner.n_layer)
    ids, mask = pad_right([[runner.bos_id, *done] for _, done in rows], runner.pad_id)
    position_ids = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    logprobs, _ = runner.run(ids, mask, position_ids, _empty(runner, len(rows)), "recompute", on_device=False,
                             cross=cross)
    return list(logprobs)


def fill_spans(runner: Runner, source: list[int], blanks: int, k: int, spec: Infill
               ) -> list[list[tuple[tuple[int, ...], float]]]:
    """Per blank of `source` (sentinels first_sentinel + b in place of blank b), its k most likely spans and their
    log-probabilities, best first, by beam search of width k.

    Blank b is searched after <s> and the best spans of blanks before it, each after its sentinel (the target as
    the model was trained to write it); a span holds one or more non-special tokens and ends where the model
    writes the next sentinel (</s> after the last blank), whose probability is part of the span's. Blanks after
    b are not conditioned on (the decoder writes left to right).
    """
    assert runner.encoder is not None
    cross, source_mask = runner.encoder.run([source], runner.pad_id, runner.n_layer)
    prefix = [runner.bos_id]
    found: list[list[tuple[tuple[int, ...], float]]] = []
    for b in range(blanks):
        prefix.append(spec.first_sentinel + b)
        end = spec.first_sentinel + b + 1 if b + 1 < blanks else spec.eos_id
        longest = min(spec.max_span_tokens, spec.max_target_length - len(prefix))
        spans = _beam(runner, (cross, source_mask), prefix, end, k, longest, spec.span_tokens)
        found.append(spans)
        if spans:
            prefix.extend(spans[0][0])
    return found


def _beam(runner: Runner, cross: tuple[list[np.ndarray], np.ndarray], prefix: list[int], end: int, k: int,
          longest: int, span_tokens: np.ndarray) -> list[tuple[tuple[int, ...], float]]:
    """The k best spans after `prefix` (at most `longest` tokens, ended by `end`), best first."""
    if longest <= 0:
        return []
    t = len(prefix)
    logprobs, pasts = runner.run(np.asarray([prefix], dtype=np.int64), np.ones((1, t), dtype=np.int64),
                                 np.arange(t, dtype=np.int64)[None], _empty(runner, 1), "fill", on_device=False,
                                 cross=cross)
    beams: list[tuple[tuple[int, ...], float]] = [((), 0.0)]
    done: list[tuple[tuple[int, ...], float]] = []
    for step in range(longest + 1):
        scores = np.array([s for _, s in beams])  # (nb,)
        if step > 0:  # a span holds one token at least
            done.extend((toks, float(s + logprobs[i, end])) for i, (toks, s) in enumerate(beams))
            done.sort(key=lambda c: -c[1])
            del done[k:]
        if step == longest:
            break
        total = np.where(span_tokens, logprobs, -np.inf) + scores[:, None]  # (nb, V)
        flat = np.argsort(-total, axis=None, kind="stable")[:k]
        flat = flat[np.isfinite(total.ravel()[flat])]
        if not len(flat) or (len(done) == k and total.ravel()[flat[0]] <= done[-1][1]):
            break  # log-probabilities only fall: no open beam can beat the k-th finished span
        parents, tokens = np.divmod(flat, total.shape[1])
        beams = [((*beams[p][0], int(tok)), float(total[p, tok])) for p, tok in zip(parents, tokens, strict=True)]
        nb = len(beams)
        rows = (np.repeat(a[:1], nb, axis=0) for a in cross[0])
        logprobs, pasts = runner.run(tokens[:, None].astype(np.int64), np.ones((nb, t + step + 1), dtype=np.int64),
                                     np.full((nb, 1), t + step, dtype=np.int64), [p[parents] for p in pasts],
                                     "fill", on_device=False, cross=(list(rows), np.repeat(cross[1][:1], nb, 0)))
    return done
