"""Generate: greedy or sampled continuation of prompts, one token per step for every active prompt.

The task checks the request against the model's window and sets up one sequence per prompt; the model's
Generator capability runs them (a KV-cache engine's continuous batching, or one batched forward per step over
every prompt still running). The sequence and its sampling (`Sequence`, `SamplingParams`, `StepEvent`) live
in the generation package.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from plm.service.errors import InvalidArgument
from plm.service.families.base import ModelAdapter
from plm.service.families.capabilities import Generator, SourceReader
from plm.service.generation.sequence import FINISH_EOS as FINISH_EOS
from plm.service.generation.sequence import FINISH_LENGTH as FINISH_LENGTH
from plm.service.generation.sequence import FINISH_STOP as FINISH_STOP
from plm.service.generation.sequence import SamplingParams as SamplingParams
from plm.service.generation.sequence import Sequence
from plm.service.generation.sequence import StepEvent as StepEvent
from plm.service.metrics import Metrics
from plm.service.tasks.common import encode_checked


@dataclass(frozen=True)
class GenerateParams:
    prompts: tuple[str, ...]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    truncate_prompt: bool = False  # keep a too-long prompt's last tokens instead of refusing it


def start_sequences(model: ModelAdapter, params: GenerateParams, metrics: Metrics) -> list[Sequence]:
    """Check the request against the model's window and set up one Sequence per prompt."""
    Generator.of(model)
    p = params.sampling
    if isinstance(model, SourceReader):
        return _source_sequences(model, model, params, metrics)
    if p.max_new_tokens >= model.context_budget:
        raise InvalidArgument("max_new_tokens", f"is {p.max_new_tokens}; model {model.name!r}'s window "
                                                f"holds {model.context_budget} tokens, prompt included")
    keep = model.context_budget - p.max_new_tokens  # prompt tokens that fit beside the new ones
    encoded = encode_checked(model, params.prompts, "prompts", allow_empty=True, reserve=None)
    for i, e in enumerate(encoded):
        if len(e.ids) > keep and not params.truncate_prompt:
            raise InvalidArgument(
                "prompts", f"is {len(e.ids)} tokens; with sampling.max_new_tokens {p.max_new_tokens}, model "
                f"{model.name!r}'s window of {model.context_budget} leaves {keep} for the prompt (set "
                "truncate_prompt to keep its last tokens)", at=f"[{i}]")
    prompts = [e.ids[-keep:] if len(e.ids) > keep else e.ids for e in encoded]
    seed = p.seed if p.seed is not None else secrets.randbits(63)
    started = time.monotonic()
    return [Sequence(i, ids, p, seed, model, metrics, started) for i, ids in enumerate(prompts)]


def _source_sequences(model: ModelAdapter, source: SourceReader, params: GenerateParams,
                      metrics: Metrics) -> list[Sequence]:
    """An encoder-decoder's sequences: each prompt is a source, checked against the encoder's window; the new
    tokens have the decoder's."""
    p = params.sampling
    if p.max_new_tokens > source.max_new_tokens:
        raise InvalidArgument("max_new_tokens", f"is {p.max_new_tokens}; model {model.name!r}'s decoder writes at "
                                                f"most {source.max_new_tokens} tokens")
    sources = [source.source_ids(text, "prompts", f"[{i}]", params.truncate_prompt)
               for i, text in enumerate(params.prompts)]
    seed = p.seed if p.seed is not None else secrets.randbits(63)
    started = time.monotonic()
    return [Sequence(i, ids, p, seed, model, metrics, started, prompt_seen=False) for i, ids in enumerate(sources)]


async def generate(model: ModelAdapter, params: GenerateParams, deadline: float | None,
                   metrics: Metrics) -> AsyncIterator[StepEvent]:
    """Yield events as tokens are produced; every prompt ends with an event carrying its finish reason."""
    generator = Generator.of(model)
    seqs = start_sequences(model, params, metrics)
    async for ev in generator.generate(seqs, deadline):
        yield ev


async def every(events: AsyncIterator[StepEvent], interval: int) -> AsyncIterator[StepEvent]:
    """The events of `generate`, each prompt's merged into one per `interval` tokens (`stream_interval`).

    A prompt's first tokens and its last event go out at once, so neither the time to first token nor the end
    waits; in between its tokens wait for company. Merged text is the concatenation of the deltas (each is
    whole UTF-8), so the stream reads the same as with interval 1.
    """
    if interval <= 1:
        async for ev in events:
            yield ev
        return
    held: dict[int, StepEvent] = {}
    started: set[int] = set()
    async for ev in events:
        if ev.index in held:
            ev = held.pop(ev.index).then(ev)
        if ev.finish_reason is not None or ev.index not in started or len(ev.token_ids) >= interval:
            started.add(ev.index)
            yield ev
        else:
            held[ev.index] = ev
