"""The router losses of a MoE policy in the SFT, DPO and KTO objectives, and their per-step metrics.

A MoE model's logprob_fn, called with ``router_stats=True``, also returns its
router statistics (``ops.moe.ROUTER_STATS`` summed over layers and the real
tokens of the micro-batch). A step given an ``aux_loss`` (a ``RouterLoss``)
asks the policy's training forward for them and adds, per micro-batch,

    (router_aux_loss_coef * aux_loss + router_z_loss_coef * z_loss) / micro_batches

to its objective. The balancing loss is a product of two means (over layers
and tokens), so it does not add across micro-batches: it is defined per
micro-batch and averaged over them, as MaxText and Megatron do. With one
micro-batch it is exactly transformers' ``aux_loss`` of the batch (whose
``attention_mask`` is our ``segment_ids > 0``). For DPO and KTO it is the
policy's alone: the reference runs without statistics. The train steps stay
model-agnostic: ``aux_loss`` is None for dense models and they never look
inside it.

Logged per step: ``moe/aux_loss`` and ``moe/z_loss`` (means over the
micro-batches), ``moe/load/e{k}``, expert k's fraction of the step's top-k
assignments over every MoE layer (they sum to 1), and ``moe/load_max``, the
largest of those over their mean (1 = balanced, ``num_experts`` = one expert
takes everything).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxrlhf.ops import moe as moe_ops

__all__ = ["RouterLoss", "add_to_loss", "policy_kwargs", "router_loss_of", "split_output", "step_metrics"]


@dataclasses.dataclass(frozen=True)
class RouterLoss:
    """Static settings of the router losses (hashable: part of the jitted step)."""

    num_experts: int
    aux_coef: float
    z_coef: float = 0.0
    num_micro_batches: int = 1

    def __post_init__(self):
        if not self.aux_coef >= 0:
            raise ValueError(f"model.router_aux_loss_coef must be >= 0, got {self.aux_coef}")
        if not self.z_coef >= 0:
            raise ValueError(f"model.router_z_loss_coef must be >= 0, got {self.z_coef}")

    def __call__(self, stats: dict) -> tuple[jax.Array, dict]:
        """``(loss term, metric sums)`` of one micro-batch's router statistics."""
        losses = moe_ops.router_losses(stats, num_experts=self.num_experts)
        term = (self.aux_coef * losses["aux_loss"] + self.z_coef * losses["z_loss"]) / self.num_micro_batches
        sums = {"moe/aux_loss": losses["aux_loss"], "moe/z_loss": losses["z_loss"], "moe/counts": stats["counts"]}
        return term, sums

    def step_metrics(self, sums: dict) -> dict:
        """The logged metrics from the metric sums of all micro-batches."""
        counts = sums["moe/counts"]
        share = counts / jnp.maximum(jnp.sum(counts), 1.0)
        width = len(str(self.num_experts - 1))  # e007 sorts before e100 in every metrics viewer
        return {
            "moe/aux_loss": sums["moe/aux_loss"] / self.num_micro_batches,
            "moe/z_loss": sums["moe/z_loss"] / self.num_micro_batches,
            "moe/load_max": jnp.max(share) * self.num_experts,
            **{f"moe/load/e{k:0{width}d}": share[k] for k in range(self.num_experts)},
        }


def router_loss_of(model_config, model_args=None, *, micro_batches: int = 1) -> RouterLoss | None:
    """The ``RouterLoss`` of a MoE model with the run's ``model.router_*_coef`` (``model_args``; the aux
    coefficient defaults to config.json's ``router_aux_loss_coef``), else None."""
    if not model_config.is_moe:
        return None
    aux_coef = getattr(model_args, "router_aux_loss_coef", None)
    coef = model_config.router_aux_loss_coef if aux_coef is None else aux_coef
    return RouterLoss(model_config.num_experts, coef, getattr(model_args, "router_z_loss_coef", 0.0), micro_batches)


# What the train steps call, each a no-op for a dense policy (aux_loss None).


def policy_kwargs(aux_loss: RouterLoss | None) -> dict:
    """Extra keyword arguments of the policy's training forward: ask a MoE policy for its router statistics."""
    return {} if aux_loss is None else {"router_stats": True}


def split_output(out, aux_loss: RouterLoss | None):
    """``(token_lp, stats)`` of a logprob_fn output (stats None without an aux loss)."""
    return (out, None) if aux_loss is None else out


def add_to_loss(loss, metrics: dict, stats, aux_loss: RouterLoss | None):
    """A micro-batch's loss with the router loss term added, and its metrics with the router metric sums."""
    if aux_loss is None:
        return loss, metrics
    term, sums = aux_loss(stats)
    return loss + term, {**metrics, **sums}


def step_metrics(sums: dict, aux_loss: RouterLoss | None) -> dict:
    return {} if aux_loss is None else aux_loss.step_metrics(sums)
