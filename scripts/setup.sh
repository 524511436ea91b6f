#!/usr/bin/env bash
# Installs reformer-serve and its SDK from this checkout. torch 2.13.0 first: on the project's machines a
# CPU wheel of it lies on disk, and the package's own range (torch>=2.4,<3) then installs nothing more.
# Usage: scripts/setup.sh [--test]   (--test adds the test extra: transformers oracle, onnxruntime, ruff...)
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip"
python -c "import torch" 2>/dev/null || $PIP install --quiet "torch==2.13.0"
extra=""
[ "${1:-}" = "--test" ] && extra="[test]"
$PIP install --quiet -e ".${extra}"
if [ -f clients/python/pyproject.toml ]; then
  $PIP install --quiet -e clients/python
fi
