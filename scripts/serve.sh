#!/usr/bin/env bash
# One command: set everything up and serve the bundled default model over gRPC (CPU, or GPU when present).
# Extra arguments go to reformer-server (see `reformer-server --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec reformer-server "$@"
