"""Transport security and caller authentication: TLS / mutual TLS credentials and the bearer-token check.

TLS is on when `security.tls_cert_file` and `tls_key_file` are set; `tls_client_ca_file` makes it mutual
(a client without a certificate signed by that CA cannot complete the handshake). Bearer-token auth is on
when any token is configured: every call must carry `authorization: Bearer <token>` metadata, except calls
to `open_services` (health and reflection by default); others get UNAUTHENTICATED before any work.
The HTTP front end (service/frontends/openai_http.py) takes the same settings: `server_ssl_context` for its
socket and `bearer_accepted` for its `Authorization` header.
"""

from __future__ import annotations

import hmac
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import grpc
from plm.service.admission import GLOBAL
from plm.service.config import Security
from plm.service.metrics import Metrics

log = logging.getLogger(__name__)


def server_credentials(sec: Security) -> grpc.ServerCredentials | None:
    """The TLS credentials of the listening port; None = plaintext."""
    if sec.tls_cert_file is None and sec.tls_key_file is None:
        if sec.tls_client_ca_file is not None:
            raise ValueError("security: tls_client_ca_file needs tls_cert_file and tls_key_file (mutual TLS is TLS)")
        return None
    if sec.tls_cert_file is None or sec.tls_key_file is None:
        raise ValueError("security: set both tls_cert_file and tls_key_file, or neither")
    try:
        key, cert = sec.tls_key_file.read_bytes(), sec.tls_cert_file.read_bytes()
        ca = sec.tls_client_ca_file.read_bytes() if sec.tls_client_ca_file is not None else None
    except OSError as e:
        raise ValueError(f"security: {e}") from e
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


def server_ssl_context(sec: Security) -> ssl.SSLContext | None:
    """The same TLS (or mutual TLS) as `server_credentials`, for an HTTP listener; None = plaintext."""
    if server_credentials(sec) is None:  # also checks the settings are whole and the files readable
        return None
    assert sec.tls_cert_file is not None and sec.tls_key_file is not None  # server_credentials checked both
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(sec.tls_cert_file, sec.tls_key_file)
        if sec.tls_client_ca_file is not None:
            context.load_verify_locations(cafile=str(sec.tls_client_ca_file))
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as e:
        raise ValueError(f"security: {e}") from e
    return context


def bearer_accepted(value: object, tokens: list[bytes]) -> bool:
    """Whether an authorization value reads `Bearer <t>` for one of `tokens`, compared with every token (no
    early exit: the time taken tells nothing about which matched)."""
    if not isinstance(value, str) or value[:7].lower() != "bearer ":
        return False
    given = value[7:].strip().encode()
    return sum(hmac.compare_digest(given, t) for t in tokens) > 0


def token_bytes(tokens: Iterable[str]) -> list[bytes]:
    """The accepted tokens as `bearer_accepted` compares them."""
    return [t.encode() for t in sorted(tokens)]


def metadata_accepted(metadata: Any, tokens: list[bytes]) -> bool:
    """Whether gRPC invocation metadata carries an accepted `authorization: Bearer <t>` (the first bearer value
    decides)."""
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value[:7].lower() == "bearer ":
            return bearer_accepted(value, tokens)
    return False


async def _refuse_unary(request: Any, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, _REFUSAL)


async def _refuse_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, _REFUSAL)
    yield  # unreachable: abort raises; the yield makes this the async generator a streaming handler must be


_REFUSAL = "missing or invalid credentials: send metadata 'authorization: Bearer <token>'"


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape (so the request still deserializes) that only refuses."""
    kinds: dict[tuple[bool, bool], tuple[Callable[..., Any], Callable[..., Any]]] = {
        (False, False): (grpc.unary_unary_rpc_method_handler, _refuse_unary),
        (False, True): (grpc.unary_stream_rpc_method_handler, _refuse_stream),
        (True, False): (grpc.stream_unary_rpc_method_handler, _refuse_unary),
        (True, True): (grpc.stream_stream_rpc_method_handler, _refuse_stream),
    }
    make, behaviour = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(behaviour, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


class TokenAuth(grpc.aio.ServerInterceptor):
    """Refuses calls without an accepted bearer token (compared in constant time)."""

    def __init__(self, tokens: frozenset[str], open_services: tuple[str, ...], metrics: Metrics) -> None:
        self._tokens = token_bytes(tokens)
        self._open = frozenset(open_services)
        self._metrics = metrics

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        service = details.method.rpartition("/")[0].lstrip("/")  # "/plm.v1.LanguageModelService/Score"
        handler = await continuation(details)
        if handler is None or service in self._open or metadata_accepted(details.invocation_metadata, self._tokens):
            return handler
        self._metrics.rejections.labels(GLOBAL, "unauthenticated").inc()
        log.debug("refused %s: missing or invalid bearer token", details.method)  # counted in metrics
        return _refusing(handler)
