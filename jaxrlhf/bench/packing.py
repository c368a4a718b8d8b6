"""``jaxrlhf bench --measure "[dpo_packing]"``: padded vs packed DPO pair-rows, on two length distributions.

For each data set the pairs are laid out as training lays them out, padded (one
pair per ``[2, T]`` row) and packed (``data.pipeline.pack_pairs``, grain's first
fit over ``PACKING_BINS`` bins; needs grain: ``commands/bench.py`` lays them out,
the data layer being out of this package's reach), ``T = --seq_len``, and reported as

- **padding efficiency**: real tokens / row tokens (``padding_efficiency``);
- **tokens/s**: real tokens of ``--batch / 2`` pair-rows per second of the DPO
  step (the policy step, reference log-probs precomputed), the pair-rows the
  first ones of each layout. Packed rows cost the same per step (same shape,
  segment-masked attention) and carry more real tokens.

Data sets: ``shipped``, ``jaxrlhf/assets/dpo.jsonl`` encoded by the shipped
tokenizer (short pairs); ``ultrafeedback-like``, ``SYNTHETIC_PAIRS`` synthetic
pairs with a prompt ~ lognormal(median ``PROMPT_MEDIAN``, sigma
``PROMPT_SIGMA``) tokens and each reply ~ lognormal(median ``REPLY_MEDIAN``,
sigma ``REPLY_SIGMA``), the spread of UltraFeedback-binarized's replies; a pair
longer than T loses prompt tokens from the left first (data.truncation:
truncate_prompt), replies are clipped to T - 1.
"""

from __future__ import annotations

import numpy as np

__all__ = ["padding_efficiency", "synthetic_pairs", "measure_packing", "print_packing"]

PROMPT_MEDIAN, PROMPT_SIGMA = 150, 0.8
REPLY_MEDIAN, REPLY_SIGMA = 250, 0.7
SYNTHETIC_PAIRS = 512
PACKING_BINS = 16


def padding_efficiency(batches) -> float:
    """Real tokens (segment id > 0) / all row tokens, over batches of ``[..., T]`` ``segment_ids``."""
    real = sum(int((np.asarray(b["segment_ids"]) > 0).sum()) for b in batches)
    total = sum(int(np.asarray(b["segment_ids"]).size) for b in batches)
    return real / max(total, 1)


def _side(prompt: np.ndarray, reply: int, vocab: int, rng) -> dict[str, np.ndarray]:
    tokens = np.concatenate([prompt, rng.integers(0, vocab, reply)]).astype(np.int32)
    return {"tokens": tokens, "loss_mask": (np.arange(len(tokens)) >= len(prompt)).astype(np.int32)}


def synthetic_pairs(n: int, max_length: int, vocab: int, *, seed: int = 0) -> list[dict]:
    """``n`` encoded pairs with UltraFeedback-like lengths (module docstring), each side <= ``max_length``."""
    rng = np.random.default_rng(seed)
    lognormal = lambda median, sigma: max(1, int(rng.lognormal(np.log(median), sigma)))  # noqa: E731
    pairs = []
    for _ in range(n):
        replies = [min(lognormal(REPLY_MEDIAN, REPLY_SIGMA), max_length - 1) for _ in range(2)]
        prompt = rng.integers(0, vocab, min(lognormal(PROMPT_MEDIAN, PROMPT_SIGMA), max_length - max(replies)))
        pairs.append({side: _side(prompt, r, vocab, rng) for side, r in zip(("chosen", "rejected"), replies)})
    return pairs


def measure_packing(bench, layouts: dict, *, pairs_per_row: int) -> dict:
    """``{"<data>/<layout>": row}`` for ``bench`` (a ``jaxrlhf.bench.suite.Bench``): efficiency, step, tokens/s.

    ``layouts``: ``{data: {"padded" | "packed": [rows, 2, T] arrays}}``, or ``{data: error}``;
    ``pairs_per_row``: the packed step's pair slots.
    """
    from jaxrlhf.bench.jax_steps import build_policy, compile_dpo, place, step_caller
    from jaxrlhf.bench.measure import first_line, time_calls
    from jaxrlhf.train.steps import DpoLossSpec

    cfg, rows_per_step = bench.cfg, max(bench.cfg.batch // 2, 1)
    policy = build_policy(bench.config, bench.mesh, seed=cfg.seed)
    results = {}
    for name, by_layout in layouts.items():
        if isinstance(by_layout, str):
            results[name] = bench.progress(f"dpo packing {name}", {"error": by_layout})
            continue
        for layout, rows in by_layout.items():
            key = f"{name}/{layout}"
            row = {"pairs": int(sum(r.max() for r in rows["segment_ids"][:, 0])), "rows": len(rows["tokens"]),
                   "padding_efficiency": padding_efficiency([rows])}  # fmt: skip
            if len(rows["tokens"]) < rows_per_step:
                results[key] = {**row, "error": f"fewer than {rows_per_step} pair-rows"}
                continue
            batch = {k: v[:rows_per_step] for k, v in rows.items()}
            slots = pairs_per_row if layout == "packed" else None
            try:
                compiled = compile_dpo(policy, place(batch, bench.mesh), DpoLossSpec(), chunk_size=bench.chunk_size(),
                                       pairs_per_row=slots)  # fmt: skip
                timing = time_calls(step_caller(compiled, policy, place(batch, bench.mesh), None),
                                    warmup=cfg.warmup, repeats=cfg.repeats)  # fmt: skip
            except Exception as e:
                results[key] = bench.progress(f"dpo packing {key}", {**row, "error": f"{type(e).__name__}: {first_line(e)}"})
                continue
            real = int((batch["segment_ids"] > 0).sum())
            row.update(step=timing.as_dict(), real_tokens_per_step=real, tokens_per_s=real / timing.median)
            bench.console.print(
                f"dpo packing {key}: {row['padding_efficiency']:.1%} of row tokens real, "
                f"{timing.median * 1e3:.1f} ms/step, {row['tokens_per_s']:,.0f} real tokens/s"
            )
            results[key] = row
    return results


def print_packing(bench) -> None:
    """The padded vs packed table, when ``dpo_packing`` was measured."""
    if "dpo_packing" not in bench.results:
        return
    from rich.table import Table

    table = Table(title=f"DPO pair-rows of {bench.cfg.seq_len} tokens, {max(bench.cfg.batch // 2, 1)} per step")
    for column in ("data / layout", "pairs", "pair-rows", "real tokens", "ms/step", "real tokens/s"):
        table.add_column(column, justify="right")
    for key, row in bench.results["dpo_packing"].items():
        timed = "step" in row
        table.add_row(
            key, str(row.get("pairs", "")), str(row.get("rows", "")),
            f"{row['padding_efficiency']:.1%}" if "padding_efficiency" in row else "",
            f"{row['step']['median_s'] * 1e3:.1f}" if timed else row.get("error", "")[:40],
            f"{row['tokens_per_s']:,.0f}" if timed else "",
        )  # fmt: skip
    bench.console.print(table)
