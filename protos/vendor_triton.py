"""Writes protos/triton/{grpc_service,model_config}.proto from the descriptors in the `tritonclient` wheel.

The wheel ships Triton's protocol as generated Python (tritonclient/grpc/*_pb2.py), not as .proto text; this
prints those descriptors back as .proto so the server generates its code from them like any other proto. The
files keep the names the wheel registers ("grpc_service.proto", "model_config.proto"), so our generated modules
and tritonclient's describe the same file and can live in one process (tests/test_kserve.py checks that the
bytes are equal). Usage: `python protos/vendor_triton.py` with tritonclient installed.
"""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

from google.protobuf import descriptor_pb2 as d

OUT = Path(__file__).resolve().parent / "triton"
F = d.FieldDescriptorProto
SCALARS = {F.TYPE_DOUBLE: "double", F.TYPE_FLOAT: "float", F.TYPE_INT64: "int64", F.TYPE_UINT64: "uint64",
           F.TYPE_INT32: "int32", F.TYPE_FIXED64: "fixed64", F.TYPE_FIXED32: "fixed32", F.TYPE_BOOL: "bool",
           F.TYPE_STRING: "string", F.TYPE_BYTES: "bytes", F.TYPE_UINT32: "uint32", F.TYPE_SFIXED32: "sfixed32",
           F.TYPE_SFIXED64: "sfixed64", F.TYPE_SINT32: "sint32", F.TYPE_SINT64: "sint64"}


def _type(f: d.FieldDescriptorProto) -> str:
    return SCALARS.get(f.type) or f.type_name  # message/enum: the fully qualified ".pkg.Name" form


def _message(m: d.DescriptorProto, ind: str) -> list[str]:
    lines = [f"{ind}message {m.name} {{"]
    entries = {n.name: n for n in m.nested_type if n.options.map_entry}
    for e in m.enum_type:
        lines += _enum(e, ind + "  ")
    for n in m.nested_type:
        if not n.options.map_entry:
            lines += _message(n, ind + "  ")
    oneof_open = -1
    for f in m.field:
        index = f.oneof_index if f.HasField("oneof_index") else -1
        if index != oneof_open:
            if oneof_open >= 0:
                lines.append(f"{ind}  }}")
                oneof_open = -1
            if index >= 0:
                oneof_open = index
                lines.append(f"{ind}  oneof {m.oneof_decl[oneof_open].name} {{")
        pad = ind + ("    " if oneof_open >= 0 else "  ")
        entry = entries.get(f.type_name.rsplit(".", 1)[-1]) if f.type == F.TYPE_MESSAGE else None
        if entry is not None:
            k, v = entry.field
            lines.append(f"{pad}map<{_type(k)}, {_type(v)}> {f.name} = {f.number};")
        else:
            label = "repeated " if f.label == F.LABEL_REPEATED else ""
            lines.append(f"{pad}{label}{_type(f)} {f.name} = {f.number};")
    if oneof_open >= 0:
        lines.append(f"{ind}  }}")
    return [*lines, f"{ind}}}"]


def _enum(e: d.EnumDescriptorProto, ind: str) -> list[str]:
    return [f"{ind}enum {e.name} {{", *(f"{ind}  {v.name} = {v.number};" for v in e.value), f"{ind}}}"]


def to_proto(fd: d.FileDescriptorProto, header: str) -> str:
    lines = [header, f'syntax = "{fd.syntax}";', "", f"package {fd.package};", ""]
    lines += [f'import "{dep}";' for dep in fd.dependency] + ([""] if fd.dependency else [])
    for e in fd.enum_type:
        lines += [*_enum(e, ""), ""]
    for m in fd.message_type:
        lines += [*_message(m, ""), ""]
    for s in fd.service:
        lines.append(f"service {s.name} {{")
        for r in s.method:
            cs, ss = ("stream " if r.client_streaming else ""), ("stream " if r.server_streaming else "")
            lines.append(f"  rpc {r.name}({cs}{r.input_type}) returns ({ss}{r.output_type}) {{}}")
        lines += ["}", ""]
    return "\n".join(lines)


def main() -> int:
    from tritonclient.grpc import model_config_pb2, service_pb2

    dist = importlib.metadata.distribution("tritonclient")
    licence = next((f for f in dist.files or () if f.name.upper().startswith("LICENSE")), None)
    text = licence.read_text() if licence else ""
    header = "\n".join(["// Triton's KServe v2 / Open Inference Protocol, printed by protos/vendor_triton.py from the",
                        f"// descriptors of tritonclient {dist.version} (PyPI); its licence follows.", "//",
                        *(f"// {line.removeprefix('#').strip()}".rstrip() for line in text.strip().splitlines()), ""])
    OUT.mkdir(exist_ok=True)
    for module in (model_config_pb2, service_pb2):
        fd = d.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(fd)
        (OUT / fd.name).write_text(to_proto(fd, header))
        print(f"wrote {OUT / fd.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
