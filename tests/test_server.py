"""End-to-end: the real server on a loopback port with the tiny models, called through the generated stubs."""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from plm.client.client import PlmClient
from plm.client.core import NO_RETRY
from plm.service.config import Batching
from prometheus_client.parser import text_string_to_metric_families

from plm.api.v1 import plm_pb2 as pb
from plm.api.v1 import plm_pb2_grpc as pb_grpc
from tests.conftest import ServerThread, make_config

HELD_OUT = [
    "To be, or not to be, that is the question.",
    "The king is dead.",
    "I will not speak with thee, my lord, until the morning comes.",
    "What light through yonder window breaks?",
    "The government said on Tuesday that the talks would continue.",
    "Zyxwv qqq unknownword, the end.",
]


def _sample(text: str, name: str, **labels: str) -> float:
    """The value of one series of a /metrics page (0 when it is absent: nothing counted yet)."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    return 0.0


def _code(exc: pytest.ExceptionInfo[grpc.RpcError]) -> grpc.StatusCode:
    return exc.value.code()  # type: ignore[no-any-return]


# ------------------------------------------------------------------------------------------ metadata


def test_list_and_get_models(client: PlmClient) -> None:
    models = {m.name: m for m in client.list_models().models}
    assert set(models) >= {"ngram-kn", "ngram-laplace", "gpt"}
    gpt = models["gpt"]
    assert gpt.family == "gpt" and set(gpt.tasks) == {"score", "predict_next", "generate", "embed"}
    assert gpt.vocab_size > 256 and gpt.max_length == 64
    assert gpt.HasField("parity_max_abs_diff") and gpt.parity_max_abs_diff <= gpt.parity_tolerance == 1e-4
    assert gpt.figures["training.steps"] > 0 and gpt.figures["evaluation.test_word_perplexity"] > 1
    assert "CPUExecutionProvider" in gpt.providers
    kn = client.get_model("ngram-kn")
    assert kn.family == "ngram" and set(kn.tasks) == {"score", "predict_next"}
    assert kn.details["order"] == "3"
    assert client.get_model("gpt") == gpt


def test_health_overall_and_per_model(client: PlmClient) -> None:
    assert client.health_status("") == "SERVING"
    assert client.health_status("plm.v1.LanguageModelService") == "SERVING"
    for name in ("gpt", "ngram-kn", "ngram-laplace"):
        assert client.health_status(name) == "SERVING"
    with pytest.raises(grpc.RpcError) as e:
        client.health_status("no-such-model")
    assert _code(e) == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_services(server: ServerThread) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.target) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        resp = next(iter(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))))
    names = {s.name for s in resp.list_services_response.service}
    assert {"plm.v1.LanguageModelService", "grpc.health.v1.Health"} <= names


# ----------------------------------------------------------------------------------------------- Score


def test_score_kn_matches_kenlm(client: PlmClient, tiny_repo: Path) -> None:
    """The outside oracle: KenLM loads our ARPA file and scores each word as the server does."""
    kenlm = pytest.importorskip("kenlm")
    lm = kenlm.Model(str(tiny_repo / "ngram-kn" / "model.arpa"))
    resp = client.score("ngram-kn", HELD_OUT)
    assert resp.method == "causal"
    for s in resp.scores:
        words = [t.token for t in s.tokens[:-1]]  # the normalised words; the last token is </s>
        expected = list(lm.full_scores(" ".join(words)))
        assert len(expected) == len(s.tokens)
        for (log10p, ngram_len, oov), t in zip(expected, s.tokens, strict=True):
            assert t.log_prob / math.log(10) == pytest.approx(log10p, abs=1e-4)
            assert t.ngram_length == ngram_len and t.oov == oov
        assert s.log10_prob == pytest.approx(lm.score(" ".join(words)), abs=1e-4)
    assert resp.scores[-1].num_oov >= 2


def test_score_fields_are_consistent(client: PlmClient) -> None:
    for model in ("gpt", "ngram-kn", "ngram-laplace"):
        resp = client.score(model, HELD_OUT)
        assert [s.text for s in resp.scores] == HELD_OUT
        for s in resp.scores:
            assert s.log_prob == pytest.approx(sum(t.log_prob for t in s.tokens), abs=1e-9)
            eos = s.tokens[-1].log_prob  # the words are the text's; the end of sentence is scored after them
            assert s.log_prob == pytest.approx(sum(w.log_prob for w in s.words) + eos, abs=1e-9)
            assert s.log10_prob == pytest.approx(s.log_prob / math.log(10))
            assert s.num_tokens == len(s.tokens) and s.num_words == len(s.words)
            assert s.perplexity == pytest.approx(math.exp(-s.log_prob / s.num_tokens))
            assert s.word_perplexity == pytest.approx(math.exp(-s.log_prob / (s.num_words + 1)))
            assert all(t.log_prob <= 0 for t in s.tokens)
        ranked = [resp.scores[i].log_prob for i in resp.ranking]
        assert sorted(resp.ranking) == list(range(len(HELD_OUT))) and ranked == sorted(ranked, reverse=True)


def test_score_without_eos_and_without_tokens(client: PlmClient) -> None:
    full = client.score("gpt", ["The king is dead."]).scores[0]
    r = client.stub.Score(pb.ScoreRequest(model="gpt", texts=["The king is dead."], add_eos=False, per_token=False))
    s = r.scores[0]
    assert not s.tokens and s.num_tokens == full.num_tokens - 1
    assert s.log_prob == pytest.approx(full.log_prob - full.tokens[-1].log_prob, abs=1e-5)


def test_score_ranks_candidates_chinese(client: PlmClient) -> None:
    """The notes' example: any Unicode works; GPT's byte-level BPE tells the two sentences apart."""
    texts = ["判断这个词的词性", "判断这个词的磁性"]
    for model in ("gpt", "ngram-kn", "ngram-laplace"):
        r = client.score(model, texts)
        assert len(r.scores) == 2 and all(math.isfinite(s.log_prob) for s in r.scores)
    kn = client.score("ngram-kn", texts).scores[0]
    assert kn.num_words == 8  # one word per CJK ideograph


# ------------------------------------------------------------------------------- batching invariants


def _score_many(target: str, model: str, texts: list[str], workers: int) -> list[list[float]]:
    def one(text: str) -> list[float]:
        with PlmClient(target) as c:
            return [t.log_prob for t in c.score(model, [text]).scores[0].tokens]

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, texts))


@pytest.mark.parametrize("model", ["gpt", "ngram-kn", "ngram-laplace"])
def test_score_alone_equals_batched(client: PlmClient, server: ServerThread, model: str) -> None:
    alone = [[t.log_prob for t in client.score(model, [text]).scores[0].tokens] for text in HELD_OUT]
    together = [[t.log_prob for t in s.tokens] for s in client.score(model, HELD_OUT[::-1]).scores][::-1]
    concurrent_ = _score_many(server.target, model, HELD_OUT * 4, workers=12)
    for i, a in enumerate(alone):
        np.testing.assert_allclose(together[i], a, atol=1e-5, rtol=0)
        for k in range(4):
            np.testing.assert_allclose(concurrent_[i + k * len(HELD_OUT)], a, atol=1e-5, rtol=0)


def test_concurrent_requests_really_batch(tiny_repo: Path) -> None:
    """Calls in flight together share ONNX runs. All are sent before any answer is read, to a server whose
    batcher never runs a lone row on the event loop (inline_max_ms = 0): the tiny model answers a call in a
    fraction of a millisecond, so with inline runs calls that trickle in may each be answered before the next
    is read, and then nothing needs batching (tests/test_batcher.py covers when a row runs inline)."""
    server = ServerThread(make_config(tiny_repo, models=("gpt",), batching=Batching(inline_max_ms=0.0)))
    try:
        gpt = server.running.registry.get("gpt")
        before = gpt.batcher.batches_run
        page_before = server.running.metrics.exposition().decode()
        with grpc.insecure_channel(server.target) as ch:
            stub = pb_grpc.LanguageModelServiceStub(ch)
            calls = [stub.Score.future(pb.ScoreRequest(model="gpt", texts=[t]), timeout=60) for t in HELD_OUT * 8]
            assert all(c.result().scores for c in calls)
        ran = gpt.batcher.batches_run - before
        text = server.running.metrics.exposition().decode()
    finally:
        server.stop()
    assert ran < len(HELD_OUT) * 8  # several rows per ONNX run
    # The histogram saw the same: one observation per run, every row counted once, some runs above one row.
    moved = {name: _sample(text, name, model="gpt") - _sample(page_before, name, model="gpt")
             for name in ("plm_batch_size_count", "plm_batch_size_sum")}
    assert moved == {"plm_batch_size_count": ran, "plm_batch_size_sum": len(HELD_OUT) * 8}
    single = (_sample(text, "plm_batch_size_bucket", le="1.0", model="gpt")
              - _sample(page_before, "plm_batch_size_bucket", le="1.0", model="gpt"))
    assert single < ran


@pytest.mark.parametrize("model", ["gpt", "ngram-kn"])
def test_predict_next_alone_equals_batched(client: PlmClient, model: str) -> None:
    contexts = ["The king", "What light through yonder", "I", "My lord, the queen is"]
    alone = [client.predict_next(model, [c], top_k=8, include_tokens=True).predictions[0] for c in contexts]
    together = client.predict_next(model, contexts, top_k=8, include_tokens=True).predictions
    for a, b in zip(alone, together, strict=True):
        assert [w.text for w in a.words] == [w.text for w in b.words]
        np.testing.assert_allclose([w.log_prob for w in a.words], [w.log_prob for w in b.words], atol=1e-5)
        np.testing.assert_allclose([t.log_prob for t in a.tokens], [t.log_prob for t in b.tokens], atol=1e-5)


# ----------------------------------------------------------------------------------------- PredictNext


def test_predict_next_ngram_is_the_model_distribution(client: PlmClient, tiny_repo: Path) -> None:
    kenlm = pytest.importorskip("kenlm")
    lm = kenlm.Model(str(tiny_repo / "ngram-kn" / "model.arpa"))
    pred = client.predict_next("ngram-kn", ["the king"], top_k=10).predictions[0]
    assert len(pred.words) == 10
    probs = [w.prob for w in pred.words]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    for w in pred.words:  # P(w | <s> the king) from KenLM's own state machinery
        state, mid, out = kenlm.State(), kenlm.State(), kenlm.State()
        lm.BeginSentenceWrite(state)
        lm.BaseScore(state, "the", mid)
        lm.BaseScore(mid, "king", state)
        assert math.log10(w.prob) == pytest.approx(lm.BaseScore(state, w.text, out), abs=1e-4)


def test_predict_next_gpt_returns_whole_words(client: PlmClient) -> None:
    pred = client.predict_next("gpt", ["The king is"], top_k=5, include_tokens=True).predictions[0]
    assert 1 <= len(pred.words) <= 5 and len(pred.tokens) == 5
    probs = [w.prob for w in pred.words]
    assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
    for w in pred.words:
        assert w.text and w.text == w.text.strip() and len(w.token_ids) >= 1
        assert w.log_prob == pytest.approx(math.log(w.prob))
    # A word's probability is at most that of its first token.
    first = client.predict_next("gpt", ["The king is"], top_k=50, include_tokens=True).predictions[0].tokens
    by_id = {t.token_ids[0]: t.prob for t in first}
    for w in pred.words:
        if w.token_ids[0] in by_id:
            assert w.prob <= by_id[w.token_ids[0]] + 1e-6


# -------------------------------------------------------------------------------------------- Generate


def _sampling(**kw: object) -> pb.SamplingParams:
    return pb.SamplingParams(**kw)  # type: ignore[arg-type]


def test_generate_seed_determinism_and_lengths(client: PlmClient) -> None:
    s = _sampling(max_new_tokens=12, temperature=0.9, top_k=40, top_p=0.95, seed=7)
    a = client.generate("gpt", ["The king", "Good morrow"], s).generations
    b = client.generate("gpt", ["Good morrow"], s).generations  # alone, and as prompt index 0
    # Prompt index 0 of a batch draws from the same (seed, 0) stream as the prompt alone: the same text.
    b_batched = client.generate("gpt", ["Good morrow", "The king", "And then"], s).generations[0]
    again = client.generate("gpt", ["The king", "Good morrow"], s).generations
    assert [g.text for g in a] == [g.text for g in again] and [list(g.token_ids) for g in a] == [
        list(g.token_ids) for g in again]
    assert len(b) == 1
    assert (b[0].text, list(b[0].token_ids)) == (b_batched.text, list(b_batched.token_ids))
    for g in a:
        assert g.generated_tokens == len(g.token_ids) <= 12 and g.prompt_tokens > 0
        if g.finish_reason == pb.FINISH_REASON_LENGTH:
            assert g.generated_tokens == 12
    other = client.generate("gpt", ["The king"], _sampling(max_new_tokens=12, temperature=1.5, seed=8))
    greedy1 = client.generate("gpt", ["The king"], _sampling(max_new_tokens=12, temperature=0.0, seed=1))
    greedy2 = client.generate("gpt", ["The king"], _sampling(max_new_tokens=12, temperature=0.0, seed=2))
    assert greedy1.generations[0].text == greedy2.generations[0].text
    assert other.generations[0].token_ids != a[0].token_ids or other.generations[0].text != a[0].text


def test_greedy_generation_follows_predict_next(client: PlmClient) -> None:
    """Greedy's first token is the argmax of the next-token distribution."""
    g = client.generate("gpt", ["The king"], _sampling(max_new_tokens=1, temperature=0.0)).generations[0]
    top = client.predict_next("gpt", ["The king"], top_k=1, include_tokens=True).predictions[0].tokens[0]
    assert g.token_ids[0] == top.token_ids[0] or g.finish_reason == pb.FINISH_REASON_EOS


def test_generate_stop_sequence(client: PlmClient) -> None:
    base = client.generate("gpt", ["The"], _sampling(max_new_tokens=20, temperature=0.0)).generations[0]
    if len(base.text) < 6:
        pytest.skip("the tiny model ended its text too early to pick a stop sequence")
    stop = base.text[3:6]
    cut = client.generate("gpt", ["The"], _sampling(max_new_tokens=20, temperature=0.0, stop=[stop])).generations[0]
    assert cut.finish_reason == pb.FINISH_REASON_STOP
    assert cut.text == base.text[: base.text.find(stop)]


def test_stream_interval_merges_tokens_and_reads_the_same(tiny_repo: Path) -> None:
    """`stream_interval = 4`: messages between the first and the last carry at least 4 tokens, and the stream
    reads exactly as the unary answer. (How many tokens the first carries depends on how many the engine made
    before the stream read them: tests/test_generate.py checks it goes out at once.)"""
    srv = ServerThread(make_config(tiny_repo, stream_interval=4, models=("gpt",)))
    try:
        with PlmClient(srv.target, timeout=60) as c:
            s = _sampling(max_new_tokens=24, temperature=0.9, seed=5)
            unary = c.generate("gpt", ["Thou art", "The sea"], s).generations
            texts, ids, sizes = ["", ""], [[], []], [[], []]
            for ev in c.generate_stream("gpt", ["Thou art", "The sea"], s):
                texts[ev.index] += ev.text_delta
                ids[ev.index].extend(ev.token_ids)
                sizes[ev.index].append((len(ev.token_ids), bool(ev.finish_reason)))
    finally:
        srv.stop()
    for i, g in enumerate(unary):
        assert texts[i] == g.text and ids[i] == list(g.token_ids)
        assert sizes[i][-1][1]  # the end carries the finish reason
        assert all(n >= 4 and not done for n, done in sizes[i][1:-1])  # in between: at least 4 per message


def test_stream_equals_unary(client: PlmClient) -> None:
    s = _sampling(max_new_tokens=16, temperature=0.8, seed=3)
    unary = client.generate("gpt", ["Thou art", "The sea"], s).generations
    texts, ids, finals = ["", ""], [[], []], {}
    messages = 0
    for ev in client.generate_stream("gpt", ["Thou art", "The sea"], s):
        messages += 1
        texts[ev.index] += ev.text_delta
        ids[ev.index].extend(ev.token_ids)
        if ev.finish_reason:
            finals[ev.index] = ev
    assert messages > 4
    for i, g in enumerate(unary):
        assert texts[i] == g.text and ids[i] == list(g.token_ids)
        assert finals[i].finish_reason == g.finish_reason and finals[i].generated_tokens == g.generated_tokens


def test_generate_unicode_prompt_and_empty_prompt(client: PlmClient) -> None:
    r = client.generate("gpt", ["判断这个词的", "", "😀 émigré"], _sampling(max_new_tokens=5, seed=1))
    assert len(r.generations) == 3 and r.generations[1].prompt_tokens == 0


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(("call", "code", "needle"), [
    (lambda c: c.score("no-such-model", ["x"]), grpc.StatusCode.NOT_FOUND, "no-such-model"),
    (lambda c: c.get_model("nope"), grpc.StatusCode.NOT_FOUND, "nope"),
    (lambda c: c.score("", ["x"]), grpc.StatusCode.INVALID_ARGUMENT, "model"),
    (lambda c: c.generate("ngram-kn", ["the"]), grpc.StatusCode.FAILED_PRECONDITION, "generate"),
    (lambda c: c.score("gpt", []), grpc.StatusCode.INVALID_ARGUMENT, "texts"),
    (lambda c: c.score("gpt", ["ok", "   "]), grpc.StatusCode.INVALID_ARGUMENT, "texts[1]"),
    (lambda c: c.score("gpt", ["word " * 200]), grpc.StatusCode.INVALID_ARGUMENT, "at most"),
    (lambda c: c.score("gpt", ["x" * 30000]), grpc.StatusCode.INVALID_ARGUMENT, "20000"),
    (lambda c: c.score("gpt", ["x"] * 65), grpc.StatusCode.INVALID_ARGUMENT, "64"),
    (lambda c: c.predict_next("gpt", ["x"], top_k=0), grpc.StatusCode.INVALID_ARGUMENT, "top_k"),
    (lambda c: c.predict_next("gpt", ["x"], top_k=-3), grpc.StatusCode.INVALID_ARGUMENT, "top_k"),
    (lambda c: c.predict_next("gpt", ["x"], top_k=1000), grpc.StatusCode.INVALID_ARGUMENT, "100"),
    (lambda c: c.generate("gpt", ["x"], _sampling(temperature=-1.0)), grpc.StatusCode.INVALID_ARGUMENT,
     "sampling.temperature"),
    (lambda c: c.generate("gpt", ["x"], _sampling(temperature=float("nan"))), grpc.StatusCode.INVALID_ARGUMENT,
     "sampling.temperature"),
    (lambda c: c.generate("gpt", ["x"], _sampling(top_p=0.0)), grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_p"),
    (lambda c: c.generate("gpt", ["x"], _sampling(max_new_tokens=0)), grpc.StatusCode.INVALID_ARGUMENT,
     "sampling.max_new_tokens"),
    (lambda c: c.generate("gpt", ["word " * 40], _sampling(max_new_tokens=30)), grpc.StatusCode.INVALID_ARGUMENT,
     "sampling.max_new_tokens 30"),
    (lambda c: c.generate("gpt", ["x"], _sampling(max_new_tokens=500)), grpc.StatusCode.INVALID_ARGUMENT,
     "sampling.max_new_tokens"),
    (lambda c: c.generate("gpt", ["x"], _sampling(stop=[""])), grpc.StatusCode.INVALID_ARGUMENT, "sampling.stop[0]"),
    (lambda c: c.generate("gpt", ["x"], _sampling(max_new_tokens=8, min_new_tokens=9)),
     grpc.StatusCode.INVALID_ARGUMENT, "sampling.min_new_tokens: is 9; must be at most sampling.max_new_tokens (8)"),
    (lambda c: c.generate("gpt", ["x"], _sampling(min_new_tokens=-1)), grpc.StatusCode.INVALID_ARGUMENT,
     "sampling.min_new_tokens"),
])
def test_errors_have_the_right_status_and_name_the_field(client: PlmClient, call, code, needle) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as e:
        call(client)
    assert _code(e) == code
    assert needle in e.value.details() and "request_id=" in e.value.details()


def test_request_id_is_echoed(client: PlmClient) -> None:
    """Unary calls: in the trailing metadata (also of an error). Streams: in the initial metadata."""
    _, call = client.stub.Score.with_call(pb.ScoreRequest(model="gpt", texts=["hi"]),
                                             metadata=(("x-request-id", "abc-123"),))
    assert dict(call.trailing_metadata())["x-request-id"] == "abc-123"
    with pytest.raises(grpc.RpcError) as e:
        client.stub.Score(pb.ScoreRequest(model="nope", texts=["hi"]), metadata=(("x-request-id", "req-9"),))
    assert "request_id=req-9" in e.value.details()
    assert dict(e.value.trailing_metadata())["x-request-id"] == "req-9"
    request = pb.GenerateRequest(model="gpt", prompts=["The king"], sampling=pb.SamplingParams(max_new_tokens=2))
    stream = client.stub.GenerateStream(request, metadata=(("x-request-id", "s-1"),))
    assert dict(stream.initial_metadata())["x-request-id"] == "s-1"
    assert list(stream)


def test_queue_full_is_resource_exhausted(tiny_repo: Path) -> None:
    from plm.service.config import Batching

    tiny_queue = Batching(max_batch_size=1, max_queue_size=2, max_queue_delay_ms=50)
    srv = ServerThread(make_config(tiny_repo, models=("gpt",), model_batching={"gpt": tiny_queue}))
    try:
        def one(_: int) -> grpc.StatusCode:
            with PlmClient(srv.target, retry=NO_RETRY) as c:  # the SDK would retry RESOURCE_EXHAUSTED
                try:
                    c.score("gpt", ["The king is dead."] * 2)
                    return grpc.StatusCode.OK
                except grpc.RpcError as e:
                    return e.code()  # type: ignore[no-any-return]

        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            codes = list(pool.map(one, range(24)))
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes and grpc.StatusCode.OK in codes
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
        text = srv.running.metrics.exposition().decode()
        refused = codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert _sample(text, "plm_rejections_total", model="gpt", reason="queue_full") == refused
    finally:
        srv.stop()


# --------------------------------------------------------------------------------------------- metrics


def test_metrics_exposition(client: PlmClient, server: ServerThread) -> None:
    before = server.running.metrics.exposition().decode()
    client.score("gpt", ["The king is dead."])
    generated = client.generate("gpt", ["The"], _sampling(max_new_tokens=3, seed=1)).generations[0]
    with pytest.raises(grpc.RpcError):
        client.score("nope", ["x"])
    # The server counts a call as it finishes, which can be just after the client has its status: wait for it.
    not_found = {"code": "NOT_FOUND", "method": "Score", "model": "-", "protocol": "grpc"}
    waited = time.monotonic() + 5
    while (_sample(text := server.running.metrics.exposition().decode(), "plm_requests_total", **not_found)
           == _sample(before, "plm_requests_total", **not_found) and time.monotonic() < waited):
        time.sleep(0.01)
    for needle in (
        'plm_requests_total{code="OK",method="Score",model="gpt",protocol="grpc"}',
        'plm_requests_total{code="NOT_FOUND",method="Score",model="-",protocol="grpc"}',
        "plm_request_duration_seconds_bucket", "plm_queue_wait_seconds_bucket", "plm_batch_size_bucket",
        "plm_batch_tokens_bucket", "plm_padding_efficiency_ratio_bucket", "plm_inference_duration_seconds_bucket",
        'plm_generated_tokens_total{model="gpt"}', "plm_time_to_first_token_seconds_bucket",
        'plm_model_ready{model="gpt"} 1.0', "plm_model_load_seconds",
    ):
        assert needle in text, needle

    def moved(name: str, **labels: str) -> float:
        return _sample(text, name, **labels) - _sample(before, name, **labels)

    # The values moved by what this test did (the session's server is shared, so deltas, not totals).
    score = {"method": "Score", "model": "gpt", "protocol": "grpc"}
    assert moved("plm_requests_total", code="OK", **score) == 1
    assert moved("plm_requests_total", **not_found) == 1
    assert moved("plm_request_duration_seconds_count", **score) == 1
    assert moved("plm_generated_tokens_total", model="gpt") == generated.generated_tokens + (
        generated.finish_reason == pb.FINISH_REASON_EOS)  # a step that ends on the end token counts too
    assert moved("plm_time_to_first_token_seconds_count", model="gpt") == 1


# ------------------------------------------------------------------------------ Embed (GPT) and errors


def test_gpt_embeddings_pool_and_contextualise(client: PlmClient) -> None:
    req = pb.EmbedRequest(model="gpt", texts=["The bank of the river", "The bank lent money"], include_tokens=True)
    r = client.stub.Embed(req)
    assert r.dimension == 64 and len(r.embeddings) == 2
    for e in r.embeddings:
        toks = np.array([t.vector for t in e.tokens])
        assert toks.shape[1] == 64
        np.testing.assert_allclose(e.vector, toks.mean(axis=0), atol=1e-5)  # mean pooling over the text's tokens
    # The same word in two contexts: a causal model's vector of "bank" depends only on what came before it,
    # so identical prefixes give identical vectors; a different prefix gives a different one.
    assert r.embeddings[0].tokens[1].token == r.embeddings[1].tokens[1].token
    a, b = (np.array(e.tokens[1].vector) for e in r.embeddings)
    np.testing.assert_allclose(a, b, atol=1e-5)
    other = client.stub.Embed(pb.EmbedRequest(model="gpt", texts=["A bank"], include_tokens=True)).embeddings[0]
    c = np.array(other.tokens[1].vector)
    assert float(a @ c / np.linalg.norm(a) / np.linalg.norm(c)) < 0.9999
    unit = client.stub.Embed(pb.EmbedRequest(model="gpt", texts=["The king"], normalize=True)).embeddings[0]
    assert np.linalg.norm(unit.vector) == pytest.approx(1.0, abs=1e-5)
    none = client.stub.Embed(pb.EmbedRequest(model="gpt", texts=["The king"], pooling=pb.POOLING_NONE)).embeddings[0]
    assert not none.vector and not unit.tokens  # POOLING_NONE: tokens only; MEAN without include_tokens: vector only
    detailed = client.stub.Embed(pb.EmbedRequest(model="gpt", texts=["The king"], include_tokens=True)).embeddings[0]
    assert len(none.tokens) == len(detailed.tokens) >= 2


@pytest.mark.parametrize(("request_", "method", "code", "needle"), [
    (pb.FillMaskRequest(model="gpt", texts=["The [MASK] is dead."]), "FillMask", grpc.StatusCode.FAILED_PRECONDITION,
     "fill_mask"),
    (pb.PredictNextSentenceRequest(model="gpt", pairs=[pb.SentencePair(a="a", b="b")]), "PredictNextSentence",
     grpc.StatusCode.FAILED_PRECONDITION, "next_sentence"),
    (pb.PredictNextSentenceRequest(model="gpt"), "PredictNextSentence", grpc.StatusCode.INVALID_ARGUMENT, "pairs"),
    (pb.EmbedRequest(model="gpt", texts=["x"], pooling=pb.POOLING_CLS), "Embed", grpc.StatusCode.INVALID_ARGUMENT,
     "pooling"),
    (pb.EmbedRequest(model="gpt", texts=["x"], pooling=99), "Embed", grpc.StatusCode.INVALID_ARGUMENT, "pooling"),
    (pb.EmbedRequest(model="gpt", texts=["x"], nearest_k=3), "Embed", grpc.StatusCode.FAILED_PRECONDITION,
     "word2vec"),
    (pb.EmbedRequest(model="gpt"), "Embed", grpc.StatusCode.INVALID_ARGUMENT, "texts"),
    (pb.EmbedRequest(model="ngram-kn", texts=["x"]), "Embed", grpc.StatusCode.FAILED_PRECONDITION, "embed"),
    (pb.FillMaskRequest(model="gpt", texts=["x"], top_k=0), "FillMask", grpc.StatusCode.INVALID_ARGUMENT, "top_k"),
])
def test_lineage_rpc_errors(client: PlmClient, request_, method: str, code: grpc.StatusCode,  # type: ignore[no-untyped-def]
                            needle: str) -> None:
    with pytest.raises(grpc.RpcError) as e:
        getattr(client.stub, method)(request_)
    assert _code(e) == code and needle in e.value.details()


# -------------------------------------------------------------------------------------------- Classify

# Short, so that the prompt fits the tiny fixture's 64-token window.
DEMOS = [pb.Demonstration(text="Alas!", label="tragedy"), pb.Demonstration(text="Ha!", label="comedy")]
TEMPLATE = "{text} = {label}\n"


def _classify(client: PlmClient, **kw: object) -> pb.ClassifyResponse:
    base: dict[str, object] = {"model": "gpt", "demonstrations": DEMOS, "labels": ["tragedy", "comedy", "history"],
                               "queries": ["To be.", "Now is the winter."], "template": TEMPLATE}
    base.update(kw)
    return client.stub.Classify(pb.ClassifyRequest(**base))  # type: ignore[arg-type]


def test_classify_scores_are_the_label_continuations(client: PlmClient) -> None:
    r = _classify(client)
    assert r.prefix_tokens > 0 and len(r.results) == 2
    for res in r.results:
        probs = [s.probability for s in res.scores]
        assert sum(probs) == pytest.approx(1.0) and res.label == res.scores[int(np.argmax(probs))].label
        for s in res.scores:
            assert s.score == pytest.approx(s.log_likelihood) and s.log_likelihood < 0 and s.num_tokens >= 1
    # The same numbers through Score: the prompt written out, the label's tokens at its end.
    prompt = "".join(f"{d.text} = {d.label}\n" for d in DEMOS) + "To be. ="
    for s in r.results[0].scores:
        full = client.score("gpt", [prompt + " " + s.label], add_eos=False).scores[0]
        tail = sum(t.log_prob for t in full.tokens[-s.num_tokens:])
        assert tail == pytest.approx(s.log_likelihood, abs=1e-4)


def test_classify_normalisations_and_calibration(client: PlmClient) -> None:
    raw = _classify(client).results[0].scores
    mean = _classify(client, scoring=pb.LABEL_SCORING_TOKEN_MEAN).results[0].scores
    char = _classify(client, scoring=pb.LABEL_SCORING_PER_CHAR).results[0].scores
    for r, m, c in zip(raw, mean, char, strict=True):
        assert m.score == pytest.approx(r.log_likelihood / r.num_tokens, abs=1e-6)
        assert c.score == pytest.approx(r.log_likelihood / len(r.label), abs=1e-6)
    cal = _classify(client, calibrate=True, content_free="N/A").results[0].scores
    prior = _classify(client, queries=["N/A"]).results[0].scores
    for r, c, p in zip(raw, cal, prior, strict=True):
        assert c.score == pytest.approx(r.log_likelihood - p.log_likelihood, abs=1e-4)


def test_classify_alone_equals_batched(client: PlmClient) -> None:
    queries = ["To be.", "A horse!", "Now is the winter."]
    together = _classify(client, queries=queries).results
    for q, t in zip(queries, together, strict=True):
        alone = _classify(client, queries=[q]).results[0]
        np.testing.assert_allclose([s.log_likelihood for s in alone.scores], [s.log_likelihood for s in t.scores],
                                   atol=1e-5)


@pytest.mark.parametrize(("kw", "code", "needle"), [
    ({"labels": ["only"]}, grpc.StatusCode.INVALID_ARGUMENT, "labels"),
    ({"labels": ["a", "a"]}, grpc.StatusCode.INVALID_ARGUMENT, "duplicates"),
    ({"template": "{label}: {text}"}, grpc.StatusCode.INVALID_ARGUMENT, "template"),
    ({"queries": []}, grpc.StatusCode.INVALID_ARGUMENT, "queries"),
    ({"demonstrations": DEMOS * 10}, grpc.StatusCode.INVALID_ARGUMENT, "demonstrations"),
    ({"model": "ngram-kn", "queries": ["x"]}, grpc.StatusCode.OK, ""),
])
def test_classify_errors(client: PlmClient, kw: dict[str, object], code: grpc.StatusCode, needle: str) -> None:
    if code == grpc.StatusCode.OK:  # any causal LM classifies, word-level ones too
        assert _classify(client, **kw).results[0].label in ("tragedy", "comedy", "history")
        return
    with pytest.raises(grpc.RpcError) as e:
        _classify(client, **kw)
    assert e.value.code() == code and needle in e.value.details()


def test_generate_truncates_the_prompt_when_asked(client: PlmClient) -> None:
    long = "the king is dead and the queen is sad " * 8  # longer than the whole window
    r = client.stub.Generate(pb.GenerateRequest(model="gpt", prompts=[long], truncate_prompt=True,
                                                sampling=_sampling(max_new_tokens=40, temperature=0.0)))
    g = r.generations[0]
    assert g.prompt == long and g.prompt_tokens == 63 - 40 and 1 <= g.generated_tokens <= 40


def test_a_failed_start_closes_the_models(tiny_repo: Path) -> None:
    """HTTP's port in use: start_server raises, and no model's batch worker is left running behind it."""
    import socket

    from plm.service.server import start_server

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = make_config(tiny_repo, models=("ngram-kn", "bert"), http_port=taken.getsockname()[1])

        async def start() -> list[str]:
            with pytest.raises(OSError):
                await start_server(config)  # type: ignore[arg-type]
            await asyncio.sleep(0)  # let cancelled workers finish
            return [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("batcher-")]

        assert asyncio.run(start()) == []
