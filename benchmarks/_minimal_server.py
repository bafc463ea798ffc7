"""The ceiling under `plm serve`: a minimal grpc.aio server of one model (`serving.py --ceiling`), and the per-text
work from text to response that it shares with serving.py's raw side.

The work (`fill_responses`, `score_responses`) is what "raw with tokenization" does per text: the adapter's own
tokenizer, right-padding, one ONNX Runtime run, BERT's top-k of the blank or GPT's per-token and per-word sums,
the response message. The server wraps only that in gRPC: plm.v1's `FillMask` (BERT) or `Score` (GPT) on uvloop,
requests parsed by protobuf, each call queued with a future; one worker takes up to twice the batch cap of what is
queued (waiting up to the server's `max_queue_delay_ms` for company when the queue is short) and on one executor
thread (the session has plm's options and threads) tokenizes it, splits it into batches of like lengths as plm's
padding floor does (`batches`: at most `max_batch_size` rows, `min_padding_efficiency` of the cells real), runs
them and answers every call of the round with its serialized response. No validation, metrics, logging,
request ids, admission or deadlines: what any Python grpc.aio server must spend per call, and no more.

    python benchmarks/_minimal_server.py --repository repository --model bert --port 50071
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import contextlib
import math
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import numpy as np
from plm.service.config import Runtime, ServerConfig
from plm.service.families.base import MASK, ModelAdapter, top_of_rows
from plm.service.metrics import Metrics
from plm.service.registry import load_model
from plm.service.runtime import OrtSession, open_graph, pad_right

from plm.api.v1 import plm_pb2 as pb

SERVICE = "plm.v1.LanguageModelService"
TOP_K = 5  # FillMask's default top_k, which the load generator's requests leave unset


def load(repository: Path, name: str, runtime: Runtime | None = None) -> tuple[Any, OrtSession]:
    """The model's adapter (for its tokenizer and specials only) and a session on its graph with `runtime`'s
    settings (by default the server's own), without plm's metrics."""
    config = ServerConfig(repository=repository, runtime=Runtime(providers=("cpu",)))  # tokenizers only
    model = load_model(repository / name, config, Metrics())
    return model, open_graph(model.folder, model.spec, "model", runtime or ServerConfig().runtime, name, None)


def gpt_logprobs(session: OrtSession, eos: int, rows: list[list[int]]) -> np.ndarray:
    """Each row's token log-probs, (B, T); rows right-padded with EOS."""
    ids, mask = pad_right(rows, eos)  # (B, T)
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    return session.run(["token_logprobs"], {"input_ids": ids, "attention_mask": mask,
                                            "position_ids": pos})["token_logprobs"]


def bert_logprobs(session: OrtSession, pad: int, rows: list[list[int]], positions: list[list[int]]) -> np.ndarray:
    """The log-probs over the vocabulary at each row's blanks, (B, M, V)."""
    ids, mask = pad_right(rows, pad)  # (B, T)
    return session.run(["mask_logprobs"], {
        "input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids),
        "mask_positions": np.asarray(positions, dtype=np.int64)})["mask_logprobs"]


def score_rows(g: Any, texts: list[str]) -> list[Any]:
    """Each text's tokens (the adapter's `Encoded`); its row is BOS, the ids, EOS."""
    return [g.encode(t) for t in texts]


def score_answers(g: Any, session: OrtSession, texts: list[str], encoded: list[Any]) -> list[pb.ScoreResponse]:
    """`Score`'s response for each text alone (per-token and per-word fields, EOS scored), in one run."""
    lp = gpt_logprobs(session, g.eos_id, [[g._bos, *e.ids, g.eos_id] for e in encoded])
    eos_text = g.token_text(g.eos_id)
    out = []
    for k, (text, e) in enumerate(zip(texts, encoded, strict=True)):
        lps = lp[k, 1:len(e.ids) + 2].astype(np.float64).tolist()
        word_lps = [0.0] * len(e.words)
        for t, w in enumerate(e.word_index):
            word_lps[w] += lps[t]
        total = sum(lps)
        out.append(pb.ScoreResponse(model=g.name, model_version=g.version, method="causal", ranking=[0], scores=[
            pb.SentenceScore(
                text=text, log_prob=total, log10_prob=total / math.log(10.0),
                perplexity=math.exp(-total / len(lps)), word_perplexity=math.exp(-total / (len(e.words) + 1)),
                num_tokens=len(lps), num_words=len(e.words), num_oov=sum(e.oov),
                tokens=[pb.TokenScore(id=t, token=s, log_prob=v, ngram_length=0, oov=o) for t, s, v, o in
                        zip([*e.ids, g.eos_id], [*e.tokens, eos_text], lps, [*e.oov, False], strict=True)],
                words=[pb.WordScore(word=w, log_prob=v) for w, v in zip(e.words, word_lps, strict=True)])]))
    return out


def score_responses(g: Any, session: OrtSession, texts: list[str]) -> list[pb.ScoreResponse]:
    return score_answers(g, session, texts, score_rows(g, texts))


class Blank(NamedTuple):
    row: list[int]  # [CLS] left [MASK] right [SEP]
    at: int  # the blank's column
    left: str
    right: str


def fill_rows(b: Any, masked: list[str]) -> list[Blank]:
    """Each masked text's row: the text before and after its one blank tokenized apart, as plm does."""
    out = []
    for text in masked:
        left, right = text.split(MASK, 1)
        before = b.encode_ids(left) if left.strip() else []
        out.append(Blank([b._cls, *before, b.mask_id, *(b.encode_ids(right) if right.strip() else []), b.eos_id],
                         len(before) + 1, left, right))
    return out


def fill_answers(b: Any, session: OrtSession, allowed: np.ndarray, masked: list[str],
                 blanks: list[Blank]) -> list[pb.FillMaskResponse]:
    """`FillMask`'s response (top 5 of the one blank) for each masked text alone, in one run; `allowed` is
    ~never_generate_mask(), made once by the caller."""
    lp = bert_logprobs(session, b._pad, [x.row for x in blanks], [[x.at] for x in blanks])
    tops = top_of_rows(lp[:, 0], allowed, TOP_K)  # the batch's blanks together, as the server takes them
    out = []
    for (ids, lps), text, x in zip(tops, masked, blanks, strict=True):
        cands = []
        for t, v in zip(ids.tolist(), lps.astype(np.float64).tolist(), strict=True):
            if math.isfinite(v):
                word = b.token_text(t)
                cands.append(pb.FillMaskCandidate(
                    score=math.exp(v) if v > -745 else 0.0, token=t, token_str=word,
                    sequence=x.left + (word.strip() or word) + x.right, log_prob=v, token_ids=[t]))
        out.append(pb.FillMaskResponse(model=b.name, model_version=b.version, results=[
            pb.FillMaskResult(text=text, masks=[pb.MaskFill(index=0, candidates=cands)])]))
    return out


def fill_responses(b: Any, session: OrtSession, allowed: np.ndarray, masked: list[str]) -> list[pb.FillMaskResponse]:
    return fill_answers(b, session, allowed, masked, fill_rows(b, masked))


def row_lengths(model: Any, texts: list[str]) -> list[int]:
    """The tokens of each text's row (specials included): what its batch pads to."""
    if model.family == "bert":
        return [len(x.row) for x in fill_rows(model, texts)]
    return [len(e.ids) + 2 for e in score_rows(model, texts)]


def batches(lengths: list[int], cap: int, floor: float) -> list[list[int]]:
    """One round's rows (indices into `lengths`) in batches, longest first: a row joins the batch while at least
    `floor` of the batch's padded cells stay real tokens, and at most `cap` rows (plm's padding floor)."""
    out: list[list[int]] = []
    batch: list[int] = []
    real = 0
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if batch and (len(batch) == cap or real + lengths[i] < floor * (len(batch) + 1) * lengths[batch[0]]):
            out.append(batch)
            batch, real = [], 0
        batch.append(i)
        real += lengths[i]
    return [*out, batch] if batch else out


class _Work(NamedTuple):
    method: str  # the one RPC served
    request_type: Any
    prepare: Callable[[list[str]], list[Any]]  # texts -> their rows
    length: Callable[[Any], int]  # a prepared row -> its tokens
    answer: Callable[[list[str], list[Any]], list[Any]]  # texts, their rows -> responses, in one run


def _work(model: ModelAdapter, session: OrtSession) -> _Work:
    if model.family == "bert":
        allowed = ~model.never_generate_mask()
        return _Work("FillMask", pb.FillMaskRequest, lambda texts: fill_rows(model, texts), lambda x: len(x.row),
                     lambda texts, rows: fill_answers(model, session, allowed, texts, rows))
    return _Work("Score", pb.ScoreRequest, lambda texts: score_rows(model, texts), lambda e: len(e.ids) + 2,
                 lambda texts, rows: score_answers(model, session, texts, rows))


async def serve(repository: Path, name: str, port: int) -> None:
    model, session = load(repository, name)
    work = _work(model, session)
    batching = ServerConfig().batching
    cap, wait, floor = batching.max_batch_size, batching.max_queue_delay_ms / 1000, batching.min_padding_efficiency
    queue: collections.deque[tuple[str, asyncio.Future[bytes]]] = collections.deque()
    arrived = asyncio.Event()
    pool = concurrent.futures.ThreadPoolExecutor(1)  # the model's one thread
    loop = asyncio.get_running_loop()

    def run_round(texts: list[str]) -> list[bytes]:
        rows = work.prepare(texts)
        out: list[bytes] = [b""] * len(texts)
        for batch in batches([work.length(r) for r in rows], cap, floor):
            for i, response in zip(batch, work.answer([texts[i] for i in batch], [rows[i] for i in batch]),
                                   strict=True):
                out[i] = response.SerializeToString()
        return out

    async def worker() -> None:
        while True:
            if not queue:
                arrived.clear()
                await arrived.wait()
            if len(queue) < cap:  # a short wait for company
                await asyncio.sleep(wait)
            taken = [queue.popleft() for _ in range(min(len(queue), 2 * cap))]
            answers = await loop.run_in_executor(pool, run_round, [text for text, _ in taken])
            for (_, future), body in zip(taken, answers, strict=True):
                if not future.done():
                    future.set_result(body)

    async def answer(request: Any, context: Any) -> bytes:
        future: asyncio.Future[bytes] = loop.create_future()
        queue.append((request.texts[0], future))
        arrived.set()
        return await future

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
        work.method: grpc.unary_unary_rpc_method_handler(answer, request_deserializer=work.request_type.FromString)}),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    task = asyncio.create_task(worker())
    try:
        await server.wait_for_termination()
    finally:
        task.cancel()


class MinimalServer:
    """The minimal server in a child process on a free loopback port, ready once its port accepts a channel."""

    def __init__(self, repository: Path, model: str, start_timeout: float = 120.0) -> None:
        from plm.client.local_server import free_port

        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, __file__, "--repository", str(repository), "--model", model,
                                      "--port", str(self.port)], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + start_timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            with grpc.insecure_channel(self.target) as ch, contextlib.suppress(grpc.FutureTimeoutError):
                grpc.channel_ready_future(ch).result(timeout=1)
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the minimal {model} server did not start within {start_timeout:.0f} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> MinimalServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repository", type=Path, default=Path("repository"))
    ap.add_argument("--model", default="bert", help="a BERT (FillMask) or GPT (Score) folder of the repository")
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    try:
        import uvloop
    except ImportError:  # as plm serve: asyncio's own loop where uvloop is not installed
        asyncio.run(serve(args.repository, args.model, args.port))
    else:
        uvloop.run(serve(args.repository, args.model, args.port))


if __name__ == "__main__":
    main()
