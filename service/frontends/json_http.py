"""plm.v1 as JSON over HTTP: `POST /plm.v1.LanguageModelService/<Method>` on the HTTP port, beside the OpenAI API.

The body is the request message in protobuf's JSON mapping (google.protobuf.json_format: field names in
lowerCamelCase or as in the .proto, enums by name or number, int64 as a string or a number); the answer is the
response message's JSON as `json_format.MessageToDict` writes it (lowerCamelCase, fields at their default left
out, int64 as strings, -inf as "-Infinity"), which is what grpcurl prints. Each method's body is plm.v1's own
(`LanguageModelServicer` in plm_v1.py, called without its gRPC edge): the same protobuf ⇄ typed-request
translation and the same data-plane call, so an answer here is the JSON of the gRPC answer to the same request.
No proxy: nothing goes through the gRPC port.

`GenerateStream` answers newline-delimited JSON (`application/x-ndjson`), grpc-gateway's framing: one line
`{"result": <GenerateStreamResponse>}` per message; a failure after the first message is one last line
`{"error": ...}`. The first message is awaited before the response starts, so a refusal is still a status.

Errors are the gRPC status as an HTTP status (http_edge.HTTP_STATUS: 400, 401, 404, 413, 429, 503, 504, ...)
with Google's JSON error body (AIP-193): `{"error": {"code": 400, "status": "INVALID_ARGUMENT", "message": ...,
"details": [{"@type": "type.googleapis.com/google.rpc.BadRequest", "fieldViolations": [{"field", "description"}]}]}}`
— a field violation for an INVALID_ARGUMENT, naming the field by its .proto name and path (`sampling.top_p`,
`pairs[1].a`). A body that is not JSON, an unknown field or a value of the wrong type is refused this way before
any work. The admin service stays on gRPC.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from google.protobuf import json_format, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from plm.service.dataplane.plane import Call, DataPlane
from plm.service.errors import InvalidArgument, ServiceError
from plm.service.frontends import plm_v1
from plm.service.frontends.http_edge import (
    HTTP_STATUS,
    admit,
    http_status,
    json_kind,
    json_object,
    json_response,
    new_call,
    read_body,
    stream_response,
)

from plm.api.v1 import plm_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["LanguageModelService"]
NDJSON = "application/x-ndjson"
_BAD_REQUEST = "type.googleapis.com/google.rpc.BadRequest"
_STATUS_NAMES = {status: name for name, status in reversed(list(HTTP_STATUS.items()))}  # 400: INVALID_ARGUMENT
_PARSE_NOISE = re.compile(r"^(?:Failed to parse \S+ field: )+|\.*(?: at \S+)?\.*$")


@dataclass(frozen=True)
class _Method:
    name: str
    request: type[Message]
    body: Callable[..., Any]  # plm.v1's (servicer, request, call) → the response, or an async iterator of them
    streaming: bool
    names: Mapping[str, str]  # data plane field → proto field (plm_v1.FIELDS)


def _methods() -> dict[str, _Method]:
    """Every method of the service with the body of its plm.v1 handler (the function its gRPC edge wraps)."""
    out = {}
    for m in SERVICE.methods:
        handler = getattr(plm_v1.LanguageModelServicer, m.name)
        body = getattr(handler, "__wrapped__", None)
        if body is None:
            raise TypeError(f"plm_v1.LanguageModelServicer.{m.name} is not wrapped by grpc_edge's unary/streaming")
        out[m.name] = _Method(m.name, message_factory.GetMessageClass(m.input_type), body, m.server_streaming,
                              plm_v1.FIELDS.get(m.name, {}))
    return out


class JsonFrontend:
    """The routes of plm.v1 as JSON, mounted on the HTTP front end's app (its auth, TLS and port)."""

    def __init__(self, plane: DataPlane, max_body: int) -> None:
        self.plane = plane
        self.max_body = max_body
        self.servicer = plm_v1.LanguageModelServicer(plane)
        self.methods = _methods()
        self.prefixes = (f"/{SERVICE.full_name}/",)

    def owns(self, path: str) -> bool:
        return path.startswith(self.prefixes)

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post(self.prefixes[0] + "{method}", self.handle)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        method = self.methods.get(request.match_info["method"])
        if method is None:
            return error_response("NOT_FOUND", f"{SERVICE.full_name} has no method {request.match_info['method']!r}; "
                                               f"its methods: {', '.join(self.methods)}")
        call = new_call(self.plane, method.name, request)
        try:
            admit(call, request)
            message = parse(await read_body(request, self.max_body), method.request)
            if method.streaming:
                return await self._stream(request, call, method, message)
            response = await method.body(self.servicer, message, call)
            return json_response(200, json_format.MessageToDict(response), call.request_id)
        except BaseException as err:
            error = call.failed(err)
            if error is None:  # the client went away (aiohttp cancelled the handler)
                raise
            return _error_of(_renamed(error, method.names), call.request_id)
        finally:
            call.end()

    async def _stream(self, request: web.Request, call: Call, method: _Method, message: Message) -> web.StreamResponse:
        events: AsyncIterator[Message] = method.body(self.servicer, message, call)

        async def line(item: Message) -> bytes:
            return _line({"result": json_format.MessageToDict(item)})

        def error_line(error: ServiceError) -> bytes:
            return _line(error_body(_renamed(error, method.names), call.request_id)[1])

        return await stream_response(request, call, events, {"Content-Type": NDJSON}, line, error_line)


def _line(body: Any) -> bytes:
    return json.dumps(body, ensure_ascii=False).encode() + b"\n"


# -------------------------------------------------------------------------------------------- errors


def status_name(http: int) -> str:
    """The status name an HTTP status stands for (aiohttp's own refusals: 404, 405, 413)."""
    return _STATUS_NAMES.get(http, "INVALID_ARGUMENT" if http < 500 else "INTERNAL")


def error_body(error: ServiceError, request_id: str | None = None) -> tuple[int, dict[str, Any]]:
    """(HTTP status, Google's JSON error body) of a data-plane error whose field is already renamed."""
    message = f"{error.message} (request_id={request_id})" if request_id else error.message
    body: dict[str, Any] = {"code": http_status(error), "status": error.code, "message": message}
    if isinstance(error, InvalidArgument):
        body["details"] = [{"@type": _BAD_REQUEST, "fieldViolations": [
            {"field": error.field + error.at, "description": error.problem}]}]
    return body["code"], {"error": body}


def error_response(status: str, message: str, http: int | None = None) -> web.Response:
    """An error the HTTP layer answers before any call (auth, routing) in Google's JSON error body."""
    code = http or HTTP_STATUS.get(status, 500)
    return json_response(code, {"error": {"code": code, "status": status, "message": message}})


def _error_of(error: ServiceError, request_id: str) -> web.Response:
    status, body = error_body(error, request_id)
    return json_response(status, body, request_id)


def _renamed(error: ServiceError, names: Mapping[str, str]) -> ServiceError:
    return error.renamed(names) if isinstance(error, InvalidArgument) else error


# ------------------------------------------------------------------------------------------- parsing


def parse(raw: bytes, cls: type[Message]) -> Message:
    """The request message of a JSON body; a refusal names the field by its .proto name and path."""
    body = json_object(raw)
    message = cls()
    try:
        json_format.ParseDict(body, message)
    except json_format.ParseError:
        raise _violation(body, cls.DESCRIPTOR) or InvalidArgument("body", "is not a valid "
                                                                          f"{cls.DESCRIPTOR.full_name}") from None
    return message


def _field(descriptor: Descriptor, key: str) -> FieldDescriptor | None:
    return descriptor.fields_by_camelcase_name.get(key) or descriptor.fields_by_name.get(key)


def _refused(path: str, problem: str) -> InvalidArgument:
    """`sampling.stop[0]` → field `sampling.stop` at `[0]` (the convention of plm_v1.FIELDS and InvalidArgument)."""
    cut = path.find("[")
    return InvalidArgument(path, problem) if cut < 0 else InvalidArgument(path[:cut], problem, path[cut:])


def _reason(e: json_format.ParseError) -> str:
    return _PARSE_NOISE.sub("", str(e).split("\n")[0])


def _violation(body: Mapping[str, Any], descriptor: Descriptor, path: str = "") -> InvalidArgument | None:
    """The first field of `body` that protobuf's JSON mapping refuses, as an InvalidArgument naming it: found by
    parsing the fields one at a time, into nested messages and list entries (only on the error path)."""
    cls = message_factory.GetMessageClass(descriptor)
    for key, value in body.items():
        field = _field(descriptor, key)
        here = f"{path}.{field.name if field else key}" if path else (field.name if field else key)
        if field is None:
            names = ", ".join(f.name for f in descriptor.fields)
            return _refused(here, f"unknown field of {descriptor.full_name} (its fields: {names})")
        try:
            json_format.ParseDict({key: value}, cls())
            continue
        except json_format.ParseError as e:
            reason = _reason(e)
        inner: InvalidArgument | None = None
        repeated = field.is_repeated and not _is_map(field)
        if repeated and isinstance(value, list):
            inner = next(filter(None, (_entry(field, item, f"{here}[{i}]") for i, item in enumerate(value))), None)
        elif not repeated and field.message_type is not None and isinstance(value, dict) and not _is_map(field):
            inner = _violation(value, field.message_type, here)
        return inner or _refused(here, f"must be {_expected(field)}, got {json_kind(value)}: {reason}")
    return None


def _entry(field: FieldDescriptor, item: object, path: str) -> InvalidArgument | None:
    """A list entry of a repeated field: a message entry is searched inside, a scalar one parsed alone."""
    if field.message_type is not None and isinstance(item, dict):
        return _violation(item, field.message_type, path)
    try:
        json_format.ParseDict({field.json_name: [item]}, message_factory.GetMessageClass(field.containing_type)())
        return None
    except json_format.ParseError as e:
        return _refused(path, f"must be {_expected(field, entry=True)}, got {json_kind(item)}: {_reason(e)}")


def _is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


_SCALARS = {FieldDescriptor.CPPTYPE_STRING: "a string", FieldDescriptor.CPPTYPE_BOOL: "a boolean",
            FieldDescriptor.CPPTYPE_FLOAT: "a number", FieldDescriptor.CPPTYPE_DOUBLE: "a number",
            FieldDescriptor.CPPTYPE_INT32: "a 32-bit integer", FieldDescriptor.CPPTYPE_INT64: "a 64-bit integer",
            FieldDescriptor.CPPTYPE_UINT32: "a 32-bit unsigned integer",
            FieldDescriptor.CPPTYPE_UINT64: "a 64-bit unsigned integer"}


def _expected(field: FieldDescriptor, entry: bool = False) -> str:
    if field.enum_type is not None:
        one = f"one of {', '.join(v.name for v in field.enum_type.values)}"
    elif _is_map(field):
        return "an object"
    elif field.message_type is not None:
        one = f"a {field.message_type.full_name} object"
    else:
        one = _SCALARS.get(field.cpp_type, "a value")
    if field.is_repeated and not entry:
        return f"an array, each entry {one}"
    return one

