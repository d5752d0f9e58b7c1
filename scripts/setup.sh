#!/usr/bin/env bash
# Sets up .venv for stdrc on a CPU machine: torch 2.13.0 (the CPU build; any other pin pulls
# several GB of CUDA wheels here), ltx-core without its declared deps (they drag a torchaudio
# that does not match torch 2.13 and is not needed for video), then stdrc with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q --no-deps ltx-core==1.0.0
.venv/bin/python -m pip install -q -e ".[test]"
echo "stdrc is set up in .venv"
