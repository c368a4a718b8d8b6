#!/usr/bin/env bash
# Run a jaxrlhf command on one GPU host, all of its GPUs in one process (the mesh spans them).
#
#   scripts/launch_gpu_host.sh sft --config_path configs/qwen2.5-0.5b_sft_gpu.yaml --model.path /models/Qwen2.5-0.5B-Instruct
#   scripts/launch_gpu_host.sh dpo --config_path configs/qwen2.5-1.5b_dpo_gpu.yaml --dry_run true
#
# Install once with the CUDA extra matching the driver: pip install -e ".[cuda12]" (or ".[cuda13]").
set -euo pipefail
[[ $# -ge 1 ]] || { sed -n '2,7p' "$0" >&2; exit 2; }

# Let XLA take most of the GPU memory up front (no fragmentation from growth), and overlap
# collectives with compute; both are the settings MaxText and Levanter run with.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-1}

here=$(cd "$(dirname "$0")/.." && pwd)
jaxrlhf=${JAXRLHF:-$(command -v jaxrlhf || echo "$here/.venv/bin/jaxrlhf")}
exec "$jaxrlhf" "$@"
