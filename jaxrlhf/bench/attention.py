"""``jaxrlhf bench --measure "[attention]"``: the SFT step on packed rows with each attention kernel, per length.

For each of ``attention_impls`` and ``attention_lengths`` the step is compiled
on one packed row of examples ``attention_segment`` tokens long and its XLA plan
recorded; on an accelerator it is also timed (on a CPU the Pallas kernels run in
interpret mode, which says nothing about their speed, and the dense path at
32k would need hundreds of GiB: memory only). A kernel the device lacks, or a
length that does not fit, is recorded as that row's error and the run goes on.
"""

from __future__ import annotations

import dataclasses

import jax

from jaxrlhf.bench.batches import packed_sft_batch
from jaxrlhf.bench.jax_steps import abstract_sft_batch, build_policy, compile_sft, place, running_as, step_caller
from jaxrlhf.bench.measure import compiled_memory, first_line, time_calls

__all__ = ["measure_attention"]


def measure_attention(bench) -> dict:
    """``{"<impl>/<length>": row}`` for ``bench`` (a ``jaxrlhf.bench.suite.Bench``)."""
    cfg = bench.cfg
    base = build_policy(bench.config, bench.mesh, seed=cfg.seed)
    timed = bench.device.platform != "cpu"
    rows = {}
    for impl in cfg.attention_impls:
        policy = running_as(base, dataclasses.replace(bench.config, attention_impl=impl))
        for length in cfg.attention_lengths:
            name = f"{impl}/{length}"
            try:
                compiled = compile_sft(policy, abstract_sft_batch(1, length, bench.mesh), packed=True)
                row = {"memory": compiled_memory(compiled)}
                if timed:
                    batch = packed_sft_batch(1, length, bench.config.vocab_size, segment=cfg.attention_segment)
                    caller = step_caller(compiled, base, place(batch, bench.mesh))
                    row["step"] = time_calls(caller, warmup=cfg.warmup, repeats=cfg.repeats).as_dict()
            except Exception as e:  # noqa: BLE001 - one row's failure is that row's result
                row = {"error": f"{type(e).__name__}: {first_line(e)}"}
            rows[name] = row
            memory = row.get("memory", {}).get("temp_bytes")
            detail = row.get("error") or f"temporaries {memory / 2**30:.2f} GiB" + (
                f", {row['step']['median_s'] * 1e3:.1f} ms/step" if "step" in row else ""
            )
            bench.console.print(f"attention {impl}, packed row of {length}: {detail}")
            jax.clear_caches()
    return rows
