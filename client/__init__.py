"""plm's Python client SDK: `PlmClient` (sync) and `AsyncPlmClient` (asyncio) for plm.v1, with their options.

The names load on first use, so `plm build` / `plm serve` (plm.cli) do not pay for grpc at start-up.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from plm.client.aio import AsyncPlmClient
    from plm.client.client import PlmClient
    from plm.client.core import DEFAULT_TARGET, NO_RETRY, RETRYABLE, RetryPolicy, TlsConfig

_HOME = {"AsyncPlmClient": "plm.client.aio", "PlmClient": "plm.client.client", "DEFAULT_TARGET": "plm.client.core",
         "NO_RETRY": "plm.client.core", "RETRYABLE": "plm.client.core", "RetryPolicy": "plm.client.core",
         "TlsConfig": "plm.client.core"}
__all__ = ["DEFAULT_TARGET", "NO_RETRY", "RETRYABLE", "AsyncPlmClient", "PlmClient", "RetryPolicy", "TlsConfig"]


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'client' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOME[name]), name)
