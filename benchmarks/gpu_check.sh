#!/usr/bin/env bash
# The GPU checks of lnb in one script, for a CUDA machine (about 10 minutes on one GPU):
#
#   1. installs the CUDA extras into the project's environment: jax[cuda12] at the installed JAX
#      version, and the cupy extra (cupy-cuda12x);
#   2. runs the CuPy tests (tests/test_xp.py: lnb_fast.xp on CuPy against lnb_ref);
#   3. runs benchmarks/step_time.py (every strategy against Adam, means over every step);
#   4. builds the peers environment (JAX 0.9.1 + CUDA, kfac-jax, psgd-jax) and runs
#      benchmarks/peers.py on Fashion-MNIST (MLP; --models to add the CNN and the ViT);
#   5. writes $OUT/summary.md: the device, the versions, each step's exit status and its tables.
#
#   bash benchmarks/gpu_check.sh                 # everything (needs nvidia-smi and the network)
#   bash benchmarks/gpu_check.sh --dry-run       # print the commands, run nothing
#   bash benchmarks/gpu_check.sh --smoke         # CPU: the quick versions of 2-4, no installs
#
# Environment: PY (default .venv/bin/python), PEERS_VENV (.venv-kfac), OUT (results/gpu_check),
# MODELS (mlp), EPOCHS (5). A failing step is recorded and the next one runs.
set -uo pipefail

MODE=full
case "${1:-}" in
  --dry-run) MODE=dry ;;
  --smoke) MODE=smoke ;;
  "") ;;
  *) echo "usage: $0 [--dry-run | --smoke]" >&2; exit 2 ;;
esac

cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PEERS_VENV=${PEERS_VENV:-.venv-kfac}
OUT=${OUT:-results/gpu_check}
MODELS=${MODELS:-mlp}
EPOCHS=${EPOCHS:-5}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.md"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

status=()
step() {  # step NAME COMMAND...: run (or print) it, log to $OUT/NAME.log, record its status
  local name=$1; shift
  echo "+ $*"
  if [[ $MODE == dry ]]; then status+=("| $name | not run (dry run) |"); return 0; fi
  "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  status+=("| $name | exit $rc |")
  tail -n 3 "$OUT/$name.log"
  return 0
}

if [[ $MODE == full ]]; then
  if ! command -v nvidia-smi >/dev/null; then
    echo "no nvidia-smi: this is not a CUDA machine (use --smoke on a CPU)" >&2
    exit 2
  fi
  JAX_VERSION=$("$PY" -c 'import jax; print(jax.__version__)')
  step install-cuda "$PY" -m pip install --quiet "jax[cuda12]==$JAX_VERSION" -e ".[cupy]"
  step devices "$PY" -c 'import jax, cupy; print(jax.devices()); print(cupy.cuda.runtime.getDeviceProperties(0)["name"])'
  step test-xp "$PY" -m pytest -q tests/test_xp.py
  step step-time "$PY" benchmarks/step_time.py --quiet --no-time-to-target --out "$OUT/step_time.json"
  step peers-env bash -c "python3 -m venv '$PEERS_VENV' && '$PEERS_VENV/bin/python' -m pip install --quiet -e '.[peers]' 'jax[cuda12]==0.9.1'"
  step peers "$PEERS_VENV/bin/python" benchmarks/peers.py --quiet --models "$MODELS" --epochs "$EPOCHS" --out "$OUT/peers.json"
elif [[ $MODE == smoke ]]; then
  step test-xp "$PY" -m pytest -q tests/test_xp.py
  step step-time "$PY" benchmarks/step_time.py --quick --quiet --models mlp --no-time-to-target --out "$OUT/step_time.json"
  step peers "$PY" benchmarks/peers.py --quick --quiet --methods adam,lnb --out "$OUT/peers.json"
else
  step install-cuda "$PY" -m pip install --quiet "jax[cuda12]==\$JAX_VERSION" -e ".[cupy]"
  step test-xp "$PY" -m pytest -q tests/test_xp.py
  step step-time "$PY" benchmarks/step_time.py --quiet --no-time-to-target --out "$OUT/step_time.json"
  step peers-env bash -c "python3 -m venv '$PEERS_VENV' && '$PEERS_VENV/bin/python' -m pip install -e '.[peers]' 'jax[cuda12]==0.9.1'"
  step peers "$PEERS_VENV/bin/python" benchmarks/peers.py --quiet --models "$MODELS" --epochs "$EPOCHS" --out "$OUT/peers.json"
fi

{
  echo "# GPU check ($MODE), $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null)"
  echo
  if command -v nvidia-smi >/dev/null; then
    echo '```'; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; echo '```'
  else
    echo "No nvidia-smi on this machine."
  fi
  echo
  echo "| step | status |"
  echo "|---|---|"
  printf '%s\n' "${status[@]}"
  for md in "$OUT/step_time.md" "$OUT/peers.md"; do
    if [[ -f $md ]]; then echo; echo "## $(basename "$md")"; echo; cat "$md"; fi
  done
} >"$SUMMARY"
echo "wrote $SUMMARY"
