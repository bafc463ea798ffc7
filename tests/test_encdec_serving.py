"""Serving the Transformer encoder-decoder (issue 16) over real gRPC: Generate's greedy tokens equal PyTorch's
(alone, batched with sources of other lengths, and joining a running batch), the KV cache equals recomputing,
Score given a source equals PyTorch's conditional log-probability, FillMask's spans and their log-probabilities,
cancellation frees the slot (self- and cross-attention rows), and the bad inputs."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from plm.models.transformer import Transformer
from tokenizers import Tokenizer

from plm.api.v1 import plm_pb2 as pb
from plm.api.v1 import plm_pb2_grpc as pbg
from tests.conftest import CACHE, ServerThread, make_config
from tests.test_encdec import _load

SOURCES = ["The cat sat on the mat.", "Hello", "It was the best of times, it was the worst of times.",
           "She said nothing at all", "A b c"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny profile's encdec model, built on its own (the shared tiny repository leaves the family out)."""
    from plm.export.build import build_repository

    repo = tmp_path_factory.mktemp("encdec-serving")
    build_repository(profile="tiny", repository=repo, cache_dir=CACHE, families=["encdec"])
    return repo / "encdec"


@pytest.fixture(scope="module")
def server(folder: Path) -> Iterator[ServerThread]:
    srv = ServerThread(make_config(folder.parent))
    yield srv
    srv.stop()


@pytest.fixture()
def stub(server: ServerThread) -> Iterator[pbg.LanguageModelServiceStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield pbg.LanguageModelServiceStub(channel)


@pytest.fixture(scope="module")
def torch_model(folder: Path) -> Transformer:
    return _load(folder)


def _source(folder: Path, text: str) -> list[int]:
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    return [*tok.encode(text, add_special_tokens=False).ids, 2]  # </s>


def _batch(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    s = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), s, dtype=torch.long)
    mask = torch.zeros(len(rows), s, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return ids, mask


@torch.no_grad()
def _reference(model: Transformer, source: list[int], max_new: int, min_new: int = 0) -> list[int]:
    """PyTorch greedy without a cache, by the server's rules: <pad> and <s> are never written, </s> not before
    `min_new` tokens. The tokens before </s>."""
    ids, mask = _batch([source])
    cfg = model.config
    tokens = [cfg.bos_id]
    for _ in range(max_new):
        logits = model.teacher_forced_logits(ids, mask, torch.tensor([tokens]))[0, -1].log_softmax(-1)
        logits[[cfg.pad_id, cfg.bos_id]] = -float("inf")
        if len(tokens) - 1 < min_new:
            logits[cfg.eos_id] = -float("inf")
        nxt = int(logits.argmax())
        if nxt == cfg.eos_id:
            break
        tokens.append(nxt)
    return tokens[1:]


def _greedy(max_new: int, min_new: int = 0) -> pb.SamplingParams:
    return pb.SamplingParams(temperature=0.0, max_new_tokens=max_new, min_new_tokens=min_new)


def test_greedy_generate_equals_pytorch_alone_and_batched(folder: Path, torch_model: Transformer,
                                                          stub: pbg.LanguageModelServiceStub) -> None:
    rows = [_source(folder, s) for s in SOURCES]
    # models/transformer.py's own greedy (cached) for the whole batch of sources of different lengths
    ids, mask = _batch(rows)
    want = [[t for t in row.tolist()] for row in torch_model.generate(ids, mask, 20)]
    want = [w[:w.index(2)] if 2 in w else w for w in want]
    alone = [list(stub.Generate(pb.GenerateRequest(model="encdec", prompts=[s], sampling=_greedy(20)))
                  .generations[0].token_ids) for s in SOURCES]
    assert alone == want
    batched = stub.Generate(pb.GenerateRequest(model="encdec", prompts=SOURCES, sampling=_greedy(20)))
    assert [list(g.token_ids) for g in batched.generations] == want
    assert [g.prompt_tokens for g in batched.generations] == [len(r) - 1 for r in rows]


def test_kv_cache_equals_recompute_over_long_generations(folder: Path, torch_model: Transformer, server: ServerThread,
                                                         stub: pbg.LanguageModelServiceStub) -> None:
    """min_new_tokens keeps every sequence running for many steps; requests join the running batch at different
    times (sources of other lengths), so rows are refilled and laid out again with their cross-attention rows."""
    lengths = [(24, 24), (6, 6), (16, 10), (12, 12), (30, 30)]
    want = [_reference(torch_model, _source(folder, s), n, m) for s, (n, m) in zip(SOURCES, lengths, strict=True)]
    got: dict[int, list[int]] = {}

    def one(i: int) -> None:
        time.sleep(0.03 * i)
        n, m = lengths[i]
        got[i] = list(stub.Generate(pb.GenerateRequest(model="encdec", prompts=[SOURCES[i]], sampling=_greedy(n, m)))
                      .generations[0].token_ids)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(SOURCES))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[i] for i in range(len(SOURCES))] == want
    engine = server.running.registry.get("encdec").engine  # type: ignore[attr-defined]
    deadline = time.monotonic() + 10
    while engine.active and time.monotonic() < deadline:  # the last to finish leaves at the next step
        time.sleep(0.02)
    assert engine.active == 0


def test_recompute_without_a_cache_gives_the_engine_tokens(folder: Path, stub: pbg.LanguageModelServiceStub) -> None:
    """`kv_cache = false`: every step re-reads each sequence whole through the batcher (the benchmark's baseline);
    greedy and seeded sampled tokens equal the engine's, alone and batched with sources of other lengths."""
    from dataclasses import replace

    from plm.service.config import Runtime

    sampled = pb.SamplingParams(temperature=0.9, top_k=20, seed=3, max_new_tokens=10, min_new_tokens=10)
    requests = [pb.GenerateRequest(model="encdec", prompts=SOURCES, sampling=_greedy(20, 12)),
                pb.GenerateRequest(model="encdec", prompts=SOURCES[2:3], sampling=_greedy(20)),
                pb.GenerateRequest(model="encdec", prompts=SOURCES[:3], sampling=sampled)]
    want = [[list(g.token_ids) for g in stub.Generate(r).generations] for r in requests]
    srv = ServerThread(make_config(folder.parent, runtime=replace(Runtime(), kv_cache=False)))
    try:
        model = srv.running.registry.get("encdec")
        assert model.info()["generation"] == "recompute"  # type: ignore[attr-defined]
        with grpc.insecure_channel(srv.target) as channel:
            other = pbg.LanguageModelServiceStub(channel)
            got = [[list(g.token_ids) for g in other.Generate(r).generations] for r in requests]
        assert model.engine.active == 0 and model.batcher.batches_run > 0  # type: ignore[attr-defined]
    finally:
        srv.stop()
    assert got == want


def test_sampling_is_seeded_and_streams(stub: pbg.LanguageModelServiceStub) -> None:
    sampling = pb.SamplingParams(temperature=0.9, top_k=50, top_p=0.95, repetition_penalty=1.2, seed=7,
                                 max_new_tokens=12, min_new_tokens=12, stop=["zzz"])
    one = stub.Generate(pb.GenerateRequest(model="encdec", prompts=SOURCES[:2], sampling=sampling))
    two = stub.Generate(pb.GenerateRequest(model="encdec", prompts=SOURCES[:2], sampling=sampling))
    assert [list(g.token_ids) for g in one.generations] == [list(g.token_ids) for g in two.generations]
    assert all(len(g.token_ids) == 12 for g in one.generations)
    streamed: dict[int, str] = {}
    for chunk in stub.GenerateStream(pb.GenerateRequest(model="encdec", prompts=SOURCES[:2], sampling=sampling)):
        streamed[chunk.index] = streamed.get(chunk.index, "") + chunk.text_delta
    assert [streamed[i] for i in range(2)] == [g.text for g in one.generations]


@torch.no_grad()
def test_score_given_a_source_equals_pytorch(folder: Path, torch_model: Transformer,
                                             stub: pbg.LanguageModelServiceStub) -> None:
    texts = [" the cat", "Hello there, general", " a"]
    sources = ["The cat sat on the mat.", "Hello", "A b c d e f"]
    r = stub.Score(pb.ScoreRequest(model="encdec", texts=texts, sources=sources))
    assert r.method == "conditional"
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    for text, source, got in zip(texts, sources, r.scores, strict=True):
        target = [*tok.encode(text, add_special_tokens=False).ids, 2]
        ids, mask = _batch([_source(folder, source)])
        logits = torch_model.teacher_forced_logits(ids, mask, torch.tensor([[1, *target[:-1]]]))[0]
        want = logits.log_softmax(-1)[torch.arange(len(target)), torch.tensor(target)].double()
        assert [t.id for t in got.tokens] == target
        assert np.allclose([t.log_prob for t in got.tokens], want.numpy(), atol=1e-4)
        assert abs(got.log_prob - float(want.sum())) < 1e-4
    # One source for every text scores each text given it.
    shared = stub.Score(pb.ScoreRequest(model="encdec", texts=texts[:2], sources=[sources[0]]))
    assert abs(shared.scores[0].log_prob - r.scores[0].log_prob) < 1e-6


@torch.no_grad()
def test_fill_mask_spans_by_beam_search(folder: Path, torch_model: Transformer,
                                        stub: pbg.LanguageModelServiceStub) -> None:
    text = "The [MASK] sat on the [MASK]."
    r = stub.FillMask(pb.FillMaskRequest(model="encdec", texts=[text], top_k=3)).results[0]
    assert len(r.masks) == 2
    first = 3  # <extra_id_0>
    source = _source(folder, "The<extra_id_0> sat on the<extra_id_1>.")
    assert source.count(first) == 1 and source.count(first + 1) == 1
    ids, mask = _batch([source])
    best: list[int] = []
    for b, fill in enumerate(r.masks):
        cands = list(fill.candidates)
        assert 1 <= len(cands) <= 3
        assert [c.log_prob for c in cands] == sorted((c.log_prob for c in cands), reverse=True)
        end = first + b + 1 if b == 0 else 2
        for c in cands:
            span = list(c.token_ids)
            assert span and all(t > first + 15 for t in span)  # no special token, no sentinel
            decoder = [1, *best, first + b, *span]
            logp = torch_model.teacher_forced_logits(ids, mask, torch.tensor([decoder]))[0].log_softmax(-1)
            start = len(decoder) - len(span) - 1
            want = sum(float(logp[start + j, t]) for j, t in enumerate([*span, end]))
            assert abs(c.log_prob - want) < 1e-4
            assert "[MASK]" in c.sequence and c.sequence.count("[MASK]") == 1
        best += [first + b, *cands[0].token_ids]
    assert "[MASK]" not in r.completed and r.completed.endswith(".")


def test_cancelled_stream_frees_its_slot(server: ServerThread, stub: pbg.LanguageModelServiceStub) -> None:
    engine = server.running.registry.get("encdec").engine  # type: ignore[attr-defined]
    call = stub.GenerateStream(pb.GenerateRequest(model="encdec", prompts=SOURCES * 2, sampling=_greedy(30, 30)))
    next(iter(call))
    call.cancel()
    with pytest.raises(grpc.RpcError) as e:
        list(call)
    assert e.value.code() == grpc.StatusCode.CANCELLED
    deadline = time.monotonic() + 10
    while engine.active and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.active == 0 and not engine._batch.cross  # self- and cross-attention rows released
    after = stub.Generate(pb.GenerateRequest(model="encdec", prompts=["Hello"], sampling=_greedy(4)))
    assert after.generations[0].finish_reason in (pb.FINISH_REASON_EOS, pb.FINISH_REASON_LENGTH)


@pytest.mark.parametrize("call, field, words", [
    ("Generate", "prompts[0]", "no tokens"),
    ("Generate", "prompts[0]", "encoder window is 33 tokens"),
    ("Generate", "prompts[0]", "written literally"),
    ("Generate", "prompts[0]", "[MASK]"),
    ("Generate", "sampling.max_new_tokens", "writes at most 32"),
    ("FillMask", "texts[0]", "at most 16"),
    ("FillMask", "texts[0]", "written literally"),
    ("FillMask", "targets", "span"),
    ("Score", "sources", "is empty"),
    ("Score", "sources[0]", "no tokens"),
    ("Score", "sources", "one per text"),
    ("Score", "sources[1]", "encoder window is 33 tokens"),
    ("Score", "sources[0]", "written literally"),
    ("Score", "sources[0]", "[MASK]"),
    ("FillMask", "texts[0]", "encoder window is 33 tokens"),
    ("FillMask", "texts[0]", "no [MASK] blank"),
])
def test_bad_input_is_invalid_argument_naming_the_field(stub: pbg.LanguageModelServiceStub, call: str, field: str,
                                                        words: str) -> None:
    long = " ".join(["word"] * 60)
    requests = {
        ("Generate", "no tokens"): pb.GenerateRequest(model="encdec", prompts=["  "]),
        ("Generate", "encoder window is 33 tokens"): pb.GenerateRequest(model="encdec", prompts=[long]),
        ("Generate", "written literally"): pb.GenerateRequest(model="encdec", prompts=["a <extra_id_0> b"]),
        ("Generate", "[MASK]"): pb.GenerateRequest(model="encdec", prompts=["a [MASK] b"]),
        ("Generate", "writes at most 32"): pb.GenerateRequest(model="encdec", prompts=["a"],
                                                               sampling=pb.SamplingParams(max_new_tokens=33)),
        ("FillMask", "at most 16"): pb.FillMaskRequest(model="encdec", texts=["[MASK]" * 17]),
        ("FillMask", "written literally"): pb.FillMaskRequest(model="encdec", texts=["a <extra_id_1> [MASK]"]),
        ("FillMask", "span"): pb.FillMaskRequest(model="encdec", texts=["a [MASK]"], targets=["cat"]),
        ("Score", "is empty"): pb.ScoreRequest(model="encdec", texts=["a"]),
        ("Score", "no tokens"): pb.ScoreRequest(model="encdec", texts=["a"], sources=[" "]),
        ("Score", "one per text"): pb.ScoreRequest(model="encdec", texts=["a", "b", "c"], sources=["x", "y"]),
        ("Score", "encoder window is 33 tokens"): pb.ScoreRequest(model="encdec", texts=["a", "b"],
                                                                  sources=["x", long]),
        ("Score", "written literally"): pb.ScoreRequest(model="encdec", texts=["a"], sources=["x </s> y"]),
        ("Score", "[MASK]"): pb.ScoreRequest(model="encdec", texts=["a"], sources=["the [MASK] sat"]),
        ("FillMask", "encoder window is 33 tokens"): pb.FillMaskRequest(model="encdec", texts=[long + " [MASK]"]),
        ("FillMask", "no [MASK] blank"): pb.FillMaskRequest(model="encdec", texts=["the cat sat"]),
    }
    with pytest.raises(grpc.RpcError) as e:
        getattr(stub, call)(requests[(call, words)])
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith(f"{field}:"), e.value.details()
    assert words in e.value.details()
    # Only Generate has truncate_prompt: no other call's refusal points at it.
    assert ("truncate_prompt" in e.value.details()) == (words == "encoder window is 33 tokens" and call == "Generate")


def test_truncate_prompt_keeps_the_first_tokens(stub: pbg.LanguageModelServiceStub) -> None:
    long = " ".join(["word"] * 60)
    r = stub.Generate(pb.GenerateRequest(model="encdec", prompts=[long], truncate_prompt=True, sampling=_greedy(3)))
    assert r.generations[0].prompt_tokens == 32  # the encoder's window of 33 less </s>


# The fuzz suite's property (tests/test_fuzz.py: requests drawn from the descriptors, never INTERNAL/UNKNOWN or a
# hang, every INVALID_ARGUMENT naming a field) on the encoder-decoder, whose fields (sources, truncate_prompt,
# [MASK] and sentinels in prompts) the shared tiny repository never reaches: its model names are mostly "encdec".
FUZZED = {"Generate": 250, "GenerateStream": 250, "Score": 300, "FillMask": 300, "PredictNext": 30, "Embed": 30}


@pytest.fixture(scope="module")
def fuzz_channel(folder: Path) -> Iterator[grpc.Channel]:
    from tests import test_fuzz

    srv = ServerThread(make_config(folder.parent, limits=test_fuzz.LIMITS))
    try:
        with grpc.insecure_channel(srv.target) as channel:
            yield channel
    finally:
        srv.stop()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("rpc", list(FUZZED))
def test_fuzz_the_encoder_decoder(fuzz_channel: grpc.Channel, rpc: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests import test_fuzz

    monkeypatch.setattr(test_fuzz, "MODELS", ["encdec"])
    monkeypatch.setattr(test_fuzz, "EXAMPLES", FUZZED)
    service, method = next((s, m) for s, m in test_fuzz.METHODS if m.name == rpc)
    test_fuzz.test_fuzz_rpc(fuzz_channel, service, method)
