#!/usr/bin/env bash
# The one-command GPU check: on a machine with an NVIDIA GPU and a CUDA PyTorch but no internet.
#   bash scripts/gpu_check.sh OUT_DIR [--wheels DIR] [--python PY] [--layers N] [--dry-run]
# Installs the wheels in DIR (default .whl; list and download command: scripts/gpu_wheels.txt) into a
# private folder, then runs, each under its own time limit (about 8 minutes in all):
#   1. facts: nvidia-smi, versions                       -> OUT_DIR/facts.json
#   2. pytest -m gpu                                      -> OUT_DIR/pytest_gpu.xml (+ .log)
#   3. DiT step benchmark, ltx2-video at full width and N layers (default 4), 768x512x121:
#      ltx-core eager bf16 baseline, bf16 and FP8 fast paths with CUDA graphs, every other
#      backend that imports                              -> OUT_DIR/dit_step.json
#   4. tiny bundle generated on CUDA (torch backend, bf16 DiT, CUDA graphs; and ONNX Runtime's CUDA EP
#      when onnxruntime-gpu was installed)               -> OUT_DIR/generate_*.json
# Every step's exit status goes into OUT_DIR/summary.json; a failed step does not stop the next.
# --dry-run checks the arguments and the wheel folder and writes OUT_DIR/plan.json without running.
for arg in "$@"; do  # --help: the comment above, on stdout
  case "$arg" in -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit 0 ;; esac
done
set -uo pipefail
cd "$(dirname "$0")/.."
usage() { echo "usage: bash scripts/gpu_check.sh OUT_DIR [--wheels DIR] [--python PY] [--layers N] [--dry-run]" >&2; exit 2; }
[ $# -ge 1 ] || usage
OUT=$1; shift
case "$OUT" in -*) usage ;; esac
WHEELS=.whl; PY=python3; LAYERS=4; DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) [ $# -ge 2 ] || usage; WHEELS=$2; shift 2 ;;
    --python) [ $# -ge 2 ] || usage; PY=$2; shift 2 ;;
    --layers) [ $# -ge 2 ] || usage; LAYERS=$2; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    *) echo "error: unknown option $1" >&2; usage ;;
  esac
done
case "$LAYERS" in ''|*[!0-9]*|0) echo "error: --layers takes a whole number >= 1, not '$LAYERS'" >&2; exit 2 ;; esac
mkdir -p "$OUT" || { echo "error: cannot create $OUT: pick a writable folder" >&2; exit 2; }

# which listed wheels are present (name==version lines of scripts/gpu_wheels.txt)
missing=()
while read -r line; do
  line=${line%%#*}; line=${line// /}; [ -n "$line" ] || continue
  name=${line%%==*}; file_name=$(echo "$name" | tr '.-' '__')  # wheel file names normalise - and . to _
  ls "$WHEELS" 2>/dev/null | grep -qiE "^${file_name}-${line#*==}-.*\.whl$" || missing+=("$line")
done < scripts/gpu_wheels.txt
ls "$WHEELS"/stdrc-*.whl >/dev/null 2>&1 || missing+=("stdrc (pip wheel --no-deps -w $WHEELS .)")

SITE=${STDRC_GPU_SITE:-/tmp/stdrc-gpu-site}
steps=(facts pytest_gpu dit_step generate_torch generate_ort_cuda)
if [ "$DRY" = 1 ]; then
  {
    printf '{"out": "%s", "wheels": "%s", "python": "%s", "layers": %s, "site": "%s",\n' "$OUT" "$WHEELS" "$PY" "$LAYERS" "$SITE"
    printf ' "steps": [%s],\n' "$(printf '"%s",' "${steps[@]}" | sed 's/,$//')"
    printf ' "missing_wheels": [%s]}\n' "$( [ ${#missing[@]} -gt 0 ] && printf '"%s",' "${missing[@]}" | sed 's/,$//')"
  } > "$OUT/plan.json"
  echo "dry run: plan in $OUT/plan.json (${#missing[@]} listed wheels missing from $WHEELS)"
  exit 0
fi
[ ${#missing[@]} -eq 0 ] || { echo "error: wheels missing from $WHEELS: ${missing[*]} (see scripts/gpu_wheels.txt)" >&2; exit 2; }
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || { echo "error: $PY has no CUDA PyTorch that sees a GPU: run this on the GPU machine" >&2; exit 2; }

"$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" "$WHEELS"/*.whl || exit 2
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
declare -A status
run_step() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; status[$name]=$?
  echo "   exit ${status[$name]}"
}
run_step facts 30 "$PY" -c "
import json, subprocess, torch, platform
smi = subprocess.run(['nvidia-smi', '--query-gpu=name,memory.total,driver_version', '--format=csv,noheader'],
                     capture_output=True, text=True).stdout.strip()
json.dump({'gpu': smi, 'torch': torch.__version__, 'cuda': torch.version.cuda, 'python': platform.python_version(),
           'capability': list(torch.cuda.get_device_capability())}, open('$OUT/facts.json', 'w'), indent=1)"
run_step pytest_gpu 150 "$PY" -m pytest -q -m gpu -p no:cacheprovider --junitxml "$OUT/pytest_gpu.xml" tests
run_step dit_step 240 "$PY" benchmarks/dit_step.py --device cuda --preset ltx2-video --layers "$LAYERS" \
  --backends ltx-eager-bf16 stdrc-bf16 stdrc-fp8 stdrc-torch onnxruntime torch-export tensorrt --warmup 2 --repeats 10 --json
cp "$OUT/dit_step.log" "$OUT/dit_step.json" 2>/dev/null
run_step generate_torch 120 bash -c "'$PY' -m stdrc.engines.cli build-engines --backend torch --precision bf16 \
  --out /tmp/stdrc-gpu-tiny-torch -q && '$PY' benchmarks/generate.py --bundle /tmp/stdrc-gpu-tiny-torch --device cuda --json"
cp "$OUT/generate_torch.log" "$OUT/generate_torch.json" 2>/dev/null
if "$PY" -c "import onnxruntime as o, sys; sys.exit(0 if 'CUDAExecutionProvider' in o.get_available_providers() else 1)"; then
  run_step generate_ort_cuda 120 "$PY" benchmarks/generate.py --device cuda --json
  cp "$OUT/generate_ort_cuda.log" "$OUT/generate_ort_cuda.json" 2>/dev/null
else
  status[generate_ort_cuda]=skipped
  echo "onnxruntime-gpu not installed: ORT CUDA EP rows skipped" > "$OUT/generate_ort_cuda.log"
fi
{
  printf '{'; sep=""
  for s in "${steps[@]}"; do printf '%s"%s": "%s"' "$sep" "$s" "${status[$s]:-not run}"; sep=", "; done
  printf '}\n'
} > "$OUT/summary.json"
cat "$OUT/summary.json"
