#!/usr/bin/env bash
# Generates the gRPC stubs of Weir's API (proto/) into src/weir/ with grpcio-tools. The generated
# files are committed so that `pip install ./clients/python` needs nothing else; never edit them:
# change proto/ and run this again (./tests/run checks they are up to date).
#   clients/python/generate.sh [python]   # a Python with grpcio-tools installed (default: python3)
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${1:-python3}"
OUT="${OUT:-src}"
rm -rf "$OUT/weir"
mkdir -p "$OUT"
"$PYTHON" -m grpc_tools.protoc -I ../../proto \
  --python_out="$OUT" --grpc_python_out="$OUT" --pyi_out="$OUT" \
  $(cd ../../proto && find weir -name '*.proto' | sort)
# Packages for the generated modules (protoc writes none).
find "$OUT/weir" -type d -exec touch {}/__init__.py \;
