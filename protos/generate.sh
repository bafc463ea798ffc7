#!/usr/bin/env bash
# Generates the Python gRPC code for protos/ into service/pb/ (never edited by hand, never committed).
# Usage: protos/generate.sh [python]   — the python must have grpcio-tools.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${1:-python3}"
out=service/pb
find "$out" -mindepth 1 -maxdepth 1 -type d -exec rm -rf {} +
"$py" -m grpc_tools.protoc -Iprotos --python_out="$out" --grpc_python_out="$out" --pyi_out="$out" \
  $(find protos -name '*.proto' | sort)
# protoc writes absolute imports rooted at protos/ (`from plm.v1 import plm_pb2`); make them package-relative.
find "$out" -name '*.py' -exec sed -i -E 's/^from plm\.v1 import /from service.pb.plm.v1 import /' {} +
find "$out" -mindepth 1 -type d -exec touch {}/__init__.py \;
