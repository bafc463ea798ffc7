#!/usr/bin/env bash
# Generates the Python gRPC code for protos/ into plm/api/ (never edited by hand, never committed): the one place
# the server (plm.service) and the SDK (plm.client) both import the API from.
# Usage: protos/generate.sh [python]   — the python must have grpcio-tools.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${1:-python3}"
out=plm/api
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$py" -m grpc_tools.protoc -Iprotos --python_out="$tmp" --grpc_python_out="$tmp" --pyi_out="$tmp" \
  $(find protos/plm -name '*.proto' | sort)
# Triton's protocol keeps the file names tritonclient registers (grpc_service.proto, model_config.proto), so both
# can share one process's descriptor pool: its own include root, generated into plm/api/triton/.
mkdir -p "$tmp/triton"
"$py" -m grpc_tools.protoc -Iprotos/triton --python_out="$tmp/triton" --grpc_python_out="$tmp/triton" \
  --pyi_out="$tmp/triton" protos/triton/model_config.proto protos/triton/grpc_service.proto
# protoc writes absolute imports rooted at the include path (`from plm.v1 import plm_pb2`,
# `import model_config_pb2`); make them point into plm.api.
find "$tmp" -name '*.py' -exec sed -i -E -e 's/^from plm\.v1 import /from plm.api.v1 import /' \
  -e 's/^import (model_config_pb2|grpc_service_pb2) as /from plm.api.triton import \1 as /' {} +
# Swap the new tree in whole, so an interrupted run never leaves half a package.
rm -rf "$out.new" && mkdir -p "$out.new"
mv "$tmp/plm/v1" "$out.new/v1" && mv "$tmp/triton" "$out.new/triton"
find "$out.new" -type d -exec touch {}/__init__.py \;
rm -rf "$out" && mv "$out.new" "$out"
