"""Dry-run plans of the shipped configs and of reference shapes, as a markdown table (BENCHMARKS.md).

    python scripts/dry_run_table.py                # every row below, each in its own process
    python scripts/dry_run_table.py --tree /path/to/other/checkout

Each row compiles the real train step on fake CPU devices (``--dry_run true
--dry_run_devices N``) with random weights of the model's preset shape, in a fresh
process (the fake device count is fixed at JAX start), and prints per device:
parameters, optimizer state, reference, batch, temporaries (activations and
workspace, XLA's plan), the total and, where the tree has it, the fit verdict.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
GIB = 2**30

# (label, task, config file, devices, device judged against, overrides)
ROWS = [
    ("demo SFT (CPU)", "sft", "configs/demo_sft.yaml", 1, "laptop-cpu", ["--model.preset", "tiny"]),
    ("demo DPO (CPU)", "dpo", "configs/demo_dpo.yaml", 1, "laptop-cpu", ["--model.preset", "tiny"]),
    ("Qwen2.5-0.5B SFT 4096, 8 x H100", "sft", "configs/qwen2.5-0.5b_sft_gpu.yaml", 8, "h100",
     ["--model.preset", "qwen2.5-0.5b"]),
    ("Qwen2.5-1.5B DPO 2048, 8 x H100", "dpo", "configs/qwen2.5-1.5b_dpo_gpu.yaml", 8, "h100",
     ["--model.preset", "qwen2.5-1.5b"]),
    ("Llama-3-8B SFT 8192, v5p-64 (32 chips)", "sft", "configs/llama3-8b_sft_tpu_v5p.yaml", 32, "tpu-v5p",
     ["--model.preset", "llama3-8b"]),
    ("Llama-3-8B SFT 8192, v5p-32 (16 chips)", "sft", "configs/llama3-8b_sft_tpu_v5p.yaml", 16, "tpu-v5p",
     ["--model.preset", "llama3-8b"]),
    ("Llama-3-8B SFT 8192, 8 x H100", "sft", "configs/llama3-8b_sft_tpu_v5p.yaml", 8, "h100",
     ["--model.preset", "llama3-8b", "--mesh.tensor", "1", "--data.batch_size", "64"]),
    ("Qwen2.5-7B SFT 8192, v5p-32 (16 chips)", "sft", "configs/llama3-8b_sft_tpu_v5p.yaml", 16, "tpu-v5p",
     ["--model.preset", "qwen2.5-7b"]),
    ("Qwen2.5-7B SFT 8192, 8 x H100", "sft", "configs/llama3-8b_sft_tpu_v5p.yaml", 8, "h100",
     ["--model.preset", "qwen2.5-7b", "--mesh.tensor", "1", "--data.batch_size", "64"]),
    ("Gemma-2-9B SFT 4096, v5e-32 (32 chips)", "sft", "configs/gemma2-9b_sft_tpu_v5e.yaml", 32, "tpu-v5e",
     ["--model.preset", "gemma2-9b"]),
    ("Gemma-2-9B SFT 4096, v5e-16 (16 chips)", "sft", "configs/gemma2-9b_sft_tpu_v5e.yaml", 16, "tpu-v5e",
     ["--model.preset", "gemma2-9b", "--mesh.tensor", "8", "--micro_batches", "16"]),
    ("Gemma-2-2B SFT 4096, 8 x H100", "sft", "configs/qwen2.5-0.5b_sft_gpu.yaml", 8, "h100",
     ["--model.preset", "gemma2-2b"]),
    ("Gemma-3-1B SFT 4096, 8 x H100", "sft", "configs/qwen2.5-0.5b_sft_gpu.yaml", 8, "h100",
     ["--model.preset", "gemma3-1b"]),
    ("Gemma-3-4B SFT 4096, 8 x H100", "sft", "configs/qwen2.5-0.5b_sft_gpu.yaml", 8, "h100",
     ["--model.preset", "gemma3-4b"]),
    # Mixture of experts (issue 20)
    ("Qwen3-30B-A3B SFT 4096, 8 x H100", "sft", "configs/qwen3-30b-a3b_sft_gpu.yaml", 8, "h100",
     ["--model.preset", "qwen3-30b-a3b"]),
    ("Qwen3-30B-A3B SFT 8192, v5p-32 (16 chips)", "sft", "configs/qwen3-30b-a3b_sft_tpu_v5p.yaml", 16, "tpu-v5p",
     ["--model.preset", "qwen3-30b-a3b"]),
    ("Mixtral-8x7B SFT 8192, v5p-64 (32 chips)", "sft", "configs/mixtral-8x7b_sft_tpu_v5p.yaml", 32, "tpu-v5p",
     ["--model.preset", "mixtral-8x7b"]),
]  # fmt: skip

_CHILD = """
import json, sys
from jaxrlhf.config import load_config
task, path, *overrides = sys.argv[1:]
if task == "sft":
    from jaxrlhf.commands.sft import SftConfig as C, run_sft as run
else:
    from jaxrlhf.commands.dpo import DpoConfig as C, run_dpo as run
try:
    report = run(load_config(C, path, overrides))
except Exception as e:  # a plan that does not fit carries its report
    report = getattr(e, "report", None) or {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
print("REPORT " + json.dumps(report, default=str))
"""


def plan(tree: pathlib.Path, task: str, config: str, devices: int, device: str, overrides, extra) -> dict:
    args = [*overrides, "--dry_run", "true", "--dry_run_devices", str(devices),
            "--data.tokenizer", str(tree / "jaxrlhf" / "assets" / "tokenizer"), *extra]  # fmt: skip
    if "dry_run_device:" in (tree / "jaxrlhf" / "train" / "run_config.py").read_text():
        args += ["--dry_run_device", device]  # trees from before the verdict do not know the key
    env = {**os.environ, "PYTHONPATH": str(tree), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, task, str(tree / config), *args],
        env=env, cwd="/", capture_output=True, text=True, check=False,
    )  # fmt: skip
    lines = [line for line in out.stdout.splitlines() if line.startswith("REPORT ")]
    return json.loads(lines[-1][7:]) if lines else {"error": out.stderr.strip().splitlines()[-1][:300]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", default=str(ROOT), help="the checkout to plan with")
    parser.add_argument("--only", default="", help="rows whose label contains this")
    parser.add_argument("extra", nargs="*", help="more overrides for every row")
    args = parser.parse_args()
    tree = pathlib.Path(args.tree).resolve()
    print("| run | devices | params | optimizer | reference | batch | temporaries | total | eval total | verdict |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, task, config, devices, device, overrides in ROWS:
        if args.only not in label:
            continue
        r = plan(tree, task, config, devices, device, overrides, args.extra)
        if "error" in r and "total" not in r:
            print(f"| {label} | {devices} | error: {r['error']} ||||||||", flush=True)
            continue
        keys = ("parameters", "optimizer", "reference", "batch", "temporaries", "total")
        cells = [f"{r.get(k, 0) / GIB:.1f}" for k in keys] + [f"{r['eval_total'] / GIB:.1f}" if "eval_total" in r else "-"]
        verdict = r.get("verdict", "-") + "".join(f"; way out: {w}" for w in r.get("ways_out", []))
        print(f"| {label} | {devices} | " + " | ".join(cells) + f" | {verdict} |", flush=True)


if __name__ == "__main__":
    main()
