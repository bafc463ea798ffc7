"""Generate: greedy or sampled continuation of prompts, one token per step for every active prompt.

Each step is one batched forward over every prompt still running (and, through the model's dynamic
batcher, over other clients' prompts too). Sampling follows Hugging Face's order: repetition penalty,
temperature, top-k, top-p. Each prompt has its own random stream seeded from (seed, prompt index), so the
same seed gives the same text whatever else shares the batch.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import numpy as np

from service.errors import InvalidArgument
from service.families.base import TASK_GENERATE, ModelAdapter
from service.metrics import Metrics
from service.tasks.common import encode_checked

FINISH_LENGTH, FINISH_STOP, FINISH_EOS = "length", "stop", "eos"


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    repetition_penalty: float = 1.0  # 1.0 = off
    max_new_tokens: int = 32
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class GenerateParams:
    prompts: tuple[str, ...]
    sampling: SamplingParams = field(default_factory=SamplingParams)


@dataclass(frozen=True)
class StepEvent:
    """One prompt's progress: new text and tokens, and on its last event the finish reason and totals."""

    index: int
    text_delta: str
    token_ids: tuple[int, ...]
    finish_reason: str | None = None
    prompt_tokens: int = 0
    generated_tokens: int = 0


def choose(logprobs: np.ndarray, allowed: np.ndarray, seen: set[int], p: SamplingParams,
           rng: np.random.Generator) -> int:
    """Pick the next token from (V,) log-probabilities."""
    x = np.where(allowed, logprobs.astype(np.float64), -np.inf)
    if p.repetition_penalty != 1.0 and seen:
        idx = np.fromiter(seen, dtype=np.int64)
        # CTRL's penalty on log-probabilities (all ≤ 0): multiplying pushes seen tokens down.
        x[idx] = x[idx] * p.repetition_penalty
    if p.temperature == 0.0:
        return int(np.argmax(x))
    x = x / p.temperature
    if 0 < p.top_k < x.size:
        kth = np.partition(x, -p.top_k)[-p.top_k]
        x = np.where(x >= kth, x, -np.inf)
    probs = np.exp(x - np.max(x))
    probs /= probs.sum()
    if p.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cum = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cum, p.top_p)) + 1]  # the smallest set reaching top_p
        mask = np.zeros_like(probs, dtype=bool)
        mask[keep] = True
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum()
    return int(rng.choice(probs.size, p=probs))


def _stable_prefix(text: str, stops: tuple[str, ...]) -> str:
    """The part of `text` safe to stream: no half UTF-8 character, no possible start of a stop sequence."""
    cut = len(text)
    while cut > 0 and text[cut - 1] == "\ufffd":  # a multi-byte character still arriving
        cut -= 1
    for s in stops:
        for k in range(min(len(s) - 1, cut), 0, -1):
            if text[:cut].endswith(s[:k]):
                cut -= k
                break
    return text[:cut]


async def generate(model: ModelAdapter, params: GenerateParams, deadline: float | None,
                   metrics: Metrics) -> AsyncIterator[StepEvent]:
    """Yield events as tokens are produced; every prompt ends with an event carrying its finish reason."""
    model.require(TASK_GENERATE)
    p = params.sampling
    encoded = encode_checked(model, params.prompts, "prompts", allow_empty=True)
    longest = max(len(e.ids) for e in encoded)
    if longest + p.max_new_tokens > model.context_budget:
        raise InvalidArgument(
            "sampling.max_new_tokens",
            f"{p.max_new_tokens} new tokens after a prompt of {longest} tokens exceed model {model.name!r}'s "
            f"window of {model.context_budget} tokens; at most {max(model.context_budget - longest, 0)} fit",
        )
    seed = p.seed if p.seed is not None else secrets.randbits(63)
    rngs = [np.random.default_rng([seed, i]) for i in range(len(encoded))]
    allowed = ~model.never_generate_mask()
    started = time.monotonic()
    last_token_at: list[float | None] = [None] * len(encoded)
    gen: list[list[int]] = [[] for _ in encoded]
    sent = [""] * len(encoded)
    active = list(range(len(encoded)))
    while active:
        rows = await model.next_logprobs([encoded[i].ids + gen[i] for i in active], deadline)
        now = time.monotonic()
        still = []
        for i, row in zip(active, rows, strict=True):
            seen = set(encoded[i].ids) | set(gen[i])
            tok = choose(row, allowed, seen, p, rngs[i])
            metrics.generated_tokens.labels(model.name).inc()
            prev = last_token_at[i]
            if prev is None:
                metrics.time_to_first_token.labels(model.name).observe(now - started)
            else:
                metrics.inter_token_latency.labels(model.name).observe(now - prev)
            last_token_at[i] = now
            finish = None
            if tok == model.eos_id:
                finish = FINISH_EOS
            else:
                gen[i].append(tok)
            text = model.decode(gen[i])
            for s in p.stop:
                at = text.find(s)
                if s and at >= 0:
                    text, finish = text[:at], FINISH_STOP
                    break
            if finish is None and len(gen[i]) >= p.max_new_tokens:
                finish = FINISH_LENGTH
            stable = text if finish else _stable_prefix(text, p.stop)
            delta = stable[len(sent[i]):] if stable.startswith(sent[i]) else ""
            sent[i] += delta
            new_ids = (tok,) if tok != model.eos_id else ()
            if delta or new_ids:
                yield StepEvent(i, delta, new_ids)
            if finish is not None:
                yield StepEvent(i, "", (), finish, len(encoded[i].ids), len(gen[i]))
            else:
                still.append(i)
        active = still
