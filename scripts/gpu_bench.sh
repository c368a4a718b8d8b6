#!/usr/bin/env bash
# Issue 8's measurements on one H100/H200: Qwen2.5-1.5B-shaped SFT and DPO at sequence 4096 in bf16 —
# MFU, tokens/s, peak memory, our step vs the Hugging Face PyTorch step, and the longest sequence
# that fits with and without the chunked LM head.
#
#   bash scripts/gpu_bench.sh                  # every stage below, in order
#   bash scripts/gpu_bench.sh steps fit        # some of them
#
# Stages (each a separate process, so the allocator's peak belongs to that stage):
#   install    pip-installs what the machine lacks (grain, draccus, tensorboardX) from the wheels
#              that scripts/fetch_gpu_wheels.sh put in $WHEELS, offline; always runs first
#   env        GPU, driver and package versions, into the log
#   steps      SFT, DPO with a frozen bf16 reference, DPO with precomputed reference log-probs
#              (remat dots_with_no_batch_dims_saveable, cuDNN attention: configs/qwen2.5-*_gpu.yaml's settings)
#   pytorch    our SFT/DPO steps and transformers + PyTorch's, both with per-layer recomputation
#              (remat full / gradient checkpointing) so that like is compared with like
#   logprobs   the SFT step with the chunked LM head vs full [B, T, V] logits
#   fit        the longest SFT sequence (batch 1) whose step fits the GPU, chunked and full logits
#   packed     the packed-row SFT step (one row of 512-token examples) with xla, cudnn (dense mask),
#              pallas_gpu (segment ids) and blockwise (plain JAX) attention at T = 2048, 8192, 32768:
#              memory and time
#
# Results: one JSON line per stage in $OUT/results.jsonl, everything printed in $OUT/bench.log.
# $OUT defaults to runs/gpu_bench. Stages that would start after DEADLINE_S seconds are skipped (and
# logged as such), so a run under a 10-minute command limit still returns what it measured.
# The knobs below are environment variables; with PRESET=tiny SEQ=64 BATCH=2 DTYPE=float32
# ATTENTION=xla FIT_BUDGET_GIB=0.05 the same path runs on a CPU in a few minutes.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-runs/gpu_bench}
WHEELS=${WHEELS:-build/gpu_wheels}
PYTHON=${PYTHON:-python3}
DEADLINE_S=${DEADLINE_S:-570}
PRESET=${PRESET:-qwen2.5-1.5b}
SEQ=${SEQ:-4096}
BATCH=${BATCH:-4}
DTYPE=${DTYPE:-bfloat16}
ATTENTION=${ATTENTION:-cudnn}
REPEATS=${REPEATS:-5}
LOGPROB_VOCABS=${LOGPROB_VOCABS:-[151936]}
FIT_BUDGET_GIB=${FIT_BUDGET_GIB:-0}
FIT_GRANULARITY=${FIT_GRANULARITY:-1024}

mkdir -p "$OUT"
exec > >(tee -a "$OUT/bench.log") 2>&1
started=$SECONDS
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(env steps pytorch logprobs fit packed)

install() {
  if "$PYTHON" -c "import grain, draccus, tensorboardX" 2>/dev/null; then
    echo "install: grain, draccus and tensorboardX are already there"
    return 0
  fi
  if [ ! -f "$WHEELS/requirements.txt" ]; then
    echo "install: no wheels in $WHEELS; run scripts/fetch_gpu_wheels.sh where there is a network, and carry $WHEELS" >&2
    return 1
  fi
  # --no-index: nothing is fetched; pip keeps every installed package that satisfies a requirement.
  "$PYTHON" -m pip install --quiet --no-index --find-links "$WHEELS" -r "$WHEELS/requirements.txt" &&
    echo "install: $(tr '\n' ' ' < "$WHEELS/requirements.txt")from $WHEELS"
}

env_report() {
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$PYTHON" - <<'EOF'
import importlib.metadata as md, platform
print("python", platform.python_version())
for name in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax", "orbax-checkpoint", "torch", "transformers", "grain", "draccus"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        pass
import jax
print("jax devices:", jax.devices())
EOF
}

# bench LABEL TIMEOUT_S ARGS...: one `jaxrlhf bench` process, within the deadline.
bench() {
  local label=$1 limit=$2
  shift 2
  local left=$((DEADLINE_S - (SECONDS - started)))
  if [ "$left" -lt 60 ]; then
    echo "=== $label: skipped, ${left}s left before DEADLINE_S=$DEADLINE_S"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $label (at most ${limit}s)"
  timeout --signal=INT --kill-after=20 "$limit" "$PYTHON" -m jaxrlhf.cli bench \
    --label "$label" --out "$OUT/results.jsonl" --preset "$PRESET" --seq_len "$SEQ" --batch "$BATCH" \
    --dtype "$DTYPE" --param_dtype float32 --reference_dtype bfloat16 --attention_impl "$ATTENTION" \
    --warmup 2 --repeats "$REPEATS" "$@"
  local status=$?
  [ "$status" -ne 0 ] && echo "=== $label: exit status $status"
  return 0
}

install || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Stages that compile the same step (steps and fit at the start length) share compilations.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jaxrlhf_jax_cache}
# JAX preallocates 75% of the GPU by default; the fit search measures against the allocator's limit.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
export PYTHONUNBUFFERED=1

for stage in "${stages[@]}"; do
  case $stage in
    install) ;;
    env) env_report ;;
    steps) bench steps 240 --remat dots_with_no_batch_dims_saveable --measure "[sft,dpo,dpo_precomputed]" ;;
    pytorch) bench pytorch 300 --remat full --measure "[hf,sft,dpo]" ;;
    logprobs) bench logprobs 240 --remat dots_with_no_batch_dims_saveable --measure "[logprobs]" --logprob_vocabs "$LOGPROB_VOCABS" ;;
    fit)
      bench fit 300 --remat dots_with_no_batch_dims_saveable --measure "[fit]" --fit_batch 1 \
        --fit_budget_gib "$FIT_BUDGET_GIB" --fit_granularity "$FIT_GRANULARITY"
      ;;
    packed)
      bench packed 300 --remat dots_with_no_batch_dims_saveable --measure "[attention]" \
        --attention_impls "[xla,cudnn,pallas_gpu,blockwise]" --attention_lengths "${PACKED_LENGTHS:-[2048,8192,32768]}"
      ;;
    *) echo "unknown stage $stage (install env steps pytorch logprobs fit packed)" >&2 ;;
  esac
done
echo "=== done in $((SECONDS - started))s: $OUT/results.jsonl, $OUT/bench.log"
