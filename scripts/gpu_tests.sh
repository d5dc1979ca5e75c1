#!/usr/bin/env bash
# The GPU tests (`pytest -m gpu`) in parts that each fit a 10-minute call on a fresh machine (Triton compiles
# and mamba-ssm's autotuning dominate a first run). Needs CUDA; mamba-ssm and fla where their tests should run.
#
#   scripts/gpu_tests.sh fla       # fla layers and kernels, HF Gated DeltaNet / KDA, and their LRP forms
#   scripts/gpu_tests.sh mamba     # the Mamba Triton kernel, HF / mamba-ssm Mamba and Mamba2, their LRP forms
#   scripts/gpu_tests.sh rest      # RWKV, RG-LRU, HF hybrids and relatives, attribution, CLI, recipes, eval
#   scripts/gpu_tests.sh all       # the three in turn
#
# OUT (default: ./gpu-logs) receives <part>.log (pytest -v: every test by name) and failures.log (each failure as
# it happens, so that a run cut by a time limit still tells what failed). PYTEST_TIMEOUT (seconds, default 540)
# bounds each part. CAPTUM_IMPLICIT_FIRST_TRITON_CONFIG=1 keeps one autotune config of fla's and mamba-ssm's
# kernels (the tests check maths, not tuning). tests/conftest.py puts Triton's float32 dots (fla's included) in
# IEEE mode and turns TF32 off.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-logs}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 CAPTUM_IMPLICIT_FIRST_TRITON_CONFIG=1
export CAPTUM_IMPLICIT_FAILURE_LOG="$OUT/failures.log"
export PYTHONPATH="$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"

declare -A PARTS=(
  [fla]="tests/test_fla.py tests/test_fla_layers.py tests/test_lrp_fla.py tests/test_gated_deltanet.py
         tests/test_kda.py tests/test_lrp_kimi.py tests/test_lrp_relatives.py tests/test_lrp_hybrids.py
         tests/test_sparse_attention.py"
  [mamba]="tests/test_ssm_triton.py tests/test_gpu_mamba.py tests/test_mamba.py tests/test_mamba2.py tests/test_lrp.py
           tests/test_lrp_families.py tests/test_lrp_mamba_ssm.py tests/test_mamba_ssm_mha.py
           tests/test_lrp_mamba2_hybrids.py tests/test_lrp_falcon_zamba.py"
  [rest]="tests/test_rwkv.py tests/test_rglru.py tests/test_hf_variants.py tests/test_softmax.py tests/test_mlstm.py
          tests/test_attr_gpu.py tests/test_cli_explain.py tests/test_recipes.py tests/test_eval.py"
)

run_part() {
  local part=$1
  # shellcheck disable=SC2086  # the file list splits on purpose
  timeout "${PYTEST_TIMEOUT:-540}" python3 -m pytest -v -n "${WORKERS:-15}" -p no:cacheprovider -p no:benchmark \
    -o faulthandler_timeout=240 -m gpu ${PARTS[$part]} > "$OUT/$part.log" 2>&1
  local rc=$?
  echo "$part: rc=$rc, $(grep -c ' PASSED' "$OUT/$part.log") passed, $(grep -c ' FAILED' "$OUT/$part.log") failed," \
       "$(grep -c ' SKIPPED' "$OUT/$part.log") skipped (rc 124: cut by PYTEST_TIMEOUT)"
  return $rc
}

case "${1:-}" in
  fla|mamba|rest) run_part "$1" ;;
  all) status=0; for part in fla mamba rest; do run_part "$part" || status=1; done; exit $status ;;
  *) echo "usage: $0 fla|mamba|rest|all" >&2; exit 2 ;;
esac
