#!/usr/bin/env bash
# Generates the Python gRPC code for protos/ into service/pb/ (never edited by hand, never committed).
# Usage: protos/generate.sh [python]   — the python must have grpcio-tools.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${1:-python3}"
out=service/pb
find "$out" -mindepth 1 -maxdepth 1 -type d -exec rm -rf {} +
"$py" -m grpc_tools.protoc -Iprotos --python_out="$out" --grpc_python_out="$out" --pyi_out="$out" \
  $(find protos/plm -name '*.proto' | sort)
# Triton's protocol keeps the file names tritonclient registers (grpc_service.proto, model_config.proto), so both
# can share one process's descriptor pool: its own include root, generated into service/pb/triton/.
mkdir -p "$out/triton"
"$py" -m grpc_tools.protoc -Iprotos/triton --python_out="$out/triton" --grpc_python_out="$out/triton" \
  --pyi_out="$out/triton" protos/triton/model_config.proto protos/triton/grpc_service.proto
# protoc writes absolute imports rooted at the include path (`from plm.v1 import plm_pb2`,
# `import model_config_pb2`); make them package-relative.
find "$out" -name '*.py' -exec sed -i -E -e 's/^from plm\.v1 import /from service.pb.plm.v1 import /' \
  -e 's/^import (model_config_pb2|grpc_service_pb2) as /from service.pb.triton import \1 as /' {} +
find "$out" -mindepth 1 -type d -exec touch {}/__init__.py \;
