"""The error table (DESIGN.md §4): typed service errors, each carrying its gRPC status code.

Code anywhere in the service raises one of these; the servicer's single wrapper turns it into a gRPC status.
Anything else that escapes becomes INTERNAL, logged with the request id, never shown as a traceback.
"""

from __future__ import annotations

import grpc


class ServiceError(Exception):
    """Base class: a failure the client can be told about, with its status code."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ServiceError):
    """A malformed or out-of-range field. The message names the field and, where there is one, the limit."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(ServiceError):
    """The model exists but does not serve the task asked of it."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(ServiceError):
    """Queue full: returned fast, before any work is done for the request."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(ServiceError):
    """The deadline passed while the request waited; its work never ran."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class Internal(ServiceError):
    code = grpc.StatusCode.INTERNAL
