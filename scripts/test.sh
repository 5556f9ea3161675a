#!/usr/bin/env bash
# The whole test suite (unit + integration, incl. a few steps on the embedded model).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/browser-deps.sh
exec .venv/bin/python -m pytest -q "$@"
