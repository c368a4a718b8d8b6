"""``jaxrlhf bench``: our jitted SFT/DPO steps side by side with the naive path and with PyTorch.

    jaxrlhf bench                                                # tiny shape, every CPU comparison
    jaxrlhf bench --preset qwen2.5-0.5b --batch 2 --seq_len 128 --measure "[sft,hf]"
    jaxrlhf bench --preset qwen2.5-1.5b --seq_len 4096 --dtype bfloat16 --measure "[fit]"
    jaxrlhf bench --num_layers 2 --measure "[attention]"                           # packed rows, per kernel
    jaxrlhf bench --num_layers 8 --batch 8 --seq_len 512 --measure "[scan]"      # scanned vs unrolled layers
    jaxrlhf bench --seq_len 1024 --measure "[dpo_packing]"                      # padded vs packed DPO pair-rows

What each measurement is: ``jaxrlhf.bench.suite``. Results print as tables with
ratios and, with ``--out``, append one JSON line to a file.
"""

from __future__ import annotations

import json
import pathlib

from jaxrlhf.bench.packing import measure_packing, print_packing
from jaxrlhf.bench.report import print_report
from jaxrlhf.bench.report import record as report_record
from jaxrlhf.bench.suite import Bench, BenchConfig

__all__ = ["BenchConfig", "run"]


def run(cfg: BenchConfig) -> dict:
    bench = Bench(cfg)
    bench.run_hf()  # before JAX claims the accelerator's memory
    bench.start_jax()
    bench.finish_hf()
    bench.run_steps()
    bench.run_logprobs()
    bench.run_scan()
    bench.run_attention()
    bench.run_fit()
    if "dpo_packing" in cfg.measure:
        bench.results["dpo_packing"] = measure_packing(bench)
    print_report(bench)
    print_packing(bench)
    record = report_record(bench)
    if cfg.out:
        path = pathlib.Path(cfg.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")
    return record
