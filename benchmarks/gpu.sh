#!/usr/bin/env bash
# Every GPU row of BENCHMARKS.md in one call of under 10 minutes (GPU time comes in short
# windows). Run from the repository root on the GPU machine:
#
#   bash benchmarks/gpu.sh            # results in $OUT (the device tool's folder) or runs/bench/gpu
#
# Needs a Python ($PY, default python3) with jax[cuda12]==0.10.2 and a CUDA build of torch
# with diffusers and peft (the machine has no network: nothing is installed here). Rows, in
# order of importance, each skipped if the time budget ($BUDGET_S, default 540 s) would be
# overrun:
#   1. sd15-lora-512    JAX vs PyTorch (bf16 autocast + SDPA), 5 rounds, + the bf16 matmul peak
#   2. sample-sd15-512  40-step CFG sampling, JAX scan vs the diffusers loop, 3 rounds
#   3. sd15-lora-512    JAX only with cuDNN flash attention (DDM_JAX_ATTENTION=auto), 3 rounds
# JAX compiles once per row (round 1, cold: reported as jax_compile_s) and then loads
# from a persistent cache (jax_compile_cached_s), so five rounds fit in the window.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-runs/bench/gpu}
BUDGET_S=${BUDGET_S:-540}
mkdir -p "$OUT"
START=$SECONDS
log() { echo "[gpu.sh $((SECONDS - START)) s] $*" | tee -a "$OUT/gpu.log" >&2; }

{
  date -u; uname -a; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  nproc; free -g | head -2
} > "$OUT/machine.txt" 2>&1
"$PY" - > "$OUT/versions.txt" 2>&1 <<'EOF'
import jax, torch, diffusers, peft
print('jax', jax.__version__, jax.default_backend(), jax.devices())
print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else '-')
print('diffusers', diffusers.__version__, 'peft', peft.__version__)
ok = jax.default_backend() == 'gpu' and torch.cuda.is_available()
raise SystemExit(0 if ok else 3)
EOF
rc=$?
cat "$OUT/versions.txt" >&2
if [ $rc -ne 0 ]; then
  log "no usable GPU stack (jax GPU backend and torch CUDA both needed): nothing run"
  exit 2
fi

# row: name, estimated seconds, run.py arguments
row() {
  local name=$1 need=$2; shift 2
  local left=$((BUDGET_S - (SECONDS - START)))
  if [ "$left" -lt "$need" ]; then
    log "skip $name: ${left} s left, needs ~${need} s"
    return
  fi
  log "start $name (${left} s left)"
  timeout "$left" "$PY" benchmarks/run.py "$@" --out "$OUT/raw.jsonl" >> "$OUT/gpu.jsonl" 2>> "$OUT/gpu.log"
  log "end $name (rc $?)"
}

row sd15-lora-512 240 sd15-lora-512 --frameworks jax,torch --rounds 5 --jax-cache "$OUT/jax_cache_train" --timeout 400
row sample-sd15-512 150 sample-sd15-512 --frameworks jax,torch --rounds 3 --jax-cache "$OUT/jax_cache_sample" --timeout 300
export DDM_JAX_ATTENTION=auto
row sd15-lora-512-cudnn 120 sd15-lora-512 --rounds 3 --frameworks jax \
  --no-peak --jax-cache "$OUT/jax_cache_cudnn" --timeout 300
rm -rf "$OUT"/jax_cache_*
log "done; rows in $OUT/gpu.jsonl"
cat "$OUT/gpu.jsonl"
