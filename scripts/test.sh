#!/usr/bin/env bash
# One command: set everything up and run the checks and the tests (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
echo "== lint (ruff)"
ruff check .
echo "== layering: reformer_infer must not import grpc, protobuf or prometheus_client"
if grep -rEn "^\s*(import|from)\s+(grpc|google\.protobuf|prometheus_client)\b" reformer_infer; then
  echo "reformer_infer imports a serving dependency" >&2
  exit 1
fi
if [ -f scripts/check_deploy.py ]; then
  echo "== deploy manifests, dashboard, Dockerfile"
  python scripts/check_deploy.py --require-tools
fi
echo "== tests"
python -m pytest -q -p no:cacheprovider "$@"
