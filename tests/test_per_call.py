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
