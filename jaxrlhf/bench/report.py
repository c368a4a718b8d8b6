"""The report of a ``jaxrlhf bench`` run: a table of steps with ratios, and one JSON record."""

from __future__ import annotations

import dataclasses
import datetime
import os

from rich.table import Table

from jaxrlhf.bench import flops
from jaxrlhf.bench.suite import MIB, Bench, memory_of, succeeded


def ratios(bench: Bench) -> dict:
    """Time and memory ratios between the measured steps (per token: every step sees the same tokens)."""
    r, out = bench.results, {}
    hf = r.get("hf", {})

    def seconds(row):
        return row["step"]["median_s"]

    # Every step processes batch x seq_len tokens, so time ratios are per-token ratios.
    for name in ("dpo", "dpo_precomputed"):
        if succeeded(r.get("sft")) and succeeded(r.get(name)):
            out[f"{name}_vs_sft_time_per_token"] = seconds(r[name]) / seconds(r["sft"])
    if succeeded(r.get("dpo")) and succeeded(r.get("dpo_precomputed")):
        out["dpo_frozen_vs_precomputed_time"] = seconds(r["dpo"]) / seconds(r["dpo_precomputed"])
    for task in ("sft", "dpo"):
        if succeeded(r.get(task)) and succeeded(hf.get(task)):
            out[f"pytorch_vs_ours_{task}_time"] = seconds(hf[task]) / seconds(r[task])
            out[f"pytorch_vs_ours_{task}_memory"] = memory_of(hf[task]) / memory_of(r[task])
    logprob_rows = r.get("logprobs", {})
    for vocab in bench.cfg.logprob_vocabs:
        full, chunked = logprob_rows.get(f"{vocab}/full"), logprob_rows.get(f"{vocab}/chunked")
        if succeeded(full) and succeeded(chunked):
            out[f"full_vs_chunked_{vocab}_temp_memory"] = full["memory"]["temp_bytes"] / chunked["memory"]["temp_bytes"]
            out[f"full_vs_chunked_{vocab}_time"] = seconds(full) / seconds(chunked)
    for task, pair in r.get("scan", {}).items():
        out[f"scanned_vs_unrolled_{task}_time"] = seconds(pair["scanned"]) / seconds(pair["unrolled"])
        out[f"scanned_vs_unrolled_{task}_min_time"] = pair["scanned"]["step"]["min_s"] / pair["unrolled"]["step"]["min_s"]
        out[f"scanned_vs_unrolled_{task}_temp_memory"] = (
            pair["scanned"]["memory"]["temp_bytes"] / pair["unrolled"]["memory"]["temp_bytes"]
        )
    if "fit" in r and r["fit"]["full"]["longest"]:
        out["fit_chunked_vs_full_length"] = r["fit"]["chunked"]["longest"] / r["fit"]["full"]["longest"]
    return out

def print_report(bench: Bench) -> None:
    """The environment line, the table of steps, the fit result and the ratios."""
    cfg, c = bench.cfg, bench.config
    bench.console.print(
        f"[bold]{cfg.preset}[/] ({flops.matmul_params(c) / 1e6:.1f}M matmul params, vocab {c.vocab_size}), "
        f"batch {cfg.batch} x seq {cfg.seq_len}, {cfg.dtype} compute / {cfg.param_dtype} params, remat {cfg.remat}, "
        f"attention {cfg.attention_impl} | {bench.env['device_kind']} x{bench.env['devices']}, "
        f"peak {bench.env['peak_flops_per_device'] / 1e12:.2f} TFLOP/s per device ({bench.env['peak_source']})"
    )
    table = Table(title="train steps (median of repeats; spread = (max - min) / median)")
    for column in ("step", "ms", "spread", "tokens/s", "TFLOP/s", "MFU", "memory MiB", "temp MiB"):
        table.add_column(column, justify="right")
    named = [(f"ours {n}", bench.results[n]) for n in ("sft", "dpo", "dpo_precomputed") if n in bench.results]
    named += [(f"pytorch {n}", row) for n, row in bench.results.get("hf", {}).items()]
    named += [(f"ours sft, vocab {k.replace('/', ', ')}", row) for k, row in bench.results.get("logprobs", {}).items()]
    named += [
        (f"ours {task}, layers {how}", row) for task, pair in bench.results.get("scan", {}).items() for how, row in pair.items()
    ]
    for name, row in named:
        if not succeeded(row):
            table.add_row(name, f"error: {row['error'][:100]}")
            continue
        temp = row.get("memory", {}).get("temp_bytes")
        table.add_row(
            name,
            f"{row['step']['median_s'] * 1e3:.1f}",
            f"{row['step']['spread']:.0%}",
            f"{row['tokens_per_s']:,.0f}",
            f"{row['tflops_per_s']:.3f}",
            f"{row['mfu']:.1%}",
            f"{memory_of(row) / MIB:,.0f}",
            "" if temp is None else f"{temp / MIB:,.0f}",
        )
    if named:
        bench.console.print(table)
    if "attention" in bench.results:
        bench.console.print(attention_table(bench))
    if "fit" in bench.results:
        fit = bench.results["fit"]
        bench.console.print(
            f"longest SFT sequence in {fit['budget_bytes'] / 2**30:.2f} GiB at batch {fit['batch']}: "
            + ", ".join(f"{p} {fit[p]['longest']} (ran: {fit[p]['ran']})" for p in ("chunked", "full"))
        )
    for name, value in ratios(bench).items():
        bench.console.print(f"  {name}: {value:.2f}x")
    memory = "memory: ours = " + (
        "the device allocator's peak" if bench.env["platform"] != "cpu" else "compiled arguments + outputs + temporaries"
    )
    kinds = {row["memory_kind"] for row in bench.results.get("hf", {}).values() if succeeded(row)}
    bench.console.print(memory + "".join(f"; pytorch = {kind}" for kind in kinds))

def attention_table(bench: Bench) -> Table:
    """Kernels down, lengths across: the packed SFT step's temporaries (and time, where measured)."""
    cfg, rows = bench.cfg, bench.results["attention"]
    table = Table(title=f"packed SFT step, one row of {cfg.attention_segment}-token examples: temporaries GiB (ms/step)")
    table.add_column("attention")
    for length in cfg.attention_lengths:
        table.add_column(f"T = {length}", justify="right")
    for impl in cfg.attention_impls:
        cells = []
        for length in cfg.attention_lengths:
            row = rows[f"{impl}/{length}"]
            if not succeeded(row):
                cells.append(f"error: {row['error'][:40]}")
                continue
            cell = f"{row['memory']['temp_bytes'] / 2**30:.2f}"
            cells.append(cell + (f" ({row['step']['median_s'] * 1e3:.1f})" if "step" in row else ""))
        table.add_row(impl, *cells)
    return table


def record(bench: Bench) -> dict:
    """The run as one JSON-able record: config, environment, results and ratios."""
    bench.env["load_average_end"] = os.getloadavg()
    bench.env["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return {"config": dataclasses.asdict(bench.cfg), "env": bench.env, "results": bench.results, "ratios": ratios(bench)}
