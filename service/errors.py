"""The error table: typed service errors, each carrying its status as a protocol-free name.

Code anywhere in the service raises one of these. The status names are the canonical ones (INVALID_ARGUMENT,
NOT_FOUND, ...) that gRPC uses as they are; a front end of another protocol maps them to its own (an HTTP front
end to 400, 404, ...). An InvalidArgument names the request field in the data plane's own naming
(service/dataplane/requests.py); each front end renames it to its wire's name through its own table
(`InvalidArgument.renamed`). Anything else that escapes becomes INTERNAL, logged with the request id, never
shown as a traceback.
"""

from __future__ import annotations

from collections.abc import Mapping


class ServiceError(Exception):
    """Base class: a failure the client can be told about, with its status."""

    code: str = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ServiceError):
    """A malformed or out-of-range field. The message names the field and, where there is one, the limit.

    `field` is the field's name (`texts`), `at` where in it the problem is (`[2]`, `[0].a`), `problem` the rest:
    the message reads `texts[2]: is empty`.
    """

    code = "INVALID_ARGUMENT"

    def __init__(self, field: str, problem: str, at: str = "") -> None:
        super().__init__(f"{field}{at}: {problem}")
        self.field = field
        self.at = at
        self.problem = problem

    def renamed(self, names: Mapping[str, str]) -> InvalidArgument:
        """The same error with its field under a front end's name (`names`: data plane name → wire name);
        a field the table does not list keeps its name."""
        name = names.get(self.field, self.field)
        return self if name == self.field else InvalidArgument(name, self.problem, self.at)


class NotFound(ServiceError):
    code = "NOT_FOUND"


class FailedPrecondition(ServiceError):
    """The model exists but does not serve the task asked of it."""

    code = "FAILED_PRECONDITION"


class ResourceExhausted(ServiceError):
    """Queue full: returned fast, before any work is done for the request."""

    code = "RESOURCE_EXHAUSTED"


class DeadlineExceeded(ServiceError):
    """The deadline passed while the request waited; its work never ran."""

    code = "DEADLINE_EXCEEDED"


class Unavailable(ServiceError):
    code = "UNAVAILABLE"


class Internal(ServiceError):
    code = "INTERNAL"
