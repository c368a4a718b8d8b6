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

import numpy as np

from jaxrlhf.bench.packing import PACKING_BINS, SYNTHETIC_PAIRS, measure_packing, print_packing, synthetic_pairs
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
        bench.results["dpo_packing"] = _measure_packing(bench)
    print_report(bench)
    print_packing(bench)
    record = report_record(bench)
    if cfg.out:
        path = pathlib.Path(cfg.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")
    return record


def _shipped_pairs(max_length: int) -> list[dict]:
    """The pairs of ``jaxrlhf/assets/dpo.jsonl`` encoded by the shipped tokenizer (too-long pairs dropped)."""
    from jaxrlhf.data import ExampleDropped, asset_path, encode_dpo, load_tokenizer

    tokenizer = load_tokenizer(str(asset_path("tokenizer")))
    pairs = []
    for line in asset_path("dpo.jsonl").read_text().splitlines():
        try:
            pairs.append(encode_dpo(json.loads(line), tokenizer, max_length=max_length))
        except ExampleDropped:
            continue
    return pairs


def _layouts(pairs: list[dict], max_length: int) -> dict[str, dict[str, np.ndarray]]:
    """``{"padded", "packed"}``: every pair-row ``[rows, 2, T]`` of ``pairs``, as the training pipeline lays them."""
    import grain

    from jaxrlhf.data.pipeline import pack_pairs, pad_row

    padded = [
        {k: np.stack([pad_row(p[s]["tokens"], p[s]["loss_mask"], max_length, 0)[k] for s in ("chosen", "rejected")])
         for k in ("tokens", "loss_mask", "segment_ids", "positions")}
        for p in pairs
    ]  # fmt: skip
    source = grain.MapDataset.source(pairs).to_iter_dataset()
    packed = list(pack_pairs(source, packing="first_fit", max_length=max_length, bins=PACKING_BINS, seed=0,
                             shuffle=False, pad=0))  # fmt: skip
    return {name: {k: np.stack([r[k] for r in rows]) for k in rows[0]} for name, rows in (("padded", padded), ("packed", packed))}


def _measure_packing(bench) -> dict:
    """``--measure dpo_packing``: this layer lays the pairs out (the data layer is out of the bench's reach)."""
    from jaxrlhf.bench.measure import first_line
    from jaxrlhf.data.validate import max_pairs_per_row

    cfg, length = bench.cfg, bench.cfg.seq_len
    data = {
        "shipped": lambda: _shipped_pairs(length),
        "ultrafeedback-like": lambda: synthetic_pairs(SYNTHETIC_PAIRS, length, bench.config.vocab_size, seed=cfg.seed),
    }
    layouts = {}
    for name, make in data.items():
        try:
            layouts[name] = _layouts(make(), length)
        except Exception as e:  # grain missing (the lent GPU hosts): that data set's error, the run goes on
            layouts[name] = f"{type(e).__name__}: {first_line(e)}"
    return measure_packing(bench, layouts, pairs_per_row=max_pairs_per_row(length))
