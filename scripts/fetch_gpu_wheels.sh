#!/usr/bin/env bash
# Download the wheels that the lent GPU machines lack, for scripts/gpu_bench.sh to install offline there.
#
#   bash scripts/fetch_gpu_wheels.sh [DIR]      # default DIR: build/gpu_wheels (ignored by git)
#
# Those machines run Python 3.12 on x86_64 with jax 0.11.x, flax, optax, orbax, chex, torch and
# transformers preinstalled, but no grain, draccus or tensorboardX, and reach no network. The versions
# are the tested ones from constraints.txt; their dependencies come along (about 22 MiB in all) so that
# pip can resolve there from this folder alone, taking only what the machine does not already have.
# grain's wheel is tagged manylinux_2_24/2_28, hence the platform list beyond manylinux2014.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-build/gpu_wheels}
python=${PYTHON:-python3}
mapfile -t pins < <(grep -E '^(grain|array_record|draccus|tensorboardX)==' constraints.txt)
if [ "${#pins[@]}" -ne 4 ]; then
  echo "fetch_gpu_wheels: expected 4 pins in constraints.txt, found: ${pins[*]}" >&2
  exit 1
fi
mkdir -p "$dir"
"$python" -m pip download --quiet --dest "$dir" --only-binary=:all: \
  --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 \
  "${pins[@]}"
printf '%s\n' "${pins[@]}" > "$dir/requirements.txt"
echo "wheels for ${pins[*]} and their dependencies in $dir ($(du -sh "$dir" | cut -f1))"
