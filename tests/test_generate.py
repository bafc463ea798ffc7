"""The generation task's per-step pieces (service/generation/sequence.py, service/tasks/generate.py), without a server.

`choose`: a row's token depends only on its own log-probabilities and generator, whatever it is batched
with. `Sequence`: what streams is always a prefix of the final text (never half a UTF-8 character, never the
start of a stop sequence), the final text is the tokenizer's decoding cut at the first stop sequence, and the
one-token-per-step byte decoding streams exactly what decoding the whole text again each step streams."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from plm.service.config import Runtime, ServerConfig
from plm.service.families.base import ModelAdapter
from plm.service.generation.sequence import (
    FINISH_EOS,
    FINISH_LENGTH,
    FINISH_STOP,
    SamplingParams,
    Sequence,
    StepEvent,
    choose,
)
from plm.service.metrics import Metrics
from plm.service.registry import load_model

hypothesis = pytest.importorskip("hypothesis")
st = pytest.importorskip("hypothesis.strategies")


@pytest.fixture(scope="module")
def gpt(tiny_repo: Path) -> ModelAdapter:
    config = replace(ServerConfig(), repository=tiny_repo, runtime=Runtime(kv_cache=False))
    return load_model(tiny_repo / "gpt", config, Metrics())


class _WholeText:
    """The same model without per-token bytes: its Sequence decodes the whole text every step."""

    def __init__(self, model: ModelAdapter) -> None:
        self._model = model

    def token_bytes(self) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def _run(model: Any, ids: list[int], stop: tuple[str, ...]) -> list[StepEvent]:
    seq = Sequence(0, [], SamplingParams(max_new_tokens=len(ids), stop=stop), 0, model, Metrics(), 0.0)
    events: list[StepEvent] = []
    for tok in ids:
        events += seq.advance(tok)
        if seq.finished:
            break
    assert seq.finished
    return events


def _expected(model: ModelAdapter, ids: list[int], stop: tuple[str, ...]) -> tuple[str, str]:
    """The specification: after each token, the whole text decoded; the first stop sequence (in the order
    given) that appears ends it there."""
    for k in range(1, len(ids) + 1):
        if ids[k - 1] == model.eos_id:
            return model.decode(ids[:k - 1]), FINISH_EOS
        text = model.decode(ids[:k])
        for s in stop:
            if s and s in text:
                return text[:text.find(s)], FINISH_STOP
    return model.decode(ids), FINISH_LENGTH


def _ids(model: ModelAdapter) -> Any:
    """Random token ids (byte tokens give broken and split UTF-8) or the tokens of random text."""
    random_ids = st.lists(st.integers(0, model.vocab_size - 1), min_size=1, max_size=24)
    text_ids = st.text(min_size=1, max_size=12).map(lambda t: model.encode(t).ids).filter(bool)
    return st.one_of(random_ids, text_ids)


def test_token_bytes_join_to_the_tokenizers_decoding(gpt: ModelAdapter) -> None:
    table = gpt.token_bytes()
    assert table is not None and len(table) == gpt.vocab_size

    @hypothesis.settings(max_examples=300, deadline=None)
    @hypothesis.given(ids=_ids(gpt))
    def check(ids: list[int]) -> None:
        assert b"".join(table[i] for i in ids).decode("utf-8", "replace") == gpt.decode(ids)

    check()


def test_encoded_words_are_the_tokenizers_decoding_of_each_word(gpt: ModelAdapter) -> None:
    """Words come from the tokens' bytes (no tokenizer call per word): the same text as decoding each word."""

    @hypothesis.settings(max_examples=200, deadline=None)
    @hypothesis.given(text=st.text(min_size=1, max_size=40))
    def check(text: str) -> None:
        enc = gpt.encode(text)
        groups: list[list[int]] = [[] for _ in enc.words]
        for i, w in zip(enc.ids, enc.word_index, strict=True):
            groups[w].append(i)
        assert enc.words == [gpt.tokenizer.decode(g).strip() for g in groups]  # type: ignore[attr-defined]

    check()


def test_streamed_text_is_a_prefix_of_the_final_text_cut_at_the_first_stop(gpt: ModelAdapter) -> None:
    @hypothesis.settings(max_examples=300, deadline=None)
    @hypothesis.given(ids=_ids(gpt), data=st.data())
    def check(ids: list[int], data: Any) -> None:
        full = gpt.decode(ids)
        # Stop sequences: pieces of the text that would be generated (so they do stop it) and random ones.
        pieces = st.tuples(st.integers(0, len(full)), st.integers(1, 4)).map(lambda a: full[a[0]:a[0] + a[1]])
        # Left out: stops with U+FFFD, which whole-text decoding also shows for a character still arriving.
        stop = tuple(data.draw(st.lists(st.one_of(pieces, st.text(max_size=3)).filter(lambda s: "\ufffd" not in s),
                                        max_size=3)))
        events = _run(gpt, ids, stop)
        text, reason = _expected(gpt, ids, stop)
        streamed = ""
        for ev in events:
            streamed += ev.text_delta
            assert text.startswith(streamed)  # nothing streamed is ever taken back
        assert streamed == text and events[-1].finish_reason == reason
        got = [t for ev in events for t in ev.token_ids]
        assert got == ids[:len(got)] and gpt.eos_id not in got and events[-1].generated_tokens == len(got)
        assert events == _run(_WholeText(gpt), ids, stop)  # one token's bytes per step == the whole text again

    check()


SAMPLINGS = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_k=50),
             SamplingParams(temperature=0.9, top_k=40, top_p=0.9), SamplingParams(temperature=1.2, top_p=0.8),
             SamplingParams(temperature=0.7), SamplingParams(temperature=1.0, top_k=20, repetition_penalty=1.3),
             SamplingParams(temperature=0.0, min_new_tokens=8),
             SamplingParams(temperature=1.0, top_k=5, min_new_tokens=8)]


def test_a_rows_token_does_not_depend_on_what_it_is_batched_with(gpt: ModelAdapter) -> None:
    @hypothesis.settings(max_examples=60, deadline=None)
    @hypothesis.given(kinds=st.lists(st.integers(0, len(SAMPLINGS) - 1), min_size=1, max_size=12),
                      seed=st.integers(0, 2**32 - 1), banned=st.booleans())
    def check(kinds: list[int], seed: int, banned: bool) -> None:
        rng = np.random.default_rng(seed)
        logits = rng.standard_normal((len(kinds), gpt.vocab_size)).astype(np.float32) * 3
        logprobs = logits - np.log(np.exp(logits.astype(np.float64)).sum(axis=1, keepdims=True)).astype(np.float32)
        allowed = np.ones(gpt.vocab_size, dtype=bool)
        if banned:
            allowed[rng.integers(0, gpt.vocab_size, 3)] = False

        def seqs() -> list[Sequence]:
            return [Sequence(i, [1, 2, 3], SAMPLINGS[k], seed, gpt, Metrics(), 0.0) for i, k in enumerate(kinds)]

        if banned:  # make the end-of-sequence token every row's favourite: min_new_tokens must still refuse it
            logprobs[:, gpt.eos_id] = 0.0
        before = logprobs.copy()
        together = choose(logprobs, allowed, seqs())
        alone = [choose(logprobs[i:i + 1], allowed, [s])[0] for i, s in enumerate(seqs())]
        assert together == alone and all(allowed[t] for t in together)
        assert all(t != gpt.eos_id for t, k in zip(together, kinds, strict=True) if SAMPLINGS[k].min_new_tokens)
        assert (logprobs == before).all()  # the caller's array is left as it was

    check()


def test_every_sends_the_first_tokens_and_the_end_at_once_and_merges_the_rest() -> None:
    """`stream_interval`: per prompt, the first event passes at once, later ones wait until `interval` tokens
    (merged: text and ids concatenated), and the finishing event flushes what waits; prompts never mix."""
    import asyncio

    from plm.service.tasks.generate import every

    def ev(i: int, tok: int, finish: str | None = None) -> StepEvent:
        return StepEvent(i, f"<{tok}>", (tok,), finish, 3 if finish else 0, 7 if finish else 0)

    source = [ev(0, 1), ev(1, 10), ev(0, 2), ev(0, 3), ev(1, 11), ev(0, 4), ev(0, 5), ev(0, 6), ev(1, 12, FINISH_EOS),
              ev(0, 7), ev(0, 8, FINISH_LENGTH)]

    async def collect(interval: int) -> list[StepEvent]:
        async def gen() -> Any:
            for e in source:
                yield e
        return [e async for e in every(gen(), interval)]

    out = asyncio.run(collect(3))
    assert [(e.index, e.token_ids, e.finish_reason) for e in out] == [
        (0, (1,), None), (1, (10,), None), (0, (2, 3, 4), None), (1, (11, 12), FINISH_EOS),
        (0, (5, 6, 7), None), (0, (8,), FINISH_LENGTH)]
    assert out[-2].text_delta == "<5><6><7>" and out[-1].generated_tokens == 7
    assert asyncio.run(collect(1)) == source  # interval 1: every event as it comes


def _series(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in metrics.registry.collect() for s in family.samples
            if s.name.startswith(("plm_generated_tokens", "plm_time_to_first_token", "plm_inter_token_latency"))}


def test_a_steps_metrics_recorded_at_once_equal_each_tokens_own(gpt: ModelAdapter) -> None:
    """The engine records a step's tokens in one update per series (`observe_step`, then `advance(observed=True)`):
    the same counter, buckets, counts and (to rounding) sums as each sequence recording its own token."""
    from plm.service.generation.sequence import observe_step

    steps = [1.0, 1.004, 1.0041, 1.3, 1.31, 2.5, 9.0]  # time.monotonic() of each step: gaps across buckets
    by_token, by_step = Metrics(), Metrics()
    alone = [Sequence(i, [1, 2], SamplingParams(max_new_tokens=50), 0, gpt, by_token, 0.5 + i / 10) for i in range(5)]
    batch = [Sequence(i, [1, 2], SamplingParams(max_new_tokens=50), 0, gpt, by_step, 0.5 + i / 10) for i in range(5)]
    for k, now in enumerate(steps):
        # the last sequence joins late (a first token beside others' later ones), the first skips odd steps
        running = [i for i in range(5) if (i != 4 or k >= 2) and (i != 0 or k % 2 == 0)]
        for i in running:
            alone[i].advance(40 + k, now)
        observe_step([batch[i] for i in running], now)
        for i in running:
            batch[i].advance(40 + k, observed=True)
    want, got = _series(by_token), _series(by_step)
    assert want.keys() == got.keys() and want
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
    assert [s.text for s in batch] == [s.text for s in alone]
