#!/usr/bin/env bash
# Generates the gRPC stubs of Weir's API (proto/) into src/weir/ with `buf generate` (the template
# is buf.gen.yaml at the repository's top): buf compiles proto/ and the local plugin
# protoc-gen-weir-python (next to this script) runs grpcio-tools' generators (python, pyi,
# grpc_python) on the result, so the files are what `python -m grpc_tools.protoc` writes. No remote
# plugin, nothing downloaded. The generated files are committed so that
# `pip install ./clients/python` needs nothing else; never edit them: change proto/ and run this
# again (./tests/run checks they are up to date).
#   clients/python/generate.sh [python]   # a Python with grpcio-tools installed (default: python3)
# buf: $BUF, else .tools/node_modules/.bin/buf (what ./tests/run installs from npm), else buf on
# PATH. OUT (default src, relative to this directory) is where weir/ is written.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
PYTHON="${1:-python3}"
OUT="${OUT:-src}"
case "$OUT" in /*) ;; *) OUT="$here/$OUT" ;; esac

BUF="${BUF:-$root/.tools/node_modules/.bin/buf}"
if [ ! -x "$BUF" ]; then
  BUF="$(command -v buf || true)"
  [ -n "$BUF" ] || {
    echo "generate.sh needs buf: run ./tests/run once, or npm install --prefix .tools @bufbuild/buf@1.75.0" >&2
    exit 1
  }
fi
"$PYTHON" -c 'import grpc_tools.protoc' 2>/dev/null || {
  echo "generate.sh: $PYTHON cannot import grpc_tools (pip install -r clients/python/requirements-dev.txt)" >&2
  exit 1
}

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# The plugin runs as `python3` from PATH: make that the Python given (a wrapper, not a symlink, so
# that a virtualenv's Python still finds its packages).
mkdir "$tmp/bin"
python="$(command -v "$PYTHON")"
case "$python" in /*) ;; *) python="$(cd "$(dirname "$python")" && pwd)/$(basename "$python")" ;; esac
printf '#!/bin/sh\nexec %q "$@"\n' "$python" >"$tmp/bin/python3"
chmod +x "$tmp/bin/python3"
(cd "$root" && PATH="$tmp/bin:$PATH" "$BUF" generate --template buf.gen.yaml -o "$tmp/out")
rm -rf "$OUT/weir"
mkdir -p "$OUT"
mv "$tmp/out/clients/python/src/weir" "$OUT/weir"
