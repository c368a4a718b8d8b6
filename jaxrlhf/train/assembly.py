"""The assembly of a training run, as a value: ``assemble(config, task) -> Run``.

config -> distributed init -> mesh -> policy (+ frozen reference) -> optimizer
and train state (restored when a checkpoint exists) -> data iterators -> the
jitted step (``step_assembly``) -> evaluation and watchers. Nothing here trains:
``driver.train(run)`` does.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from jaxrlhf.config import ConfigError, dump_config
from jaxrlhf.data import load_tokenizer, make_iterator
from jaxrlhf.data.kto import check_balance, label_census
from jaxrlhf.data.pipeline import record_datasets
from jaxrlhf.models import (
    ModelConfig,
    default_chunk_size,
    init_model,
    load_hf,
    make_logprob_fn,
)
from jaxrlhf.models.lora_io import add_adapters, base_graphdef, load_peft_adapter
from jaxrlhf.parallel.distributed import initialize_distributed
from jaxrlhf.parallel.mesh import make_mesh
from jaxrlhf.train.checkpoint import Checkpointer
from jaxrlhf.train.diagnostics import (
    DpoStallWatcher,
    NonFiniteWatcher,
    ZeroGradientWatcher,
)
from jaxrlhf.train.evaluation import dpo_evaluator, kto_evaluator, sft_evaluator
from jaxrlhf.train.optim import make_optimizer
from jaxrlhf.train.prefetch import place_batch, rows_sharded
from jaxrlhf.train.reference import ReferenceTable
from jaxrlhf.train.router_loss import router_loss_of
from jaxrlhf.train.run_config import (
    DpoConfig,
    KtoConfig,
    ModelArgs,
    TrainConfig,
    changed_settings,
    check_batch_layout,
    checkpoint_meaning,
    eval_micro_batches,
    loss_spec,
    model_config_of,
    pairs_per_row,
    reference_is_base,
    rows_are_packed,
)
from jaxrlhf.train.step_assembly import (
    abstract_train_state,
    build_train_step,
    describe_trainable,
    new_train_state,
    split_policy,
)
from jaxrlhf.train.steps import TrainState


def load_model(
    args: ModelArgs,
    path: str,
    mesh,
    *,
    param_dtype: str,
    tokenizer: str = "",
    sequence_parallel: bool = False,
    seed: int = 0,
    adapter_weights: bool = True,
):
    """``(model, model_config)``: the preset with random weights, or the folder's weights, on ``mesh``; with
    ``args.lora``, the base (in ``args.dtype``) with adapters added (fresh from ``seed``, or the adapter folder's;
    ``adapter_weights=False``: fresh, for a caller that restores them from a checkpoint)."""
    config = model_config_of(args, path, param_dtype=param_dtype, tokenizer=tokenizer, sequence_parallel=sequence_parallel)
    base_config = dataclasses.replace(config, lora=None, weight_qtype="none", param_dtype=config.base_param_dtype)
    if args.preset:
        model = init_model(base_config, mesh=mesh)
    else:
        model, _ = load_hf(
            path,
            dtype=jnp.dtype(args.dtype),
            param_dtype=jnp.dtype(base_config.param_dtype),
            mesh=mesh,
            remat=args.remat,
            scan_layers=args.scan_layers,
            attention_impl=args.attention_impl,
            sequence_parallel=sequence_parallel,
        )
    if config.lora is None:
        return model, config
    model = add_adapters(model, config, seed=seed, mesh=mesh)
    if args.lora.adapter_path and adapter_weights:
        try:
            model = load_peft_adapter(model, args.lora.adapter_path)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return model, config


def estimated_steps(config: TrainConfig, task: str) -> int:
    """``max_steps``, or the optimizer steps of ``data.num_epochs`` passes, counted exactly.

    Drops and packing decide how many rows a pass yields, so the count is one pass
    over the encoded data (as TRL's up-front tokenization does); processes agree on
    the smallest count, since all must stop together. Set max_steps to skip it.
    """
    if config.max_steps > 0:
        return config.max_steps
    if config.data.num_epochs is None:
        raise ConfigError("data.num_epochs is null (repeat forever): set max_steps")
    if jax.process_index() == 0:
        print("counting the steps of one pass over the data (set max_steps to skip this)", file=sys.stderr)
    one_pass = dataclasses.replace(config.data, num_epochs=1)
    batches = sum(1 for _ in make_iterator(one_pass, task=task, split="train"))
    if jax.process_count() > 1:
        batches = int(np.min(multihost_utils.process_allgather(np.asarray(batches))))
    if batches == 0:
        raise ConfigError("the training data yields no full batch: fewer examples than data.batch_size after drops")
    return batches * config.data.num_epochs


def lm_head_chunk_size(config: TrainConfig, task: str, mesh, vocab_size: int) -> int:
    """``model.chunk_size``, or about 256 MiB of logits per chunk *per device*.

    Inside jit the arrays have their global shapes, so the automatic default would
    see the whole global batch and make chunks (and scan steps) far too small.
    """
    if config.model.chunk_size > 0:
        return config.model.chunk_size
    data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
    rows = max(config.data.batch_size // max(config.micro_batches, 1) // data_parallel, 1) * (1 if task == "sft" else 2)
    tensor = mesh.shape["tensor"]
    vocab = vocab_size // tensor if vocab_size % tensor == 0 else vocab_size
    return default_chunk_size(rows, vocab)


def prepare_run_dir(run_dir: pathlib.Path) -> None:
    """Create ``run_dir`` and prove it writable now, not with a traceback at the first checkpoint."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run_dir {run_dir} is a file, not a directory: choose another run_dir")
    probe = run_dir / ".jaxrlhf-write-check"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"run_dir {run_dir} cannot be written ({e.strerror or e}): choose another run_dir") from None


def check_vocabularies(config: TrainConfig, model_config: ModelConfig) -> None:
    """A tokenizer with more ids than the model has embeddings trains into NaN (or silently wrong rows)."""
    tokens = len(load_tokenizer(config.data.tokenizer))
    if tokens > model_config.vocab_size:
        raise ConfigError(
            f"the tokenizer {config.data.tokenizer} has {tokens} tokens but the model "
            f"{config.model.path or config.model.preset} has vocab_size {model_config.vocab_size}: ids from "
            f"{model_config.vocab_size} on have no embedding. Use the model's own tokenizer (data.tokenizer)"
        )


def _reporter(found: list[str]):
    """Print a diagnosis where the user sees it and keep it for summary.json."""

    def report(message: str) -> None:
        found.append(message)
        print(f"\njaxrlhf diagnosis: {message}\n", file=sys.stderr, flush=True)

    return report


@dataclasses.dataclass(frozen=True)
class Run:
    """Everything a training run is made of; ``driver.train`` runs it."""

    config: TrainConfig
    task: str
    mesh: jax.sharding.Mesh
    graphdef: nnx.GraphDef
    model_config: ModelConfig
    state: TrainState
    """Fresh, or restored from the newest checkpoint (then ``start_step`` > 0)."""
    frozen: object
    """A LoRA policy's frozen base (None in full fine-tuning): passed to every step, never checkpointed."""
    start_step: int
    total_steps: int
    step: Callable
    """Jitted ``(state, batch) -> (state, metrics)``; donates the state."""
    train_data: object
    """The Grain iterator of training batches (its position restored with the state)."""
    host_transform: Callable | None
    """Host-side columns added to every batch before it is placed (precomputed reference log-probs)."""
    evaluate: Callable | None
    """``state -> {metric: value}`` over the held-out split; None without one."""
    checkpointer: Checkpointer
    watchers: tuple
    diagnoses: list[str]
    """Diagnoses the watchers reported, for summary.json."""

    @property
    def run_dir(self) -> pathlib.Path:
        return pathlib.Path(self.config.run_dir)


def _reference(config: DpoConfig | KtoConfig, mesh):
    """``(ref_params, host_transform)`` of a DPO or KTO run's reference setting."""
    if reference_is_base(config):
        return None, None
    if config.reference_setting() == "model":
        reference, _ = load_model(
            dataclasses.replace(config.model, lora=None),
            config.reference_model_path(),
            mesh,
            param_dtype=config.reference_args.reference_dtype,
            tokenizer=config.data.tokenizer,
            sequence_parallel=config.mesh.sequence_parallel,
        )
        return nnx.split(reference)[1], None
    if config.reference_setting() == "precomputed":
        table = ReferenceTable(
            config.reference_folder(),
            model_path=config.reference_model_path(),
            tokenizer_path=config.data.tokenizer,
            data=config.data,
        )
        return None, table.host_transform(pairs_per_row(config, "dpo"))
    return None, None


def _restore(checkpointer: Checkpointer, step: int, config: TrainConfig, model_config: ModelConfig, tx, mesh):
    """``(graphdef, state, data_state)`` of checkpoint ``step``, restored onto an abstract state: neither
    the base weights nor a fresh optimizer state are ever materialised."""
    graphdef, abstract = abstract_train_state(model_config, tx, mesh)
    try:
        state, data_state = checkpointer.restore(step, abstract)
    except ValueError as e:
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise ConfigError(
            f"checkpoint step {step} of {config.run_dir} does not fit this run's train state ({first}): the model "
            "or optimizer settings changed in a way the saved state cannot follow; use a new run_dir"
        ) from None
    return graphdef, state, data_state


def assemble(config: TrainConfig, task: str) -> Run:
    """Build the run ``config`` describes for ``task`` (sft | dpo | kto), resuming from its newest checkpoint.

    On resume the checkpoint's own record of the run (its length, the settings that
    give it its meaning) is read first: a changed setting is an error naming each
    key (unless ``checkpoint.allow_config_change``), the data is not counted again,
    and the state is restored straight into its shards.
    """
    spec = loss_spec(config, task)
    config.optim.check()
    d = config.distributed
    initialize_distributed(d.coordinator_address, d.num_processes, d.process_id, force=d.force)
    run_dir = pathlib.Path(config.run_dir)
    if jax.process_index() == 0:
        prepare_run_dir(run_dir)
    mesh = make_mesh(config.mesh)
    check_batch_layout(config, dict(mesh.shape))
    if task == "kto":  # TRL's balance check, from the labels alone; one label missing is an error
        census = label_census(record_datasets(config.data, "train"))
        warning = check_balance(census, desirable_weight=spec.desirable_weight, undesirable_weight=spec.undesirable_weight)
        if warning and jax.process_index() == 0:
            print(f"jaxrlhf kto: warning: {warning}", file=sys.stderr, flush=True)
    checkpointer = Checkpointer(run_dir / "checkpoints", config.checkpoint)
    latest = checkpointer.latest_step
    if latest is not None and not config.checkpoint.resume:
        raise ConfigError(
            f"{run_dir} already has checkpoints (newest: step {latest}) and checkpoint.resume is false: "
            "use a new run_dir, or resume"
        )
    meaning = checkpoint_meaning(config, task)
    saved = checkpointer.saved_meta(latest) if latest is not None else None
    changes = changed_settings(saved["config"], meaning) if saved is not None else []
    if changes and not config.checkpoint.allow_config_change:
        raise ConfigError(
            f"{run_dir} holds a checkpoint (step {latest}) of a run with other settings: " + "; ".join(changes)
            + ". Resume with the original settings, use a new run_dir, or pass --checkpoint.allow_config_change true"
        )
    model_config = model_config_of(
        config.model, config.model.path, param_dtype=config.model.param_dtype, tokenizer=config.data.tokenizer,
        sequence_parallel=config.mesh.sequence_parallel,
    )  # fmt: skip
    check_vocabularies(config, model_config)
    frozen = None
    if latest is None or model_config.lora is not None:  # a LoRA checkpoint holds the adapters: the base loads
        model, model_config = load_model(
            config.model, config.model.path, mesh, param_dtype=config.model.param_dtype,
            tokenizer=config.data.tokenizer, sequence_parallel=config.mesh.sequence_parallel, seed=config.seed,
            adapter_weights=latest is None,
        )  # fmt: skip
        graphdef, params, frozen = split_policy(model)
        del model
        if jax.process_index() == 0:
            print(describe_trainable(params, frozen, model_config), file=sys.stderr)
    total_steps = saved["total_steps"] if saved is not None and not changes else estimated_steps(config, task)
    config.optim.check(total_steps)
    tx, schedule = make_optimizer(config.optim, total_steps)
    data_state, start_step = None, 0
    if latest is None:
        state = new_train_state(params, tx, mesh, seed=config.seed)
    else:
        graphdef, state, data_state = _restore(checkpointer, latest, config, model_config, tx, mesh)
        start_step = int(state.step)
    checkpointer.meta = {"total_steps": total_steps, "config": meaning}
    if jax.process_index() == 0:
        dump_config(config, run_dir / "config.yaml")
    train_data = make_iterator(config.data, task=task, split="train")
    if data_state is not None:
        train_data.set_state(data_state)
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    logprob_fn = make_logprob_fn(
        graphdef,
        chunk_size=lm_head_chunk_size(config, task, mesh, model_config.vocab_size),
        packed=rows_are_packed(config, task),
    )
    ref_params, host_transform = _reference(config, mesh) if task != "sft" else (None, None)
    base_reference = task != "sft" and reference_is_base(config)
    reference_logprob_fn = None
    if base_reference:  # a LoRA policy's base, adapters off, is the reference
        reference_logprob_fn = make_logprob_fn(
            base_graphdef(model_config),
            chunk_size=lm_head_chunk_size(config, task, mesh, model_config.vocab_size),
            packed=rows_are_packed(config, task),
        )
    jitted = build_train_step(
        task,
        logprob_fn=logprob_fn,
        tx=tx,
        schedule=schedule,
        state_shardings=state_shardings,
        micro_batches=config.micro_batches,
        spec=spec,
        reference_logprob_fn=reference_logprob_fn,
        reference_is_frozen=base_reference,
        dropout=model_config.uses_dropout,
        pairs_per_row=pairs_per_row(config, task),
        aux_loss=router_loss_of(model_config, config.model, micro_batches=config.micro_batches),
    )
    sharding_for = rows_sharded(mesh)

    def eval_batches():
        """Every eval batch as global device arrays (DPO batches keep their ``pair_mask``)."""
        for batch in make_iterator(config.data, task=task, split="eval"):
            if host_transform is not None:
                batch = host_transform(batch, pair_mask=batch.get("pair_mask"))
            yield place_batch(batch, sharding_for)

    evaluate = None
    if config.has_eval():
        if task == "sft":
            evaluate = sft_evaluator(
                logprob_fn, eval_batches, micro_batches=eval_micro_batches(config), frozen=frozen
            )
        else:
            evaluate = (dpo_evaluator if task == "dpo" else kto_evaluator)(
                logprob_fn,
                eval_batches,
                ref_params=frozen if base_reference else ref_params,
                ref_logprob_fn=reference_logprob_fn,
                spec=spec,
                micro_batches=eval_micro_batches(config),
                frozen=frozen,
            )
    diagnoses: list[str] = []
    watchers = [NonFiniteWatcher(lambda: checkpointer.latest_step)]
    if config.diagnostics.zero_grad_patience > 0:
        watchers.append(ZeroGradientWatcher(patience=config.diagnostics.zero_grad_patience, report=_reporter(diagnoses)))
    if task == "dpo" and config.diagnostics.stall_patience > 0:
        watchers.append(
            DpoStallWatcher(
                patience=config.diagnostics.stall_patience,
                tolerance=config.diagnostics.stall_tolerance,
                loss_types=spec.loss_type,
                beta=spec.beta,
                report=_reporter(diagnoses),
            )
        )
    return Run(
        config=config,
        task=task,
        mesh=mesh,
        graphdef=graphdef,
        model_config=model_config,
        state=state,
        start_step=start_step,
        total_steps=total_steps,
        frozen=frozen,
        step=lambda state, batch: jitted(state, batch, ref_params, frozen),
        train_data=train_data,
        host_transform=host_transform,
        evaluate=evaluate,
        checkpointer=checkpointer,
        watchers=tuple(watchers),
        diagnoses=diagnoses,
    )
