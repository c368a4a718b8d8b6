#!/usr/bin/env bash
# Run one jaxrlhf command on every worker of a TPU VM pod slice.
#
#   scripts/launch_tpu_pod.sh setup TPU_NAME ZONE [PROJECT]
#       copy this checkout to every worker and install it with the TPU extra
#   scripts/launch_tpu_pod.sh run TPU_NAME ZONE [PROJECT] -- sft --config_path configs/llama3-8b_sft_tpu_v5p.yaml
#       start the command on all workers at once; each joins jax.distributed from the TPU environment
#
# Plan first, on any machine:  jaxrlhf sft --config_path CONFIG --dry_run true --dry_run_devices 64
# Data, model and run_dir must be on a filesystem every worker sees (or copied to each worker).
set -euo pipefail

usage() { sed -n '2,10p' "$0" >&2; exit 2; }
[[ $# -ge 3 ]] || usage
action=$1 tpu=$2 zone=$3
shift 3
project_flag=()
if [[ $# -gt 0 && $1 != "--" ]]; then project_flag=(--project "$1"); shift; fi
remote_dir=${JAXRLHF_REMOTE_DIR:-jaxrlhf}
ssh_all=(gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" "${project_flag[@]}" --worker=all)

case "$action" in
  setup)
    repo=$(cd "$(dirname "$0")/.." && pwd)
    gcloud compute tpus tpu-vm scp --recurse "$repo" "$tpu:~/$remote_dir" --zone "$zone" "${project_flag[@]}" --worker=all
    "${ssh_all[@]}" --command "cd ~/$remote_dir && python3 -m venv .venv && .venv/bin/pip install -q -e '.[tpu]'"
    ;;
  run)
    [[ ${1:-} == "--" ]] || usage
    shift
    [[ $# -gt 0 ]] || usage
    quoted=$(printf ' %q' "$@")
    # --distributed.force: gcloud's shells carry no cluster hint, so ask JAX to detect the pod itself.
    "${ssh_all[@]}" --command "cd ~/$remote_dir && .venv/bin/jaxrlhf$quoted --distributed.force true"
    ;;
  *) usage ;;
esac
