#!/usr/bin/env bash
# One prepared GPU check for an NVIDIA H100/H200 without internet, within one 8-minute budget (BUDGET, seconds,
# default 470), steps in priority order; each step gets the smaller of its own timeout and what is left of the
# budget, and a step with less than 30 s left is reported as skipped:
#   1. the CUDA tests (pytest -m cuda over tests/; 75 s),
#   2. the kernel benchmarks (python -m bench.kernels: AR trainable head GSPO and token, frozen head, log-probs only,
#      the round-one tiled kernel, GSPO sequences longer than a chunk, the 2/3/4-GEMM ceilings, torch.compile and
#      Liger-Kernel when installed; flow against eager, torch.compile and a copy; 190 s, its own budget 40 s less),
#   3. the verifier benchmark (python -m bench.verifier; 70 s),
#   4. training-step throughput on one GPU (python -m bench.train_step: a random-weight TinyUMM-style model, dim
#      TS_DIM (1024) x TS_LAYERS (16): samples/s, time split, peak memory; 45 s),
#   5. SD3.5-Medium-shaped random transformer: rollout/replay throughput and memory at 512 px (bench.sd3_smoke
#      --random-shape; 45 s; skipped without diffusers/peft),
#   6. BAGEL-7B-MoT-shaped random model: rollout/replay cost, peak memory, drift (bench.bagel_smoke --random 7b;
#      45 s; skipped without nemo-automodel/peft),
#   7. when tensorrt_llm imports: the trtllm backend check (bench.trtllm_check; outside the budget, TRTLLM_TIMEOUT,
#      default 300 s; TRTLLM_MODEL=/ckpt for a real Qwen2.5-VL checkpoint); otherwise it says it was skipped.
# SKIP_VERIFIER=1, SKIP_TRAIN_STEP=1, SKIP_SD3=1, SKIP_BAGEL=1, SKIP_TRTLLM=1 skip a step.
# Everything goes to $OUT when set (else bench/results/gpu_check/, which git does not ignore: commit it only on
# purpose). The kernel table is printed last. A failing step does not stop the others.
# Usage: bash bench/gpu_check.sh        (PY=/path/to/python to pick the interpreter)
#        AUTOTUNE=1 SKIP_VERIFIER=1 bash bench/gpu_check.sh   (also torch.compile max-autotune rows)
#        DEMO_STEPS=80 DEMO_SET="optim.lr=3e-5" bash bench/gpu_check.sh   (after the rest, `alphagrpo demo` on CUDA
#            for that many GRPO steps with those overrides, under DEMO_TIMEOUT seconds (default 120), output in
#            demo.txt; not part of the budget)
#        ONLY_TRAIN_STEP=1 bash bench/gpu_check.sh   (the training-step measurement alone, 90 s)
#        ONLY_DEMO=1 DEMO_STEPS=250 DEMO_SET="lora.rank=8 lora.alpha=16 optim.lr=3e-4" DEMO_TIMEOUT=560 \
#            bash bench/gpu_check.sh   (the demo alone, e.g. a long GPU run in one 10-minute call; exit status = its)
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT_DIR="${OUT:-$ROOT/bench/results/gpu_check}"
mkdir -p "$OUT_DIR" "$ROOT/bench/results"
T0=$(date +%s)
log() { echo "[gpu_check +$(( $(date +%s) - T0 ))s] $*"; }
BUDGET="${BUDGET:-470}"
# allot WANT: the timeout for a step, the smaller of WANT and what is left of the budget less a 10 s margin (0: skip)
allot() { local left=$(( BUDGET - ($(date +%s) - T0) - 10 )); local t=$1; [ "$left" -lt "$t" ] && t=$left;
          [ "$t" -lt 30 ] && t=0; echo "$t"; }

if [ -z "${PY:-}" ]; then   # the first interpreter with a CUDA torch, else the first with any torch
  CANDIDATES=("$ROOT/.venv/bin/python" "$(command -v python3)" "$(command -v python)")
  for c in "${CANDIDATES[@]}"; do
    [ -x "$c" ] && "$c" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null && { PY="$c"; break; }
  done
  if [ -z "${PY:-}" ]; then
    for c in "${CANDIDATES[@]}"; do [ -x "$c" ] && "$c" -c "import torch" 2>/dev/null && { PY="$c"; break; }; done
  fi
  PY="${PY:-python3}"
fi

# Every step runs from $ROOT, so the checkout's packages import without an install (alphagrpo/__init__.py loads the
# top-level kernels/ folder as alphagrpo.kernels when no install maps it); bench.* needs $ROOT on the path too.
export PYTHONPATH="${PYTHONPATH:-$ROOT}"
case ":$PYTHONPATH:" in *":$ROOT:"*) ;; *) export PYTHONPATH="$PYTHONPATH:$ROOT" ;; esac

{
  echo "date: $(date -Is)"; echo "host: $(hostname)"; echo "python: $PY"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | head -5
  "$PY" - <<'EOF' 2>&1
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0))
try:
    import triton; print("triton", triton.__version__)
except Exception as e:
    print("triton missing:", e)
import alphagrpo.kernels as k; print("alphagrpo.kernels from", k.__file__)
EOF
} > "$OUT_DIR/env.txt" 2>&1
cat "$OUT_DIR/env.txt"

RC_TESTS=0; RC_KERNELS=0
if [ "${ONLY_DEMO:-0}" = 1 ] && [ -z "${DEMO_STEPS:-}" ]; then
  echo "ONLY_DEMO=1 needs DEMO_STEPS (and usually DEMO_SET, DEMO_TIMEOUT)"; exit 2
fi
RC_VERIFIER="not run"; RC_TRAIN_STEP="not run"; RC_SD3="not run"; RC_BAGEL="not run"; RC_TRTLLM="not run"
if [ "${ONLY_TRAIN_STEP:-0}" = 1 ]; then
  log "training-step throughput, one GPU (timeout 90 s)"
  timeout 90 "$PY" -m bench.train_step --dim "${TS_DIM:-1024}" --layers "${TS_LAYERS:-16}" --steps 5 \
    --out "$OUT_DIR/train_step.json" > "$OUT_DIR/train_step.txt" 2>&1
  RC_TRAIN_STEP=$?
  tail -n 8 "$OUT_DIR/train_step.txt"
  exit "$RC_TRAIN_STEP"
fi
if [ "${ONLY_DEMO:-0}" != 1 ]; then
T=$(allot 75); log "1. CUDA tests (timeout $T s)"
timeout "$T" "$PY" -m pytest -q -m cuda tests/ -p no:cacheprovider -o addopts="" -rs > "$OUT_DIR/pytest_cuda.txt" 2>&1
RC_TESTS=$?
tail -n 15 "$OUT_DIR/pytest_cuda.txt"

T=$(allot 190)
if [ "$T" = 0 ]; then RC_KERNELS="skipped (budget)"; log "2. kernel benchmarks SKIPPED (budget)"; else
  log "2. kernel benchmarks (timeout $T s)"
  EXTRA_K=()
  if [ "${AUTOTUNE:-0}" = 1 ]; then EXTRA_K=(--autotune); fi   # max-autotune rows: minutes; set SKIP_VERIFIER=1
  timeout "$T" "$PY" -m bench.kernels --time-budget $(( T - 40 )) --out "$OUT_DIR" "${EXTRA_K[@]}" \
    > "$OUT_DIR/kernels.txt" 2> "$OUT_DIR/kernels.stderr.txt"
  RC_KERNELS=$?
fi

T=$(allot 70)
if [ "${SKIP_VERIFIER:-0}" = 1 ]; then RC_VERIFIER="not run (SKIP_VERIFIER=1)"
elif [ "$T" = 0 ]; then RC_VERIFIER="skipped (budget)"; log "3. verifier benchmark SKIPPED (budget)"
else
  log "3. verifier benchmark (timeout $T s)"
  timeout "$T" "$PY" -m bench.verifier --out "$OUT_DIR/verifier.json" --time-budget $(( T - 20 )) \
    > "$OUT_DIR/verifier.txt" 2>&1
  RC_VERIFIER=$?
  tail -n 5 "$OUT_DIR/verifier.txt"
fi

T=$(allot 45)
if [ "${SKIP_TRAIN_STEP:-0}" = 1 ]; then RC_TRAIN_STEP="not run (SKIP_TRAIN_STEP=1)"
elif [ "$T" = 0 ]; then RC_TRAIN_STEP="skipped (budget)"; log "4. training-step throughput SKIPPED (budget)"
else
  log "4. training-step throughput, one GPU (timeout $T s)"
  timeout "$T" "$PY" -m bench.train_step --dim "${TS_DIM:-1024}" --layers "${TS_LAYERS:-16}" --steps 3 \
    --out "$OUT_DIR/train_step.json" > "$OUT_DIR/train_step.txt" 2>&1
  RC_TRAIN_STEP=$?
  tail -n 8 "$OUT_DIR/train_step.txt"
fi

T=$(allot 45)
if [ "${SKIP_SD3:-0}" = 1 ]; then RC_SD3="not run (SKIP_SD3=1)"
elif ! "$PY" -c "import diffusers, peft" 2>/dev/null; then
  RC_SD3="skipped (diffusers/peft not installed: pip install 'alphagrpo[diffusers]')"; log "5. sd3: $RC_SD3"
elif [ "$T" = 0 ]; then RC_SD3="skipped (budget)"; log "5. sd3 SKIPPED (budget)"
else
  log "5. sd3: SD3.5-Medium-shaped random transformer at 512 px (timeout $T s)"
  timeout "$T" "$PY" -m bench.sd3_smoke --random-shape --time-budget $(( T - 15 )) \
    --out "$OUT_DIR/sd3_random_shape.json" > "$OUT_DIR/sd3_random_shape.txt" 2>&1
  RC_SD3=$?
  tail -c 1500 "$OUT_DIR/sd3_random_shape.txt"; echo
fi

T=$(allot 45)
if [ "${SKIP_BAGEL:-0}" = 1 ]; then RC_BAGEL="not run (SKIP_BAGEL=1)"
elif ! "$PY" -c "import nemo_automodel.components.models.bagel, peft" > /dev/null 2>&1; then
  RC_BAGEL="skipped (no nemo-automodel/peft: pip install --no-deps nemo-automodel==0.7.0 einops; pip install peft)"
  log "6. bagel: $RC_BAGEL"
elif [ "$T" = 0 ]; then RC_BAGEL="skipped (budget)"; log "6. bagel SKIPPED (budget)"
else
  log "6. BAGEL-7B-MoT-shaped random model: rollout/replay cost, peak memory, drift (timeout $T s)"
  timeout "$T" "$PY" -m bench.bagel_smoke --random 7b --think-tokens 128 --out "$OUT_DIR/bagel_random.json" \
    > "$OUT_DIR/bagel_random.txt" 2>&1
  RC_BAGEL=$?
  grep -v '^{' "$OUT_DIR/bagel_random.txt" | tail -n 6
fi

if [ "${SKIP_TRTLLM:-0}" = 1 ]; then
  RC_TRTLLM="not run (SKIP_TRTLLM=1)"; log "7. trtllm check SKIPPED (SKIP_TRTLLM=1)"
elif "$PY" -c "import tensorrt_llm" > "$OUT_DIR/trtllm_import.txt" 2>&1; then
  log "7. trtllm backend check (timeout ${TRTLLM_TIMEOUT:-300} s, outside the budget)"
  TRT_ARGS=(--out "$OUT_DIR")
  [ -n "${TRTLLM_MODEL:-}" ] && TRT_ARGS+=(--model "$TRTLLM_MODEL")
  timeout "${TRTLLM_TIMEOUT:-300}" "$PY" -m bench.trtllm_check "${TRT_ARGS[@]}" > "$OUT_DIR/trtllm_check.txt" 2>&1
  RC_TRTLLM=$?
  sed '$d' "$OUT_DIR/trtllm_check.txt" | tail -n 14
else
  RC_TRTLLM="skipped (tensorrt_llm does not import)"
  log "7. trtllm check SKIPPED: tensorrt_llm does not import with $PY ($(tail -n 1 "$OUT_DIR/trtllm_import.txt"))"
fi

log "done: tests rc=$RC_TESTS, kernels rc=$RC_KERNELS, verifier rc=$RC_VERIFIER, train_step rc=$RC_TRAIN_STEP, sd3 rc=$RC_SD3, bagel rc=$RC_BAGEL, trtllm check rc=$RC_TRTLLM (outputs in $OUT_DIR)"
tail -n 3 "$OUT_DIR/kernels.stderr.txt" 2>/dev/null
if [ -s "$OUT_DIR/kernels.txt" ]; then
  tail -n 1 "$OUT_DIR/kernels.txt"                                 # the JSON line
  echo
  sed '$d' "$OUT_DIR/kernels.txt"                                  # the table, last
else
  echo "no kernel table: see $OUT_DIR/kernels.stderr.txt"
fi
fi   # ONLY_DEMO
if [ -n "${DEMO_STEPS:-}" ]; then
  log "GRPO demo on CUDA: $DEMO_STEPS steps, overrides '${DEMO_SET:-}' (timeout ${DEMO_TIMEOUT:-120} s)"
  DEMO_ARGS=(demo --steps "$DEMO_STEPS" --out "${TMPDIR:-/tmp}/alphagrpo_demo" --set device=cuda)
  for kv in ${DEMO_SET:-}; do DEMO_ARGS+=(--set "$kv"); done
  PYTHONUNBUFFERED=1 timeout "${DEMO_TIMEOUT:-120}" "$PY" -m alphagrpo.cli "${DEMO_ARGS[@]}" > "$OUT_DIR/demo.txt" 2>&1
  RC_DEMO=$?
  log "demo rc=$RC_DEMO"
  tail -n 25 "$OUT_DIR/demo.txt"
  [ "${ONLY_DEMO:-0}" = 1 ] && exit "$RC_DEMO"
fi
[ "$RC_TESTS" = 0 ] && [ "$RC_KERNELS" = 0 ]
