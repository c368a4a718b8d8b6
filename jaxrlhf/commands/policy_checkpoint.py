"""The policy saved in a run directory's checkpoint, for `jaxrlhf export` and `jaxrlhf generate`."""

from __future__ import annotations

import dataclasses
import pathlib

from flax import nnx

from jaxrlhf.config import ConfigError
from jaxrlhf.parallel.mesh import MeshConfig, make_mesh
from jaxrlhf.train.checkpoint import Checkpointer
from jaxrlhf.train.optim import make_optimizer
from jaxrlhf.train.run_config import load_run_config, model_config_of
from jaxrlhf.models import merge_lora
from jaxrlhf.train.assembly import load_model
from jaxrlhf.train.step_assembly import abstract_train_state, split_policy


def restore_policy(run_dir: str | pathlib.Path, step: int = 0, *, dtype: str | None = None, merged: bool = True):
    """The policy saved in a run's checkpoint: ``(model, model_config, train_config, step)``.

    ``step`` 0 means the newest. Parameters are restored straight onto all local
    devices (FSDP over them, whatever mesh the run trained on); neither the base
    weights nor the optimizer moments are materialised first. ``dtype`` overrides
    the compute dtype. A LoRA run's checkpoint holds its adapters: the base is
    loaded as the run loaded it, and the model comes back merged (a plain decoder),
    or with ``merged=False`` as the LoRA model.
    """
    run_dir = pathlib.Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise ConfigError(f"{run_dir / 'config.yaml'} not found: --run_dir must be a directory written by jaxrlhf sft/dpo/kto")
    train_config = load_run_config(run_dir / "config.yaml")
    mesh = make_mesh(MeshConfig())
    model_args = dataclasses.replace(train_config.model, dtype=dtype or train_config.model.dtype)
    model_config = model_config_of(
        model_args, model_args.path, param_dtype=model_args.param_dtype, tokenizer=train_config.data.tokenizer
    )
    tx, _ = make_optimizer(train_config.optim, max(train_config.max_steps, 1))
    graphdef, abstract_state = abstract_train_state(model_config, tx, mesh)
    checkpointer = Checkpointer(run_dir / "checkpoints", dataclasses.replace(train_config.checkpoint, async_save=False))
    try:
        step = step or checkpointer.latest_step
        if step is None:
            raise ConfigError(f"no checkpoint in {run_dir / 'checkpoints'}")
        state, _ = checkpointer.restore(step, abstract_state, with_data=False)
    finally:
        checkpointer.close()
    if model_config.lora is None:
        return nnx.merge(graphdef, state.params), model_config, train_config, step
    base, _ = load_model(
        model_args, model_args.path, mesh, param_dtype=model_args.param_dtype,
        tokenizer=train_config.data.tokenizer, seed=train_config.seed, adapter_weights=False,
    )  # fmt: skip
    model = nnx.merge(graphdef, state.params, split_policy(base)[2])
    if merged:
        model, model_config = merge_lora(model, model_config)
    return model, model_config, train_config, step
