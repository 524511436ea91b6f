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
echo "== Dockerfile (hadolint; the manifests, their CRD schemas and metric names are in tests/test_deploy.py)"
hadolint Dockerfile
echo "== tests"
python -m pytest -q -p no:cacheprovider "$@"
