#!/usr/bin/env bash
# Regenerate the Python gRPC/protobuf stubs in src/kine_server/pb from protos/.
# Usage: scripts/gen_protos.sh   (from any directory; PYTHON overrides the interpreter)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-.venv/bin/python}"

mkdir -p src/kine_server/pb

"$PYTHON" -m grpc_tools.protoc \
  -I protos \
  --python_out=src \
  --pyi_out=src \
  --grpc_python_out=src \
  protos/kine_server/pb/*.proto

init=src/kine_server/pb/__init__.py
if [ ! -f "$init" ]; then
  echo '"""Generated protobuf/gRPC code lives here; regenerate with scripts/gen_protos.sh."""' > "$init"
fi
