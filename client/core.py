"""What the sync and asyncio clients share: targets, deadlines, the retry policy, TLS, the token, request building.

Nothing here does I/O: `client.client.PlmClient` and `client.aio.AsyncPlmClient` own the channels and the calls.
The request builders are the one place where keyword arguments become plm.v1 request messages, so both clients
(and the CLI through them) build identical requests.
"""

from __future__ import annotations

import itertools
import random
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import grpc
from grpc_health.v1 import health_pb2_grpc

from plm.api.v1 import plm_pb2 as pb
from plm.api.v1 import plm_pb2_grpc as pb_grpc

DEFAULT_TARGET = "127.0.0.1:50051"

# The statuses a retry can fix: the replica is down/draining (UNAVAILABLE) or its queue is full right now
# (RESOURCE_EXHAUSTED, refused before any work). Everything else (INVALID_ARGUMENT, NOT_FOUND, DEADLINE_EXCEEDED,
# INTERNAL, ...) would fail the same way again or may already have done work.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter, bounded in attempts and by the call's deadline."""

    max_attempts: int = 4  # the first try + 3 retries: rides out a replica restart, does not hammer a full queue
    initial_backoff: float = 0.1  # seconds; the cap of the first wait
    max_backoff: float = 2.0  # seconds; no single wait is longer
    multiplier: float = 2.0
    retry_on: frozenset[grpc.StatusCode] = RETRYABLE

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"RetryPolicy.max_attempts is {self.max_attempts}; must be >= 1 (1 = no retries)")
        if not 0 <= self.initial_backoff <= self.max_backoff or self.multiplier < 1:
            raise ValueError("RetryPolicy: need 0 <= initial_backoff <= max_backoff and multiplier >= 1")
        if not self.retry_on <= RETRYABLE:
            extra = ", ".join(sorted(c.name for c in self.retry_on - RETRYABLE))
            raise ValueError(f"RetryPolicy.retry_on: {extra} may have done work on the server; only "
                             "UNAVAILABLE and RESOURCE_EXHAUSTED are safe to retry")

    def wait(self, attempts_done: int, code: grpc.StatusCode | None, deadline: float | None,
             rng: random.Random) -> float | None:
        """Seconds to sleep before the next attempt, or None to give up and raise the last error.

        Gives up when the status is not retryable, the attempts are spent, or the wait would pass the deadline.
        """
        if code not in self.retry_on or attempts_done >= self.max_attempts:
            return None
        cap = min(self.max_backoff, self.initial_backoff * self.multiplier ** (attempts_done - 1))
        wait = rng.uniform(0.0, cap)  # full jitter: clients that failed together do not come back together
        if deadline is not None and time.monotonic() + wait >= deadline:
            return None
        return wait


NO_RETRY = RetryPolicy(max_attempts=1)


@dataclass(frozen=True)
class TlsConfig:
    """Channel security. Without a CA file the system's roots verify the server; cert + key add mutual TLS."""

    ca_file: str | Path | None = None
    cert_file: str | Path | None = None
    key_file: str | Path | None = None
    server_name: str | None = None  # the name the server's certificate must carry when it differs from the host

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("TlsConfig: give both cert_file and key_file (mutual TLS) or neither")

    def credentials(self) -> grpc.ChannelCredentials:
        def read(p: str | Path | None) -> bytes | None:
            return Path(p).read_bytes() if p is not None else None

        return grpc.ssl_channel_credentials(read(self.ca_file), read(self.key_file), read(self.cert_file))

    def options(self) -> list[tuple[str, Any]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []



def _loopback(target: str) -> bool:
    """host:port (or [v6]:port, unix:...) names this machine."""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    host = target.rsplit(":", 1)[0].strip("[]") if ":" in target else target
    return host in ("localhost", "::1") or host.startswith("127.")


@dataclass
class Connection:
    """Targets, channel settings and per-call metadata: everything a client decides before a call leaves."""

    targets: tuple[str, ...]
    timeout: float | None
    retry: RetryPolicy
    tls: TlsConfig | None
    token: str | None
    channel_options: tuple[tuple[str, Any], ...]
    rng: random.Random = field(default_factory=random.Random)
    _turn: itertools.count[int] = field(default_factory=itertools.count)

    @classmethod
    def build(cls, targets: str | Sequence[str], timeout: float | None, retry: RetryPolicy | None,
              tls: TlsConfig | None, token: str | None, max_message_bytes: int,
              channel_options: Sequence[tuple[str, Any]]) -> Connection:
        names = (targets,) if isinstance(targets, str) else tuple(targets)
        if not names or not all(names):
            raise ValueError("targets: give at least one host:port")
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout is {timeout}; must be > 0 seconds or None (no deadline)")
        if token is not None and (not token or any(c in token for c in "\r\n")):
            raise ValueError("token must be a non-empty string without line breaks")
        if token is not None and tls is None and not all(_loopback(n) for n in names):
            # A bearer token in plaintext is readable by anyone on the path: only over TLS, or on this machine.
            raise ValueError("a token is sent only over TLS or to a loopback target; give tls= (--tls-ca/--tls)")
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # gRPC's own reconnect backoff grows to 120 s: a replica that came back would stay unused for minutes
            # while our bounded retries fail fast against it.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ]
        options += tls.options() if tls else []
        options += list(channel_options)
        return cls(names, timeout, retry or RetryPolicy(), tls, token, tuple(options))

    def next_index(self) -> int:
        """Round-robin over the targets, one step per attempt (a retry goes to the next replica)."""
        return next(self._turn) % len(self.targets)

    def deadline(self, timeout: float | None) -> float | None:
        """The call's absolute deadline (time.monotonic): the per-call timeout, else the client's default.

        It covers every attempt and every wait between them, as a gRPC deadline covers the whole call.
        """
        t = self.timeout if timeout is None else timeout
        return None if t is None else time.monotonic() + t

    def metadata(self, request_id: str | None) -> tuple[tuple[str, str], ...]:
        # One request id for every attempt of a call: the server's log lines of the retries correlate.
        md = [("x-request-id", request_id or uuid.uuid4().hex[:16])]
        if self.token is not None:
            md.append(("authorization", f"Bearer {self.token}"))
        return tuple(md)


class ClientBase:
    """The part of both clients that is not I/O style: targets → channels → stubs, and which stub a call uses."""

    def __init__(self, targets: str | Sequence[str] = DEFAULT_TARGET, *, timeout: float | None = 60.0,
                 retry: RetryPolicy | None = None, tls: TlsConfig | None = None, token: str | None = None,
                 max_message_bytes: int = 64 * 1024 * 1024, interceptors: Sequence[Any] = (),
                 channel_options: Sequence[tuple[str, Any]] = ()) -> None:
        self.conn = Connection.build(targets, timeout, retry, tls, token, max_message_bytes, channel_options)
        self.channels = [self._open(t, list(self.conn.channel_options), list(interceptors))
                         for t in self.conn.targets]
        self._plm = [pb_grpc.LanguageModelServiceStub(c) for c in self.channels]
        self._health = [health_pb2_grpc.HealthStub(c) for c in self.channels]
        self.stub = self._plm[0]  # the first target's raw stub: no retries, no default deadline
        self.health = self._health[0]

    def _open(self, target: str, options: list[tuple[str, Any]], interceptors: list[Any]) -> Any:
        raise NotImplementedError

    @property
    def timeout(self) -> float | None:
        return self.conn.timeout

    def _rpc(self, method: str, first: int, attempt: int) -> Any:
        """The stub method ("Health.Check" or a plm.v1 method name) for a call's `attempt` (1, 2, ...): the
        call's first target comes from the round-robin (`first`), each retry goes to the target after the one
        that just failed — never back to it while others are left, however the calls of other threads
        interleave."""
        i = (first + attempt - 1) % len(self.channels)
        return self._health[i].Check if method == "Health.Check" else getattr(self._plm[i], method)


class StreamHandle:
    """What both clients' streams share: the attempt in flight, so that `cancel()` reaches it."""

    def __init__(self) -> None:
        self.attempt: Any = None  # the gRPC call of the current attempt (None before the first)
        self.cancelled = False

    def cancel(self) -> bool:
        """Stop the stream: the server stops generating; reading on raises CANCELLED (or ends, if not started)."""
        self.cancelled = True
        return bool(self.attempt.cancel()) if self.attempt is not None else True


def remaining(deadline: float | None) -> float | None:
    """The timeout of one attempt: what is left of the call's deadline (never negative)."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def status_of(err: BaseException) -> grpc.StatusCode | None:
    code = getattr(err, "code", None)
    return code() if callable(code) else None


# ---------------------------------------------------------------------------------------- request builders
# One builder per RPC: its keyword arguments are the client method's (client.client and client.aio wrap each
# builder, so the signature is written once). Unset optional fields (None) stay unset: the server's documented
# defaults apply. `timeout` (seconds, covering every attempt) and `request_id` are per call.

Req = TypeVar("Req")


@dataclass(frozen=True)
class Prepared(Generic[Req]):
    """One call before it leaves: the request message and the call's own options."""

    request: Req
    timeout: float | None = None  # None: the client's default deadline
    request_id: str | None = None  # None: a fresh id (sent as x-request-id, echoed in the server's logs)

_POOLING = {"mean": pb.POOLING_MEAN, "cls": pb.POOLING_CLS, "none": pb.POOLING_NONE}
_SCORING = {"sum": pb.LABEL_SCORING_SUM, "token_mean": pb.LABEL_SCORING_TOKEN_MEAN,
            "per_char": pb.LABEL_SCORING_PER_CHAR}


def _enum(value: str | int | None, names: Mapping[str, int], field_name: str) -> Any:  # a pb enum value
    if value is None or isinstance(value, int):
        return value
    if value not in names:
        raise ValueError(f"{field_name} is {value!r}; use one of {', '.join(names)}")
    return names[value]


def sampling_params(sampling: pb.SamplingParams | Mapping[str, Any] | None) -> pb.SamplingParams | None:
    """A SamplingParams message, or one built from a mapping such as {"temperature": 0, "max_new_tokens": 8}."""
    if sampling is None or isinstance(sampling, pb.SamplingParams):
        return sampling
    return pb.SamplingParams(**sampling)


def score_request(model: str, texts: Sequence[str], *, add_eos: bool | None = None, per_token: bool | None = None,
                  timeout: float | None = None, request_id: str | None = None) -> Prepared[pb.ScoreRequest]:
    """Log-probability of each text (add_eos default True, per_token default True)."""
    req = pb.ScoreRequest(model=model, texts=list(texts), add_eos=add_eos, per_token=per_token)
    return Prepared(req, timeout, request_id)


def predict_next_request(model: str, contexts: Sequence[str], *, top_k: int | None = None,
                         include_tokens: bool = False, beam_width: int | None = None,
                         max_word_tokens: int | None = None, timeout: float | None = None,
                         request_id: str | None = None) -> Prepared[pb.PredictNextRequest]:
    """The top_k (default 5) most probable next words after each context."""
    req = pb.PredictNextRequest(model=model, contexts=list(contexts), top_k=top_k, include_tokens=include_tokens,
                                beam_width=beam_width, max_word_tokens=max_word_tokens)
    return Prepared(req, timeout, request_id)


def generate_request(model: str, prompts: Sequence[str],
                     sampling: pb.SamplingParams | Mapping[str, Any] | None = None, *, truncate_prompt: bool = False,
                     timeout: float | None = None, request_id: str | None = None) -> Prepared[pb.GenerateRequest]:
    """A continuation of each prompt; `sampling` is a SamplingParams or a mapping of its fields."""
    req = pb.GenerateRequest(model=model, prompts=list(prompts), sampling=sampling_params(sampling),
                             truncate_prompt=truncate_prompt)
    return Prepared(req, timeout, request_id)


def fill_mask_request(model: str, texts: Sequence[str], *, top_k: int | None = None, targets: Sequence[str] = (),
                      timeout: float | None = None, request_id: str | None = None) -> Prepared[pb.FillMaskRequest]:
    """Candidates for each [MASK] of each text (top_k default 5), or the scores of `targets` only."""
    req = pb.FillMaskRequest(model=model, texts=list(texts), top_k=top_k, targets=list(targets))
    return Prepared(req, timeout, request_id)


def embed_request(model: str, texts: Sequence[str] = (), *, pooling: str | int | None = None,
                  normalize: bool = False, layer_weights: Sequence[float] = (), nearest_k: int | None = None,
                  analogies: Sequence[tuple[str, str, str]] = (), include_tokens: bool = False,
                  timeout: float | None = None, request_id: str | None = None) -> Prepared[pb.EmbedRequest]:
    """Vectors of texts; pooling "mean", "cls" or "none" (None: the model's own, mean unless an imported
    sentence-transformers model says otherwise); analogies (a, b, c) = a − b + c."""
    req = pb.EmbedRequest(model=model, texts=list(texts), pooling=_enum(pooling, _POOLING, "pooling"),
                          normalize=normalize, layer_weights=list(layer_weights), nearest_k=nearest_k,
                          analogies=[pb.Analogy(a=a, b=b, c=c) for a, b, c in analogies],
                          include_tokens=include_tokens)
    return Prepared(req, timeout, request_id)


def next_sentence_request(model: str, pairs: Sequence[tuple[str, str]], *, timeout: float | None = None,
                          request_id: str | None = None) -> Prepared[pb.PredictNextSentenceRequest]:
    """P(b follows a) for each (a, b) pair."""
    req = pb.PredictNextSentenceRequest(model=model, pairs=[pb.SentencePair(a=a, b=b) for a, b in pairs])
    return Prepared(req, timeout, request_id)


def classify_request(model: str, queries: Sequence[str], labels: Sequence[str], *,
                     demonstrations: Sequence[tuple[str, str]] = (), instruction: str = "", template: str = "",
                     scoring: str | int | None = None, calibrate: bool = False, content_free: str = "",
                     timeout: float | None = None, request_id: str | None = None) -> Prepared[pb.ClassifyRequest]:
    """Few-shot classification of each query among `labels`; demonstrations are (text, label) pairs;
    scoring "sum" (default), "token_mean" or "per_char"."""
    req = pb.ClassifyRequest(
        model=model, queries=list(queries), labels=list(labels), instruction=instruction, template=template,
        demonstrations=[pb.Demonstration(text=t, label=lab) for t, lab in demonstrations],
        scoring=_enum(scoring, _SCORING, "scoring"), calibrate=calibrate, content_free=content_free,
    )
    return Prepared(req, timeout, request_id)


def list_models_request(*, timeout: float | None = None,
                        request_id: str | None = None) -> Prepared[pb.ListModelsRequest]:
    """Every served model's metadata."""
    return Prepared(pb.ListModelsRequest(), timeout, request_id)


def get_model_request(name: str, *, timeout: float | None = None,
                      request_id: str | None = None) -> Prepared[pb.GetModelRequest]:
    """One model's metadata (NOT_FOUND for an unknown name)."""
    return Prepared(pb.GetModelRequest(name=name), timeout, request_id)
