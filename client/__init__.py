"""plm's Python client SDK: `PlmClient` (sync) and `AsyncPlmClient` (asyncio) for plm.v1, with their options."""

from client.aio import AsyncPlmClient
from client.client import PlmClient
from client.core import DEFAULT_TARGET, NO_RETRY, RETRYABLE, RetryPolicy, TlsConfig

__all__ = ["DEFAULT_TARGET", "NO_RETRY", "RETRYABLE", "AsyncPlmClient", "PlmClient", "RetryPolicy", "TlsConfig"]
