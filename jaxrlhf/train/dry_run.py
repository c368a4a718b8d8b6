"""`--dry_run true`: will this config fit? Compile the real step on abstract arrays and report bytes per device.

Nothing is allocated: parameters are ``eval_shape``d on the config's mesh, the
optimizer state's shardings are the trainer's, and the jitted SFT or DPO step
(``build_train_step``, the one training runs, donation included) is lowered and
compiled on ``ShapeDtypeStruct`` inputs. Where the hardware is absent (a laptop
planning a pod run), the mesh is built from fake CPU devices (``dry_run_devices``).
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from rich.console import Console
from rich.table import Table

from jaxrlhf.models import make_logprob_fn
from jaxrlhf.parallel.mesh import make_mesh
from jaxrlhf.train.assembly import lm_head_chunk_size
from jaxrlhf.train.optim import make_optimizer
from jaxrlhf.train.prefetch import batch_sharding
from jaxrlhf.train.run_config import TrainConfig, model_config_of, rows_are_packed
from jaxrlhf.train.step_assembly import (
    abstract_params,
    abstract_train_state,
    build_train_step,
)


def use_fake_devices(count: int) -> None:
    """Plan on ``count`` fake CPU devices; effective only before JAX first touches a backend."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform")]
    os.environ["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={count}"])
    os.environ["JAX_PLATFORMS"] = "cpu"


def _per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded abstract arrays (the largest shard of each leaf)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
    return total


def dry_run(config: TrainConfig, task: str) -> dict:
    """Compile the step of ``config`` and return (and print) the per-device memory plan in bytes."""
    if config.dry_run_devices > 0:
        use_fake_devices(config.dry_run_devices)
    if config.model.attention_impl == "cudnn" and jax.devices()[0].platform == "cpu":
        # cuDNN kernels do not compile for CPU; XLA's attention holds the [T, T] scores, so this overestimates.
        print("dry run on CPU devices: attention_impl cudnn -> xla (temporaries are an upper bound)")
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, attention_impl="xla"))
    spec = config.dpo.spec(config.micro_batches) if task == "dpo" else None
    mesh = make_mesh(config.mesh)
    param_dtype = config.model.param_dtype
    model_config = model_config_of(config.model, config.model.path, param_dtype=param_dtype, tokenizer=config.data.tokenizer)
    tx, schedule = make_optimizer(config.optim, config.max_steps or 1000)
    graphdef, state = abstract_train_state(model_config, tx, mesh)
    params, opt_state = state.params, state.opt_state
    shape = (config.data.batch_size, config.data.max_length) if task == "sft" else (
        config.data.batch_size, 2, config.data.max_length)  # fmt: skip
    batch = {
        key: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sharding(mesh, len(shape)))
        for key in ("tokens", "loss_mask", "segment_ids", "positions")
    }
    chunk_size = lm_head_chunk_size(config, task, mesh, model_config.vocab_size)
    logprob_fn = make_logprob_fn(graphdef, chunk_size=chunk_size, packed=rows_are_packed(config, task))
    ref_params, reference_bytes = None, 0
    if task == "dpo" and config.dpo.reference == "model":
        ref_config = model_config_of(
            config.model, config.reference_model_path(),
            param_dtype=config.dpo.reference_dtype, tokenizer=config.data.tokenizer,
        )  # fmt: skip
        _, ref_params = abstract_params(ref_config, mesh)
        reference_bytes = _per_device_bytes(ref_params)
    elif task == "dpo" and config.dpo.reference == "precomputed":
        batch["ref_logps"] = jax.ShapeDtypeStruct(shape[:2], jnp.float32, sharding=batch_sharding(mesh, 2))
    jitted = build_train_step(
        task,
        logprob_fn=logprob_fn,
        tx=tx,
        schedule=schedule,
        state_shardings=jax.tree.map(lambda x: x.sharding, state),
        micro_batches=config.micro_batches,
        spec=spec,
    )
    with jax.set_mesh(mesh):
        compiled = jitted.lower(state, batch, ref_params).compile()
    memory = compiled.memory_analysis()
    report = {
        "devices": mesh.devices.size,
        "mesh": dict(mesh.shape),
        "parameters": _per_device_bytes(params),
        "optimizer": _per_device_bytes(opt_state),
        "reference": reference_bytes,
        "batch": _per_device_bytes(batch),
        "temporaries": int(memory.temp_size_in_bytes),
    }
    report["total"] = sum(report[k] for k in ("parameters", "optimizer", "reference", "batch", "temporaries"))
    report["parameter_count"] = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    _print(report, config, task)
    return report


def _print(report: dict, config: TrainConfig, task: str) -> None:
    gib = 2**30
    console = Console()
    console.print(
        f"dry run: {task} of {config.model.preset or config.model.path} on mesh {report['mesh']} "
        f"({jax.devices()[0].platform}), global batch {config.data.batch_size} x {config.data.max_length}, "
        f"{config.micro_batches} micro-batch(es), {report['parameter_count'] / 1e9:.3f} B parameters"
    )
    table = Table(title="memory per device", title_justify="left")
    table.add_column("per device")
    table.add_column("GiB", justify="right")
    for key in ("parameters", "optimizer", "reference", "batch", "temporaries", "total"):
        table.add_row(key, f"{report[key] / gib:.3f}")
    console.print(table)
    console.print("temporaries: activations and workspace of the compiled step, as XLA planned them")
