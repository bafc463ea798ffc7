"""Fairness across models: a flood on one model does not queue another model's requests behind it.

Each model has its own queue and its own batch worker (service/batcher.py), so a second model's request
is never behind the first model's backlog. Shown with a real server: GPT gets ~900 queued rows that run one
per batch; a BERT FillMask sent afterwards is answered while GPT's backlog is still there.
"""

from __future__ import annotations

import time
from pathlib import Path

import grpc
from plm.service.config import Batching

from plm.api.v1 import plm_pb2 as pb
from plm.api.v1 import plm_pb2_grpc as pb_grpc
from tests.conftest import ServerThread, make_config

LONG = "the king and the queen of the land went to the sea to see the ships that came from the far west"


def test_a_flooded_model_does_not_delay_another(tiny_repo: Path) -> None:
    slow = Batching(max_batch_size=1, max_queue_size=4096)  # GPT's backlog drains one row per run
    srv = ServerThread(make_config(tiny_repo, models=("gpt", "bert"), model_batching={"gpt": slow}))
    try:
        with grpc.insecure_channel(srv.target) as channel:
            stub = pb_grpc.LanguageModelServiceStub(channel)
            flood = [stub.Score.future(pb.ScoreRequest(model="gpt", texts=[LONG] * 60), timeout=300)
                     for _ in range(15)]
            gpt = srv.running.registry.get("gpt").batcher
            deadline = time.monotonic() + 60
            while gpt.depth < 300:  # the backlog is queued before BERT's request is sent
                assert time.monotonic() < deadline and not any(f.done() for f in flood)
                time.sleep(0.005)
            filled = stub.FillMask(pb.FillMaskRequest(model="bert", texts=["the king is [MASK]."]), timeout=60)
            backlog = gpt.depth
            assert filled.results[0].masks[0].candidates
            assert backlog > 0, "GPT's backlog drained before BERT answered: BERT may have queued behind it"
            assert all(len(f.result().scores) == 60 for f in flood)  # and the flood itself is all served
    finally:
        srv.stop()
