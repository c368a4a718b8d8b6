"""Held-out evaluation of SFT, DPO and KTO runs: ``state -> {metric: value}`` over every eval batch.

SFT sums NLL and trained tokens over the whole split and divides once; DPO
gathers every pair (KTO every example and its KL row) with its padding mask on
every process, so the metrics are global and computed as TRL logs them. Each eval batch runs in micro-batches of
the training micro-batch's rows with the same LM-head chunks, so eval fits
wherever training fits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import jax
from jax.experimental import multihost_utils

from jaxrlhf.train import kto_steps, steps


def sft_evaluator(
    logprob_fn: steps.LogprobFn, eval_batches: Callable[[], Iterator[dict]], *, micro_batches: int = 1, frozen=None
):
    """``state -> {"loss": nats per trained token, "trained_tokens"}`` over the eval split (``frozen``: a LoRA
    policy's base)."""

    @jax.jit
    def eval_sums(params, batch, frozen):
        bound = steps.bind_frozen(logprob_fn, frozen)
        return steps.sft_eval_sums(params, batch, logprob_fn=bound, num_micro_batches=micro_batches)

    def evaluate(state) -> dict[str, float]:
        nll, tokens = 0.0, 0.0
        for batch in eval_batches():
            sums = jax.device_get(eval_sums(state.params, batch, frozen))
            nll += float(sums["nll_sum"])
            tokens += float(sums["trained_tokens"])
        return {"loss": nll / max(tokens, 1.0), "trained_tokens": tokens}

    return evaluate


def _pair_evaluator(rows_fn, metrics_fn, logprob_fn, eval_batches, *, ref_params, micro_batches, ref_logprob_fn,
                    frozen):  # fmt: skip
    """``state -> metrics_fn(rows of every eval batch, gathered from every process)``; ``rows_fn`` is a jit-able
    ``(params, batch, *, logprob_fn, ref_params, ref_logprob_fn, num_micro_batches) -> per-row arrays``."""

    @jax.jit
    def eval_rows(params, batch, ref_params, frozen):
        return rows_fn(
            params, batch, logprob_fn=steps.bind_frozen(logprob_fn, frozen), ref_params=ref_params,
            ref_logprob_fn=ref_logprob_fn, num_micro_batches=micro_batches,
        )  # fmt: skip

    def evaluate(state) -> dict[str, float]:
        rows = [
            multihost_utils.process_allgather(eval_rows(state.params, batch, ref_params, frozen), tiled=True)
            for batch in eval_batches()
        ]
        return metrics_fn(rows)

    return evaluate


def dpo_evaluator(
    logprob_fn: steps.LogprobFn,
    eval_batches: Callable[[], Iterator[dict]],
    *,
    ref_params,
    spec: steps.DpoLossSpec,
    micro_batches: int = 1,
    ref_logprob_fn: steps.LogprobFn | None = None,
    frozen=None,
):
    """``state -> DPO metrics`` (loss, rewards, margins, accuracies) over every eval pair (``frozen``: a LoRA
    policy's base; ``ref_logprob_fn``: the reference's, default the policy's)."""
    return _pair_evaluator(
        steps.dpo_eval_pairs, lambda pairs: steps.dpo_eval_metrics(pairs, spec), logprob_fn, eval_batches,
        ref_params=ref_params, micro_batches=micro_batches, ref_logprob_fn=ref_logprob_fn, frozen=frozen,
    )  # fmt: skip


def kto_evaluator(
    logprob_fn: steps.LogprobFn,
    eval_batches: Callable[[], Iterator[dict]],
    *,
    ref_params,
    spec: kto_steps.KtoLossSpec,
    micro_batches: int = 1,
    ref_logprob_fn: steps.LogprobFn | None = None,
    frozen=None,
):
    """``state -> KTO metrics`` over every eval example, the reference point from all of their KL rows."""
    return _pair_evaluator(
        kto_steps.kto_eval_rows, lambda rows: kto_steps.kto_eval_metrics(rows, spec), logprob_fn, eval_batches,
        ref_params=ref_params, micro_batches=micro_batches, ref_logprob_fn=ref_logprob_fn, frozen=frozen,
    )  # fmt: skip
