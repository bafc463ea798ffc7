"""The per-call path's economies keep what the edge promises: a request id sent is echoed, one not sent costs no
trailer but still names the call in errors and the access line."""

from __future__ import annotations

import grpc
import pytest

from plm.api.v1 import plm_pb2 as pb
from plm.api.v1 import plm_pb2_grpc as pb_grpc
from tests.conftest import ServerThread


@pytest.fixture()
def stub(server: ServerThread) -> pb_grpc.LanguageModelServiceStub:
    channel = grpc.insecure_channel(server.target)
    yield pb_grpc.LanguageModelServiceStub(channel)
    channel.close()


def test_no_request_id_sent_no_trailer(stub: pb_grpc.LanguageModelServiceStub) -> None:
    _, call = stub.PredictNext.with_call(pb.PredictNextRequest(model="ngram-kn", contexts=["the king"]))
    assert "x-request-id" not in dict(call.trailing_metadata() or ())
    with pytest.raises(grpc.RpcError) as e:
        stub.PredictNext(pb.PredictNextRequest(model="nope", contexts=["the king"]))
    assert "x-request-id" not in dict(e.value.trailing_metadata() or ())
    assert "(request_id=" in e.value.details()  # the server's own id, as in its access line


def test_request_id_sent_is_echoed(stub: pb_grpc.LanguageModelServiceStub) -> None:
    _, call = stub.PredictNext.with_call(pb.PredictNextRequest(model="ngram-kn", contexts=["the king"]),
                                         metadata=(("x-request-id", "pc-1"),))
    assert dict(call.trailing_metadata())["x-request-id"] == "pc-1"


def test_observe_many_equals_observe_per_value() -> None:
    """A batch's values observed at once give the same buckets, count and sum as one observation each, bounds
    included (a value equal to a bound falls in that bound's bucket)."""
    from plm.service.metrics import observe_many
    from prometheus_client import CollectorRegistry, Histogram

    values = [0.0005, 0.0004, 0.003, 0.001, 0.2, 40.0, 0.001, 0.0]
    registry = CollectorRegistry()
    h = Histogram("h", "h", ["model"], buckets=(0.0005, 0.001, 0.0025, 0.1, 1.0), registry=registry)
    for v in values:
        h.labels("one").observe(v)
    observe_many(h.labels("many"), values)
    seen: dict[str, dict[tuple[str, str | None], float]] = {"one": {}, "many": {}}
    for f in registry.collect():
        for s in f.samples:
            seen[s.labels["model"]][(s.name, s.labels.get("le"))] = s.value
    assert seen["one"].keys() == seen["many"].keys()
    for key, value in seen["one"].items():
        assert seen["many"][key] == pytest.approx(value), key
