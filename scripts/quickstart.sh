#!/usr/bin/env bash
# The main job, from a fresh clone: install, prepare the embedded model, fine-tune it with
# LoRA on a generated order-extraction task, and print base vs tuned on held-out rows.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/tuneforge models --prepare
exec .venv/bin/tuneforge train examples/quickstart.yaml "$@"
