"""Channel credentials for a server with TLS, mutual TLS or bearer-token auth (service/security.py).

gRPC sends a token only over a protected channel: TLS, or a local connection (loopback TCP), so a token is
never written in plaintext to the network by mistake.
"""

from __future__ import annotations

from pathlib import Path

import grpc


def channel_credentials(ca: Path | None = None, cert: Path | None = None, key: Path | None = None,
                        token: str | None = None) -> grpc.ChannelCredentials | None:
    """TLS when `ca` is given (with `cert` + `key`: mutual TLS); `token` adds `authorization: Bearer <token>`.

    A token without TLS works only for a loopback target. None = plaintext, nothing to add.
    """
    if (cert is None) != (key is None):
        raise ValueError("give both a client certificate and its key (mutual TLS), or neither")
    if cert is not None and ca is None:
        raise ValueError("a client certificate needs --tls-ca (mutual TLS runs over TLS)")
    channel = None
    if ca is not None:
        channel = grpc.ssl_channel_credentials(ca.read_bytes(), key.read_bytes() if key else None,
                                               cert.read_bytes() if cert else None)
    if not token:
        return channel
    if channel is None:
        channel = grpc.local_channel_credentials(grpc.LocalConnectionType.LOCAL_TCP)
    return grpc.composite_channel_credentials(channel, grpc.access_token_call_credentials(token))
