#!/usr/bin/env bash
# Sets up .venv for stdrc on a CPU machine: torch 2.13.0 (the CPU build; any other pin pulls
# several GB of CUDA wheels here), ltx-core without its declared deps (they drag a torchaudio
# that does not match torch 2.13 and is not needed for video), then stdrc with its test extras.
for arg in "$@"; do  # --help: the comment above, on stdout
  case "$arg" in -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit 0 ;; esac
done
[ $# -eq 0 ] || { echo "error: setup.sh takes no arguments (PYTHON=python3.11 picks the interpreter): see --help" >&2; exit 2; }
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q --no-deps ltx-core==1.0.0
.venv/bin/python -m pip install -q -e ".[test]"
echo "stdrc is set up in .venv"
