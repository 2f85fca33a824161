#!/usr/bin/env bash
# Fail if the checked-in stubs in src/kine_server/pb differ from what protos/ generates now.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PYTHON" -m grpc_tools.protoc -I protos --python_out="$tmp" --pyi_out="$tmp" --grpc_python_out="$tmp" \
  protos/kine_server/pb/*.proto
for generated in "$tmp"/kine_server/pb/*; do
  name=$(basename "$generated")
  if ! cmp -s "$generated" "src/kine_server/pb/$name"; then
    echo "stale generated stub: src/kine_server/pb/$name (run: make proto)" >&2
    exit 1
  fi
done
echo "generated stubs are up to date"
