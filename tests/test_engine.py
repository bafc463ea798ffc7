"""The KV-cache generation engine through the real server: same tokens as recomputing, continuous batching,
cancellation that frees the slot."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from plm.client.client import PlmClient
from plm.service.config import Runtime

from plm.api.v1 import plm_pb2 as pb
from tests.conftest import ServerThread, make_config

PROMPTS = ["The king", "Good morrow, my lord", "O", "What light through yonder window breaks"]
SAMPLINGS = [
    {"temperature": 0.0, "max_new_tokens": 20},
    {"temperature": 0.9, "top_k": 40, "top_p": 0.9, "seed": 5, "max_new_tokens": 20},
    {"temperature": 1.2, "repetition_penalty": 1.3, "seed": 11, "max_new_tokens": 16},
]


@pytest.fixture(scope="module")
def recompute(tiny_repo: Path) -> Iterator[ServerThread]:
    """The same models with the KV-cache engine off: every step re-reads the whole sequence."""
    srv = ServerThread(make_config(tiny_repo, models=("gpt",), runtime=Runtime(kv_cache=False)))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def bound(tiny_repo: Path) -> Iterator[ServerThread]:
    """The engine with ORT's IO binding on, as a GPU runs it: each step's presents stay OrtValues and feed the
    next step as they are (on CPU here, so the suite checks that path without a GPU)."""
    srv = ServerThread(make_config(tiny_repo, models=("gpt",), runtime=Runtime(io_binding="on")))
    yield srv
    srv.stop()


def _gen(target: str, prompts: list[str], **sampling: object) -> list[pb.Generation]:
    with PlmClient(target) as c:
        return list(c.generate("gpt", prompts, pb.SamplingParams(**sampling)).generations)  # type: ignore[arg-type]


def test_engine_is_on(server: ServerThread, recompute: ServerThread) -> None:
    assert server.running.registry.get("gpt").engine is not None
    assert recompute.running.registry.get("gpt").engine is None
    with PlmClient(server.target) as c:
        assert c.get_model("gpt").details["generation"] == "kv_cache"


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_kv_cache_generates_what_recomputing_generates(server: ServerThread, recompute: ServerThread,
                                                        sampling: dict[str, object]) -> None:
    cached = _gen(server.target, PROMPTS, **sampling)
    plain = _gen(recompute.target, PROMPTS, **sampling)
    for a, b in zip(cached, plain, strict=True):
        assert list(a.token_ids) == list(b.token_ids) and a.text == b.text and a.finish_reason == b.finish_reason


def test_concurrent_streams_join_one_batch_and_match_alone(server: ServerThread) -> None:
    alone = {p: _gen(server.target, [p], temperature=0.0, max_new_tokens=24)[0].token_ids for p in PROMPTS}
    engine = server.running.registry.get("gpt").engine
    steps_before = engine.steps
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda p: _gen(server.target, [p], temperature=0.0, max_new_tokens=24)[0],
                                 PROMPTS * 2))
    for g, p in zip(together, PROMPTS * 2, strict=True):
        assert list(g.token_ids) == list(alone[p])
    tokens = sum(len(g.token_ids) for g in together)
    assert engine.steps - steps_before < tokens  # several sequences advanced per decode step


def test_cancelled_stream_leaves_the_batch_and_frees_its_slot(server: ServerThread) -> None:
    engine = server.running.registry.get("gpt").engine
    metrics = server.running.metrics
    before = metrics.rejections.labels("gpt", "cancelled")._value.get()
    with PlmClient(server.target) as c:
        call = c.generate_stream("gpt", ["The king"] * 16, pb.SamplingParams(temperature=1.0, seed=1,
                                                                          max_new_tokens=60))
        next(iter(call))  # the first token has come: the sequences are running
        call.cancel()  # type: ignore[attr-defined]
        with pytest.raises(grpc.RpcError) as e:
            list(call)
        assert e.value.code() == grpc.StatusCode.CANCELLED
    deadline = time.monotonic() + 10
    while engine.active and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.active == 0  # every sequence left the batch, its KV memory released
    assert metrics.rejections.labels("gpt", "cancelled")._value.get() == before + 1
    # The engine goes on serving: the freed slots are reused.
    assert _gen(server.target, ["The king"], temperature=0.0, max_new_tokens=5)[0].generated_tokens >= 1


def test_classify_from_cached_prefix_equals_full_sequences(server: ServerThread, recompute: ServerThread) -> None:
    demos = [pb.Demonstration(text="Alas!", label="tragedy"), pb.Demonstration(text="Ha!", label="comedy")]
    req = pb.ClassifyRequest(model="gpt", demonstrations=demos, labels=["tragedy", "comedy", "history play"],
                             queries=["To be.", "A horse!", "O"], template="{text} = {label}\n", calibrate=True)
    hits = server.running.metrics.prefix_cache.labels("gpt", "hit")
    before = hits._value.get()
    with PlmClient(server.target) as a, PlmClient(recompute.target) as b:
        cached, again, plain = a.stub.Classify(req), a.stub.Classify(req), b.stub.Classify(req)
    assert cached.prefix_tokens > 0 and hits._value.get() >= before + 1  # the second request reused the prefix
    for x, y, z in zip(cached.results, again.results, plain.results, strict=True):
        assert x.label == y.label == z.label
        for sx, sy, sz in zip(x.scores, y.scores, z.scores, strict=True):
            assert sx.log_likelihood == pytest.approx(sz.log_likelihood, abs=1e-4)
            assert sx.log_likelihood == sy.log_likelihood and sx.num_tokens == sz.num_tokens


def test_min_new_tokens_gives_fixed_lengths_with_and_without_the_cache(server: ServerThread,
                                                                        recompute: ServerThread) -> None:
    """With min_new_tokens = max_new_tokens every prompt gets exactly that many tokens, none of them the end of
    sequence (sampled and greedy; unconstrained sampling ends some prompts at EOS); the engine and recomputing
    agree token for token."""
    eos = server.running.registry.get("gpt").eos_id
    free = _gen(server.target, PROMPTS, temperature=1.0, top_k=50, seed=3, max_new_tokens=40)
    assert any(g.finish_reason == pb.FINISH_REASON_EOS for g in free)  # else the test shows nothing
    for sampling in ({"temperature": 1.0, "top_k": 50, "seed": 3}, {"temperature": 0.0}):
        fixed = _gen(server.target, PROMPTS, max_new_tokens=40, min_new_tokens=40, **sampling)
        assert [g.generated_tokens for g in fixed] == [40] * len(PROMPTS)
        assert all(g.finish_reason == pb.FINISH_REASON_LENGTH and eos not in g.token_ids for g in fixed)
        again = _gen(recompute.target, PROMPTS, max_new_tokens=40, min_new_tokens=40, **sampling)
        assert [list(g.token_ids) for g in fixed] == [list(g.token_ids) for g in again]


def test_classify_prefix_reuse_follows_the_config(tiny_repo: Path, server: ServerThread) -> None:
    """`prefix_reuse = false` scores whole sequences through the model's batcher, with the engine still
    generating, and gives the scores the cached prefix gives; GetModel says which."""
    demos = [pb.Demonstration(text="Alas!", label="tragedy"), pb.Demonstration(text="Ha!", label="comedy")]
    req = pb.ClassifyRequest(model="gpt", demonstrations=demos, labels=["tragedy", "comedy"], queries=["To be.", "O"])
    srv = ServerThread(make_config(tiny_repo, models=("gpt",), runtime=Runtime(prefix_reuse=False)))
    try:
        lookups = srv.running.metrics.prefix_cache
        with PlmClient(srv.target) as off, PlmClient(server.target) as on:
            assert on.get_model("gpt").details["classify"] == "prefix_cache"
            assert off.get_model("gpt").details["classify"] == "whole_sequences"
            assert off.get_model("gpt").details["generation"] == "kv_cache"
            got, want = off.stub.Classify(req), on.stub.Classify(req)
        assert lookups.labels("gpt", "hit")._value.get() == lookups.labels("gpt", "miss")._value.get() == 0
        for x, y in zip(got.results, want.results, strict=True):
            assert x.label == y.label
            for sx, sy in zip(x.scores, y.scores, strict=True):
                assert sx.log_likelihood == pytest.approx(sy.log_likelihood, abs=1e-4)
    finally:
        srv.stop()


def test_deadline_stops_generation_and_frees_the_slot(server: ServerThread) -> None:
    engine = server.running.registry.get("gpt").engine
    with PlmClient(server.target, timeout=0.01) as c, pytest.raises(grpc.RpcError) as e:
        c.generate("gpt", ["The king"] * 32, pb.SamplingParams(temperature=1.0, seed=2, max_new_tokens=60))
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + 10
    while engine.active and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.active == 0


def test_a_slow_reader_gets_piled_up_tokens_together(server: ServerThread) -> None:
    """Events that pile up while their reader is busy leave in one message per prompt, nothing lost."""
    from plm.service.tasks.generate import GenerateParams, SamplingParams, start_sequences

    model = server.running.registry.get("gpt")
    sampling = SamplingParams(temperature=1.0, seed=4, max_new_tokens=40)

    async def slow_reader() -> list[object]:
        seqs = start_sequences(model, GenerateParams(tuple(PROMPTS), sampling), server.running.metrics)
        events = model.engine.generate(seqs, None)
        first = await events.__anext__()
        await asyncio.sleep(0.3)  # the engine runs ahead of this reader
        return [first] + [ev async for ev in events]

    events = server.call(slow_reader())
    with PlmClient(server.target) as c:
        unary = c.generate("gpt", PROMPTS, pb.SamplingParams(temperature=1.0, seed=4, max_new_tokens=40)).generations
    texts, ids = [""] * len(PROMPTS), [[] for _ in PROMPTS]  # type: list[str], list[list[int]]
    for ev in events:
        texts[ev.index] += ev.text_delta  # type: ignore[attr-defined]
        ids[ev.index].extend(ev.token_ids)  # type: ignore[attr-defined]
    assert texts == [g.text for g in unary] and ids == [list(g.token_ids) for g in unary]
    token_events = sum(1 for ev in events if ev.token_ids)  # type: ignore[attr-defined]
    assert token_events < sum(len(g.token_ids) for g in unary)  # several tokens per event


def test_io_binding_generates_and_classifies_what_plain_runs_do(server: ServerThread, bound: ServerThread) -> None:
    """Keys and values kept as OrtValues between steps (copied to numpy only when rows join or leave) give
    the same tokens and the same Classify scores as plain runs, and the steps really are fed OrtValues."""
    import onnxruntime as ort

    engine = bound.running.registry.get("gpt").engine
    plain = server.running.registry.get("gpt").engine.session
    assert engine.session.io_binding and (plain.device != "cpu" or not plain.io_binding)  # auto: off on CPU
    fed: list[bool] = []
    decode = engine._decode

    def watched() -> object:
        fed.append(isinstance(engine._batch.kv[0], ort.OrtValue))
        return decode()

    engine._decode = watched
    try:
        for sampling in SAMPLINGS:
            for a, b in zip(_gen(bound.target, PROMPTS, **sampling), _gen(server.target, PROMPTS, **sampling),
                            strict=True):
                assert list(a.token_ids) == list(b.token_ids) and a.text == b.text
        with concurrent.futures.ThreadPoolExecutor(8) as pool:  # joiners and leavers between steps
            together = list(pool.map(
                lambda p: _gen(bound.target, [p], temperature=0.0, max_new_tokens=4 + len(p) // 4)[0], PROMPTS * 2))
        for g, p in zip(together, PROMPTS * 2, strict=True):
            assert list(g.token_ids) == list(_gen(server.target, [p], temperature=0.0,
                                                  max_new_tokens=4 + len(p) // 4)[0].token_ids)
        demos = [pb.Demonstration(text="Alas!", label="tragedy"), pb.Demonstration(text="Ha!", label="comedy")]
        req = pb.ClassifyRequest(model="gpt", demonstrations=demos, labels=["tragedy", "comedy", "history play"],
                                 queries=["To be.", "A horse!", "O"])
        with PlmClient(bound.target) as a, PlmClient(server.target) as b:
            for x, y in zip(a.stub.Classify(req).results, b.stub.Classify(req).results, strict=True):
                assert x.label == y.label
                for sx, sy in zip(x.scores, y.scores, strict=True):
                    assert sx.log_likelihood == pytest.approx(sy.log_likelihood, abs=1e-5)
    finally:
        del engine._decode
    assert fed and all(fed)  # joins and leaves too were laid out by the KV layout graph, never through numpy
    # Classify's cached prefix stays where the decoder keeps it (each use repeats it there, by the layout graph).
    assert engine.runner.prefixes and all(isinstance(p, ort.OrtValue) for kv, _ in engine.runner.prefixes.values()
                                          for p in kv)
    with PlmClient(bound.target) as c:
        details = c.get_model("gpt").details
        assert details["io_binding"] == details["kv_layout"] == engine.session.device  # "cpu" here, "cuda" on a GPU


@pytest.mark.parametrize("which", ["server", "bound"])
def test_sequences_joining_and_leaving_mid_generation_get_the_tokens_they_get_alone(
        which: str, request: pytest.FixtureRequest) -> None:
    """The batch's keys and values are laid out again only when a sequence joins or leaves: whatever joins
    or leaves around a sequence, it gets the tokens it gets alone, and the batch is never much wider than its
    longest sequence (leading padding that no row uses is trimmed once it exceeds `width_slack`). With IO
    binding too."""
    from plm.service.generation.kv_batch import width_slack
    from plm.service.tasks.generate import GenerateParams, SamplingParams, start_sequences

    server: ServerThread = request.getfixturevalue(which)
    model = server.running.registry.get("gpt")
    engine = model.engine
    # (prompt, sampling, decode steps after the first request starts at which this one arrives)
    jobs = [("The king", SamplingParams(temperature=0.0, max_new_tokens=40), 0),
            ("O", SamplingParams(temperature=0.0, max_new_tokens=6), 2),
            ("What light through yonder window breaks", SamplingParams(temperature=0.0, max_new_tokens=12), 3),
            ("Good morrow, my lord", SamplingParams(temperature=0.9, top_k=40, seed=7, max_new_tokens=20), 5),
            ("O", SamplingParams(temperature=0.0, max_new_tokens=3), 9),
            ("The king", SamplingParams(temperature=1.0, seed=3, max_new_tokens=16), 14)]
    widths: list[tuple[int, int]] = []
    decode = engine._decode

    def checked_decode() -> object:
        batch = engine._batch
        assert (batch.mask.sum(axis=1) == batch.lengths).all()
        live = [i for i in range(len(batch.slots)) if i not in batch.holes]
        widths.append((batch.mask.shape[1], int(batch.lengths[live].max())))
        return decode()

    async def one(prompt: str, sampling: SamplingParams, after: int | None, start: int) -> list[int]:
        while after is not None and engine.steps < start + after:
            await asyncio.sleep(0.0002)
        seqs = start_sequences(model, GenerateParams((prompt,), sampling), server.running.metrics)
        return [t async for ev in engine.generate(seqs, None) for t in ev.token_ids]

    async def together() -> list[list[int]]:
        start = engine.steps
        return list(await asyncio.gather(*(one(p, s, after, start) for p, s, after in jobs)))

    async def alone() -> list[list[int]]:
        return [await one(p, s, None, 0) for p, s, _ in jobs]

    engine._decode = checked_decode
    try:
        mixed = server.call(together())
    finally:
        del engine._decode
    assert mixed == server.call(alone())
    assert len(widths) > 10 and all(longest <= p <= longest + width_slack(longest) for p, longest in widths)
    deadline = time.monotonic() + 10
    while engine.active and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.active == 0 and not engine._batch.kv  # every sequence's KV memory released


def _random_batch(rng: Any, lengths: list[int], width: int, tag: str) -> Any:
    """A running batch of the given real lengths, left-padded to `width`: 4 KV arrays (B, 2, width, 3)."""
    import numpy as np
    from plm.service.generation.kv_batch import Batch

    mask = np.zeros((len(lengths), width), dtype=np.int64)
    for i, n in enumerate(lengths):
        mask[i, width - n:] = 1
    kv = [rng.standard_normal((len(lengths), 2, width, 3)).astype(np.float32) for _ in range(4)]
    return Batch([f"{tag}{i}" for i in range(len(lengths))], kv, mask,  # type: ignore[arg-type]
                  np.array(lengths, dtype=np.int64))


def test_refilling_rows_in_place_gives_every_sequence_what_a_full_layout_gives() -> None:
    """When joiners take the rows of those who left (no copy of the batch), each sequence keeps the same real
    keys, values, mask and length as in a full layout; the batch is at most `width_slack` wider, and rows
    nobody took stay as holes (masked out entirely) up to the number allowed, else the batch closes up."""
    import numpy as np
    from plm.service.generation.kv_batch import EMPTY, Batch, Scratch, refill, width_slack

    hypothesis = pytest.importorskip("hypothesis")
    st = pytest.importorskip("hypothesis.strategies")

    def rows_of(b: Batch) -> dict[object, tuple[int, list[np.ndarray]]]:
        out = {}
        for i, slot in enumerate(b.slots):
            if i in b.holes:
                assert b.lengths[i] == 0 and not b.mask[i].any()
                continue
            n = int(b.lengths[i])
            assert b.mask[i].sum() == n and (b.mask[i, b.mask.shape[1] - n:] == 1).all()
            out[slot] = (n, [a[i, :, a.shape[2] - n:].copy() for a in b.kv])
        return out

    @hypothesis.settings(max_examples=200, deadline=None)
    @hypothesis.given(lengths=st.lists(st.integers(1, 24), min_size=1, max_size=8), joiners=st.lists(
        st.integers(1, 24), max_size=4), data=st.data(), seed=st.integers(0, 2**32 - 1),
        extra=st.integers(0, 10), holes_kept=st.integers(0, 3))
    def check(lengths: list[int], joiners: list[int], data: Any, seed: int, extra: int, holes_kept: int) -> None:
        rng = np.random.default_rng(seed)
        running = _random_batch(rng, lengths, max(lengths) + extra, "r")  # wider than its longest: kept slack
        joined = _random_batch(rng, joiners, max(joiners), "j") if joiners else EMPTY
        keep = sorted(data.draw(st.sets(st.sampled_from(range(len(lengths))))))
        rows = list(range(len(joiners)))
        full = Scratch().layout([(running, keep), (joined, rows)])
        expected = rows_of(full)  # before the refill writes into `running`
        refilled = refill(running, keep, joined, rows, holes_kept)
        if refilled is None:
            return
        width, longest = refilled.mask.shape[1], full.mask.shape[1]
        assert longest <= width <= longest + width_slack(longest)
        assert len(refilled.slots) - len(refilled.holes) == len(full.slots) and len(refilled.holes) <= holes_kept
        got = rows_of(refilled)
        assert got.keys() == expected.keys()
        for slot, (n, kv) in expected.items():
            assert got[slot][0] == n and all((a == b).all() for a, b in zip(got[slot][1], kv, strict=True))

    check()


def test_the_kv_layout_graph_lays_out_what_numpy_lays_out(tmp_path: Path) -> None:
    """The layout graph (joins and leaves on the decoder's device under IO binding) gives the same batch as the
    numpy layout, bit for bit: slots, mask, lengths and every key and value, whatever rows are kept or join."""
    import numpy as np
    from plm.export.onnx_export import export_kv_layout
    from plm.service.config import Runtime
    from plm.service.generation.kv_batch import EMPTY, Scratch
    from plm.service.generation.runner import Runner
    from plm.service.runtime import OrtSession, on_host

    hypothesis = pytest.importorskip("hypothesis")
    st = pytest.importorskip("hypothesis.strategies")
    export_kv_layout(tmp_path / "kv_layout.onnx", 4)
    runner = object.__new__(Runner)  # only what the layout reads
    runner.n_head, runner.head_dim, runner.layout_outputs = 2, 3, [f"out.{i}" for i in range(4)]
    runner.layout = OrtSession(tmp_path / "kv_layout.onnx", Runtime(providers=("cpu",), io_binding="on"), "m")

    @hypothesis.settings(max_examples=100, deadline=None)
    @hypothesis.given(lengths=st.lists(st.integers(1, 12), max_size=8), joiners=st.lists(st.integers(1, 12),
                      max_size=4), data=st.data(), seed=st.integers(0, 2**32 - 1))
    def check(lengths: list[int], joiners: list[int], data: Any, seed: int) -> None:
        rng = np.random.default_rng(seed)
        running = _random_batch(rng, lengths, max(lengths) + data.draw(st.integers(0, 3)), "r") if lengths else EMPTY
        joined = _random_batch(rng, joiners, max(joiners), "j") if joiners else EMPTY
        keep = sorted(data.draw(st.sets(st.sampled_from(range(len(lengths))))) if lengths else set())
        rows = sorted(data.draw(st.sets(st.sampled_from(range(len(joiners))))) if joiners else set())
        want = Scratch().layout([(running, keep), (joined, rows)])
        got = runner.layout_on_device(running, keep, joined, rows)
        assert got.slots == want.slots and (got.mask == want.mask).all() and (got.lengths == want.lengths).all()
        assert all(a.shape == b.shape and (a == b).all() for a, b in zip(on_host(got.kv), want.kv, strict=True))

    check()
