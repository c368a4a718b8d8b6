"""AdamW with warmup + cosine/linear/constant decay, global-norm clipping and a decay mask.

Weight decay applies to matrices only: norms' scales and biases (rank < 2) are
excluded, as in every mainstream LLM recipe.
"""

from __future__ import annotations

import dataclasses

import jax
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxrlhf.config import ConfigError


@dataclasses.dataclass
class OptimConfig:
    learning_rate: float = 1e-5
    """Peak learning rate, reached at the end of warmup."""
    warmup_steps: int = 0
    """Linear warmup from 0 to ``learning_rate``; ``warmup_ratio`` overrides it when > 0."""
    warmup_ratio: float = 0.0
    schedule: str = "cosine"
    """After warmup: cosine | linear | constant."""
    min_lr_ratio: float = 0.0
    """Final learning rate as a fraction of the peak (cosine and linear)."""
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    """Global-norm clipping threshold; 0 disables clipping."""


def learning_rate_schedule(config: OptimConfig, total_steps: int) -> optax.Schedule:
    total_steps = max(int(total_steps), 1)
    warmup = int(round(config.warmup_ratio * total_steps)) if config.warmup_ratio > 0 else config.warmup_steps
    warmup = min(warmup, total_steps)
    decay_steps = max(total_steps - warmup, 1)
    end_value = config.learning_rate * config.min_lr_ratio
    if config.schedule == "cosine":
        decay = optax.cosine_decay_schedule(config.learning_rate, decay_steps, alpha=config.min_lr_ratio)
    elif config.schedule == "linear":
        decay = optax.linear_schedule(config.learning_rate, end_value, decay_steps)
    elif config.schedule == "constant":
        decay = optax.constant_schedule(config.learning_rate)
    else:
        raise ConfigError(f"optim.schedule must be cosine, linear or constant, got {config.schedule!r}")
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, config.learning_rate, warmup), decay], [warmup])


def decay_mask(params):
    """True for parameters that get weight decay: matrices, not norm scales or biases."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(config: OptimConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = learning_rate_schedule(config, total_steps)
    parts = []
    if config.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(config.max_grad_norm))
    parts.append(
        optax.adamw(
            schedule, b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=config.weight_decay, mask=decay_mask
        )
    )
    return optax.chain(*parts), schedule


def opt_state_shardings(tx: optax.GradientTransformation, params, param_shardings, mesh):
    """Shardings of ``tx.init(params)``: moments like their parameters, counters replicated.

    Stated explicitly because the moments are created by ``zeros_like``, which
    carries no data dependence for the partitioner to follow: left to itself it
    replicates them, and FSDP would hold the whole optimizer state on every device.
    """
    replicated = NamedSharding(mesh, PartitionSpec())
    return optax.tree_map_params(
        tx,
        lambda _, sharding: sharding,
        jax.eval_shape(tx.init, params),
        param_shardings,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def init_opt_state(tx: optax.GradientTransformation, params, mesh):
    """``tx.init(params)`` created directly in its shards."""
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    shardings = opt_state_shardings(tx, params, param_shardings, mesh)
    return jax.jit(tx.init, out_shardings=shardings)(params)
