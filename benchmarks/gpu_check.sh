#!/usr/bin/env bash
# The GPU checks of lnb in one script, for a CUDA machine (about 10 minutes on one GPU):
#
#   1. installs the CUDA extras into the project's environment: jax[cuda12] at the installed JAX
#      version, and the cupy extra (cupy-cuda12x);
#   2. runs the CuPy tests (tests/test_xp.py: lnb_fast.xp on CuPy against lnb_ref);
#   3. runs benchmarks/step_time.py (every strategy against Adam, means over every step) and
#      benchmarks/measured_strategy.py (does timing whole steps choose other strategies than the
#      flop model on the GPU, and is the step faster?);
#   4. builds the peers environment (JAX 0.9.1 + CUDA, kfac-jax, psgd-jax) and runs
#      benchmarks/peers.py on Fashion-MNIST (MLP; --models to add the CNN and the ViT);
#   5. writes $RESULTS/summary.md: the device, the versions, each step's exit status and its tables.
#
#   bash benchmarks/gpu_check.sh                 # everything (needs nvidia-smi and the network)
#   bash benchmarks/gpu_check.sh --preinstalled  # offline: the Python in $PY already has JAX
#                                                # with CUDA and CuPy (no installs; see below)
#   bash benchmarks/gpu_check.sh --dry-run       # print the commands, run nothing
#   bash benchmarks/gpu_check.sh --smoke         # CPU: the quick versions of 2-4, no installs
#
# --preinstalled is for a machine with no network whose Python already holds jax + a CUDA plugin,
# CuPy, optax, pytest, hypothesis, equinox and flax (as the GPUs lent to this project do). It
# installs nothing but the wheels in .whl/ (if any, e.g. psgd-jax) into /tmp/site, skips K-FAC
# (kfac-jax 0.0.8 needs JAX <= 0.9.1), and adds: benchmarks/matmul_precision.py (TF32 on the
# metric), benchmarks/conv_f64.py (float64 convolutions under jit), the MLP's step time at batch
# 8000, step_time.py again at JAX_DEFAULT_MATMUL_PRECISION=highest, and the float32 GPU run of
# the tests that exercise lnb_fast. Each step has a time limit (STEP_TIMEOUT, default 150 s; the
# tests TESTS_TIMEOUT, default 240 s, on TEST_WORKERS processes, default 14). It took 7 minutes on
# an H200 before the conv-f64 and batch-8000 steps were added (benchmarks/gpu_h200.md); their
# runs there took about 10 s and 53 s. MEASURED_MODELS (default mlp,cnn) picks
# measured_strategy.py's models; the ViT's measurement alone took 3.5 minutes there, so add it
# (MEASURED_MODELS=mlp,cnn,vit STEP_TIMEOUT=300) only where the call's time allows, or run
# `python3 benchmarks/measured_strategy.py --models vit` in a call of its own.
#
# Environment: PY (default .venv/bin/python; python3 with --preinstalled), PEERS_VENV (.venv-kfac),
# RESULTS (results/gpu_check), MODELS (mlp), EPOCHS (5), DATA_PATH (Fashion-MNIST's IDX files;
# default the Debian package's folder). A failing step is recorded and the next one runs.
set -uo pipefail

MODE=full
case "${1:-}" in
  --dry-run) MODE=dry ;;
  --smoke) MODE=smoke ;;
  --preinstalled) MODE=preinstalled ;;
  "") ;;
  *) echo "usage: $0 [--preinstalled | --dry-run | --smoke]" >&2; exit 2 ;;
esac

cd "$(dirname "$0")/.."
if [[ $MODE == preinstalled ]]; then PY=${PY:-python3}; else PY=${PY:-.venv/bin/python}; fi
PEERS_VENV=${PEERS_VENV:-.venv-kfac}
OUT=${RESULTS:-results/gpu_check}
STEP_TIMEOUT=${STEP_TIMEOUT:-150}
DATA_ARGS=()
if [[ -n ${DATA_PATH:-} ]]; then DATA_ARGS=(--data-path "$DATA_PATH"); fi
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
  if [[ $MODE == preinstalled ]]; then
    timeout "$STEP_TIMEOUT" "$@" >"$OUT/$name.log" 2>&1
  else
    "$@" >"$OUT/$name.log" 2>&1
  fi
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
  step measured-strategy "$PY" benchmarks/measured_strategy.py --quiet --out "$OUT/measured_strategy.json"
  step peers-env bash -c "python3 -m venv '$PEERS_VENV' && '$PEERS_VENV/bin/python' -m pip install --quiet -e '.[peers]' 'jax[cuda12]==0.9.1'"
  step peers "$PEERS_VENV/bin/python" benchmarks/peers.py --quiet --models "$MODELS" --epochs "$EPOCHS" --out "$OUT/peers.json"
elif [[ $MODE == preinstalled ]]; then
  command -v nvidia-smi >/dev/null || { echo "no nvidia-smi: not a CUDA machine" >&2; exit 2; }
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
  fi
  export XLA_PYTHON_CLIENT_PREALLOCATE=false  # several processes share the GPU in the test step
  step devices "$PY" -c 'import jax, cupy, optax; print(jax.__version__, optax.__version__, jax.devices()); print(cupy.__version__, cupy.cuda.runtime.getDeviceProperties(0)["name"])'
  step test-xp "$PY" -m pytest -q -p no:cacheprovider tests/test_xp.py
  step precision "$PY" benchmarks/matmul_precision.py --out "$OUT/matmul_precision.json"
  step conv-f64 "$PY" benchmarks/conv_f64.py --out "$OUT/conv_f64.json"
  step step-time "$PY" benchmarks/step_time.py --quiet --no-time-to-target --models mlp \
    --out "$OUT/step_time.json"
  step peers "$PY" benchmarks/peers.py --quiet --models "$MODELS" --epochs "$EPOCHS" \
    --methods adam,lnb,muon,psgd "${DATA_ARGS[@]}" --out "$OUT/peers.json"
  step measured-strategy "$PY" benchmarks/measured_strategy.py --quiet \
    --models "${MEASURED_MODELS:-mlp,cnn}" --out "$OUT/measured_strategy.json"
  step step-time-b8000 "$PY" benchmarks/step_time.py --quiet --no-time-to-target --models mlp \
    --batch 8000 --repeats 50 --out "$OUT/step_time_b8000.json"
  step step-time-cnn-vit "$PY" benchmarks/step_time.py --quiet --no-time-to-target \
    --models cnn,vit --out "$OUT/step_time_cnn_vit.json"
  JAX_DEFAULT_MATMUL_PRECISION=highest step step-time-highest "$PY" benchmarks/step_time.py \
    --quiet --no-time-to-target --models mlp --out "$OUT/step_time_highest.json"
  # -v: each result is in the log as it comes, so a run cut by its time limit still says which
  # tests passed; the suite's conftest sets JAX_DEFAULT_MATMUL_PRECISION=highest (docs/fast.md)
  STEP_TIMEOUT=${TESTS_TIMEOUT:-240} step tests-gpu "$PY" -m pytest -v -p no:cacheprovider \
    -n "${TEST_WORKERS:-14}" -rfE tests/test_fast.py tests/test_step_norm.py \
    tests/test_strategies.py tests/test_conformance.py tests/test_optax_composition.py \
    tests/test_readme.py tests/test_models.py tests/test_locoprop_proxprop_fast.py \
    tests/test_fast_crosscheck.py
elif [[ $MODE == smoke ]]; then
  step test-xp "$PY" -m pytest -q tests/test_xp.py
  step step-time "$PY" benchmarks/step_time.py --quick --quiet --models mlp --no-time-to-target --out "$OUT/step_time.json"
  step measured-strategy "$PY" benchmarks/measured_strategy.py --quick --quiet --models mlp --out "$OUT/measured_strategy.json"
  step peers "$PY" benchmarks/peers.py --quick --quiet --methods adam,lnb --out "$OUT/peers.json"
else
  step install-cuda "$PY" -m pip install --quiet "jax[cuda12]==\$JAX_VERSION" -e ".[cupy]"
  step test-xp "$PY" -m pytest -q tests/test_xp.py
  step step-time "$PY" benchmarks/step_time.py --quiet --no-time-to-target --out "$OUT/step_time.json"
  step measured-strategy "$PY" benchmarks/measured_strategy.py --quiet --out "$OUT/measured_strategy.json"
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
  for md in "$OUT"/step_time*.md "$OUT/measured_strategy.md" "$OUT/peers.md" "$OUT/conv_f64.md"; do
    if [[ -f $md ]]; then echo; echo "## $(basename "$md")"; echo; cat "$md"; fi
  done
} >"$SUMMARY"
echo "wrote $SUMMARY"
