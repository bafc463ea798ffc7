"""Container health check: one grpc.health.v1 Check against the local server; exit 0 when SERVING, else 1.

    python healthcheck.py [SERVICE]     SERVICE: "" (the server, default), plm.v1.LanguageModelService, a model

Uses only grpcio and grpcio-health-checking, which the server already needs, so the image carries no probe binary.
The target is 127.0.0.1:$PLM_PORT (50051); PLM_HEALTH_TARGET overrides it, PLM_HEALTH_TIMEOUT (s) bounds the call.
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(target: str, service: str, timeout: float) -> tuple[bool, str]:
    """(serving?, what to print) for one Check call; a failed call is 'not serving', never an exception."""
    with grpc.insecure_channel(target) as channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout, wait_for_ready=False
            )
        except grpc.RpcError as e:
            return False, f"{target} {service!r}: {e.code().name} {e.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    return resp.status == health_pb2.HealthCheckResponse.SERVING, f"{target} {service!r}: {status}"


def main(argv: list[str]) -> int:
    target = os.environ.get("PLM_HEALTH_TARGET") or f"127.0.0.1:{os.environ.get('PLM_PORT', '50051')}"
    serving, line = check(target, argv[0] if argv else "", float(os.environ.get("PLM_HEALTH_TIMEOUT", "3")))
    print(line, file=sys.stdout if serving else sys.stderr)
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
