"""A small typed Python client for plm.v1 (synchronous), used by the `plm client` verbs and the tests."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.pb.plm.v1 import plm_pb2 as pb
from service.pb.plm.v1 import plm_pb2_grpc as pb_grpc


class PlmClient:
    """One channel to one server. `timeout` is each call's deadline in seconds (None = none)."""

    def __init__(self, target: str = "127.0.0.1:50051", timeout: float | None = 60.0,
                 max_message_bytes: int = 64 * 1024 * 1024,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes)]
        # credentials: TLS / mutual TLS / a bearer token (client/credentials.py); None = plaintext.
        self.channel = (grpc.secure_channel(target, credentials, options) if credentials is not None
                        else grpc.insecure_channel(target, options))
        self.stub = pb_grpc.LanguageModelServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.timeout = timeout

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> PlmClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _md(self, request_id: str | None) -> tuple[tuple[str, str], ...]:
        return (("x-request-id", request_id or uuid.uuid4().hex[:16]),)

    def score(self, model: str, texts: Sequence[str], *, add_eos: bool = True, per_token: bool = True,
              request_id: str | None = None) -> pb.ScoreResponse:
        req = pb.ScoreRequest(model=model, texts=list(texts), add_eos=add_eos, per_token=per_token)
        return self.stub.Score(req, timeout=self.timeout, metadata=self._md(request_id))

    def predict_next(self, model: str, contexts: Sequence[str], *, top_k: int = 5, include_tokens: bool = False,
                     request_id: str | None = None) -> pb.PredictNextResponse:
        req = pb.PredictNextRequest(model=model, contexts=list(contexts), top_k=top_k, include_tokens=include_tokens)
        return self.stub.PredictNext(req, timeout=self.timeout, metadata=self._md(request_id))

    def generate(self, model: str, prompts: Sequence[str], sampling: pb.SamplingParams | None = None,
                 request_id: str | None = None) -> pb.GenerateResponse:
        req = pb.GenerateRequest(model=model, prompts=list(prompts), sampling=sampling)
        return self.stub.Generate(req, timeout=self.timeout, metadata=self._md(request_id))

    def generate_stream(self, model: str, prompts: Sequence[str], sampling: pb.SamplingParams | None = None,
                        request_id: str | None = None) -> Iterator[pb.GenerateStreamResponse]:
        req = pb.GenerateRequest(model=model, prompts=list(prompts), sampling=sampling)
        return self.stub.GenerateStream(req, timeout=self.timeout, metadata=self._md(request_id))

    def list_models(self) -> pb.ListModelsResponse:
        return self.stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout)

    def get_model(self, name: str) -> pb.ModelInfo:
        return self.stub.GetModel(pb.GetModelRequest(name=name), timeout=self.timeout)

    def health_status(self, service: str = "") -> str:
        resp = self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
