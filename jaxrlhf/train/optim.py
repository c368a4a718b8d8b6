"""Optimizers through optax (AdamW, Adafactor, Lion, SGD) with warmup + decay schedules, clipping and a
weight-decay mask read from each parameter's own metadata.

Which parameters decay is decided where each is created (the ``decay_group``
metadata of its ``nnx.Param``: ``kernel`` | ``embedding`` | ``none``), never
inferred from rank: with stacked layers every norm scale is ``[L, D]`` and every
bias ``[L, H, d]``, as matrix-shaped as any kernel. Kernels of linear layers
decay; norm scales and biases never; embeddings and the LM head decay unless
``decay_embeddings: false``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxrlhf.config import ConfigError

OPTIMIZERS = ("adamw", "adafactor", "lion", "sgd")
DECAY_GROUPS = ("kernel", "embedding", "none")


@dataclasses.dataclass
class OptimConfig:
    name: str = "adamw"
    """adamw | adafactor | lion | sgd (optax's implementations)."""
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
    """Decoupled weight decay of kernels (and embeddings, see decay_embeddings); norms and biases never decay."""
    decay_embeddings: bool = True
    """Whether the token embedding and the LM head get weight decay."""
    b1: float = 0.9
    """First-moment decay (adamw, lion)."""
    b2: float = 0.999
    """Second-moment decay (adamw; lion's update interpolation uses b1, its moment b2)."""
    eps: float = 1e-8
    """adamw's denominator epsilon."""
    momentum: float = 0.0
    """sgd's momentum; 0 = plain SGD."""
    mu_dtype: str | None = None
    """Storage dtype of first moments (adamw, lion, sgd momentum); None = the parameters' dtype.
    bfloat16 halves AdamW's first-moment memory."""
    max_grad_norm: float = 1.0
    """Global-norm clipping threshold; 0 disables clipping."""

    def check(self, total_steps: int | None = None) -> None:
        """Raise a ConfigError naming every setting that cannot train as intended (the warmup against the
        run's length when ``total_steps`` is known)."""
        problems = []
        if self.name not in OPTIMIZERS:
            problems.append(f"optim.name must be one of {', '.join(OPTIMIZERS)}, got {self.name!r}")
        if self.schedule not in ("cosine", "linear", "constant"):
            problems.append(f"optim.schedule must be cosine, linear or constant, got {self.schedule!r}")
        if not self.learning_rate > 0:
            problems.append(f"optim.learning_rate must be > 0, got {self.learning_rate}")
        for key in ("b1", "b2"):
            if not 0 <= getattr(self, key) < 1:
                problems.append(f"optim.{key} must be in [0, 1), got {getattr(self, key)}")
        if not 0 <= self.momentum < 1:
            problems.append(f"optim.momentum must be in [0, 1), got {self.momentum}")
        if not self.eps > 0:
            problems.append(f"optim.eps must be > 0, got {self.eps}")
        if self.weight_decay < 0:
            problems.append(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if self.max_grad_norm < 0:
            problems.append(f"optim.max_grad_norm must be >= 0 (0 = no clipping), got {self.max_grad_norm}")
        if not 0 <= self.min_lr_ratio <= 1:
            problems.append(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"optim.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.warmup_steps < 0:
            problems.append(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        elif total_steps is not None and self.warmup_ratio == 0 and self.warmup_steps > max(total_steps, 1):
            problems.append(
                f"optim.warmup_steps {self.warmup_steps} is not within the run's {total_steps} steps:"
                " the learning rate would never reach its peak"
            )
        if self.mu_dtype not in (None, "float32", "bfloat16"):
            problems.append(f"optim.mu_dtype must be null, float32 or bfloat16, got {self.mu_dtype!r}")
        if problems:
            raise ConfigError("; ".join(problems))


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


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def decay_mask(params, *, decay_embeddings: bool = True):
    """True for the parameters that get weight decay, from each Variable's ``decay_group`` metadata."""

    def decays(path, variable) -> bool:
        group = variable.get_metadata().get("decay_group") if _is_variable(variable) else None
        if group not in DECAY_GROUPS:
            name = jax.tree_util.keystr(path)
            groups = ", ".join(DECAY_GROUPS)
            raise ValueError(f"parameter {name} has no decay_group metadata ({groups}): set it where it is created")
        return group == "kernel" or (group == "embedding" and decay_embeddings)

    return jax.tree_util.tree_map_with_path(decays, params, is_leaf=_is_variable)


def make_optimizer(config: OptimConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``(tx, schedule)``: clipping, then the chosen optimizer with its masked weight decay."""
    schedule = learning_rate_schedule(config, total_steps)
    mask = lambda params: decay_mask(params, decay_embeddings=config.decay_embeddings)  # noqa: E731
    mu_dtype = None if config.mu_dtype is None else jnp.dtype(config.mu_dtype)
    if config.name == "adamw":
        optimizer = optax.adamw(
            schedule, b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=config.weight_decay, mask=mask,
            mu_dtype=mu_dtype,
        )  # fmt: skip
    elif config.name == "lion":
        optimizer = optax.lion(
            schedule, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay, mask=mask, mu_dtype=mu_dtype
        )
    elif config.name == "adafactor":
        optimizer = optax.adafactor(
            learning_rate=schedule, weight_decay_rate=config.weight_decay or None, weight_decay_mask=mask
        )
    elif config.name == "sgd":
        optimizer = optax.chain(
            optax.add_decayed_weights(config.weight_decay, mask),
            optax.sgd(schedule, momentum=config.momentum or None, accumulator_dtype=mu_dtype),
        )
    else:
        raise ConfigError(f"optim.name must be one of {', '.join(OPTIMIZERS)}, got {config.name!r}")
    parts = [optax.clip_by_global_norm(config.max_grad_norm)] if config.max_grad_norm > 0 else []
    return optax.chain(*parts, optimizer), schedule


def opt_state_shardings(tx: optax.GradientTransformation, params, param_shardings, mesh):
    """Shardings of ``tx.init(params)``: moments shaped like their parameter sharded like it, the rest
    (counters, Adafactor's factored row/column statistics) replicated.

    Stated explicitly because the moments are created by ``zeros_like``, which
    carries no data dependence for the partitioner to follow: left to itself it
    replicates them, and FSDP would hold the whole optimizer state on every device.
    """
    replicated = NamedSharding(mesh, PartitionSpec())

    def sharding_of(state_leaf, param, sharding):
        return sharding if tuple(state_leaf.shape) == tuple(param.shape) else replicated

    return optax.tree_map_params(
        tx,
        sharding_of,
        jax.eval_shape(tx.init, params),
        params,
        param_shardings,
        transform_non_params=lambda _: replicated,
        is_leaf=_is_variable,
    )


def init_opt_state(tx: optax.GradientTransformation, params, mesh):
    """``tx.init(params)`` created directly in its shards."""
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    shardings = opt_state_shardings(tx, params, param_shardings, mesh)
    return jax.jit(tx.init, out_shardings=shardings)(params)
